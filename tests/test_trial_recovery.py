"""A finished trial is never lost: a sweep killed after a job wrote its complete metrics.json and before the
sweeper recorded the trial recovers it, re-run with the same command, from the job folder (COMPLETE, the
same params and values), instead of marking it FAIL 'abandoned' and running a replacement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from tests.conftest import TINY, cli_env, run_cli
from tests.test_sweeps import LEAN, PHASES_OFF, states


@pytest.mark.slow
def test_a_trial_finished_before_its_sweep_was_killed_is_recovered_not_replaced(tmp_path):
    sweep_dir, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"
    args = ["-m", *TINY, *LEAN, "+sweep=optuna_ppl_quick", *PHASES_OFF, "objectives=[model/params]",
            "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=s", "hydra.sweeper.sampler.seed=3",
            "training.dist_reg_weight=interval(0.0,1.0)", f"paths.output_root={tmp_path / 'outputs'}",
            f"hydra.sweep.dir={sweep_dir}"]
    metrics_file = sweep_dir / "trial_0" / "metrics.json"
    proc = subprocess.Popen([sys.executable, "-m", "newllm.run", *args], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not metrics_file.exists():  # the job runs inside the sweep process
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # after the job's last write (atomic), before the sweeper's tell
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    killed = optuna.load_study(study_name="s", storage=storage)
    assert states(killed) == ["RUNNING"] and metrics_file.is_file()  # the window the issue describes
    params, metrics = killed.trials[0].params, json.loads(metrics_file.read_text())

    proc = run_cli(args, cwd=tmp_path)  # the same command again
    study = optuna.load_study(study_name="s", storage=storage)
    assert states(study) == ["COMPLETE"]  # recovered, and no replacement trial
    (trial,) = study.trials
    assert trial.params == params and trial.values == [metrics["model/params"]]
    assert trial.user_attrs["run_dir"] == str(sweep_dir / "trial_0") and trial.user_attrs["recovered"]
    assert {k: trial.user_attrs[k] for k in metrics} == metrics
    assert "Launching" not in proc.stdout + proc.stderr  # nothing ran again
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["trial_0"]


@pytest.mark.slow
def test_a_killed_trial_whose_job_did_not_finish_is_still_failed_and_replaced(tmp_path):
    """No metrics.json (killed mid-job): nothing to recover, so FAIL 'abandoned' and a replacement, as before."""
    sweep_dir, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"
    args = ["-m", *TINY, *LEAN, "+sweep=optuna_ppl_quick", *PHASES_OFF, "objectives=[model/params]",
            "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=s", f"paths.output_root={tmp_path / 'outputs'}",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "newllm.run", *args], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = sweep_dir / "trial_0" / ".hydra" / "config.yaml"
    while proc.poll() is None and not config.exists():  # the job has started, nothing finished
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    assert not (sweep_dir / "trial_0" / "metrics.json").exists()
    run_cli(args, cwd=tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    assert states(study) == ["FAIL", "COMPLETE"]
    assert study.trials[0].user_attrs["fail_reason"].startswith("abandoned: sweep process")
