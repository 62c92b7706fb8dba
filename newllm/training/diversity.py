"""Diversity regularisers L_div(C) for Phase 1, blended as (1-w) MSE + w L_div.

Each takes the contexts of one sweep, C: (..., N, C_dim) with grad, and returns a scalar whose
*decrease* means more diverse contexts. Every one keeps a gradient path through C (a version of
the original whose loss used only detached running statistics had none). `reset()` clears
per-pass state at the start of a pass.
"""

from __future__ import annotations

import torch
from torch import nn


def _rows(contexts: torch.Tensor) -> torch.Tensor:
    return contexts.reshape(-1, contexts.shape[-1])


class Diversity(nn.Module):
    def reset(self) -> None:  # stateless by default
        pass

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FrobeniusDeviation(Diversity):
    """L = -||C - mean_rows(C)||_F / sqrt(N * C_dim): the RMS deviation from the mean context.

    The original divided by N, which makes the term ~1/sqrt(N): the same dist_reg_weight then meant
    a 3x weaker regulariser at 8k than at 1k tokens (and depended on the chunk size). This scale is
    per element like the MSE it is blended with, and lies in [-1, 0] for LayerNorm'd contexts.
    """

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        m = _rows(contexts)
        return -(m - m.mean(dim=0, keepdim=True)).norm() / m.numel() ** 0.5


class DimUsage(Diversity):
    """Per-dimension usage tracking, batched: position t is weighted by the usage of positions
    before it in the sweep, weight_d = 1 / (u_d + 1) with u the cumulative |c| (detached);
    L = -mean(weight * |c|). Rewards activity in rarely used dimensions.

    u is normalised by the position count, so the weights do not vanish on long streams
    (the original accumulated raw sums, making late positions' weights ~1/t).
    """

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        a = contexts.abs()
        # usage of earlier positions along the sequence axis (-2), as a running mean
        cum = a.detach().cumsum(dim=-2) - a.detach()
        count = torch.arange(a.shape[-2], device=a.device, dtype=a.dtype).clamp(min=1).unsqueeze(-1)
        weight = 1.0 / (cum / count + 1.0)
        return -(weight * a).mean()


class EMAVariance(Diversity):
    """Per-dimension variance around an exponential running mean; L = -mean_d sqrt(var_d).

    The running mean (momentum ~0.99, detached) smooths the centre over sweeps; the variance is
    of the *current* contexts around it, so the loss keeps a full gradient path through C.
    """

    def __init__(self, momentum: float = 0.99) -> None:
        super().__init__()
        self.momentum = momentum
        self.running_mean: torch.Tensor | None = None

    def reset(self) -> None:
        self.running_mean = None

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        m = _rows(contexts)
        batch_mean = m.detach().mean(dim=0)
        if self.running_mean is None:
            self.running_mean = batch_mean
        else:
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * batch_mean
        var = (m - self.running_mean).pow(2).mean(dim=0)
        return -(var + 1e-8).sqrt().mean()


class VICReg(Diversity):
    """VICReg's variance hinge mean_d relu(target - std_d) plus covariance penalty
    sum_{i != j} cov_ij^2 / C. The covariance term punishes correlated (collapsed) dimensions,
    which per-dimension terms miss. Non-negative; 0 means every dimension has std >= target
    and all dimensions are decorrelated."""

    def __init__(self, std_target: float = 1.0, covariance_weight: float = 1.0) -> None:
        super().__init__()
        self.std_target, self.covariance_weight = std_target, covariance_weight

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        m = _rows(contexts)
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
