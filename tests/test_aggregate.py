"""Seeds and uncertainty: newllm.analysis.aggregate, `analyze runs --group`, error bars, and the size
columns of study tables (core parameters, seeds), on hand-made numbers with the t interval by hand."""

from __future__ import annotations

import json
import math
import shutil

import optuna
import pandas as pd
import pytest
import yaml

from newllm import analysis
from tests.conftest import run_in_process

# Two-sided 95 % Student-t quantiles t(0.975, df), from a printed t table.
T975 = {1: 12.706204736174704, 2: 4.302652729911275}
# (architecture, layers) -> test perplexities of seeds 1, 2, 3, ...
PPL = {("layerwise", 1): [10.0, 12.0, 17.0], ("layerwise", 2): [20.0], ("sequential", 1): [5.0, 7.0]}


def hand_made_runs() -> pd.DataFrame:
    rows = []
    for (arch, layers), values in PPL.items():
        for seed, ppl in enumerate(values, start=1):
            rows.append({"run": f"{arch}/{layers}/{seed}", "status": "completed", "choices/model": arch,
                         "overrides": f"seed={seed}", "model.layers": layers, "model.core_params": 20000,
                         "data.split_seed": 0, "training.phase2.lr": 0.003, "seed": seed,
                         "model.embedding.pretrained": None,
                         "phase2/test_ppl": ppl, "phase2/val_ppl": ppl - 1.0,
                         "model/params_core": 19900 if arch == "layerwise" else 20100})
    # the same config at another learning rate is another experiment, not a fourth seed
    rows.append({**rows[0], "run": "lr", "training.phase2.lr": 0.01, "phase2/test_ppl": 99.0})
    rows.append({**rows[0], "run": "failed", "status": "failed", "phase2/test_ppl": math.nan,
                 "model.embedding.pretrained": "gpt2"})  # a text column with missing values (pandas 3: NaN)
    return pd.DataFrame(rows)


