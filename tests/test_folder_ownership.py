"""No run writes into another run's folder, however Hydra names it: run dir, sweep dir, job subdir, Hydra's
output subdir, or the folder of a resumed run (newllm.runtime.rundirs). Each case hashes every file of the
other runs before and after: a refusal is one line, exit 2, and not one byte changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from newllm.errors import ConfigError
from newllm.runtime.rundirs import check_inside, foreign_owner
from tests.conftest import TINY, read_metrics, run_cli
from tests.test_resume import LIFECYCLE, killed_run


def digests(root: Path) -> dict[str, str]:
    """Every file below root (relative path -> sha256 of its bytes), and every folder (-> 'dir')."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished run and a run killed in Phase 1 (resumable), the folders the cases below must not touch."""
    root = tmp_path_factory.mktemp("owned")
    common = [*LIFECYCLE, f"paths.output_root={root / 'outputs'}"]
    run_cli([*common, f"hydra.run.dir={root / 'finished'}"], cwd=root)
    killed_run([*common, f"hydra.run.dir={root / 'killed'}"], root, phase=1, step=5)
    return {"root": root, "finished": root / "finished", "killed": root / "killed"}


# (id, arguments: {finished}, {killed} and {tmp} filled in)
CASES = [
    ("run_dir_inside_a_run", ["hydra.run.dir={finished}/checkpoints/nested"]),
    ("sweep_dir_inside_a_run", ["-m", "hydra.sweep.dir={finished}/sweep", "seed=1"]),
    ("job_subdir_escaping_to_a_run", ["-m", "hydra.sweep.dir={tmp}/sweep", "hydra.sweep.subdir=../../{name}",
                                      "seed=1"]),
    ("job_subdir_absolute", ["-m", "hydra.sweep.dir={tmp}/sweep", "hydra.sweep.subdir={finished}", "seed=1"]),
    ("hydra_files_escaping_to_a_run", ["hydra.run.dir={tmp}/new", "hydra.output_subdir=../{name}/.hydra"]),
    ("resume_into_another_run", ["resume={killed}", "hydra.run.dir={finished}"]),
    ("study_folder_inside_a_run", ["-m", "hydra/sweeper=newllm_optuna", "hydra.sweeper.storage=null",
                                   "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweep.dir={finished}/study"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("args", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_a_folder_of_another_run_is_never_written(runs, tmp_path, args):
    before = {name: digests(runs[name]) for name in ("finished", "killed")}
    tmp = runs["root"] / tmp_path.name  # beside the runs, so that '../../finished' reaches one
    names = {"finished": runs["finished"], "killed": runs["killed"], "tmp": tmp, "name": "finished"}
    args = [a.format(**names) for a in args]
    settings = [] if any(a.startswith("resume=") for a in args) else [*TINY, f"paths.output_root={tmp / 'out'}"]
    proc = run_cli([*settings, *args], cwd=runs["root"], check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert {name: digests(runs[name]) for name in ("finished", "killed")} == before
    assert not (tmp / "sweep").exists() and not (tmp / "new").exists()


@pytest.mark.slow
def test_jobs_of_one_sweep_never_share_a_folder(tmp_path):
    """hydra.sweep.subdir=same made job 1 overwrite job 0's metrics.json and checkpoint.pt (exit 0)."""
    sweep = tmp_path / "x"
    args = ["-m", *TINY, f"paths.output_root={tmp_path / 'out'}", "seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = run_cli([*args, "hydra.sweep.subdir=same"], cwd=tmp_path, check=False)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert line.startswith("error: hydra.sweep.subdir='same' is not allowed: expected a name holding "
                           "${hydra.job.num}")
    assert not sweep.exists()
    # a name unique per job is fine, whatever else it holds
    run_cli([*args, "hydra.sweep.subdir=${hydra.job.num}_seed${seed}"], cwd=tmp_path)
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [j.name for j in jobs] == ["0_seed1", "1_seed2"] and [read_metrics(j)["seed"] for j in jobs] == [1, 2]
    assert [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text())[-1] for j in jobs] == ["seed=1", "seed=2"]


# ----------------------------------------------------------------------------- the rule itself (fast)
def test_foreign_owner_finds_the_run_or_sweep_a_folder_lies_in(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "multirun.yaml").write_text("{}")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / ".newllm-owner.json").write_text("{}")
    assert foreign_owner(tmp_path / "run" / "checkpoints" / "nested") == tmp_path / "run"
    assert foreign_owner(tmp_path / "grid" / "0" / "deeper") == tmp_path / "grid"
    assert foreign_owner(tmp_path / "study" / "new") == tmp_path / "study"
    assert foreign_owner(tmp_path / "run") is None  # the folder itself: claim() refuses it unless empty
    assert foreign_owner(tmp_path / "elsewhere" / "new") is None


@pytest.mark.parametrize(("written", "unique", "allowed"), [
    ("${hydra.job.num}", True, True), ("${hydra.job.id}", True, True),
    ("${hydra.job.num}_${hydra.job.override_dirname}", True, True), ("a/${hydra.job.num}", True, True),
    ("same", True, False), ("${hydra.job.override_dirname}", True, False),
    ("../${hydra.job.num}", True, False), ("/abs/${hydra.job.num}", True, False),
    (".hydra", False, True), (".hydra/resume", False, True), ("../other/.hydra", False, False), (None, False, True),
])
def test_check_inside_allows_only_relative_names_inside_and_unique_per_job(written, unique, allowed):
    if allowed:
        check_inside("key", written, unique)
    else:
        with pytest.raises(ConfigError, match=r"^key="):
            check_inside("key", written, unique)
