"""Optuna studies -> tables: trials, Pareto fronts, hypervolumes, parameter importances, per-study summaries."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml

from newllm import keys
from newllm.analysis.runs import FINAL_METRIC
from newllm.errors import AnalysisError


def load_studies(storage: str | Sequence[str], names: Sequence[str] | None = None) -> list[optuna.Study]:
    """Every study in one or more storages (or only `names`), in storage order."""
    storages = [storage] if isinstance(storage, str) else list(storage)
    studies = []
    for url in storages:
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise AnalysisError(f"storage {url!r}: no such SQLite file (an Optuna sweep with "
                                "hydra.sweeper.storage=<url> creates it)")
        summaries = optuna.get_all_study_summaries(url, include_best_trial=False)
        studies += [optuna.load_study(study_name=s.study_name, storage=url) for s in summaries
                    if names is None or s.study_name in names]
    if not studies:
        which = f" named {list(names)}" if names else ""
        raise AnalysisError(f"no Optuna studies{which} in {storages}")
    return studies


def _objectives_of_trial_runs(study: optuna.Study) -> list[str] | None:
    """`objectives` from the config of a trial's run dir (hydra/sweeper=newllm_optuna stores `run_dir`)."""
    for t in completed_trials(study):
        config = Path(str(t.user_attrs.get("run_dir", ""))) / ".hydra" / "config.yaml"
        if t.user_attrs.get("run_dir") and config.is_file():
            return (yaml.safe_load(config.read_text()) or {}).get("objectives")
    return None


def objective_names(study: optuna.Study, names: Sequence[str] | None = None) -> list[str]:
    """`names` if given, else study.metric_names if the sweeper set them, else the study's 'objectives'
    user attr, else the `objectives` its trials' runs returned (newllm_optuna sweeper), else objective_i."""
    names = names or study.metric_names or study.user_attrs.get("objectives") or _objectives_of_trial_runs(study)
    if names and len(names) == len(study.directions):
        return list(names)
    return [f"objective_{i}" for i in range(len(study.directions))]


CORE_PARAMS_ATTR = keys.MODEL_PARAMS_CORE  # a trial's metrics.json, stored as user attrs by newllm_optuna


def objective_panels(studies: Sequence[optuna.Study], names: Sequence[str] | None = None
                     ) -> dict[str, list[tuple[optuna.Study, int]]]:
    """Objective name -> [(study, index of that objective in it)], in order of first appearance: studies
    share a plot panel where they share an objective, and each appears only under its own objectives."""
    panels: dict[str, list[tuple[optuna.Study, int]]] = {}
    for s in studies:
        for k, name in enumerate(objective_names(s, names)):
            panels.setdefault(name, []).append((s, k))
    return panels


def trials_frame(studies: Iterable[optuna.Study]) -> pd.DataFrame:
    """All trials of all studies: study, number, state, values, params_*, core_params (the trial's core
    parameter count, beside the size params it came from; NaN where the sweeper kept no metrics),
    user_attrs_*, times."""
    frames = []
    for study in studies:
        df = study.trials_dataframe(multi_index=False)
        df.insert(0, "study", study.study_name)
        core = df.pop(f"user_attrs_{CORE_PARAMS_ATTR}") if f"user_attrs_{CORE_PARAMS_ATTR}" in df else math.nan
        params = [i for i, c in enumerate(df.columns) if c.startswith("params_")]
        df.insert(params[-1] + 1 if params else len(df.columns), "core_params", core)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The COMPLETE trials of a study (no copies)."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def pareto_front(study: optuna.Study, names: Sequence[str] | None = None) -> pd.DataFrame:
    """The best trials (the Pareto front when multi-objective), sorted by the first objective, with the
    core parameter count and the test perplexity of each (from the trial's metrics; NaN if not kept).
    Trials were selected on validation; the test column is the figure to report."""
    names = objective_names(study, names)
    rows = [{"study": study.study_name, "number": t.number, **dict(zip(names, t.values, strict=True)),
             **{f"params_{k}": v for k, v in t.params.items()},
             "core_params": t.user_attrs.get(CORE_PARAMS_ATTR, math.nan),
             FINAL_METRIC: t.user_attrs.get(FINAL_METRIC, math.nan)} for t in study.best_trials]
    return pd.DataFrame(rows).sort_values(names[0]).reset_index(drop=True) if rows else pd.DataFrame()


