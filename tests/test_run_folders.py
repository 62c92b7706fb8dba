"""Run folders: one per run whatever the timing; a taken folder is de-duplicated or refused, never shared."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, cli_env, read_metrics, run_cli, run_in_process, tree

pytestmark = pytest.mark.slow
TIMESTAMPED = "hydra.run.dir=${paths.output_root}/runs/${now:%Y}"  # the default's kind of pattern, coarser


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "newllm.run", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def seed_of(run_dir: Path) -> int:
    return read_metrics(run_dir)["seed"]


def test_concurrent_runs_never_share_a_folder(tmp_path):
    """Two runs whose timestamped folder name is the same get one folder each; two runs given the
    same explicit folder: one runs, the other is refused with one line naming it."""
    common = [*TINY, f"paths.output_root={tmp_path / 'outputs'}"]
    fixed = tmp_path / "fixed"
    procs = [start([*common, TIMESTAMPED, "seed=1"], tmp_path), start([*common, TIMESTAMPED, "seed=2"], tmp_path),
             start([*common, f"hydra.run.dir={fixed}", "seed=3"], tmp_path),
             start([*common, f"hydra.run.dir={fixed}", "seed=4"], tmp_path)]
    results = [finish(p) for p in procs]
    assert [rc for rc, _ in results[:2]] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    year = str(datetime.now().year)
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert [r.name for r in runs] == [year, f"{year}_1"]
    assert sorted(seed_of(r) for r in runs) == [1, 2]
    for r in runs:  # each folder holds exactly one run's own files
        assert f"seed={seed_of(r)}" in yaml.safe_load((r / ".hydra" / "overrides.yaml").read_text())

    rcs = sorted(rc for rc, _ in results[2:])
    assert rcs == [0, 2], results[2][1][-2000:] + results[3][1][-2000:]
    winner, loser = (3, 4) if results[2][0] == 0 else (4, 3)
    (line,) = results[loser - 1][1].strip().splitlines()
    assert line.startswith(f"error: hydra.run.dir={str(fixed)!r} already holds another run or other files")
    assert seed_of(fixed) == winner


def occupy(folders: list[Path]) -> None:
    for f in folders:
        (f / ".hydra").mkdir(parents=True)
        (f / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (f / "metrics.json").write_text("{}")


def next_seconds(base: Path, n: int, sep: str = "/") -> list[Path]:
    """The default pattern's folder for each of the next n seconds (runs/<date>/<time>)."""
    now = datetime.now()
    return [base / (now + timedelta(seconds=s)).strftime(f"%Y-%m-%d{sep}%H-%M-%S") for s in range(-1, n)]


def test_default_run_folder_that_is_taken_is_deduplicated(tmp_path):
    out = tmp_path / "outputs"
    taken = next_seconds(out / "runs", 600)  # every folder the default pattern can name in the next 10 min
    occupy(taken)
    before = [tree(t) for t in taken]
    run_in_process([*TINY, f"paths.output_root={out}", "seed=5"], cwd=tmp_path)
    (new,) = [p.parent for p in (out / "runs").glob("*/*/metrics.json") if p.parent not in taken]
    assert new.parent / new.name.removesuffix("_1") in taken and new.name.endswith("_1")
    assert seed_of(new) == 5
    assert [tree(t) for t in taken] == before  # the other runs' folders are untouched


def test_default_sweep_folder_that_is_taken_is_deduplicated(tmp_path):
    out = tmp_path / "outputs"
    taken = next_seconds(out / "multirun", 600)
    occupy([t / "0" for t in taken])
    before = [tree(t) for t in taken]
    run_cli(["-m", *TINY, f"paths.output_root={out}", "seed=6"], cwd=tmp_path)
    (job,) = [p.parent for p in (out / "multirun").glob("*/*/0/metrics.json") if p.parent.parent not in taken]
    assert job.parent.name.endswith("_1") and job.parent.parent / job.parent.name.removesuffix("_1") in taken
    assert seed_of(job) == 6
    assert [tree(t) for t in taken] == before


def test_explicit_sweep_folder_that_holds_runs_is_refused(tmp_path):
    sweep = tmp_path / "grid"
    occupy([sweep / "0"])
    before = tree(tmp_path)
    proc = run_cli(["-m", *TINY, f"paths.output_root={tmp_path / 'outputs'}", f"hydra.sweep.dir={sweep}", "seed=1,2"],
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: hydra.sweep.dir={str(sweep)!r} already holds another run or other files")
    assert tree(tmp_path) == before
