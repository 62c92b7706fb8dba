"""Runs and Optuna studies -> pandas DataFrames and matplotlib figures.

Used by notebooks/ and by `python -m newllm.analyze`. Reads only what a run leaves on disk
(.hydra/*.yaml, metrics.json, history.csv, run.log, phase1_val_contexts.pt, checkpoint.pt,
tokenizer.json) and what Optuna stores; never imports newllm.training (arrows point down).

    runs = load_runs("outputs")                 # one row per run dir, cached incrementally
    aggregate(runs, by=["seed"])                # runs that differ only in seed -> mean and 95 % interval
    studies = load_studies("sqlite:///outputs/optuna.db")
    compare_studies(studies)                    # one summary row per study

Final comparisons use the test split (phase2/test_*): validation picked each run's weights and
pruned its trials, so its figures are optimistically biased; the defaults below say so in their names.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import pandas as pd
import yaml
from omegaconf import OmegaConf

from newllm.errors import NewllmError
from newllm.fileio import atomic_write
from newllm.scaling import fit_power_law, plot_power_law  # noqa: F401  (issue 15: newllm.analysis.fit_power_law)

if TYPE_CHECKING:  # torch and matplotlib load lazily: `analyze runs` answers in about a second
    import torch
    from matplotlib.figure import Figure

CACHE_NAME = ".runs_cache.parquet"
# Columns every runs table starts with; metrics follow, then the flattened config.
ID_COLUMNS = ["run", "status", "sweep_id", "job", "start_time", "end_time", "choices/model", "overrides", "error",
              "pruned_reason"]
KEY_METRICS = ["phase1/val_convergence_rate", "phase1/val_memory_length", "phase1/val_effective_rank",
               "phase2/val_ppl", "phase2/test_ppl", "phase2/test_acc", "model/params_core", "time/wall_s"]
FINAL_METRIC = "phase2/test_ppl"  # what final comparisons report: the held-out test split, read once per run
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d ")  # '[2026-11-23 10:00:00,000][logger][LEVEL] - ...'
# Config keys that differ between runs without describing the experiment.
NOISE_KEYS = ("paths.", "hydra.", "progress", "device")


class AnalysisError(NewllmError):
    """Nothing to analyse (missing folder, no runs, unknown study, unreadable file...)."""


# ----------------------------------------------------------------------------- run directories
def find_run_dirs(root: str | Path) -> list[Path]:
    """Every directory below `root` that Hydra made for a job (it holds .hydra/config.yaml)."""
    root = Path(root)
    if not root.is_dir():
        raise AnalysisError(f"runs folder {str(root)!r} does not exist (expected e.g. 'outputs', "
                            "where `python -m newllm.run` writes runs/ and multirun/)")
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if ".hydra" in dirnames:
            if (Path(dirpath) / ".hydra" / "config.yaml").is_file():
                found.append(Path(dirpath))
            dirnames.remove(".hydra")
        dirnames[:] = [d for d in dirnames if d != "cache"]  # tokenizer/data caches hold no runs
    return sorted(found)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _signature(run_dir: Path) -> str:
    """Changes whenever a file load_runs reads from this run dir changes."""
    parts = []
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json", "run.log"):
        try:
            st = (run_dir / name).stat()
            parts.append(f"{st.st_mtime_ns}:{st.st_size}")
        except FileNotFoundError:
            parts.append("-")
    return "|".join(parts)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'layers': 2}} -> {'model.layers': 2}; lists become JSON strings (one table cell)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _as_number(value: Any) -> Any:
    """metrics.json stores non-finite floats as "nan"/"inf"/"-inf"."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def _resolved_config(path: Path) -> dict:
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation this process cannot resolve: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _exception_of(traceback: list[str]) -> str | None:
    """Type and message of the exception a logged traceback ends with, as one line.

    After the last frame ('  File ...' and its indented source lines) comes 'Type: message', whose
    message may run over several lines, indented or not (OmegaConf adds 'full_key: ...' lines)."""
    lines = list(itertools.takewhile(lambda t: not LOG_LINE.match(t), traceback))
    frames = [i for i, t in enumerate(lines) if t.startswith("  File ")]
    rest = lines[frames[-1] + 1:] if frames else lines
    start = next((i for i, t in enumerate(rest) if t.strip() and not t.startswith(" ")), None)
    if start is None:
        return None
    return " ".join(t.strip() for t in rest[start:] if t.strip())


