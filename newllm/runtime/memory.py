"""Memory: refuse a model that cannot fit before any work, and make out-of-memory errors one line.

    check_model_fits(cfg, device)      # before data: parameter count from a model built on the meta device
    with out_of_memory_guard(cfg, "phase 1"):
        ...                            # an allocation that fails -> ResourceError naming its size and the keys

Training needs 16 bytes per parameter in fp32 (weights, gradients and Adam's two moments), plus
activations that depend on the data; the up-front check counts only the former, so a run it lets
through can still run out of memory later, in a phase, and then the guard names what to lower.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from newllm.errors import ResourceError
from newllm.models import build_model

TRAINING_BYTES_PER_PARAM = 16
MODEL_KEYS = ("model.context_dim", "model.embed_dim", "model.hidden_dim", "model.layers", "tokenizer.vocab_size")
STAGE_KEYS = {  # what sets the size of the tensors each stage allocates
    "building the model": MODEL_KEYS,
    "phase 1": (*MODEL_KEYS, "training.phase1.max_tokens", "training.phase1.num_streams",
                "training.phase1.chunk_size", "training.phase1.erank_samples"),
    "repetition training": (*MODEL_KEYS, "data.phrase_lengths", "data.repetitions", "data.phrases_per_stage"),
    "phase 2": (*MODEL_KEYS, "training.phase2.batch_size", "training.phase2.seq_len"),
}


def gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


def _settings(cfg: DictConfig, keys: tuple[str, ...]) -> str:
    values = ((k, OmegaConf.select(cfg, k)) for k in keys)
    return ", ".join(f"{k}={'null' if v is None else v}" for k, v in values)


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has in all: GPU memory, or RAM (capped by a cgroup limit, as in containers)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit():
        total = min(total, int(limit.read_text()))
    return total


def check_model_fits(cfg: DictConfig, device: torch.device) -> None:
    """Refuse, before any work, a model whose training state alone exceeds the device's memory.

    The model is built on the meta device (shapes, no storage), with the requested vocabulary size
    (the tokenizer's is at most that for a trained BPE)."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.tokenizer.vocab_size)
    n = sum(p.numel() for p in model.parameters())
    need, have = TRAINING_BYTES_PER_PARAM * n, device_memory(device)
    if need > have:
        raise ResourceError(f"{_settings(cfg, MODEL_KEYS)} make a model of {n:,} parameters: training it needs "
                            f"{gigabytes(need)} ({TRAINING_BYTES_PER_PARAM} bytes a parameter for weights, gradients "
                            f"and Adam state), more than the {gigabytes(have)} of {device.type} memory here: use "
                            "a smaller model.context_dim, model.hidden_dim, model.layers or model.embed_dim")


def _failed_size(err: BaseException) -> str:
    """The allocation that failed, as torch reports it (CPU: 'allocate N bytes', CUDA: 'Tried to allocate 2.00 GiB')."""
    text = str(err)
    if m := re.search(r"allocate (\d+) bytes", text):
        return gigabytes(int(m.group(1)))
    if m := re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", text):
        return m.group(1)
    return "an allocation"


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and ("can't allocate" in str(err) or "out of memory" in str(err))


@contextmanager
def out_of_memory_guard(cfg: DictConfig, stage: str) -> Iterator[None]:
    """An out-of-memory error inside becomes a ResourceError: the size that failed and the keys that set it."""
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise ResourceError(f"out of memory in {stage}: {_failed_size(err)} could not be allocated; the sizes "
                            f"come from {_settings(cfg, STAGE_KEYS[stage])}: lower them") from err
