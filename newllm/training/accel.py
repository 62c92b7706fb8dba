"""Speed switches: bf16 autocast (`training.precision`) and torch.compile (`training.compile`).

Both are safe everywhere: where a switch is unsupported it is a no-op with one log line saying so,
so a config that asks for it still runs (same results, fp32/eager speed).
"""

from __future__ import annotations

import contextlib
import logging
import shutil

import torch
from torch import nn

log = logging.getLogger("newllm")

# The modules that do the per-token work, by model family (everything else is an embedding or a head).
COMPILE_TARGETS = ("blocks", "rnn", "decoder")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when precision=bf16 and the device supports it; else a null context."""
    if precision != "bf16":
        return contextlib.nullcontext()
    supported = torch.amp.is_autocast_available(device.type) and (
        device.type != "cuda" or torch.cuda.is_bf16_supported())
    if not supported:
        log.info("training.precision=bf16: not supported on %s, running fp32", device)
        return contextlib.nullcontext()
    # The context spans whole training loops, so the bf16 weight cache must be off: a cached cast
    # would keep serving the weights of before the optimizer's steps (the model stops learning).
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def maybe_compile(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """Compile the per-token modules in place (nn.Module.compile keeps names and state dicts).

    Inductor needs a C compiler on CPU; without one this is a logged no-op. Measured on the 2-core
    CPU (C = 256, 10k tokens): ~1 min of compilation, then 1.1-1.5 s per Phase-1 iteration against
    0.7-1.0 s eager, so it is off by default; it is meant for GPUs.
    """
    if not enabled:
        return model
    if not hasattr(torch, "compile") or (shutil.which("cc") is None and shutil.which("gcc") is None
                                         and not torch.cuda.is_available()):
        log.info("training.compile=true: torch.compile is unavailable here (no C compiler), running eager")
        return model
    for name in COMPILE_TARGETS:
        target = getattr(model, name, None)
        for module in (target if isinstance(target, nn.ModuleList) else [target] if target is not None else []):
            module.compile(backend=backend)  # static shapes first; dynamo re-traces dynamic if needed
    log.info("training.compile=true: compiled %s", ", ".join(n for n in COMPILE_TARGETS if hasattr(model, n)))
    return model