def _failure(run_dir: Path) -> str | None:
    """The error a run logged: newllm's one line (a one-line error, or an exception's type and message),
    else the exception ending Hydra's 'Job failed' traceback (runs from before newllm logged that line)."""
    log = run_dir / "run.log"
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"\]\[ERROR\] - (.*)", line)
        if m:
            if m.group(1).strip() == "Job failed":
                return _exception_of(lines[i + 1:]) or "Job failed"
            return m.group(1).strip()
    return None


def _pruned_reason(run_dir: Path) -> str | None:
    """Why a sweep stopped this trial early (its pruner, an early-stop rule), if it did: the run logs it."""
    log = run_dir / "run.log"
    if not log.is_file():
        return None
    # 'trial pruned: <reason>' (newllm.run); older runs ended in a 'Job failed' traceback of TrialPruned
    m = re.search(r"\]\[INFO\] - trial pruned: (.*)|^newllm\.sweeping\.TrialPruned: (.*)$",
                  log.read_text(errors="replace"), re.MULTILINE)
    return (m.group(1) or m.group(2)).strip() if m else None


def _sweep_dir(run_dir: Path, root: Path, mode: str | None) -> Path | None:
    """The multirun folder of a job: the nearest ancestor holding Hydra's multirun.yaml (the basic
    sweeper writes it), else the job's parent (the Optuna sweeper writes none); None for single runs."""
    if mode != "MULTIRUN":
        return None
    for parent in run_dir.parents:
        if (parent / "multirun.yaml").is_file():
            return parent
        if parent == root:
            break
    return run_dir.parent


