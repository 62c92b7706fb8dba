"""Sweeps end to end through the real CLI: the official Optuna sweeper, and newllm_optuna's pruning,
early-stop rules, failure handling, resume, traceability, launchers and presets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from newllm.sweeping import early_stop_reason
from tests.conftest import REPO, TINY, cli_env, run_cli

pytestmark = pytest.mark.slow
OURS = "hydra/sweeper=newllm_optuna"
LEAN = ["save_checkpoint=false", "save_contexts=false"]  # trials write only what the tests read


def sweep(tmp: Path, *overrides: str, name: str = "s", check: bool = True, storage: str | None = None):
    """One `python -m newllm.run -m` sweep in tmp; returns (study, process)."""
    args = ["-m", *TINY, *LEAN, f"paths.output_root={tmp / 'outputs'}", f"hydra.sweep.dir={tmp / 'sweep'}",
            f"hydra.sweeper.study_name={name}", *overrides]
    if storage:
        args.append(f"hydra.sweeper.storage={storage}")
    proc = run_cli(args, cwd=tmp, check=check)
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{tmp / 'outputs' / 'optuna.db'}"), proc


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def test_official_optuna_sweeper_multi_objective(tmp_path):
    """hydra/sweeper=optuna as its docs say: params grammar, sampler, direction list, storage, results file."""
    storage = f"sqlite:///{tmp_path / 'official.db'}"
    study, _ = sweep(tmp_path, "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=1",
                     "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.n_trials=2",
                     "hydra.sweeper.n_jobs=1", "training.dist_reg_weight=interval(0.0,1.0)",
                     "model.layers=range(1,3)", "seed=choice(1,2)",
                     "training.phase1.lr=tag(log,interval(0.0001,0.01))", storage=storage)
    assert states(study) == ["COMPLETE"] * 2
    for t in study.trials:
        assert 0.0 <= t.params["training.dist_reg_weight"] <= 1.0
        assert t.params["model.layers"] in (1, 2) and t.params["seed"] in (1, 2)  # range stop is exclusive
        assert 1e-4 <= t.params["training.phase1.lr"] <= 1e-2
        assert t.distributions["training.phase1.lr"].log
        assert 0.0 <= t.values[0] <= 1.0 and t.values[1] > 1.0  # convergence rate, perplexity
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and len(results["solutions"]) == len(study.best_trials) >= 1
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]


def test_median_pruner_stops_bad_trials_in_joblib_workers(tmp_path):
    """A trial whose Phase-2 val loss lags the median is PRUNED after its first epoch, not FAIL, though it
    runs in a joblib worker process and reports through the shared storage."""
    study, proc = sweep(tmp_path, OURS, "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1",
                        "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=11", "objectives=[phase2/val_ppl]",
                        "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=3", "training.phase2.epochs=2",
                        "training.phase2.patience=5", "training.phase2.lr=choice(0.003,0.0000001)", *JOBLIB)
    # seed 11 proposes lr 0.003, 1e-7, 1e-7. Phase-1 iteration k reports at step k, Phase-2 epoch e at
    # phase1.max_iterations + 1 + e = 7 + e (training=quick).
    def phase2_steps(t):
        return sorted(s for s in t.intermediate_values if s > 7)

    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, states(study)
    for t in pruned:
        assert t.params["training.phase2.lr"] == 1e-7
        assert t.user_attrs["pruned_reason"].startswith("MedianPruner: intermediate value 6.2")
        assert phase2_steps(t) == [8]  # stopped after its first epoch
        assert "fail_reason" not in t.user_attrs
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        # Phase 1 reports its held-out convergence where it measures it: every val_every = 3 iterations
        assert phase2_steps(t) == [8, 9] and sorted(s for s in t.intermediate_values if s <= 7) == [3, 6]
        assert t.value == pytest.approx(t.user_attrs["phase2/val_ppl"])
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].params["training.phase2.lr"] == 0.003
    assert len(study.trials) == 3 and "FAIL" not in states(study)  # pruned trials count toward n_trials


def test_hyperband_pruner_prunes_lagging_trials(tmp_path):
    """hydra/sweeper/pruner=hyperband: one bracket (resources 8..10 = the Phase-2 steps of training=quick) so
    successive halving at step 8 compares every trial with the earlier ones, deterministically."""
    study, _ = sweep(tmp_path, OURS, "hydra/sweeper/pruner=hyperband", "hydra.sweeper.pruner.reduction_factor=2",
                     "hydra.sweeper.pruner.min_resource=8", "hydra.sweeper.pruner.max_resource=10",
                     "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=11", "objectives=[phase2/val_ppl]",
                     "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=3", "training.phase2.epochs=3",
                     "training.phase2.patience=5", "training.phase2.lr=choice(0.003,0.0000001)",
                     "hydra.sweeper.report=[phase2]")
    # seed 11 proposes lr 0.003, 1e-7, 1e-7: the first sets the rung, the second and third lag it at step 8.
    assert states(study) == ["COMPLETE", "PRUNED", "PRUNED"]
    for t in study.trials[1:]:
        assert t.user_attrs["pruned_reason"].startswith("HyperbandPruner: intermediate value 6.2")
        assert sorted(t.intermediate_values) == [8]


@pytest.mark.parametrize(("rules", "reason"), [
    (["hydra.sweeper.early_stop.min_effective_rank_ratio=0.9"], "effective_rank_collapse: "),  # held-out or training
    # the same through submitit_local: the rule fires in a separate worker process
    (["hydra.sweeper.early_stop.max_identity_score=-1.0", "hydra/launcher=submitit_local",
      "hydra.launcher.timeout_min=5"], "identity_mapping: identity score"),
], ids=["rank_in_process", "identity_submitit_local"])
def test_multi_objective_early_stop_rules_prune(tmp_path, rules, reason):
    """Multi-objective studies cannot report(); the rules stop trials instead, recorded PRUNED with the rule."""
    study, proc = sweep(tmp_path, OURS, "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.n_trials=1",
                        "hydra.sweeper.early_stop.grace_iterations=0", "model.layers=choice(1,2)", *rules)
    assert states(study) == ["PRUNED"]  # and the sweep exited 0: pruned trials are not failures
    for t in study.trials:
        assert t.user_attrs["pruned_reason"].startswith(reason)
        assert t.intermediate_values == {}
        assert not (Path(t.user_attrs["run_dir"]) / "metrics.json").exists()  # stopped before the end


def test_cvfp_preset_prunes_a_collapsed_trial(tmp_path):
    """f initialised at ~0 collapses (held-out rank ~1.2/32) and converges from c = 0 at once: without the preset's
    collapse rule it would own the convergence end of the Pareto front."""
    study, _ = sweep(tmp_path, "+sweep=optuna_cvfp_quick", "hydra.sweeper.n_trials=1", "model.init_std=1e-6",
                     "model.context_dim=choice(32)", "model.layers=choice(2)", "training.dist_reg_weight=choice(0.5)")
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED, trial.user_attrs
    assert trial.user_attrs["pruned_reason"].startswith("effective_rank_collapse:")
    assert "< min_effective_rank_ratio=0.1" in trial.user_attrs["pruned_reason"]


def test_early_stop_rules_on_rows():
    rules = {"nan_loss": True, "min_effective_rank_ratio": 0.25, "max_identity_score": 0.9, "grace_iterations": 2}
    ok = {"phase": 1, "step": 3, "phase1/loss": 0.1, "phase1/effective_rank": 12.0}
    assert early_stop_reason(ok, rules, 32, lambda: 0.5) is None
    assert early_stop_reason({**ok, "phase1/effective_rank": 7.9}, rules, 32, lambda: 0.5).startswith(
        "effective_rank_collapse: effective rank 7.90/32 = 0.247 < min_effective_rank_ratio=0.25")
    assert early_stop_reason({**ok, "step": 1, "phase1/effective_rank": 1.0}, rules, 32, lambda: 0.99) is None  # grace
    assert early_stop_reason(ok, rules, 32, lambda: 0.95).startswith("identity_mapping: identity score 0.950 > 0.9"
                                                                     .replace("> 0.9", "> max_identity_score=0.9"))
    nan_row = {"phase": 2, "step": 10, "phase2/val_loss": math.nan, "phase2/train_loss": 2.0}
    assert early_stop_reason(nan_row, rules, 32, lambda: 0.0) == "nan_loss: {'phase2/val_loss': nan} at phase 2 step 10"
    assert early_stop_reason(nan_row, {**rules, "nan_loss": False}, 32, lambda: 0.0) is None


def test_identity_rule_measures_f_without_dropout():
    """The rule's identity score is taken mid-training (model in train mode): dropout must not enter it."""
    from functools import partial

    import torch
    from omegaconf import OmegaConf

    from newllm.metrics import identity_mapping_score
    from newllm.models.context_lm import ContextLM
    from newllm.models.updaters import GatedUpdater
    from newllm.sweeping import TrialReporter

    torch.manual_seed(0)
    model = ContextLM(40, "layerwise", 2, 24, 16, None, 0.1, 0.5, partial(GatedUpdater)).train()
    cfg = OmegaConf.create({"training": {"phase1": {"max_iterations": 5}}, "model": {"context_dim": 24}})
    reporter = TrialReporter(optuna.create_study().ask(), {}, cfg, model)
    score = reporter.identity_score()
    assert model.training
    model.eval()
    assert score == pytest.approx(identity_mapping_score(model.update, 24, 16))


