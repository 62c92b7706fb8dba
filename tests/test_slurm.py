"""An Optuna study through sweeps/on_slurm.yaml on a real SLURM cluster, storage PostgreSQL (slow tier).

Needs a cluster with accounting whose default partition runs jobs on this machine's filesystem:
tests/cluster/slurm-up.sh starts a one-node one (.ci/run does); without `sinfo` or with no node up the
tests skip. Jobs are cancelled (scancel) and killed (kill -9) while they run: their trials must fail,
be replaced, and the sweep end on its own with every result kept.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import FAST, cli_env, read_metrics

pytestmark = pytest.mark.slow

SWEEP_TIMEOUT_S = 600  # the sweep must end by itself well within this (it takes ~2 min on 2 busy cores)
# tiny trials: 2 CPU-minutes each at most; 1 GB is far more than they use
SMALL = [*(o for o in FAST if o != "progress=false"), "progress=true", "save_checkpoint=false",
         "hydra.launcher.timeout_min=5"]  # progress on, as a user's run has it: the job logs must show no bar


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def cluster() -> str:
    """The partition jobs go to, or a skip saying why there is no cluster."""
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM here (sinfo not found): tests/cluster/slurm-up.sh starts a one-node cluster")
    try:
        states = _slurm("sinfo", "-h", "-o", "%T").split()
        accounting = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=60)
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"SLURM cluster not reachable ({err}): run tests/cluster/slurm-up.sh")
    if not {"idle", "mixed", "allocated"} & set(states):
        pytest.skip(f"no SLURM node up (sinfo: {states}): run tests/cluster/slurm-up.sh")
    if accounting.returncode != 0:
        pytest.skip("SLURM accounting (slurmdbd) is off: a dead job would be polled forever; run "
                    "tests/cluster/slurm-up.sh")
    return _slurm("sinfo", "-h", "-o", "%P").split()[0].rstrip("*")


def _jobs(name: str) -> list[tuple[str, str, str]]:
    """(job id as array_task, raw job id, state) of every queued or running job named `name`."""
    rows = _slurm("squeue", "-h", "-n", name, "-o", "%i %A %T").split("\n")
    return [tuple(r.split()) for r in rows if r.strip()]


def _job_process(raw_id: str) -> int | None:
    """The pid of the job's task (srun step 0, the python that runs the trial), once it has started."""
    rows = [r.split() for r in _slurm("scontrol", "listpids", raw_id).splitlines()[1:]]
    return next((int(r[0]) for r in rows if r[2:4] == ["0", "0"]), None)


def _kill_while_running(name: str, sweep: subprocess.Popen) -> dict[str, str]:
    """In the sweep's first array, cancel task 0 with scancel and kill task 1's process with SIGKILL, each once
    it runs; returns {job id: how}."""
    killed: dict[str, str] = {}
    first = None
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while len(killed) < 2 and sweep.poll() is None and time.monotonic() < deadline:
        for job_id, raw_id, state in _jobs(name):
            array, task = job_id.split("_", 1)  # a pending rest of an array shows as 17_[1-2]
            first = first or array
            if array != first or state != "RUNNING" or job_id in killed:
                continue
            if task == "0":
                _slurm("scancel", job_id)
                killed[job_id] = "scancel"
            elif task == "1" and (pid := _job_process(raw_id)) is not None:
                os.kill(pid, signal.SIGKILL)
                killed[job_id] = "kill -9"
        time.sleep(0.5)
    return killed


def _accounting(name: str) -> dict[str, str]:
    rows = _slurm("sacct", "-n", "-X", "-P", "--name", name, "-o", "JobID,State").splitlines()
    return dict(r.split("|") for r in rows)


def test_optuna_study_on_slurm_replaces_cancelled_and_killed_jobs(tmp_path, cluster, postgres):  # skips before PG
    """'+sweep=[optuna_ppl_quick,on_slurm]' with PostgreSQL storage, 3 trials in batches of 3 on a 2-CPU node:
    of the first batch one job is scancel'd and one kill -9'd while running; both trials FAIL with the
    reason, the third job of that array completes (its result kept), and two more trials are run to reach
    n_trials. Every job is in sacct with its fate, the sweep exits 0 on its own, no job is left behind."""
    name = f"newllm-test-{secrets.token_hex(4)}"  # the jobs of this sweep, in squeue and sacct
    sweep_dir, study_name = tmp_path / "sweep", "slurm"
    args = ["-m", "+sweep=[optuna_ppl_quick,on_slurm]", *SMALL, f"paths.output_root={tmp_path / 'outputs'}",
            f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.storage={postgres.url()}",
            f"hydra.sweeper.study_name={study_name}", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=3",
            "hydra.sweeper.max_failure_rate=1.0", f"hydra.launcher.name={name}", f"hydra.launcher.partition={cluster}"]
    started = time.monotonic()
    sweep = subprocess.Popen([sys.executable, "-m", "newllm.run", *args], cwd=tmp_path,
                             env={**cli_env(), "PGPASSWORD": postgres.password},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_while_running(name, sweep)
        out, err = sweep.communicate(timeout=SWEEP_TIMEOUT_S - (time.monotonic() - started))
    finally:
        if sweep.poll() is None:  # a hang: stop the sweep and its jobs before failing
            sweep.kill()
            subprocess.run(["scancel", "-n", name], capture_output=True)
    assert sweep.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name=study_name, storage=postgres.url(postgres.password))
    trials = {t.number: t for t in study.trials}
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    array = next(iter(killed)).split("_")[0]
    assert killed == {f"{array}_0": "scancel", f"{array}_1": "kill -9"}, killed  # trials 0 and 1
    assert trials[0].user_attrs["fail_reason"].startswith(f"JobDied: SLURM job {array}_0 ended CANCELLED")
    assert trials[1].user_attrs["fail_reason"].startswith(f"JobDied: SLURM job {array}_1 ended FAILED")
    for t in (trials[0], trials[1]):  # the dead job's folder, where its trial said it would be
        assert Path(t.user_attrs["run_dir"]) == sweep_dir / f"trial_{t.number}"

    accounting = _accounting(name)
    assert accounting[f"{array}_0"].startswith("CANCELLED") and accounting[f"{array}_1"] == "FAILED"
    assert accounting[f"{array}_2"] == "COMPLETED"  # the killed jobs' sibling (trial 2) ran on
    assert list(accounting.values()).count("COMPLETED") == 3 and len(accounting) == 5, accounting
    assert _jobs(name) == []  # nothing left queued or running

    for t in (trials[2], trials[3], trials[4]):  # nothing lost: each result in its folder and in the study
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == sweep_dir / f"trial_{t.number}"
        assert read_metrics(run_dir)["phase2/val_ppl"] == pytest.approx(t.value)
        assert t.intermediate_values  # reported from inside the SLURM job, to PostgreSQL
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["n_trials"]["fail"] == 2
    assert results["n_trials"]["complete"] == 3 and results["best_value"] == min(t.value for t in trials.values()
                                                                                  if t.value is not None)
    logs = [*sweep_dir.glob(".submitit/*/*_log.*"), *sweep_dir.glob("trial_*/*.log")]
    assert len(logs) >= 10 and not [p for p in logs if "\r" in p.read_text()]  # readable: no bar redraws
    assert "Trial 0 failed: JobDied" in out and "Trial 1 failed: JobDied" in out  # the sweep's log
