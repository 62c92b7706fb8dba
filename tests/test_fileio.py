"""atomic_write: all or nothing, and files get the mode an ordinary open(..., "w") gives them."""

from __future__ import annotations

import ast
import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from newllm.errors import OutputError
from newllm.runtime import fileio
from newllm.runtime.fileio import atomic_write, save_checkpoint, save_json
from tests.conftest import REPO


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_files_get_the_mode_an_ordinary_write_gives(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what any other tool would create
        f.write("x")
    save_json(tmp_path / "metrics.json", {"a": 1.0})
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"w": torch.zeros(2)})
    atomic_write(tmp_path / "table.csv", lambda tmp: Path(tmp).write_text("a,b\n"))
    expected = 0o666 & ~mask
    assert mode(tmp_path / "plain.txt") == expected
    for name in ("metrics.json", "checkpoints/last.pt", "table.csv"):
        assert mode(tmp_path / name) == expected, (name, oct(mode(tmp_path / name)))


def test_a_failed_write_leaves_neither_file_nor_temp_file(tmp_path):
    atomic_write(tmp_path / "keep.txt", lambda tmp: Path(tmp).write_text("old"))

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "keep.txt", fail)
    assert (tmp_path / "keep.txt").read_text() == "old" and sorted(tmp_path.iterdir()) == [tmp_path / "keep.txt"]


def test_a_write_the_file_system_refuses_is_one_output_error_naming_the_file(tmp_path):
    """torch.save turns a failed write into RuntimeError('unexpected pos 576 vs 534'); the checkpoint writer keeps
    the file system's own error. /dev/full refuses every write with ENOSPC, as a full disk does."""
    with pytest.raises(OSError) as err:
        fileio._torch_save({"w": torch.zeros(100_000)}, "/dev/full")
    assert err.value.errno == errno.ENOSPC
    full = tmp_path / "ckpt.pt"

    def onto_a_full_disk(tmp: str) -> None:
        fileio._torch_save({"w": torch.zeros(100_000)}, "/dev/full")

    with pytest.raises(OutputError) as refused:
        atomic_write(full, onto_a_full_disk)
    assert str(refused.value) == f"cannot write {full}: No space left on device (ENOSPC)"
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp file


def test_stale_temp_files_are_exactly_those_atomic_write_names(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.pt.1a2b3c4d.tmp", tmp_path / ".metrics.json.00ff00ff.tmp"]
    kept = [tmp_path / "checkpoints" / "last.pt", tmp_path / "notes.tmp", tmp_path / ".x.tmp",
            tmp_path / ".last.pt.nothex00.tmp"]
    for p in stale + kept:
        p.write_text("x")
    assert sorted(fileio.remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


# What writes a file. Each call must sit inside the function handed to atomic_write (or in fileio.py itself).
WRITES = {"save", "savefig", "to_csv", "to_parquet", "write_text", "write_bytes", "dump", "to_json"}
# newllm's own: checkpoint.save and RunLifecycle.save call atomic_write; a loop state's save() builds a dict.
NOT_WRITES = {"ckpt.save", "self.save", "life.save", "loop.state.save"}


def _name(node: ast.AST) -> str:
    return ast.unparse(node)


def _writes_outside_the_helper(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and _name(call.func).split(".")[-1] == "atomic_write":
            inside |= {id(n) for arg in call.args[1:] for n in ast.walk(arg)}
    bad = []
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call) or id(call) in inside:
            continue
        func = _name(call.func)
        is_open_for_writing = func == "open" and any(
            isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wax")
            for a in [*call.args[1:2], *(k.value for k in call.keywords if k.arg == "mode")])
        if is_open_for_writing or (isinstance(call.func, ast.Attribute) and call.func.attr in WRITES
                                   and func not in NOT_WRITES):
            bad.append(f"{path.relative_to(REPO)}:{call.lineno}: {func}")
    return bad


def test_every_write_in_the_package_goes_through_atomic_write():
    """tokenizer.json and phase1_val_contexts.pt were written in place: a kill mid-write left half a file."""
    sources = [p for folder in ("newllm", "hydra_plugins") for p in (REPO / folder).rglob("*.py")
               if p.name != "fileio.py"]
    assert len(sources) > 40
    assert [w for p in sources for w in _writes_outside_the_helper(p)] == []