def test_failures_are_recorded_and_replaced_until_the_rate_is_exceeded(tmp_path):
    """Raising (ConfigError) and NaN-returning trials are FAIL with their reason and are replaced; the sweep
    stops once failures exceed max_failure_rate x n_trials; the finished trial is kept."""
    study, proc = sweep(tmp_path, OURS, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=33",
                        "hydra.sweeper.direction=minimize", "training.dist_reg_weight=choice(0.5,1.5)",
                        "objectives=choice([phase2/val_ppl],[phase2/no_such_metric])", "hydra.sweeper.n_trials=2",
                        "hydra.sweeper.max_failure_rate=1.0", check=False)
    # seed 33 proposes: dist_reg_weight=1.5 (raises), a missing objective (NaN), a good trial, 1.5 again.
    assert states(study) == ["FAIL", "FAIL", "COMPLETE", "FAIL"]
    raised = "ConfigError: training.dist_reg_weight=1.5 is not allowed: expected a number in [0, 1]"
    assert study.trials[0].user_attrs["fail_reason"] == raised == study.trials[3].user_attrs["fail_reason"]
    assert study.trials[1].params["objectives"] == "[phase2/no_such_metric]"
    assert study.trials[1].user_attrs["fail_reason"] == "the task returned a non-finite objective: [nan]"
    good = study.trials[2]
    assert good.params == {"training.dist_reg_weight": 0.5, "objectives": "[phase2/val_ppl]"}
    assert good.value == pytest.approx(good.user_attrs["phase2/val_ppl"]) and "fail_reason" not in good.user_attrs
    assert proc.returncode != 0
    assert ("sweep stopped: 3 of 4 trials failed in this run, more than max_failure_rate=1.0 x n_trials=2 "
            f"(last: {raised})") in proc.stderr
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_value"] == good.value and results["n_trials"]["fail"] == 3


