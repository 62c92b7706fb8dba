"""Seeds and uncertainty: runs that differ only in seed -> mean and 95 % Student-t interval; the interval
function every other 95 % interval in newllm.analysis uses (t_half_width)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from newllm.analysis.runs import ID_COLUMNS, NOISE_KEYS
from newllm.errors import AnalysisError


def t_half_width(standard_error: float, dof: int) -> float:
    """Half-width of a two-sided 95 % interval, estimate +- t(0.975, dof) x its standard error: the one interval
    newllm reports -- for a mean over seeds (ci95) and for a fitted exponent (analysis.scaling, whose standard
    error comes from a bootstrap). NaN when dof < 1 or the standard error is not finite."""
    from scipy import stats

    if dof < 1 or not math.isfinite(standard_error):
        return math.nan
    return float(stats.t.ppf(0.975, dof) * standard_error)


def ci95(values: Sequence[float] | pd.Series) -> float:
    """Half-width of the two-sided 95 % Student-t interval of the mean: t(0.975, n-1) * s / sqrt(n),
    s the sample standard deviation (ddof 1) of the finite values; NaN for fewer than 2."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan
    return t_half_width(float(v.std(ddof=1)) / math.sqrt(len(v)), len(v) - 1)


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """Numeric metrics.json columns (keys with a slash, booleans excluded)."""
    return [c for c in runs.columns if "/" in c and not c.startswith("choices/") and c not in ID_COLUMNS
            and pd.api.types.is_numeric_dtype(runs[c]) and not pd.api.types.is_bool_dtype(runs[c])]


def _experiment_columns(runs: pd.DataFrame) -> list[str]:
    """What defines an experiment: the Hydra choices and the flattened config, noise keys excluded."""
    config = [c for c in runs.columns if c not in ID_COLUMNS and c not in ("run_dir", "_signature")
              and "/" not in c and not c.startswith(NOISE_KEYS)]
    return [c for c in runs.columns if c.startswith("choices/")] + config


def aggregate(runs: pd.DataFrame, by: Sequence[str] = ("seed",), metrics: Sequence[str] | None = None
              ) -> pd.DataFrame:
    """Completed runs whose configs are equal except in the `by` keys (default: seed) -> one row each:
    the config columns that tell the groups apart, `n` (runs in the group), and for every metric
    `<metric>/mean` and `<metric>/ci95` (see ci95; NaN when n = 1)."""
    done = runs[runs["status"] == "completed"] if "status" in runs else runs
    if done.empty:
        raise AnalysisError("no completed runs to aggregate")
    unknown = [k for k in by if k not in done]
    if unknown:
        raise AnalysisError(f"--group {','.join(unknown)}: not a column of the runs table (e.g. seed, "
                            "data.split_seed, model.layers)")
    metrics = list(metrics) if metrics is not None else metric_columns(done)
    same = [c for c in _experiment_columns(done) if c not in by]
    # As text, so that NaN, None and lists compare (pandas 3 keeps NaN through astype(str); str() does not).
    keys = done[same].map(str).agg("\x1f".join, axis=1) if same else pd.Series("", index=done.index)
    rows = []
    for _, group in done.groupby(keys, sort=False):
        row: dict[str, Any] = {c: group[c].iloc[0] for c in same}
        row["n"] = len(group)
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce")
            row[f"{m}/mean"], row[f"{m}/ci95"] = values.mean(), ci95(values)
        rows.append(row)
    table = pd.DataFrame(rows)
    apart = [c for c in same if table[c].map(str).nunique() > 1 or c == "choices/model"]
    return table[apart + ["n"] + [f"{m}/{s}" for m in metrics for s in ("mean", "ci95")]]
