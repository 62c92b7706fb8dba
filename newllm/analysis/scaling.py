"""Data scaling: fit L(N) = a N^-b (+ c) to final losses and plot it on log-log axes.

The fit is least squares in log space: log L = log a - b log N (no offset), or, with an offset c,
log(L - c) = log a - b log N for the c (0 <= c < min L) found by a 1-D bounded search that minimises
the squared residuals of log L against log(a N^-b + c). The ci95 on b comes from fitting each seed
separately (Student-t over seeds); with one seed, from a bootstrap over the points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize

from newllm.analysis.seeds import ci95
from newllm.errors import ScalingError


@dataclass
class PowerLawFit:
    a: float
    b: float
    c: float
    ci95_b: float  # half-width of the 95 % interval on b (NaN when it cannot be estimated)
    n_points: int
    n_seeds: int

    def predict(self, n: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(n, dtype=float) ** -self.b + self.c


def _fit_log_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of y = a x^-b by least squares on (log x, log y)."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(intercept)), float(-slope)


def _fit_one(x: np.ndarray, y: np.ndarray, offset: bool) -> tuple[float, float, float]:
    if not offset:
        return (*_fit_log_linear(x, y), 0.0)

    def sse(c: float) -> float:
        a, b = _fit_log_linear(x, y - c)
        return float(np.sum((np.log(y) - np.log(a * x ** -b + c)) ** 2))

    hi = float(y.min()) * (1 - 1e-9)
    c = float(optimize.minimize_scalar(sse, bounds=(0.0, hi), method="bounded",
                                       options={"xatol": 1e-10 * max(hi, 1e-12)}).x)
    return (*_fit_log_linear(x, y - c), c)


def _clean(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    for col in (x, y):
        if col not in df:
            raise ScalingError(f"column {col!r} is not in the runs table")
    d = df[[x, y] + (["seed"] if "seed" in df else [])].dropna(subset=[x, y])
    d = d[(d[x] > 0) & (d[y] > 0)]
    if d[x].nunique() < 2 + 0:
        raise ScalingError(f"a power-law fit needs >= 2 distinct positive values of {x}; got {d[x].nunique()}")
    return d


def fit_power_law(df: pd.DataFrame, x: str, y: str, offset: bool = False, n_boot: int = 1000,
                  seed: int = 0) -> PowerLawFit:
    """Fit df[y] = a df[x]^-b (+ c) over all rows; ci95 on b from per-seed fits (or a bootstrap)."""

    d = _clean(df, x, y)
    if offset and d[x].nunique() < 3:
        raise ScalingError(f"a fit with offset needs >= 3 distinct values of {x}; got {d[x].nunique()}")
    xs, ys = d[x].to_numpy(float), d[y].to_numpy(float)
    a, b, c = _fit_one(xs, ys, offset)
    seeds = sorted(d["seed"].unique()) if "seed" in d else [None]
    per_seed = [g for _, g in d.groupby("seed")] if len(seeds) > 1 else []
    per_seed = [g for g in per_seed if g[x].nunique() >= (3 if offset else 2)]
    if len(per_seed) >= 2:
        bs = np.array([_fit_one(g[x].to_numpy(float), g[y].to_numpy(float), offset)[1] for g in per_seed])
        ci = ci95(bs)
    else:  # one seed: bootstrap over the points (resamples with < 2 distinct x are skipped)
        rng = np.random.default_rng(seed)
        bs_list = []
        for _ in range(n_boot):
            i = rng.integers(0, len(xs), len(xs))
            if len(np.unique(xs[i])) >= (3 if offset else 2):
                bs_list.append(_fit_one(xs[i], ys[i], offset)[1])
        ci = float(1.96 * np.std(bs_list, ddof=1)) if len(bs_list) >= 2 else math.nan
    return PowerLawFit(a=a, b=b, c=c, ci95_b=ci, n_points=len(xs), n_seeds=len(seeds))


def plot_power_law(df: pd.DataFrame, x: str, y: str, fit: PowerLawFit, label: str | None = None, ax=None):
    """Log-log scatter of the runs with the fitted line; returns the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    d = _clean(df, x, y)
    ax.scatter(d[x], d[y], s=14, alpha=0.7, label=label or "runs")
    grid = np.geomspace(d[x].min(), d[x].max(), 50)
    text = f"{fit.a:.3g} N^-{fit.b:.3f}" + (f" + {fit.c:.3g}" if fit.c else "") + f"  (b ± {fit.ci95_b:.2g})"
    ax.plot(grid, fit.predict(grid), "-", label=text)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=8)
    return ax.figure