def test_resume_continues_to_n_trials_in_total_and_keeps_every_job_dir(tmp_path):
    args = [OURS, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0", "model.layers=choice(1,2)",
            "hydra.sweeper.direction=[maximize,minimize]"]
    study, _ = sweep(tmp_path, *args, "hydra.sweeper.n_trials=1")
    assert states(study) == ["COMPLETE"]
    marker = tmp_path / "sweep" / "trial_0" / "marker"
    marker.write_text("first run")
    # A trial left RUNNING by a sweep process that died (pid 2**22 + 1 is above Linux's pid_max).
    orphan = study.ask()
    study._storage.set_trial_system_attr(orphan._trial_id, "newllm:owner", f"{os.uname().nodename}:{2**22 + 1}")

    study, proc = sweep(tmp_path, *args, "hydra.sweeper.n_trials=2")
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["fail_reason"].startswith("abandoned: sweep process")
    assert marker.read_text() == "first run"  # the first run's job folder was not reused
    dirs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert dirs == ["trial_0", "trial_2"]

    # Traceability: run dir, full overrides and every metric of metrics.json in the user attrs.
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir == tmp_path / "sweep" / f"trial_{t.number}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert {k: t.user_attrs[k] for k in metrics} == metrics
        assert f"model.layers={t.params['model.layers']}" in t.user_attrs["overrides"]
        assert {o.lower() for o in TINY} <= {o.lower() for o in t.user_attrs["overrides"]}  # progress=False
        assert t.values == [metrics["phase1/val_convergence_rate"], metrics["phase2/val_ppl"]]

    _, proc = sweep(tmp_path, *args, "hydra.sweeper.n_trials=2")  # already complete: launches nothing
    assert "Launching" not in proc.stderr + proc.stdout and len(study.trials) == 3
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["n_trials"]["complete"] == 2 and results["n_trials"]["fail"] == 1


