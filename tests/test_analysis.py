"""newllm.analysis and `python -m newllm.analyze` on a real tiny grid, a failed run and two real Optuna studies."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from newllm import analysis
from tests.conftest import TINY, read_metrics, run_in_process


@pytest.fixture(scope="module")
def runs(analysis_outputs) -> pd.DataFrame:
    return analysis.load_runs(analysis_outputs["outputs"], cache=False)


@pytest.fixture(scope="module")
def studies(analysis_outputs) -> list[optuna.Study]:
    return analysis.load_studies(analysis_outputs["storage"])


@pytest.mark.slow
def test_load_runs_one_row_per_job(runs, analysis_outputs):
    grid = analysis.select_sweep(runs, analysis_outputs["grid"])
    assert len(grid) == 4 and list(grid["job"]) == [0, 1, 2, 3]
    assert set(grid["status"]) == {"completed"}
    combos = set(zip(grid["choices/model"], grid["model.context_dim"], strict=True))
    assert combos == {(a, c) for a in ("sequential", "layerwise") for c in (16, 32)}
    assert (grid["model.architecture"] == grid["choices/model"]).all()
    assert (grid["model.embed_dim"] == 24).all() and (grid["training.phase1.max_iterations"] == 3).all()
    for _, row in grid.iterrows():
        m = read_metrics(Path(row["run_dir"]))
        assert row["phase2/val_ppl"] == pytest.approx(m["phase2/val_ppl"])
        assert row["phase1/val_convergence_rate"] == pytest.approx(m["phase1/val_convergence_rate"])
        assert row["model/params"] == m["model/params"]
        assert f"model.context_dim={row['model.context_dim']}" in row["overrides"]
        assert row["end_time"] >= row["start_time"]
    # every trial of both studies is a run too; 4 + 8 + the failed single run
    assert len(runs) == 13
    assert sorted(runs["sweep_id"].dropna().unique()) == ["multirun/grid", "multirun/study_layerwise",
                                                           "multirun/study_sequential"]


@pytest.mark.slow
def test_failed_run_appears_with_its_status(runs, analysis_outputs):
    row = runs[runs["run"] == analysis_outputs["crashed"]].iloc[0]
    assert row["status"] == "failed"
    assert "model.context_dim=-4 is not allowed" in row["error"]
    assert row["model.context_dim"] == -4 and pd.isna(row["sweep_id"])
    assert math.isnan(row["phase2/val_ppl"])
    assert (runs["status"] == "completed").sum() == 12


@pytest.mark.slow
def test_runs_cache_rereads_only_changed_dirs(analysis_outputs, tmp_path):
    root = tmp_path / "outputs"
    shutil.copytree(analysis_outputs["outputs"] / "multirun" / "grid", root / "multirun" / "grid")
    first = analysis.load_runs(root)
    cache = root / analysis.CACHE_NAME
    assert cache.is_file() and len(first) == 4
    # A cached row is trusted while its files are unchanged: tamper with the cache to prove no re-read.
    table = pd.read_parquet(cache)
    table.loc[table["run"] == "multirun/grid/0", "phase2/val_ppl"] = -1.0
    table.to_parquet(cache, index=False)
    assert analysis.load_runs(root).set_index("run").loc["multirun/grid/0", "phase2/val_ppl"] == -1.0
    # A changed metrics.json, a new run dir and a removed one are picked up.
    metrics_path = root / "multirun/grid/0/metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({**metrics, "phase2/val_ppl": 123.5}))
    shutil.copytree(root / "multirun/grid/1", root / "multirun/grid/7")
    shutil.rmtree(root / "multirun/grid/2")
    (root / "multirun/grid/3/metrics.json").unlink()  # as if killed before the end: no metrics, no error
    again = analysis.load_runs(root).set_index("run")
    assert list(again["status"].sort_index()) == ["completed", "completed", "incomplete", "completed"]
    assert math.isnan(again.loc["multirun/grid/3", "phase2/val_ppl"])
    assert sorted(again.index) == ["multirun/grid/0", "multirun/grid/1", "multirun/grid/3", "multirun/grid/7"]
    assert again.loc["multirun/grid/0", "phase2/val_ppl"] == 123.5
    assert again.loc["multirun/grid/7", "phase2/val_ppl"] == again.loc["multirun/grid/1", "phase2/val_ppl"]
    assert not list(root.glob(".*.tmp"))  # nothing half-written left behind


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(analysis.AnalysisError, match="does not exist"):
        analysis.load_runs(tmp_path / "nope")
    with pytest.raises(analysis.AnalysisError, match="no run directories"):
        analysis.load_runs(tmp_path)


def test_a_damaged_metrics_json_is_one_failed_row_not_a_crash(tmp_path, capsys):
    """A truncated metrics.json in one run folder made `analyze runs` fail with JSONDecodeError: one bad folder hid
    the whole table. (newllm writes metrics.json atomically; damage comes from outside: a full disk elsewhere,
    a copy cut short.)"""
    from newllm.analyze import main

    for name, text in (("good", '{"phase2/val_ppl": 12.5}'), ("truncated", '{"phase2/val_ppl": 1')):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 1\n")
        (tmp_path / name / "metrics.json").write_text(text)
    runs = analysis.load_runs(tmp_path, cache=False).set_index("run")
    assert runs.loc["good", "status"] == "completed" and runs.loc["good", "phase2/val_ppl"] == 12.5
    assert runs.loc["truncated", "status"] == "failed"
    assert runs.loc["truncated", "error"].startswith(f"{tmp_path / 'truncated' / 'metrics.json'} is unreadable "
                                                     "(JSONDecodeError: ")
    assert main(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"2 runs under {tmp_path} (") and len(table) == 4  # title, header, both runs
    with pytest.raises(analysis.AnalysisError, match="is unreadable"):  # read directly: one line, not a traceback
        analysis.read_metrics(tmp_path / "truncated")


@pytest.mark.slow
def test_history_and_contexts_of_a_run(runs, analysis_outputs):
    run_dir = Path(analysis.select_sweep(runs, analysis_outputs["grid"])["run_dir"].iloc[0])
    m = read_metrics(run_dir)
    hist = analysis.load_history(run_dir)
    assert (hist["phase"] == "phase1").sum() == m["phase1/iterations"]
    assert (hist["phase"] == "phase2").sum() == m["phase2/epochs"]
    assert hist.loc[hist["phase"] == "phase2", "phase2/val_ppl"].iloc[-1] == pytest.approx(m["phase2/val_ppl"])
    s, erank = analysis.context_spectrum(run_dir)
    assert s.shape == (16,) and (np.diff(s) <= 1e-6).all() and 1.0 <= erank <= 16
    with pytest.raises(analysis.AnalysisError, match="history.csv"):
        analysis.load_history(analysis_outputs["outputs"] / analysis_outputs["crashed"])


@pytest.mark.slow
def test_generate_text_from_a_run(runs):
    run_dir = analysis.latest_run(runs)
    model, tokenizer = analysis.load_model(run_dir)
    assert type(model).__name__ == "ContextLM" and tokenizer.get_vocab_size() == 512
    text = analysis.generate_text(run_dir, "Hello", n=12, seed=3)
    assert text and text == analysis.generate_text(run_dir, "Hello", n=12, seed=3)


@pytest.mark.slow
def test_compare_studies_one_row_per_study(studies, analysis_outputs):
    assert [s.study_name for s in studies] == analysis_outputs["studies"]
    summary = analysis.compare_studies(studies)
    assert list(summary["study"]) == ["sequential", "layerwise"]
    assert (summary["trials"] == 4).all() and (summary["complete"] == 4).all() and (summary["fail"] == 0).all()
    trials = analysis.trials_frame(studies)
    assert len(trials) == 8 and {"params_model.context_dim", "values_0", "values_1", "state"} <= set(trials.columns)
    for s, row in zip(studies, summary.to_dict("records"), strict=True):
        vals = np.array([t.values for t in s.trials])
        assert row["best objective_0"] == vals[:, 0].max() and row["best objective_1"] == vals[:, 1].min()
        front = analysis.pareto_front(s)
        assert len(front) == row["n_best"] >= 1
        for _, p in front.iterrows():  # no trial dominates a front member
            dominated = (vals[:, 0] >= p["objective_0"]) & (vals[:, 1] <= p["objective_1"]) & \
                        ((vals[:, 0] > p["objective_0"]) | (vals[:, 1] < p["objective_1"]))
            assert not dominated.any()
        assert row["hypervolume"] > 0
    assert summary["hv_reference"].nunique() == 1  # same directions => one shared reference point


@pytest.mark.slow
def test_objective_names_come_from_a_trial_run_dir(runs, analysis_outputs):
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="linked")
    assert analysis.objective_names(study) == ["objective_0", "objective_1"]
    run_dir = analysis.select_sweep(runs, analysis_outputs["grid"])["run_dir"].iloc[0]
    study.add_trial(optuna.trial.create_trial(values=[0.5, 100.0], user_attrs={"run_dir": run_dir}))
    assert analysis.objective_names(study) == ["phase1/val_converged_gain", "phase2/val_ppl"]  # conf/config.yaml
    assert list(analysis.pareto_front(study).columns[2:4]) == ["phase1/val_converged_gain", "phase2/val_ppl"]
    assert analysis.objective_names(study, ["a", "b"]) == ["a", "b"]


def test_hypervolume_matches_hand_computation():
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="hand")
    dists = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for a, b in [(1.0, 3.0), (2.0, 5.0), (0.5, 5.5)]:  # the third is dominated by the first
        study.add_trial(optuna.trial.create_trial(values=[a, b], params={"x": a / 4}, distributions=dists))
    # minimisation form (-1,3), (-2,5) against (0,6): 1*3 + 2*1 - overlap 1*1 = 4
    row = analysis.compare_studies([study], reference=[0.0, 6.0]).iloc[0]
    assert row["hypervolume"] == pytest.approx(4.0) and row["n_best"] == 2
    # auto reference: worst (-0.5, 5.5) + 10% of the span (1.5, 2.5) = (-0.35, 5.75)
    auto = analysis.compare_studies([study]).iloc[0]
    assert json.loads(auto["hv_reference"]) == pytest.approx([-0.35, 5.75])
    assert auto["hypervolume"] == pytest.approx(0.65 * 2.75 + 1.65 * 0.75 - 0.65 * 0.75)


@pytest.mark.slow
def test_plots(runs, studies, analysis_outputs, tmp_path):
    grid = analysis.select_sweep(runs, analysis_outputs["grid"])
    fig = analysis.plot_metric_vs_context_dim(grid, metrics=["phase1/effective_rank", "phase2/val_ppl"])
    assert len(fig.axes) == 4 and all(len(ax.lines[0].get_xdata()) == 2 for ax in fig.axes)
    table = analysis.compare_architectures(grid)
    assert table.shape == (2, 2) and not table.isna().any().any()
    fig = analysis.plot_pareto_fronts(studies)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["sequential", "layerwise"]
    assert len(analysis.plot_optimization_history(studies).axes) == 2
    assert len(analysis.plot_param_importances(studies, objective=1).axes) == 2
    assert len(analysis.plot_training_curves(grid["run_dir"], grid["choices/model"]).axes[2].lines) == 4
    fig = analysis.plot_context_spectrum(grid["run_dir"][:2])
    assert len(fig.axes[0].lines) == 2
    path = analysis.save_figure(fig, tmp_path / "plots" / "spectrum.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_runs_table(analysis_outputs, tmp_path):
    out = analysis_outputs["outputs"]
    proc = run_in_process(["runs", str(out), "--sort", "phase2/val_ppl", "--csv", str(tmp_path / "runs.csv")],
                          cwd=tmp_path, module="newllm.analyze")
    lines = proc.stdout.splitlines()
    assert lines[0] == f"13 runs under {out} (12 completed, 1 failed)"
    assert "phase2/val_ppl" in lines[1] and "model.context_dim" in lines[1]
    assert len(lines) == 2 + 13 and "failed" in lines[-1]  # NaN ppl sorts last
    assert sum("multirun/grid/" in line for line in lines) == 4
    table = pd.read_csv(tmp_path / "runs.csv")
    assert len(table) == 13 and table["phase2/val_ppl"].iloc[:12].is_monotonic_increasing


@pytest.mark.slow
def test_cli_studies(analysis_outputs, tmp_path):
    proc = run_in_process(["studies", "--storage", analysis_outputs["storage"], "--out", str(tmp_path / "plots")],
                          cwd=tmp_path, module="newllm.analyze")
    assert "best trials of sequential:" in proc.stdout and "best trials of layerwise:" in proc.stdout
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["importances_objective_0.png", "importances_objective_1.png", "optimization_history.png",
                    "pareto_objective_0_vs_objective_1.png"]


@pytest.mark.slow
def test_cli_studies_plots_each_study_with_its_own_objectives(analysis_outputs, tmp_path):
    """One storage holding a single-objective study next to two-objective ones, as outputs/optuna.db does after
    both presets (on main: IndexError, no plots): one panel per objective, each study in its objectives' panels."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    ppl = optuna.create_study(study_name="ppl", storage=url, direction="minimize")  # optuna_ppl runs first
    ppl.set_metric_names(["phase2/val_ppl"])
    ppl.optimize(lambda t: 200.0 + 100.0 * t.suggest_float("x", 0.0, 1.0), n_trials=3)
    for name in analysis_outputs["studies"]:
        optuna.copy_study(from_study_name=name, from_storage=analysis_outputs["storage"], to_storage=url)
        optuna.load_study(study_name=name, storage=url).set_metric_names(
            ["phase1/convergence_rate", "phase2/val_ppl"])  # as our sweeper names them

    proc = run_in_process(["studies", "--storage", url, "--out", str(tmp_path / "plots")], cwd=tmp_path,
                          module="newllm.analyze")
    assert "best trials of ppl:" in proc.stdout and "best phase2/val_ppl" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "importances_phase1_convergence_rate.png", "importances_phase2_val_ppl.png", "optimization_history.png",
        "pareto_phase1_convergence_rate_vs_phase2_val_ppl.png"]
    studies = analysis.load_studies(url)
    fig = analysis.plot_optimization_history(studies)
    assert [ax.get_title() for ax in fig.axes] == ["phase2/val_ppl", "phase1/convergence_rate"]
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes] == [
        ["ppl", "sequential", "layerwise"], ["sequential", "layerwise"]]
    ppl_points = fig.axes[0].collections[0].get_offsets()[:, 1]
    assert sorted(ppl_points) == sorted(t.value for t in ppl.trials)
    fig = analysis.plot_param_importances(studies, objective="phase2/val_ppl")
    assert [ax.get_title() for ax in fig.axes] == [f"{n}: phase2/val_ppl" for n in ("ppl", "sequential", "layerwise")]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["runs", "missing"], "error: runs folder 'missing' does not exist"),
    (["runs", "empty"], "error: no run directories under 'empty'"),
    (["studies", "--storage", "sqlite:///missing.db"], "error: storage 'sqlite:///missing.db': no such SQLite file"),
])
def test_cli_nothing_to_analyse(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    proc = run_in_process(args, cwd=tmp_path, module="newllm.analyze", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(message) and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "missing.db")  # looking did not create an empty storage


# A bug surfacing mid-run, as one once did: the residual updater's constructor rejecting a width
# (Hydra's instantiate appends unindented 'full_key: ...' lines to the message). Here the width is
# set after the config checks, which now refuse it up front.
@pytest.mark.slow
def test_a_run_that_fails_with_a_traceback_records_the_exception_type_and_message(tmp_path, monkeypatch):
    import newllm.models as models

    build = models.build_model

    def build_with_bad_width(model_cfg, vocab_size):
        model_cfg.hidden_dim = 50
        return build(model_cfg, vocab_size)

    monkeypatch.setattr(models, "build_model", build_with_bad_width)  # newllm.run imports it when it starts
    run_dir = tmp_path / "run"
    proc = run_in_process([*TINY, "model/updater=residual", f"hydra.run.dir={run_dir}",
                           f"paths.output_root={tmp_path / 'outputs'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # a bug stays a traceback for whoever debugs it
    row = analysis.read_run(run_dir)
    assert row["status"] == "failed"
    assert row["error"] == ("ValueError: model.hidden_dim=50 is not allowed with the residual updater: expected "
                            "context_dim + embed_dim = 56 (or null) full_key: updater")
    # a run.log written before newllm logged that line: the end of Hydra's traceback gives the same
    log = run_dir / "run.log"
    log.write_text("\n".join(t for t in log.read_text().splitlines() if "][newllm][ERROR]" not in t) + "\n")
    assert "Job failed" in log.read_text() and analysis.read_run(run_dir)["error"] == row["error"]



def test_analysis_reads_checkpoints_only_through_checkpoint_load(tmp_path):
    """load_model and load_contexts go through runtime.checkpoint.load: a foreign file or a checkpoint of another
    kind is one clear line (CheckpointError), not an unpickling error or a KeyError deep in the model code."""
    import torch

    from newllm.errors import CheckpointError
    from newllm.runtime import checkpoint

    contexts = torch.randn(7, 4)
    checkpoint.save(tmp_path / checkpoint.VAL_CONTEXTS_FILE, "val_contexts", {"contexts": contexts})
    assert torch.equal(analysis.load_contexts(tmp_path), contexts)
    torch.save({"model": {}}, tmp_path / checkpoint.FINAL_FILE)  # a raw torch.save: no newllm marker
    with pytest.raises(CheckpointError, match="is not a newllm checkpoint"):
        analysis.load_model(tmp_path)
    checkpoint.save(tmp_path / checkpoint.FINAL_FILE, "resume", {"model": {}})
    with pytest.raises(CheckpointError, match="holds a 'resume' checkpoint, expected 'final'"):
        analysis.load_model(tmp_path)
    torch.save(contexts, tmp_path / checkpoint.VAL_CONTEXTS_FILE)  # how runs before this wrote it
    with pytest.raises(CheckpointError, match="is not a newllm checkpoint"):
        analysis.load_contexts(tmp_path)