def t_interval(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T975[n - 1] * sd / math.sqrt(n)


def test_aggregate_over_seeds_gives_the_t_interval():
    table = analysis.aggregate(hand_made_runs())
    assert list(table.columns[:3]) == ["choices/model", "model.layers", "training.phase2.lr"]
    assert "phase2/test_ppl/mean" in table and "phase2/test_ppl/ci95" in table and "seed" not in table
    assert sorted(table["n"]) == [1, 1, 2, 3]  # the failed run is left out
    row = lambda arch, layers, lr=0.003: table[(table["choices/model"] == arch) & (table["model.layers"] == layers)
                                               & (table["training.phase2.lr"] == lr)].iloc[0]
    mean, half = t_interval([10.0, 12.0, 17.0])  # 13 +- 4.3027 * sqrt(13) / sqrt(3) = 13 +- 8.957
    assert (mean, round(half, 3)) == (13.0, 8.957)
    lw = row("layerwise", 1)
    assert lw["n"] == 3 and lw["phase2/test_ppl/mean"] == pytest.approx(mean)
    assert lw["phase2/test_ppl/ci95"] == pytest.approx(half, rel=1e-9)
    seq = row("sequential", 1)  # n = 2: 6 +- 12.706 * sqrt(2) / sqrt(2)
    assert seq["phase2/test_ppl/ci95"] == pytest.approx(12.706204736174704, rel=1e-9)
    assert math.isnan(row("layerwise", 2)["phase2/test_ppl/ci95"]) and math.isnan(row("layerwise", 1, 0.01)[
        "phase2/test_ppl/ci95"])
    assert row("layerwise", 2)["phase2/test_ppl/mean"] == 20.0


def test_aggregate_over_several_keys_and_bad_keys():
    runs = hand_made_runs()
    runs.loc[runs["run"] == "layerwise/2/1", "data.split_seed"] = 7
    over_seed = analysis.aggregate(runs)
    assert "data.split_seed" in over_seed and len(over_seed) == 4
    both = analysis.aggregate(runs, by=["seed", "training.phase2.lr"])  # lr is aggregated over too
    lw = both[(both["choices/model"] == "layerwise") & (both["model.layers"] == 1)].iloc[0]
    assert lw["n"] == 4 and lw["phase2/test_ppl/mean"] == pytest.approx((10 + 12 + 17 + 99) / 4)
    with pytest.raises(analysis.AnalysisError, match="--group sed: not a column"):
        analysis.aggregate(runs, by=["sed"])


def test_error_bars_where_several_seeds_exist():
    import matplotlib

    matplotlib.use("Agg")
    runs = hand_made_runs()[lambda d: d["run"] != "lr"]  # a sweep: what varies is architecture, layers, seed
    fig = analysis.plot_metric_vs_core_params(runs, metrics=["phase2/test_ppl"])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {"layerwise: phase2/test_ppl", "sequential: phase2/test_ppl"}
    assert axes["layerwise: phase2/test_ppl"].get_xlabel() == "model/params_core"
    bars = {}
    for title, ax in axes.items():
        for container in ax.containers:
            label = container.get_label()
            segments = [s for c in container.lines[2] for s in c.get_segments()]
            bars[(title.split(":")[0], label)] = [(s[1][1] - s[0][1]) / 2 for s in segments]
    _, half = t_interval([10.0, 12.0, 17.0])
    assert bars[("layerwise", "layers=1")] == [pytest.approx(half)]
    assert bars[("layerwise", "layers=2")] == []  # one seed: no interval
    assert bars[("sequential", "layers=1")] == [pytest.approx(12.706204736174704)]


def test_compare_architectures_at_equal_budgets_reports_test_figures():
    table = analysis.compare_architectures(hand_made_runs()[lambda d: d["run"] != "lr"])
    assert table.index.names == ["model.layers", "model.core_params"]
    assert table.loc[(1, 20000), "layerwise"] == pytest.approx(13.0)  # mean test perplexity over seeds
    assert table.loc[(1, 20000), "sequential"] == pytest.approx(6.0)


def test_study_tables_show_core_params_beside_the_size_params():
    study = optuna.create_study(directions=["minimize"])
    dist = {"model.context_dim": optuna.distributions.CategoricalDistribution([32, 64]),
            "model.layers": optuna.distributions.IntDistribution(1, 4)}
    for width, layers, core, test in ((32, 1, 9000, 30.0), (64, 2, 41000, 20.0)):
        study.add_trial(optuna.trial.create_trial(
            params={"model.context_dim": width, "model.layers": layers}, distributions=dist, values=[test - 1],
            user_attrs={"model/params_core": core, "phase2/test_ppl": test}))
    trials = analysis.trials_frame([study])
    cols = list(trials.columns)
    assert cols[cols.index("params_model.layers") + 1] == "core_params"
    assert list(trials["core_params"]) == [9000, 41000]
    front = analysis.pareto_front(study)
    assert front.loc[0, ["core_params", "phase2/test_ppl"]].tolist() == [41000, 20.0]


@pytest.mark.slow
def test_analyze_runs_group_on_real_run_dirs(analysis_outputs, tmp_path):
    """Three copies of one real run dir as seeds 1-3 with hand-set test perplexities, one at another lr."""
    grid = analysis_outputs["outputs"] / "multirun" / "grid"
    root = tmp_path / "outputs"
    for job, (seed, ppl, lr) in enumerate([(1, 10.0, 0.003), (2, 12.0, 0.003), (3, 17.0, 0.003), (1, 50.0, 0.01)]):
        run = root / "multirun" / "seeds" / str(job)
        shutil.copytree(grid / "0", run)
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["seed"], config["training"]["phase2"]["lr"] = seed, lr
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**metrics, "seed": seed, "phase2/test_ppl": ppl}))
    out = tmp_path / "seeds.csv"
    proc = run_in_process(["runs", str(root), "--group", "seed", "--csv", str(out), "--sort", "phase2/test_ppl"],
                          cwd=tmp_path, module="newllm.analyze")
    assert "2 groups of completed runs differing only in seed" in proc.stdout
    table = pd.read_csv(out)
    assert list(table["n"]) == [3, 1] and list(table["training.phase2.lr"]) == [0.003, 0.01]
    mean, half = t_interval([10.0, 12.0, 17.0])
    assert table.loc[0, "phase2/test_ppl/mean"] == pytest.approx(mean)
    assert table.loc[0, "phase2/test_ppl/ci95"] == pytest.approx(half, rel=1e-6)
    assert math.isnan(table.loc[1, "phase2/test_ppl/ci95"])
    assert {"phase2/val_ppl/mean", "phase2/val_ppl/ci95", "model/params_core/mean"} <= set(table.columns)
    bad = run_in_process(["runs", str(root), "--group", "sed"], cwd=tmp_path, module="newllm.analyze", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --group sed: not a column")