def test_presets_compose():
    from hydra import compose, initialize_config_dir

    from newllm.config import register_configs

    register_configs()
    with initialize_config_dir(str(REPO / "conf")):
        ppl = compose("config", ["+sweep=optuna_ppl"], return_hydra_config=True)
        cvfp = compose("config", ["+sweep=optuna_cvfp_quick"], return_hydra_config=True)
        arch = compose("config", ["+sweep=arch_sizes_quick"], return_hydra_config=True)
        cmp = compose("config", ["+sweep=compare_architectures", "model=sequential"], return_hydra_config=True)
        slurm = compose("config", ["+sweep=[optuna_cvfp,on_slurm]"], return_hydra_config=True)
        local = compose("config", ["+sweep=[optuna_ppl,on_joblib]"], return_hydra_config=True)
        # a preset's tuned pruner is an option of hydra/sweeper/pruner: switching it replaces its settings
        quick = compose("config", ["+sweep=optuna_ppl_quick"], return_hydra_config=True)
        hyper = compose("config", ["+sweep=optuna_ppl_quick", "hydra/sweeper/pruner=hyperband"],
                        return_hydra_config=True)
    assert ppl.hydra.sweeper._target_.endswith("NewllmOptunaSweeper")
    assert ppl.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert list(ppl.objectives) == ["phase2/val_ppl"] and ppl.hydra.sweeper.direction == "minimize"
    assert ppl.hydra.sweeper.params["model.context_dim"] == "choice(32, 64, 128, 256, 512)"
    assert list(cvfp.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert cvfp.hydra.sweeper.sampler._target_.endswith("create_nsgaii_sampler")
    assert cvfp.training.phase1.max_iterations == 6 and cvfp.hydra.sweeper.n_trials == 6
    assert dict(arch.hydra.sweeper.params) == {"model": "sequential,layerwise", "model.layers": "1,2",
                                               "model.core_params": "5000,20000"}
    assert cmp.hydra.sweeper.study_name == "compare_sequential"
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.sweeper.n_jobs == 8
    assert slurm.hydra.sweeper.study_name == "optuna_cvfp" and slurm.device == "cuda"
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2
    assert (ppl.hydra.sweeper.pruner.n_startup_trials, ppl.hydra.sweeper.pruner.n_warmup_steps) == (5, 2)
    assert (quick.hydra.sweeper.pruner.n_startup_trials, quick.hydra.sweeper.pruner.n_warmup_steps) == (3, 0)
    assert hyper.hydra.sweeper.pruner._target_ == "optuna.pruners.HyperbandPruner"
    assert "n_startup_trials" not in hyper.hydra.sweeper.pruner


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A private PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl as a non-root user), stopped afterwards."""
    import glob
    import shutil
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    initdb = shutil.which("initdb") or (bins and f"{bins[-1]}/initdb")
    if not initdb:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run does this)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    root = Path(tempfile.mkdtemp(prefix="newllm-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "newllm", "--auth=trust"], check=True,
                   capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=50"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://newllm@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_sweep_processes_share_one_postgres_study(tmp_path, postgres_url):
    n = 4
    procs = []
    for worker in (1, 2):
        args = ["-m", *TINY, *LEAN, f"paths.output_root={tmp_path / 'outputs'}",
                f"hydra.sweep.dir={tmp_path / f'w{worker}'}", OURS, f"hydra.sweeper.storage={postgres_url}",
                "hydra.sweeper.study_name=shared", f"hydra.sweeper.n_trials={n}", "hydra/sweeper/sampler=random",
                f"hydra.sweeper.sampler.seed={worker}",
                "training.dist_reg_weight=interval(0.0,1.0)", "model.layers=choice(1,2)",
                "objectives=[phase2/val_ppl]"]
        procs.append(subprocess.Popen([sys.executable, "-m", "newllm.run", *args], cwd=tmp_path, env=cli_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers)))  # every number exactly once
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == n
    surplus = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in surplus)
    ran = {Path(t.user_attrs["run_dir"]).parent.name for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert ran == {"w1", "w2"}  # both processes did work
