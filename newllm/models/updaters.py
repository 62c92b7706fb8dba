"""Context updaters: how a hidden vector h (computed from [c; x]) changes the context.

Both map (context c: (..., C), token stream x: (..., E), hidden h: (..., H)) -> (c', x').
They act position-wise, so the same call updates one position or a whole stream at once.
"""

from __future__ import annotations

import torch
from torch import nn


# ----------------------------------------------------------------------------- the gated step, defined once
# z = sigmoid(g_f) * c + sigmoid(g_i) * tanh(g_u) from the gate logits g = [g_f | g_i | g_u] (..., 3C); the
# new context is LayerNorm(z). Every loop that runs the gated updater -- GatedUpdater (eager), the scripted
# no-grad and sampling loops, the scripted training forward and its reverse loop (newllm.models.scripted) --
# calls these three functions, and they are TorchScript-compatible so the scripted loops compile them in.
def gate_activations(g: torch.Tensor) -> torch.Tensor:
    """[sigmoid(g_f) | sigmoid(g_i) | tanh(g_u)]: the activated gates a = [f | i | u] (..., 3C)."""
    d = g.shape[-1] // 3
    return torch.cat([torch.sigmoid(g[..., : 2 * d]), torch.tanh(g[..., 2 * d :])], dim=-1)


def gated_mix(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """z = f * c + i * u: the context kept by the forget gate plus the gated candidate."""
    d = c.shape[-1]
    return a[..., :d] * c + a[..., d : 2 * d] * a[..., 2 * d :]


def gated_mix_backward(dz: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dc through f * c, dL/dg) of z = gated_mix(c, gate_activations(g)), given dL/dz.

    sigmoid' = s (1 - s), tanh' = 1 - t^2; tested against autograd (tests/test_hoisted.py)."""
    d = c.shape[-1]
    f, i, u = a[..., :d], a[..., d : 2 * d], a[..., 2 * d :]
    dg = torch.cat([dz * c * f * (1 - f), dz * u * i * (1 - i), dz * i * (1 - u * u)], dim=-1)
    return dz * f, dg


class GatedUpdater(nn.Module):
    """LSTM-like damped update: c' = LN(sigmoid(W_f h) * c + sigmoid(W_i h) * tanh(W_u h)).

    The gates damp each step, which makes fixed points easy to reach even before training.
    The token stream passes through unchanged.
    """

    rewrites_tokens = False  # later blocks see the embedding itself: their x-projection can be hoisted

    def __init__(self, context_dim: int, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.forget = nn.Linear(hidden_dim, context_dim)
        self.input = nn.Linear(hidden_dim, context_dim)
        self.update = nn.Linear(hidden_dim, context_dim)
        self.norm = nn.LayerNorm(context_dim)

    @staticmethod
    def hidden_dim(context_dim: int, embed_dim: int, requested: int | None) -> int:
        return requested if requested is not None else context_dim

    def forward(self, c: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.cat([self.forget(h), self.input(h), self.update(h)], dim=-1)
        return self.norm(gated_mix(c, gate_activations(g))), x

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The three gate Linears stacked: W^T (H, 3C) and bias (3C,), for one matmul per step in a loop."""
        layers = (self.forget, self.input, self.update)
        return torch.cat([m.weight for m in layers]).t().contiguous(), torch.cat([m.bias for m in layers])

    def fused_step(self, c: torch.Tensor, h: torch.Tensor, fused: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """forward(c, x, h)[0] with the gates from one addmm (same math, one kernel instead of three)."""
        return self.norm(gated_mix(c, gate_activations(torch.addmm(fused[1], h, fused[0]))))


class ResidualUpdater(nn.Module):
    """The "CVFP layer": h = ReLU(Linear([c; x])) is split into (dc, dx);
    c' = (1-m)(c + dc) + m LN(c + dc), x' = LN(x + dx). Both context and token stream change.

    Needs hidden_dim = C + E (the increment has one entry per context and token dimension).
    """

    rewrites_tokens = True

    def __init__(self, context_dim: int, embed_dim: int, hidden_dim: int, layernorm_mix: float = 1.0) -> None:
        super().__init__()
        if hidden_dim != context_dim + embed_dim:  # a bug if reached: newllm.config.validate refuses it first
            raise ValueError(
                f"model.hidden_dim={hidden_dim} is not allowed with the residual updater: "
                f"expected context_dim + embed_dim = {context_dim + embed_dim} (or null)"
            )
        self.context_dim = context_dim
        self.layernorm_mix = layernorm_mix
        self.context_norm = nn.LayerNorm(context_dim)
        self.token_norm = nn.LayerNorm(embed_dim)

    @staticmethod
    def hidden_dim(context_dim: int, embed_dim: int, requested: int | None) -> int:
        return context_dim + embed_dim if requested is None else requested

    def forward(self, c: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dc, dx = h[..., : self.context_dim], h[..., self.context_dim :]
        c = c + dc
        m = self.layernorm_mix
        c = self.context_norm(c) if m == 1.0 else (1 - m) * c + m * self.context_norm(c)
        return c, self.token_norm(x + dx)


def relu_fnn(in_dim: int, hidden_dim: int, depth: int, dropout: float) -> nn.Sequential:
    """Linear(in->H), ReLU, then depth-1 x (Linear(H->H), ReLU)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