def read_run(run_dir: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """One row of the runs table: ids, status, metrics and the flattened resolved config."""
    run_dir = Path(run_dir)
    root = Path(root) if root is not None else run_dir.parent
    hydra_dir = run_dir / ".hydra"
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) if (hydra_dir / "overrides.yaml").is_file() \
        else []
    hydra_cfg = yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) if (hydra_dir / "hydra.yaml").is_file() else {}
    hydra_node = (hydra_cfg or {}).get("hydra", {})
    job = hydra_node.get("job", {})
    choices = hydra_node.get("runtime", {}).get("choices", {}) or {}
    sweep = _sweep_dir(run_dir, root, hydra_node.get("mode"))
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    pruned = None if metrics else _pruned_reason(run_dir)
    error = None if metrics or pruned else _failure(run_dir)
    end = _mtime(metrics_path)
    row: dict[str, Any] = {
        "run": run_dir.relative_to(root).as_posix() if run_dir.is_relative_to(root) else str(run_dir),
        "status": "completed" if metrics else "pruned" if pruned else "failed" if error else "incomplete",
        "sweep_id": None if sweep is None else (sweep.relative_to(root).as_posix() if sweep != root else "."),
        "job": job.get("num") if sweep is not None else None,
        "start_time": datetime.fromtimestamp(_mtime(hydra_dir / "config.yaml") or 0, UTC),
        "end_time": datetime.fromtimestamp(end, UTC) if end else None,
        "overrides": " ".join(overrides or []),
        "error": error,
        "pruned_reason": pruned,
        **{f"choices/{k}": v for k, v in choices.items() if not k.startswith("hydra/")},
        **{k: _as_number(v) for k, v in metrics.items()},
        **flatten(_resolved_config(hydra_dir / "config.yaml")),
    }
    if row.get("model.core_params") is not None:  # a budget: the widths that ran were solved from it
        for key in ("context_dim", "hidden_dim"):
            if f"model/{key}" in metrics:
                row[f"model.{key}"] = metrics[f"model/{key}"]
    return row


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding several Python types (a key that is 'auto' in one run, 3 in another) become str."""
    df = df.copy()
    for col in [c for c in df.columns if df[c].dtype == object]:
        types = {type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(types) > 1:
            df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return df


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    ids = [c for c in ID_COLUMNS if c in df]
    choices = sorted(c for c in df if c.startswith("choices/") and c not in ids)
    metrics = sorted(c for c in df if "/" in c and c not in ids and c not in choices and c != "_signature")
    config = sorted(c for c in df if c not in ids + choices + metrics and c not in ("run_dir", "_signature"))
    return df[ids + choices + metrics + config + [c for c in ("run_dir", "_signature") if c in df]]


def load_runs(root: str | Path = "outputs", cache: bool = True) -> pd.DataFrame:
    """Every run dir below `root` -> one row each (see read_run), newest first.

    With `cache`, the table is kept in <root>/.runs_cache.parquet and only run dirs that are new or
    whose files changed since are re-read; vanished ones are dropped. Column `run_dir` is absolute.
    """
    root = Path(root)
    dirs = find_run_dirs(root)
    if not dirs:
        raise AnalysisError(f"no run directories under {str(root)!r} (a run dir holds .hydra/config.yaml; "
                            "start one with `python -m newllm.run`)")
    signatures = {d.relative_to(root).as_posix(): _signature(d) for d in dirs}
    cache_path = root / CACHE_NAME
    cached = pd.DataFrame()
    if cache and cache_path.is_file():
        try:
            cached = pd.read_parquet(cache_path)
            cached = cached[cached["run"].map(signatures.get) == cached["_signature"]]
        except Exception:  # unreadable or from an older layout: rebuild
            cached = pd.DataFrame()
    have = set(cached["run"]) if len(cached) else set()
    fresh = [{**read_run(root / rel, root), "_signature": sig} for rel, sig in signatures.items() if rel not in have]
    parts = [p for p in (cached, pd.DataFrame(fresh)) if len(p)]
    df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    df = _parquet_safe(df)
    if cache and fresh:
        with contextlib.suppress(OSError):  # read-only outputs: analyse without caching
            atomic_write(cache_path, lambda tmp: df.to_parquet(tmp, index=False))
    df = df.drop(columns="_signature")
    df["run_dir"] = [str((root / r).resolve()) for r in df["run"]]
    df = df.sort_values("start_time", ascending=False, kind="stable").reset_index(drop=True)
    return _order_columns(df)


def varying_config_columns(runs: pd.DataFrame) -> list[str]:
    """Config columns whose value differs between runs (what a sweep varied), noise keys excluded."""
    cols = [c for c in runs.columns if "." in c and "/" not in c and not c.startswith(NOISE_KEYS) and c != "run_dir"]
    return [c for c in cols if runs[c].astype(str).nunique(dropna=False) > 1]


def summary_columns(runs: pd.DataFrame) -> list[str]:
    """A readable subset: ids, what varied, the key metrics."""
    ids = [c for c in ("run", "status", "choices/model") if c in runs]
    return ids + varying_config_columns(runs) + [m for m in KEY_METRICS if m in runs]


def select_sweep(runs: pd.DataFrame, sweep_id: str | None = None) -> pd.DataFrame:
    """The jobs of one multirun (`sweep_id` as in the runs table; None: the most recent multirun)."""
    sweeps = runs.dropna(subset=["sweep_id"])
    if sweeps.empty:
        raise AnalysisError("no multirun jobs in this runs table (start one with `python -m newllm.run -m ...`)")
    if sweep_id is None:
        sweep_id = sweeps.sort_values("start_time")["sweep_id"].iloc[-1]
    part = sweeps[sweeps["sweep_id"] == sweep_id]
    if part.empty:
        known = sorted(sweeps["sweep_id"].unique())
        raise AnalysisError(f"sweep_id={sweep_id!r} is not in this runs table; known: {known}")
    return part.sort_values("job").reset_index(drop=True)


def size_key(runs: pd.DataFrame) -> str:
    """What sizes a sweep: model.core_params (a budget, equal for every architecture) when its runs
    set one, else model.context_dim."""
    budgets = runs["model.core_params"] if "model.core_params" in runs else pd.Series(dtype=float)
    return "model.core_params" if budgets.notna().any() else "model.context_dim"


def compare_architectures(runs: pd.DataFrame, metric: str = FINAL_METRIC, index: Sequence[str] | None = None,
                          arch: str = "choices/model") -> pd.DataFrame:
    """Completed runs as a table: one row per size (layers x budget, or x context_dim without budgets),
    one column per architecture, the mean over repeats (seeds) of `metric` (default: test perplexity)."""
    done = runs[runs["status"] == "completed"]
    index = list(index) if index is not None else ["model.layers", size_key(done)]
    return done.pivot_table(index=index, columns=arch, values=metric, aggfunc="mean")


# ----------------------------------------------------------------------------- seeds and uncertainty
def ci95(values: Sequence[float] | pd.Series) -> float:
    """Half-width of the two-sided 95 % Student-t interval of the mean: t(0.975, n-1) * s / sqrt(n),
    s the sample standard deviation (ddof 1) of the finite values; NaN for fewer than 2."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


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


def latest_run(runs: pd.DataFrame) -> Path:
    done = runs[runs["status"] == "completed"]
    if done.empty:
        raise AnalysisError("no completed run (with metrics.json) in this runs table")
    return Path(done.sort_values("start_time")["run_dir"].iloc[-1])


# ----------------------------------------------------------------------------- one run
def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise AnalysisError(f"{path} does not exist: {what}")
    return path


