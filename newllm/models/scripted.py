"""The no-grad recurrence of the layer-wise gated model as one TorchScript loop.

A step is ~10 small kernels per block; called from Python each pays interpreter and dispatch cost,
which is what bounds pass 0 and generation on a CPU. Scripted, the loop runs without the interpreter.
Same math as ContextLM._step with the gated updater (tested equal to float tolerance); used only
without autograd (pass 0, validation, the held-out reference), where no graph has to be recorded.

torch.jit.script is deprecated in torch 2.13 but is the one tool that compiles a data-dependent time
loop without unrolling it (torch.compile unrolls T steps; minutes of compile for a 10k-token pass).
If scripting ever fails, the same function runs eagerly: slower, same numbers.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn import functional as F


def _gated_layerwise_loop(hoisted: list[torch.Tensor], c: torch.Tensor, w_c: list[torch.Tensor],
                          w_g: list[torch.Tensor], b_g: list[torch.Tensor], ln_w: list[torch.Tensor],
                          ln_b: list[torch.Tensor], eps: float) -> torch.Tensor:
    """hoisted[k] (B, T, H): block k's x-projection plus bias; w_c[k] (C, H); w_g[k] (H, 3C): the three
    gates stacked; ln_*: the block's LayerNorm. Returns contexts (B, T, C) from c (B, C)."""
    steps: list[torch.Tensor] = []
    size = [c.shape[-1]]
    for t in range(hoisted[0].shape[1]):
        for k in range(len(hoisted)):
            h = torch.relu(torch.addmm(hoisted[k][:, t], c, w_c[k]))
            gates = torch.addmm(b_g[k], h, w_g[k]).chunk(3, dim=-1)
            c = F.layer_norm(torch.sigmoid(gates[0]) * c + torch.sigmoid(gates[1]) * torch.tanh(gates[2]),
                             size, ln_w[k], ln_b[k], eps)
        steps.append(c)
    return torch.stack(steps, dim=1)


@functools.cache
def _compiled():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_gated_layerwise_loop)
    except Exception as err:  # noqa: BLE001 -- any scripting failure: fall back to the eager loop
        warnings.warn(f"TorchScript unavailable ({err}); the gated layer-wise loop runs eagerly", stacklevel=2)
        return _gated_layerwise_loop


def gated_layerwise_loop(hoisted: list[torch.Tensor], c: torch.Tensor, w_c: list[torch.Tensor],
                         w_g: list[torch.Tensor], b_g: list[torch.Tensor], ln_w: list[torch.Tensor],
                         ln_b: list[torch.Tensor], eps: float) -> torch.Tensor:
    return _compiled()(hoisted, c, w_c, w_g, b_g, ln_w, ln_b, eps)
