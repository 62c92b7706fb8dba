"""Figures of runs and studies (matplotlib, offline; imported inside the functions, so the table CLI starts fast)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
import pandas as pd

from newllm import keys
from newllm.analysis.runs import FINAL_METRIC, context_spectrum, load_history
from newllm.analysis.seeds import ci95
from newllm.analysis.studies import completed_trials, objective_names, objective_panels, param_importances
from newllm.errors import AnalysisError
from newllm.runtime.fileio import atomic_write

if TYPE_CHECKING:  # matplotlib loads lazily: `analyze runs` answers in about a second
    from matplotlib.figure import Figure


def _labels(run_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    """Given labels, else the last two parts of each run dir (e.g. 'grid/3')."""
    return list(labels) if labels is not None else ["/".join(Path(d).parts[-2:]) for d in run_dirs]


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def _label(objective: int, study: optuna.Study, names: Sequence[str] | None) -> str:
    return objective_names(study, names)[objective]


def plot_metric_vs(runs: pd.DataFrame, x: str, metrics: Sequence[str] = (FINAL_METRIC,),
                   group: str = "model.layers", arch: str = "choices/model", log_x: bool = True) -> Figure:
    """One panel per metric (rows) and architecture (columns); one line per `group` value through the
    mean of the runs that share (architecture, group, x) -- seeds -- with 95 % t-interval error bars
    where there are several (ci95); dots are the single runs."""
    done = runs[runs["status"] == "completed"]
    missing = [c for c in (x, group, arch, *metrics) if c not in done]
    if done.empty or missing:
        raise AnalysisError(f"cannot plot: no completed runs with columns {missing or [x, group, arch]}")
    archs = sorted(done[arch].dropna().unique())
    fig, axes = _figure(len(metrics), len(archs))
    for r, metric in enumerate(metrics):
        for c, name in enumerate(archs):
            ax = axes[r][c]
            part = done[done[arch] == name]
            for g, sub in part.groupby(group):
                stats = sub.groupby(x)[metric].agg(["mean", ci95])
                err = stats["ci95"].fillna(0.0) if stats["ci95"].notna().any() else None
                line = ax.errorbar(stats.index, stats["mean"], yerr=err, marker="o", capsize=3,
                                   label=f"{group.split('.')[-1]}={g}")
                ax.scatter(sub[x], sub[metric], s=10, alpha=0.4, color=line[0].get_color())
            if log_x:
                ax.set_xscale("log", base=2)
            ax.set_title(f"{name}: {metric}")
            ax.set_xlabel(x)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_metric_vs_core_params(runs: pd.DataFrame, metrics: Sequence[str] = (FINAL_METRIC,),
                               group: str = "model.layers", arch: str = "choices/model") -> Figure:
    """plot_metric_vs against the core parameter count (everything but embedding and head): the axis on
    which architectures compare at equal size (see model.core_params)."""
    return plot_metric_vs(runs, keys.MODEL_PARAMS_CORE, metrics, group, arch)


def plot_metric_vs_context_dim(runs: pd.DataFrame, metrics: Sequence[str] = (FINAL_METRIC,),
                               x: str = "model.context_dim", group: str = "model.layers",
                               arch: str = "choices/model") -> Figure:
    """plot_metric_vs against the width (architectures of one width differ in size: prefer core params)."""
    return plot_metric_vs(runs, x, metrics, group, arch)


def plot_pareto_fronts(studies: Sequence[optuna.Study], objectives: tuple[int, int] = (0, 1),
                       names: Sequence[str] | None = None) -> Figure:
    """All completed trials (faint) and each study's Pareto front (line) of two objectives, one axes."""
    fig, axes = _figure(size=(6.0, 4.5))
    ax = axes[0][0]
    i, j = objectives
    for s in studies:
        if len(s.directions) <= max(i, j):
            raise AnalysisError(f"study {s.study_name!r} has {len(s.directions)} objective(s): no Pareto front")
        vals = np.array([t.values for t in completed_trials(s)], dtype=float).reshape(-1, len(s.directions))
        pts = ax.scatter(vals[:, i], vals[:, j], s=14, alpha=0.35)
        front = np.array(sorted((t.values[i], t.values[j]) for t in s.best_trials)).reshape(-1, 2)
        ax.plot(front[:, 0], front[:, 1], marker="o", color=pts.get_facecolor()[0][:3], label=s.study_name)
    ax.set_xlabel(_label(i, studies[0], names))
    ax.set_ylabel(_label(j, studies[0], names))
    ax.set_title("Pareto fronts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_optimization_history(studies: Sequence[optuna.Study], names: Sequence[str] | None = None) -> Figure:
    """One panel per objective (by name): every trial's value and the best-so-far line of each study that has
    that objective, against trial number."""
    panels = objective_panels(studies, names)
    fig, axes = _figure(1, len(panels))
    for ax, (name, members) in zip(axes[0], panels.items(), strict=True):
        for s, k in members:
            done = sorted(completed_trials(s), key=lambda t: t.number)
            num = [t.number for t in done]
            vals = np.array([t.values[k] for t in done], dtype=float)
            best = (np.fmin if s.directions[k] == optuna.study.StudyDirection.MINIMIZE else np.fmax).accumulate(vals)
            pts = ax.scatter(num, vals, s=12, alpha=0.4)
            ax.step(num, best, where="post", color=pts.get_facecolor()[0][:3], label=s.study_name)
        ax.set_xlabel("trial")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_param_importances(studies: Sequence[optuna.Study], objective: int | str = 0,
                           names: Sequence[str] | None = None) -> Figure:
    """One panel per study that has the objective (its index, or its name): bars of parameter importances."""
    members = [(s, k) for s in studies
               for k in ([objective] if isinstance(objective, int) else
                         [i for i, n in enumerate(objective_names(s, names)) if n == objective])
               if k < len(s.directions)]
    if not members:
        raise AnalysisError(f"no study has objective {objective!r}")
    fig, axes = _figure(1, len(members))
    for ax, (s, k) in zip(axes[0], members, strict=True):
        try:
            imp = param_importances(s, k).sort_values()
        except (AnalysisError, RuntimeError, ValueError) as err:  # too few / constant trials
            ax.text(0.5, 0.5, str(err), ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ax.barh(imp.index.str.removeprefix("params_"), imp.values)
        ax.set_xlabel("importance")
        ax.set_title(f"{s.study_name}: {_label(k, s, names)}")
    fig.tight_layout()
    return fig


def plot_training_curves(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None,
                         columns: Sequence[str] = (keys.P1_VAL_CONVERGENCE_RATE, keys.P1_EFFECTIVE_RANK,
                                                   keys.P2_VAL_PPL)) -> Figure:
    """history.csv of several runs overlaid: one panel per column, x = step within its phase."""
    fig, axes = _figure(1, len(columns))
    labels = _labels(run_dirs, labels)
    for run_dir, label in zip(run_dirs, labels, strict=True):
        hist = load_history(run_dir)
        for ax, col in zip(axes[0], columns, strict=True):
            if col in hist and hist[col].notna().any():
                s = hist[["step", col]].dropna()
                ax.plot(s["step"], s[col], marker="." if len(s) < 30 else None, label=label)
    for ax, col in zip(axes[0], columns, strict=True):
        ax.set_title(col)
        ax.set_xlabel("iteration" if col.startswith("phase1/") else "step")
        if col.endswith("_ppl"):
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_context_spectrum(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None,
                          centered: bool = False) -> Figure:
    """Normalised singular values s_i / s_1 of each run's Phase-1 contexts (log scale), effective rank in the legend."""
    fig, axes = _figure(size=(6.0, 4.0))
    ax = axes[0][0]
    labels = _labels(run_dirs, labels)
    for run_dir, label in zip(run_dirs, labels, strict=True):
        s, erank = context_spectrum(run_dir, centered)
        ax.plot(np.arange(1, len(s) + 1), s / s[0], marker=".", label=f"{label} (eff. rank {erank:.1f}/{len(s)})")
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1")
    ax.set_title("context singular-value spectrum" + (" (centred)" if centered else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure (temp file + os.replace, so no half-written PNG) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)


def plot_loss_by_position(curves: dict[str, dict[str, float]], title: str = ""):
    """One line per name (e.g. split or architecture): mean loss per position bucket."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", label=name)
    ax.set_xlabel("position in document (bucket)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    return fig


def save_position_plot(metrics: dict, path) -> None:
    """loss_by_position.png of a run: the val (and test) curves of its metrics, if any."""
    import matplotlib

    matplotlib.use("Agg")

    curves = {s: metrics[keys.p2_split(s, "loss_by_position")] for s in keys.HELD_OUT
              if keys.p2_split(s, "loss_by_position") in metrics}
    if not curves:
        return
    save_figure(plot_loss_by_position(curves, f"loss by position (eval_seq_len {metrics.get('phase2/eval_seq_len')})"),
                path)
