"""Checkpoints: atomic save, safe load, the resume state and Phase-1 reuse across runs.

Files in a run dir:
  checkpoints/last.pt    resume state: stage (phase1 | phase2), model, the phase's loop state
                         (optimizer, iteration/epoch, contexts, RNG...), metrics and history so far.
                         Written every N iterations/epochs and at the phase boundary; removed when
                         the run finishes.
  checkpoints/phase1.pt  the Phase-1 weights, their metrics and model config (training.phase1.from_run).
  checkpoint.pt          the final model (written by run.py when save_checkpoint=true).
  phase1_val_contexts.pt the held-out contexts Phase 1 converged to (save_contexts=true).
Every one of them is written by `save` and read by `load` (analysis included), which checks it.

Everything is stored as tensors, numbers, strings and containers, so `torch.load(weights_only=True)`
reads it; a truncated or foreign file is one clear CheckpointError, never a crash deep in torch.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from newllm.config import flatten
from newllm.errors import CheckpointError, first_line
from newllm.keys import PHASE1
from newllm.runtime.fileio import save_checkpoint

FORMAT = "newllm-checkpoint"
VERSION = 1
RESUME_FILE = "checkpoints/last.pt"
PHASE1_FILE = "checkpoints/phase1.pt"
FINAL_FILE = "checkpoint.pt"
VAL_CONTEXTS_FILE = "phase1_val_contexts.pt"  # kind val_contexts: {"contexts": (N, C)}


def save(path: str | Path, kind: str, payload: dict) -> Path:
    """torch.save to a temp file + rename: a kill mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    save_checkpoint(path, {"format": FORMAT, "version": VERSION, "kind": kind, **payload})
    return path


def load(path: str | Path, kind: str | None = None, mmap: bool = False) -> dict:
    """A checkpoint, checked; mmap=True maps its tensors instead of reading them (a cheap validity check)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 -- unpickling errors of every kind mean one thing here
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or foreign file: "
                              f"{first_line(err, limit=120)})") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a newllm checkpoint (no '{FORMAT}' marker)")
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {obj.get('version')!r}; "
                              f"this newllm reads versions <= {VERSION}")
    if kind is not None and obj.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {obj.get('kind')!r} checkpoint, expected {kind!r}")
    return obj


# ----------------------------------------------------------------------------- state pieces
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def module_state(module: torch.nn.Module) -> dict:
    """Parameters/buffers plus plain tensor/number attributes (e.g. a running mean kept outside buffers)."""
    extra = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and (v is None or isinstance(v, (torch.Tensor, int, float, bool)))}
    return {"state_dict": module.state_dict(), "attributes": extra}


def load_module_state(module: torch.nn.Module, state: dict, device: torch.device) -> None:
    """`module_state`'s inverse. Checkpoints load to the CPU: load_state_dict copies into the module's own
    tensors, but a plain tensor attribute is set as it comes, so it is moved to `device` (the run's)."""
    module.load_state_dict(state["state_dict"])
    for k, v in state["attributes"].items():
        setattr(module, k, v.to(device) if isinstance(v, torch.Tensor) else v)


def primitive(d: dict) -> dict:
    """The JSON-like part of a dict (what metrics/history rows hold)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def tensor_hash(*tensors: torch.Tensor, context: str = "") -> str:
    """Hash of the tensors' shapes, dtypes and bytes (the same bytes as (2, 64) and (4, 32) differ), and `context`."""
    h = hashlib.sha256(context.encode())
    for t in tensors:
        h.update(f"|{tuple(t.shape)}:{t.dtype}|".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def contexts_key(inputs: torch.Tensor, weights: list[torch.Tensor], precision: str) -> str:
    """Cache key of fixed Phase-2 contexts: the windows, f's weights, and how f was run (eval mode, precision)."""
    return tensor_hash(inputs, *weights, context=f"eval;precision={precision}")


# ----------------------------------------------------------------------------- resume
def resume_config(run_dir: str | Path, mmap: bool = False) -> tuple[DictConfig, dict | None]:
    """The config the interrupted run started with, and its last checkpoint (None if it wrote none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"resume={str(run_dir)!r} is not a run directory (no such folder)")
    if (run_dir / "metrics.json").is_file() and not (run_dir / RESUME_FILE).is_file():
        raise CheckpointError(f"resume={str(run_dir)!r}: that run already finished (metrics.json is written)")
    if (run_dir / RESUME_FILE).is_file():
        state = load(run_dir / RESUME_FILE, "resume", mmap=mmap)
        return OmegaConf.create(state["config"]), state
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise CheckpointError(f"resume={str(run_dir)!r} is not a run directory "
                              f"(neither {RESUME_FILE} nor .hydra/config.yaml is there)")
    return OmegaConf.load(saved), None  # killed before the first checkpoint: start over, same config


# ----------------------------------------------------------------------------- from_run
def phase1_checkpoint_path(source: str | Path) -> Path:
    source = Path(source)
    return source / PHASE1_FILE if source.is_dir() else source


def load_phase1(source: str | Path, model_cfg: dict, tokenizer: Tokenizer) -> dict:
    """The Phase-1 checkpoint of a run dir (or a checkpoint path), checked against this run."""
    path = phase1_checkpoint_path(source)
    if not path.is_file():
        raise CheckpointError(f"training.phase1.from_run={str(source)!r}: no Phase-1 checkpoint at {path}")
    state = load(path)
    if state.get("kind") != PHASE1:  # what run.py saves the Phase-1 checkpoint as
        raise CheckpointError(f"training.phase1.from_run={str(source)!r}: {path} holds a {state.get('kind')!r} "
                              f"checkpoint; point it at a run dir or its {PHASE1_FILE}")
    theirs, ours = flatten(state["config"]["model"]), flatten(model_cfg)
    differing = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k, "<unset>") != ours.get(k, "<unset>"))
    if differing:
        detail = ", ".join(f"model.{k}: {theirs.get(k, '<unset>')!r} there, {ours.get(k, '<unset>')!r} here"
                           for k in differing)
        raise CheckpointError(f"training.phase1.from_run={str(source)!r}: model config differs ({detail})")
    if state["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise CheckpointError(f"training.phase1.from_run={str(source)!r}: that run used a different tokenizer "
                              "(check data.* and tokenizer.* against its .hydra/config.yaml)")
    return state


def cached_contexts(cache_dir: Path, key: str, compute: Any) -> torch.Tensor:
    """Phase-1 contexts of the Phase-2 training windows, cached next to the Phase-1 checkpoint."""
    path = cache_dir / f"phase1_contexts-{key}.pt"
    if path.is_file():
        try:
            return load(path, "contexts")["contexts"]
        except CheckpointError:
            path.unlink(missing_ok=True)  # a corrupt cache entry is rebuilt, never used
    contexts = compute()
    save(path, "contexts", {"contexts": contexts.cpu()})
    return contexts
