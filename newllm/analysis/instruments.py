"""Tables and plots of the three instruments over a folder of runs (`python -m newllm.analyze
positions|recall|scaling ROOT`): loss by position, recall accuracy vs pairs and vs state size, data scaling."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd

from newllm import keys
from newllm.analysis import scaling
from newllm.analysis.runs import load_runs
from newllm.errors import AnalysisError

KEYS = ["choices/model", keys.MODEL_CORE_PARAMS_BUDGET, "seed"]


def _as_dict(value) -> dict:
    """Dict-valued metrics come back as dicts, or as their text from the parquet cache."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return ast.literal_eval(value)
    return {}


def _completed(root: str | Path, need: str) -> pd.DataFrame:
    runs = load_runs(root)
    runs = runs[runs["status"] == "completed"] if "status" in runs else runs
    if need not in runs or runs[need].isna().all():
        raise AnalysisError(f"no completed run under {root} reports {need}")
    return runs[runs[need].notna()].copy()


def _keys(runs: pd.DataFrame) -> list[str]:
    return [k for k in KEYS if k in runs]


def position_table(root: str | Path, split: str = "test") -> pd.DataFrame:
    """One row per run (model, core budget, seed, eval_seq_len), one column per position bucket."""
    col = keys.p2_split(split, "loss_by_position")
    runs = _completed(root, col)
    curves = pd.DataFrame([_as_dict(v) for v in runs[col]], index=runs.index)
    order = sorted(curves.columns, key=lambda b: int(str(b).split("-")[0]))
    columns = _keys(runs) + ([keys.P2_EVAL_SEQ_LEN] if keys.P2_EVAL_SEQ_LEN in runs else [])
    return pd.concat([runs[columns], curves[order]], axis=1).reset_index(drop=True)


def plot_positions(table: pd.DataFrame):
    """Mean curve per (model, core budget) over seeds: the architectures overlaid."""
    from newllm.analysis.plots import plot_loss_by_position

    buckets = [c for c in table.columns if c[0].isdigit()]
    group = [k for k in ("choices/model", keys.MODEL_CORE_PARAMS_BUDGET) if k in table]
    means = table.groupby(group, dropna=False)[buckets].mean() if group else table[buckets].mean().to_frame().T
    curves = {" ".join(map(str, idx if isinstance(idx, tuple) else (idx,))): row.dropna().to_dict()
              for idx, row in means.iterrows()}
    return plot_loss_by_position(curves, "test loss by position")


def recall_table(root: str | Path, split: str = "test") -> pd.DataFrame:
    """Accuracy per (model, core budget, num_pairs): mean and n over seeds, beside the chance level a model
    without access to the past reaches (recall/chance_accuracy_no_past; runs written before it had none)."""
    col = keys.recall_split(split, "accuracy")
    runs = _completed(root, col)
    runs["num_pairs"] = runs[keys.DATA_NUM_PAIRS]
    group = [k for k in ("choices/model", keys.MODEL_CORE_PARAMS_BUDGET) if k in runs] + ["num_pairs"]
    chance = {"chance": (keys.RECALL_CHANCE_NO_PAST, "first")} if keys.RECALL_CHANCE_NO_PAST in runs else {}
    return runs.groupby(group, dropna=False).agg(accuracy=(col, "mean"), n=(col, "count"), **chance).reset_index()


def plot_recall(table: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    group = [k for k in ("choices/model", keys.MODEL_CORE_PARAMS_BUDGET) if k in table]
    for name, part in table.groupby(group, dropna=False):
        label = " ".join(map(str, name if isinstance(name, tuple) else (name,)))
        ax.plot(part["num_pairs"], part["accuracy"], marker="o", label=label)
    if "chance" in table:  # what no access to the past scores: the floor to read accuracy against
        floor = table.groupby("num_pairs")["chance"].max()
        ax.plot(floor.index, floor.values, "k--", lw=1, label="chance (no past)")
    ax.set_xlabel("key-value pairs (data.num_pairs)")
    ax.set_ylabel("answer accuracy")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def recall_frontier(root: str | Path, split: str = "test") -> pd.DataFrame:
    """Accuracy per (model, state size, num_pairs), mean and n over seeds: recall against the floats a model
    carries per sequence (model/state_floats), the axis of Zoology and Based (Arora et al. 2023, 2024). Beside
    it the two levels reached without recall: no access to the past (chance) and a uniform pick among the
    sequence's stored values (chance_stored_value = 1/P), the plateau MQAR learners sit on first."""
    col = keys.recall_split(split, "accuracy")
    runs = _completed(root, col)
    if keys.MODEL_STATE_FLOATS not in runs:
        raise AnalysisError(f"no completed run under {root} reports {keys.MODEL_STATE_FLOATS}")
    runs["num_pairs"], runs["state_floats"] = runs[keys.DATA_NUM_PAIRS], runs[keys.MODEL_STATE_FLOATS]
    group = [k for k in ("choices/model",) if k in runs] + ["state_floats", "num_pairs"]
    chance = {name: (key, "first") for name, key in (("chance", keys.RECALL_CHANCE_NO_PAST),
                                                     ("chance_stored_value", keys.RECALL_CHANCE_STORED_VALUE))
              if key in runs}
    table = runs.groupby(group, dropna=False).agg(accuracy=(col, "mean"), n=(col, "count"), **chance)
    return table.reset_index()


def plot_recall_frontier(table: pd.DataFrame):
    """Accuracy against state size (log x), one line per model family, one panel per num_pairs."""
    import matplotlib.pyplot as plt

    pairs = sorted(table["num_pairs"].unique())
    fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 3.5), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], pairs, strict=True):
        part = table[table["num_pairs"] == n]
        for name, line in part.groupby("choices/model") if "choices/model" in part else [("runs", part)]:
            line = line.sort_values("state_floats")
            ax.plot(line["state_floats"], line["accuracy"], marker="o", label=str(name))
        if "chance" in part:
            ax.axhline(part["chance"].max(), color="k", ls="--", lw=1, label="chance (no past)")
        if "chance_stored_value" in part:  # knows the answer is a stored value, not which: no association
            ax.axhline(part["chance_stored_value"].max(), color="k", ls=":", lw=1, label="a stored value (1/P)")
        ax.set_xscale("log")
        ax.set_title(f"{n:g} key-value pairs", fontsize=9)
        ax.set_xlabel(f"state size ({keys.MODEL_STATE_FLOATS})")
    axes[0][0].set_ylabel("answer accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def scaling_fit(root: str | Path, y: str = keys.P2_TEST_LOSS, offset: bool = False):
    """(runs with N = data/train_tokens, the power-law fit of y against N)."""
    runs = _completed(root, y)
    cap = runs.get("data.max_train_tokens")
    if cap is not None:  # the loader caps at most: a budget above the corpus trains on the corpus, mislabelled
        over = runs[cap.notna() & (cap > runs[keys.DATA_TRAIN_TOKENS])]
        if len(over):
            raise AnalysisError(
                f"data.max_train_tokens={int(over['data.max_train_tokens'].iloc[0])} exceeds the training corpus "
                f"({int(over['data/train_tokens'].iloc[0])} tokens): use budgets up to that, or more data")
    runs = runs[[c for c in (keys.DATA_TRAIN_TOKENS, y, "seed") if c in runs]].copy()
    return runs, scaling.fit_power_law(runs, keys.DATA_TRAIN_TOKENS, y, offset=offset)