def _losses(study: optuna.Study) -> np.ndarray:
    """Completed trials' values in minimisation form (maximised objectives negated), shape (T, M)."""
    signs = np.array([1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions])
    vals = np.array([t.values for t in completed_trials(study)], dtype=float).reshape(-1, len(signs))
    return vals * signs


def hypervolume_reference(studies: Sequence[optuna.Study], margin: float = 0.1) -> np.ndarray:
    """A reference point shared by studies with the same directions (minimisation form): the worst value
    per objective over all their completed trials, pushed out by `margin` of the range (or of |worst|)."""
    losses = np.concatenate([_losses(s) for s in studies])
    losses = losses[np.isfinite(losses).all(axis=1)]
    worst, best = losses.max(axis=0), losses.min(axis=0)
    span = np.where(worst > best, worst - best, np.maximum(np.abs(worst), 1.0))
    return worst + margin * span


def hypervolume(study: optuna.Study, reference: np.ndarray) -> float:
    """Hypervolume of the completed trials against `reference` (optuna's WFG implementation)."""
    from newllm.sweep.compat import compute_hypervolume  # Optuna's own (private: wrapped in newllm.sweep.compat)

    losses = _losses(study)
    losses = losses[np.isfinite(losses).all(axis=1) & (losses < reference).all(axis=1)]
    return float(compute_hypervolume(losses, reference)) if len(losses) else 0.0


def compare_studies(studies: Sequence[optuna.Study], reference: Sequence[float] | None = None,
                    names: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per study: trials by state, best value per objective, #best trials, hypervolume.

    Hypervolume is given for multi-objective studies; studies with the same directions share one
    reference point (hypervolume_reference over all of them, or `reference`) so the numbers compare.
    """
    groups: dict[tuple, list[optuna.Study]] = {}
    for s in studies:
        groups.setdefault(tuple(s.directions), []).append(s)
    refs = {}
    for dirs, group in groups.items():
        if len(dirs) > 1 and any(len(completed_trials(s)) for s in group):
            refs[dirs] = np.asarray(reference, dtype=float) if reference is not None else hypervolume_reference(group)
    rows = []
    for s in studies:
        trials = s.get_trials(deepcopy=False)
        row: dict[str, Any] = {"study": s.study_name, "directions": ",".join(d.name.lower() for d in s.directions),
                               "trials": len(trials)}
        for state in optuna.trial.TrialState:
            row[state.name.lower()] = sum(t.state == state for t in trials)
        done = completed_trials(s)
        for i, (name, d) in enumerate(zip(objective_names(s, names), s.directions, strict=True)):
            vals = [t.values[i] for t in done if math.isfinite(t.values[i])]
            pick = min if d == optuna.study.StudyDirection.MINIMIZE else max
            row[f"best {name}"] = pick(vals) if vals else math.nan
        row["n_best"] = len(s.best_trials) if done else 0
        ref = refs.get(tuple(s.directions))
        row["hypervolume"] = hypervolume(s, ref) if ref is not None else math.nan
        row["hv_reference"] = None if ref is None else json.dumps([float(r) for r in ref])
        rows.append(row)
    return pd.DataFrame(rows)


def param_importances(study: optuna.Study, objective: int = 0) -> pd.Series:
    """optuna.importance.get_param_importances (PED-ANOVA by default) for one objective."""
    if len(completed_trials(study)) < 2:
        raise AnalysisError(f"study {study.study_name!r}: importances need at least 2 completed trials")
    sign = 1.0 if study.directions[objective] == optuna.study.StudyDirection.MINIMIZE else -1.0
    with warnings.catch_warnings():  # PED-ANOVA warns that it ranks params for LOW targets: hence the sign
        warnings.simplefilter("ignore", UserWarning)
        imp = optuna.importance.get_param_importances(study, target=lambda t: sign * t.values[objective])
    return pd.Series(imp, name=objective_names(study)[objective], dtype=float)
