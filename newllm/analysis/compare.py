"""The `compare_models` table: one row per model from the seed re-runs of each study's best trial.

`+sweep=compare_models` leaves, per model label, <sweep dir>/<label>/reruns/rerun_best.json (the tuned
params, which trial they came from) next to one job folder per seed. `compare_models(root)` reads them
all and reports, per model: the tuned hyperparameters, parameters (total, embedding, head, core), the state
carried per sequence, training FLOPs (Phase 1 and Phase 2; newllm.models.costs), test perplexity mean and
Student-t ci95 over seeds, the paired (same seed, same split) test-ppl difference against a reference
model with its ci95, steps and wall time to the best validation evaluation, and how the runs stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml

from newllm import keys
from newllm.analysis.runs import read_metrics
from newllm.analysis.seeds import ci95
from newllm.errors import AnalysisError
from newllm.runtime.fileio import atomic_write

REFERENCE = "layerwise"  # the context LM (layer-wise): what every other model is paired against
METRIC = keys.P2_TEST_PPL


def rerun_runs(root: str | Path) -> pd.DataFrame:
    """One row per completed re-run below root: label, seed, tuned params (tuned/<name>) and its metrics."""
    rows = []
    for record_path in sorted(Path(root).rglob("rerun_best.json")):
        record = json.loads(record_path.read_text())
        for metrics_path in sorted(record_path.parent.glob("*/metrics.json")):
            config = yaml.safe_load((metrics_path.parent / ".hydra" / "config.yaml").read_text())
            rows.append({"model": record["label"] or record["rerun_study"], "seed": int(config["seed"]),
                         "split_seed": int(config["data"]["split_seed"]),
                         **{f"tuned/{k}": v for k, v in record["params"].items()},
                         **read_metrics(metrics_path.parent)})  # as the runs table reads them: "nan" -> nan
    if not rows:
        raise AnalysisError(f"no compare_models re-runs below {root} (no rerun_best.json with finished runs): "
                            "run python -m newllm.run -m +sweep=compare_models first")
    return pd.DataFrame(rows)


def _paired(runs: pd.DataFrame, model: str, reference: str) -> tuple[float, float, int]:
    """Mean and ci95 of (model - reference) test ppl over the seeds both have."""
    a = runs[runs.model == model].set_index("seed")[METRIC]
    b = runs[runs.model == reference].set_index("seed")[METRIC]
    diff = (a - b).dropna()
    return (float(diff.mean()) if len(diff) else float("nan")), ci95(diff), len(diff)


def _costs(group: pd.DataFrame) -> dict:
    """What the model is and what its training cost: parameters by part (a head tied to the embedding counts
    under embedding), the state it carries per sequence at the evaluation length, and training FLOPs -- Phase 1
    (context LMs; 0 for the baselines, which have none) and Phase 2, means over the seeds (runs stop on their
    own plateau). NaN where the runs predate the metric."""
    def column(key: str) -> pd.Series:
        return pd.to_numeric(group[key], errors="coerce") if key in group else pd.Series(math.nan, index=group.index)

    phase2 = column(keys.P2_TRAIN_FLOPS)
    phase1 = column(keys.P1_TRAIN_FLOPS).fillna(0.0).where(phase2.notna())  # no Phase 1 (baselines): 0
    sizes = {"params": keys.MODEL_PARAMS, "embedding_params": keys.MODEL_PARAMS_EMBEDDING,
             "head_params": keys.MODEL_PARAMS_HEAD, "core_params": keys.MODEL_PARAMS_CORE,
             "state_floats": keys.MODEL_STATE_FLOATS}
    return {**{name: column(key).iloc[0] for name, key in sizes.items()}, "phase1_flops/mean": phase1.mean(),
            "phase2_flops/mean": phase2.mean(), "train_flops/mean": (phase1 + phase2).mean()}


def compare_models(root: str | Path, reference: str = REFERENCE) -> pd.DataFrame:
    """The comparison table (one row per model, the reference first); also written to ROOT/compare_models.csv."""
    runs = rerun_runs(root)
    if runs.split_seed.nunique() != 1:
        raise AnalysisError(f"the re-runs below {root} used data.split_seed {sorted(runs.split_seed.unique())}: "
                            "seeds are paired only on one split")
    has_reference = reference in set(runs.model)
    rows = []
    for model, group in runs.groupby("model", sort=False):
        tuned = {c: group[c].iloc[0] for c in group.columns if c.startswith("tuned/") and group[c].notna().any()}
        reasons = group[keys.P2_STOP_REASON].value_counts()
        row = {"model": model, **tuned, **_costs(group), "seeds": len(group),
               # skipna=False: a seed that diverged makes the mean NaN instead of dropping out of it unseen
               "test_ppl/mean": group[METRIC].mean(skipna=False), "test_ppl/ci95": ci95(group[METRIC]),
               "val_ppl/mean": group[keys.P2_VAL_PPL].mean(skipna=False)}
        if has_reference and model != reference:
            mean, half, _ = _paired(runs, model, reference)
            row |= {f"test_ppl_minus_{reference}/mean": mean, f"test_ppl_minus_{reference}/ci95": half}
        row |= {"best_step/mean": group[keys.P2_BEST_STEP].mean(),
                "time_to_best_s/mean": group[keys.P2_TIME_TO_BEST_S].mean(),
                "stopped_plateau": int(reasons.get("plateau", 0)), "stopped_cap": int(reasons.get("cap", 0))}
        rows.append(row)
    table = pd.DataFrame(rows)
    order = [reference] + sorted(m for m in table.model if m != reference)
    table = table.set_index("model").loc[[m for m in order if m in set(table.model)]].reset_index()
    tuned = sorted(c for c in table.columns if c.startswith("tuned/"))
    table = table[["model", *tuned, *(c for c in table.columns if c != "model" and c not in tuned)]]
    atomic_write(Path(root) / "compare_models.csv", lambda tmp: table.to_csv(tmp, index=False))
    return table


def plot_compare(table: pd.DataFrame):
    """Test perplexity (mean, 95 % t-interval over seeds) of each model in a compare_models table against
    the state it carries per sequence and against its training FLOPs (log x): where each family sits on
    the two costs the field compares at, beside the matched core parameters every row shares."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (x, label) in zip(axes, [("state_floats", f"state per sequence ({keys.MODEL_STATE_FLOATS})"),
                                     ("train_flops/mean", "training FLOPs (Phase 1 + Phase 2)")], strict=True):
        for _, row in table.iterrows():
            ax.errorbar(row[x], row["test_ppl/mean"], yerr=row["test_ppl/ci95"], fmt="o", capsize=3)
            ax.annotate(str(row["model"]), (row[x], row["test_ppl/mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].set_ylabel("test perplexity (seeds: mean, 95 % CI)")
    fig.tight_layout()
    return fig
