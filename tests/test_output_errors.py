"""Writes the file system refuses, and writes a kill cut short, through the real CLI: a full disk or a
read-only output folder is one line naming the file (exit 2) and leaves nothing half-written; a temp file
left by a run killed mid-write is removed when the run resumes.

The full disk and the read-only folder are real: a 256 KiB tmpfs and a read-only bind mount, made in a user
and mount namespace of their own (`unshare -Urm`, no privileges needed where user namespaces are enabled).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from newllm.runtime import checkpoint as ckpt
from tests.conftest import TINY, cli_env, read_metrics, run_cli
from tests.test_resume import LIFECYCLE

pytestmark = pytest.mark.slow


def namespaces_work() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-Urm", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not namespaces_work(), reason="unshare -Urm (user namespaces) not available")


def in_namespace(setup: str, after: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`setup`, then `python -m newllm.run args`, then `after` (which sees the mounts: they end with the
    namespace), in a user and mount namespace of their own; exit status of the run."""
    script = f'{setup} && {{ "$0" -m newllm.run "$@"; rc=$?; {after}; exit $rc; }}'
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script, sys.executable, *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)


@needs_namespaces
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """torch.save on a full disk ended in a RuntimeError traceback ('unexpected pos ... vs ...')."""
    disk = tmp_path / "disk"
    disk.mkdir()
    listing = tmp_path / "listing.txt"
    proc = in_namespace(f"mount -t tmpfs -o size=256k tmpfs {disk}", f"find {disk} > {listing}",
                        [*TINY, f"hydra.run.dir={disk / 'run'}", f"paths.output_root={tmp_path / 'outputs'}"], tmp_path)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert line.startswith(f"error: cannot write {disk / 'run'}/") and line.endswith(
        ": No space left on device (ENOSPC)"), line
    found = listing.read_text().split()
    assert [f for f in found if f.endswith(".tmp")] == []  # the failed write left no temp file
    assert str(disk / "run" / "tokenizer.json") in found  # what fitted was written whole


@needs_namespaces
def test_a_read_only_output_root_is_one_line(tmp_path):
    """paths.output_root on a read-only file system: an OSError traceback when the tokenizer cache was written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = in_namespace(f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}", "true",
                        [*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"paths.output_root={ro}"], tmp_path)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert line.startswith(f"error: cannot write {ro}/cache/") and line.endswith(": Read-only file system (EROFS)")


# The real CLI, killed by SIGKILL while checkpoints/last.pt is written the second time: its temp file is complete,
# the rename into place has not happened.
KILL_MID_WRITE = """
import os, runpy, signal, sys
replace, seen = os.replace, []
def replace_then_die(src, dst, *args, **kwargs):
    if str(dst).endswith("checkpoints/last.pt"):
        seen.append(dst)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = replace_then_die
sys.argv = ["newllm.run", *sys.argv[1:]]
runpy.run_module("newllm.run", run_name="__main__")
"""


def test_a_temp_file_left_by_a_kill_mid_write_is_removed_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *LIFECYCLE, f"hydra.run.dir={run_dir}",
                           f"paths.output_root={tmp_path / 'outputs'}"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    (stale,) = (run_dir / "checkpoints").glob(".last.pt.*.tmp")
    assert ckpt.load(run_dir / ckpt.RESUME_FILE, "resume")["loop"]["iteration"] == 2  # the first one is in place
    run_cli([f"resume={run_dir}"], cwd=tmp_path)
    assert not stale.exists() and list(run_dir.rglob("*.tmp")) == []
    assert read_metrics(run_dir)["phase1/iterations"] == 8
