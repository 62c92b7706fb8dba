"""The runs table: every run dir below a folder -> one row (ids, status, metrics, flattened config),
cached incrementally; and what one finished run left on disk (history, contexts, model, samples).

Reads only what a run leaves (.hydra/*.yaml, metrics.json, history.csv, run.log, phase1_val_contexts.pt,
checkpoint.pt, tokenizer.json; the .pt files through newllm.runtime.checkpoint.load, which checks them);
never imports newllm.training (arrows point down).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf

from newllm import keys
from newllm.config import flatten
from newllm.errors import AnalysisError, first_line
from newllm.runtime.fileio import atomic_write

if TYPE_CHECKING:  # torch loads lazily: `analyze runs` answers in about a second
    import torch

CACHE_NAME = ".runs_cache.parquet"
# Columns every runs table starts with; metrics follow, then the flattened config.
ID_COLUMNS = ["run", "status", "sweep_id", "job", "start_time", "end_time", "choices/model", "overrides", "error",
              "pruned_reason"]
KEY_METRICS = [keys.P1_VAL_CONVERGED_GAIN, keys.P1_VAL_PROBE_GAIN, keys.P1_VAL_CONVERGENCE_RATE,
               keys.P1_VAL_MEMORY_LENGTH, keys.P1_VAL_EFFECTIVE_RANK,
               keys.P2_VAL_PPL, keys.P2_TEST_PPL, keys.P2_TEST_ACC, keys.MODEL_PARAMS_CORE, keys.WALL_S]
FINAL_METRIC = keys.P2_TEST_PPL  # what final comparisons report: the held-out test split, read once per run
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d ")  # '[2026-11-23 10:00:00,000][logger][LEVEL] - ...'
# Config keys that differ between runs without describing the experiment.
NOISE_KEYS = ("paths.", "hydra.", "progress", "device")


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


def _config_cells(config: dict) -> dict[str, Any]:
    """{'model': {'layers': 2, 'sizes': [1, 2]}} -> {'model.layers': 2, 'model.sizes': '[1, 2]'}: one table
    cell per key, lists as JSON strings."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(config).items()}


def _as_number(value: Any) -> Any:
    """metrics.json stores non-finite floats as "nan"/"inf"/"-inf"."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics.json as numbers (its "nan"/"inf" strings as floats); {} when the run wrote none. A file
    that is not a JSON object (truncated or damaged outside newllm, which writes it atomically) is an
    AnalysisError naming it."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path} is unreadable ({first_line(err)})") from err
    if not isinstance(metrics, dict):
        raise AnalysisError(f"{path} is unreadable (a JSON {type(metrics).__name__}, not an object)")
    return {k: _as_number(v) for k, v in metrics.items()}


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
    try:
        metrics, unreadable = read_metrics(run_dir), None
    except AnalysisError as err:  # one damaged folder is one failed row, not a table that cannot be read
        metrics, unreadable = {}, str(err)
    pruned = None if metrics or unreadable else _pruned_reason(run_dir)
    error = unreadable or (None if metrics or pruned else _failure(run_dir))
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
        **metrics,
        **_config_cells(_resolved_config(hydra_dir / "config.yaml")),
    }
    if row.get("model.core_params") is not None:  # a budget: the widths that ran were solved from it
        for key in ("context_dim", "hidden_dim"):
            if keys.model_key(key) in metrics:
                row[f"model.{key}"] = metrics[keys.model_key(key)]
    return row


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding several Python types (a key that is 'auto' in one run, 3 in another) become str."""
    mixed = {}
    for col in [c for c in df.columns if df[c].dtype == object]:
        types = {type(v) for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if len(types) > 1:
            mixed[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v))
                                     else str(v))
    # one concat, not a setitem per column: hundreds of setitems fragment the frame (PerformanceWarning on stderr)
    return pd.concat([df.drop(columns=list(mixed)), pd.DataFrame(mixed, index=df.index)], axis=1)[list(df.columns)]


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
    df = df.drop(columns="_signature").copy()  # copy() consolidates: per-column inserts below would warn on stderr
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
    """history.csv: one row per Phase-1 iteration (phase=phase1) and Phase-2 evaluation (phase=phase2)."""
    path = _need(Path(run_dir) / "history.csv", "the run did not finish (history.csv is written at the end)")
    return pd.read_csv(path)


def load_contexts(run_dir: str | Path) -> torch.Tensor:
    """The (N, C) validation contexts Phase 1 converged to (phase1_val_contexts.pt), read by checkpoint.load."""
    from newllm.runtime import checkpoint

    path = _need(Path(run_dir) / checkpoint.VAL_CONTEXTS_FILE, "run with save_contexts=true and Phase 1 enabled")
    return checkpoint.load(path, "val_contexts")["contexts"]  # a bad file: one-line CheckpointError


def context_spectrum(run_dir: str | Path, centered: bool = False) -> tuple[np.ndarray, float]:
    """Singular values of a run's contexts (descending) and their effective rank."""
    from newllm.metrics import effective_rank_from_singular_values, singular_values

    s = singular_values(load_contexts(run_dir), centered=centered)
    return s.numpy(), effective_rank_from_singular_values(s)


def load_model(run_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a finished run, rebuilt from checkpoint.pt's config and tokenizer.json."""
    from tokenizers import Tokenizer

    from newllm.models import build_model
    from newllm.runtime import checkpoint

    run_dir = Path(run_dir)
    path = _need(run_dir / checkpoint.FINAL_FILE, "run with save_checkpoint=true")
    ckpt = checkpoint.load(path, "final")  # format, version and kind checked: one-line CheckpointError
    model = build_model(OmegaConf.create(ckpt["config"]["model"]), ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    tokenizer = Tokenizer.from_file(str(_need(run_dir / "tokenizer.json", "the run's tokenizer")))
    return model.to(device).eval(), tokenizer


def generate_text(run_dir: str | Path, prompt: str, n: int = 40, temperature: float = 0.8, top_k: int | None = 20,
                  seed: int = 0) -> str:
    """Sample `n` tokens after `prompt` with a run's model (every model's generate(prompt, n, temperature, top_k,
    generator)); returns the decoded sample."""
    import torch

    model, tokenizer = load_model(run_dir)
    ids = torch.tensor(tokenizer.encode(prompt).ids, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, n, temperature=temperature, top_k=top_k,
                             generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out.tolist())
