"""Diversity regularisers L_div(C) for Phase 1, blended as (1-w) MSE + w L_div.

Each takes the contexts of one whole sweep, C: (..., N, C_dim) with grad, and returns a scalar
whose *decrease* means more diverse contexts. Every one keeps a gradient path through C (in the
research code newllm re-implements, a regulariser whose loss used only detached running statistics
had none: it could not move f).

Every term is measured on `unit_rms(C)`, the sweep rescaled to unit root-mean-square: contexts are
LayerNorm outputs whose learnable gain can grow, and a term that rewards raw spread is then met by
inflating the gain (measured: gain 1.25-1.63 and a Frobenius term of -1.04 at w = 0.9) instead of
by spreading the contexts out. On unit-RMS contexts L(sC) = L(C) for any s > 0, so no loss is
gained by rescaling, and each term lies in the range its docstring states.

Called once per sweep on the whole sweep (Phase 1 computes the loss on all positions even when
it chunks f's forward/backward), so no term depends on training.phase1.chunk_size.
`reset()` clears state carried from sweep to sweep (EMAVariance's running mean).
"""

from __future__ import annotations

import torch
from torch import nn


def _rows(contexts: torch.Tensor) -> torch.Tensor:
    return contexts.reshape(-1, contexts.shape[-1])


def unit_rms(contexts: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """C / sqrt(mean(C^2)): one scale for the whole sweep, so the geometry between contexts is kept."""
    return contexts / (contexts.pow(2).mean() + eps).sqrt()


class Diversity(nn.Module):
    def reset(self) -> None:  # stateless by default
        pass

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FrobeniusDeviation(Diversity):
    """L = -||U - mean_rows(U)||_F / sqrt(N * C_dim) with U = unit_rms(C): the RMS deviation from
    the mean context, relative to the contexts' own RMS. Lies in [-1, 0]: 0 when every context is the
    same point, -1 when the contexts have zero mean (L^2 = -(1 - ||mean(U)||^2 / C_dim)).

    The original divided ||C - mean(C)||_F by N, which makes the term ~1/sqrt(N): the same
    dist_reg_weight then meant a 3x weaker regulariser at 8k than at 1k tokens. This scale is per
    element like the MSE it is blended with.
    """

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        m = _rows(unit_rms(contexts))
        return -(m - m.mean(dim=0, keepdim=True)).norm() / m.numel() ** 0.5


class DimUsage(Diversity):
    """Per-dimension usage tracking, batched: position t is weighted by the usage of positions
    before it in the sweep, weight_d = 1 / (u_d + 1) with u the running mean of |U| (detached),
    U = unit_rms(C); L = -mean(weight * |U|). Rewards activity in rarely used dimensions.
    Lies in [-1, 0] (weights <= 1 and mean |U| <= 1).

    u is normalised by the position count, so the weights do not vanish on long streams
    (the research code newllm re-implements accumulated raw sums, making late positions' weights ~1/t).
    """

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        a = unit_rms(contexts).abs()
        # usage of earlier positions along the sequence axis (-2), as a running mean
        cum = a.detach().cumsum(dim=-2) - a.detach()
        count = torch.arange(a.shape[-2], device=a.device, dtype=a.dtype).clamp(min=1).unsqueeze(-1)
        weight = 1.0 / (cum / count + 1.0)
        return -(weight * a).mean()


class EMAVariance(Diversity):
    """Per-dimension spread around an exponential running mean: L = -mean_d sqrt(mean_t (U_td - mu_d)^2),
    U = unit_rms(C).

    mu is carried from sweep to sweep, mu <- momentum * mu + (1 - momentum) * mean_t(U) (detached;
    momentum 0 is the plain per-sweep std); it is part of the Phase-1 resume state. The spread is
    that of the *current* contexts around it, so the loss keeps a full gradient path through C.
    Lies in [-2, 0]; in [-1, 0] whenever mu equals the current mean (the first sweep, momentum 0).
    """

    def __init__(self, momentum: float = 0.99) -> None:
        super().__init__()
        self.momentum = momentum
        self.running_mean: torch.Tensor | None = None

    def reset(self) -> None:
        self.running_mean = None

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        m = _rows(unit_rms(contexts))
        batch_mean = m.detach().mean(dim=0)
        if self.running_mean is None:
            self.running_mean = batch_mean
        else:
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * batch_mean
        var = (m - self.running_mean).pow(2).mean(dim=0)
        return -(var + 1e-8).sqrt().mean()


class VICReg(Diversity):
    """VICReg's variance hinge mean_d relu(target - std_d) plus covariance penalty
    sum_{i != j} cov_ij^2 / C_dim, on U = unit_rms(C). The covariance term punishes correlated
    (collapsed) dimensions, which per-dimension terms miss. Non-negative; 0 means every dimension
    has std >= target and all dimensions are decorrelated. On unit-RMS contexts mean_d var_d <= 1,
    so std_target = 1 asks for zero-mean contexts spread evenly over every dimension; the hinge lies
    in [0, std_target], the covariance term in [0, C_dim].
    """

    def __init__(self, std_target: float = 1.0, covariance_weight: float = 1.0) -> None:
        super().__init__()
        self.std_target, self.covariance_weight = std_target, covariance_weight

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        m = _rows(unit_rms(contexts))
        m = m - m.mean(dim=0, keepdim=True)
        std = (m.var(dim=0) + 1e-4).sqrt()
        variance = torch.relu(self.std_target - std).mean()
        cov = (m.T @ m) / max(m.shape[0] - 1, 1)
        off_diag = cov - torch.diag(torch.diag(cov))
        return variance + self.covariance_weight * off_diag.pow(2).sum() / m.shape[1]


class NoDiversity(Diversity):
    """L = 0 (the MSE alone; w then only scales the fixed-point loss down)."""

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        return contexts.sum() * 0.0