def load_history(run_dir: str | Path) -> pd.DataFrame:
    """history.csv: one row per Phase-1 iteration (phase=1) and Phase-2 epoch (phase=2)."""
    path = _need(Path(run_dir) / "history.csv", "the run did not finish (history.csv is written at the end)")
    return pd.read_csv(path)


def load_contexts(run_dir: str | Path) -> torch.Tensor:
    """The (N, C) validation contexts Phase 1 converged to (phase1_val_contexts.pt)."""
    import torch

    path = _need(Path(run_dir) / "phase1_val_contexts.pt", "run with save_contexts=true and Phase 1 enabled")
    return torch.load(path, weights_only=True)


def context_spectrum(run_dir: str | Path, centered: bool = False) -> tuple[np.ndarray, float]:
    """Singular values of a run's contexts (descending) and their effective rank."""
    from newllm.metrics import effective_rank_from_singular_values, singular_values

    s = singular_values(load_contexts(run_dir), centered=centered)
    return s.numpy(), effective_rank_from_singular_values(s)


def load_model(run_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a finished run, rebuilt from checkpoint.pt's config and tokenizer.json."""
    import torch
    from tokenizers import Tokenizer

    from newllm.models import build_model

    run_dir = Path(run_dir)
    ckpt = torch.load(_need(run_dir / "checkpoint.pt", "run with save_checkpoint=true"), map_location=device,
                      weights_only=True)
    model = build_model(OmegaConf.create(ckpt["config"]["model"]), ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer.from_file(str(_need(run_dir / "tokenizer.json", "the run's tokenizer")))
    return model.to(device).eval(), tokenizer


def generate_text(run_dir: str | Path, prompt: str, n: int = 40, temperature: float = 0.8, top_k: int | None = 20,
                  seed: int = 0) -> str:
    """Sample `n` tokens after `prompt` with a run's model (ContextLM.generate); returns the decoded sample."""
    import torch

    model, tokenizer = load_model(run_dir)
    if not hasattr(model, "generate"):
        raise AnalysisError(f"{type(model).__name__} has no generate(): only context models sample here")
    ids = torch.tensor(tokenizer.encode(prompt).ids, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, n, temperature=temperature, top_k=top_k,
                             generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out.tolist())


# ----------------------------------------------------------------------------- Optuna studies
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
    for t in _complete(study):
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


CORE_PARAMS_ATTR = "model/params_core"  # a trial's metrics.json, stored as user attrs by newllm_optuna


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


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
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
    vals = np.array([t.values for t in _complete(study)], dtype=float).reshape(-1, len(signs))
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
    from newllm.compat import compute_hypervolume  # Optuna's own (private: wrapped in newllm.compat)

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
        if len(dirs) > 1 and any(len(_complete(s)) for s in group):
            refs[dirs] = np.asarray(reference, dtype=float) if reference is not None else hypervolume_reference(group)
    rows = []
    for s in studies:
        trials = s.get_trials(deepcopy=False)
        row: dict[str, Any] = {"study": s.study_name, "directions": ",".join(d.name.lower() for d in s.directions),
                               "trials": len(trials)}
        for state in optuna.trial.TrialState:
            row[state.name.lower()] = sum(t.state == state for t in trials)
        done = _complete(s)
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
    if len(_complete(study)) < 2:
        raise AnalysisError(f"study {study.study_name!r}: importances need at least 2 completed trials")
    sign = 1.0 if study.directions[objective] == optuna.study.StudyDirection.MINIMIZE else -1.0
    with warnings.catch_warnings():  # PED-ANOVA warns that it ranks params for LOW targets: hence the sign
        warnings.simplefilter("ignore", UserWarning)
        imp = optuna.importance.get_param_importances(study, target=lambda t: sign * t.values[objective])
    return pd.Series(imp, name=objective_names(study)[objective], dtype=float)


def _labels(run_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    """Given labels, else the last two parts of each run dir (e.g. 'grid/3')."""
    return list(labels) if labels is not None else ["/".join(Path(d).parts[-2:]) for d in run_dirs]


# ----------------------------------------------------------------------------- plots (matplotlib, offline)
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
    return plot_metric_vs(runs, "model/params_core", metrics, group, arch)


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
        vals = np.array([t.values for t in _complete(s)], dtype=float).reshape(-1, len(s.directions))
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
            done = sorted(_complete(s), key=lambda t: t.number)
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
                         columns: Sequence[str] = ("phase1/val_convergence_rate", "phase1/effective_rank",
                                                   "phase2/val_ppl")) -> Figure:
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
