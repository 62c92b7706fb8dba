"""What training code may assume of a model, as structural types: a class satisfies them by having
the members, not by inheriting (ContextLM does; the GRU and transformer baselines are not context models).

Members are plain attributes and methods, not submodules, so that isinstance checks them without
nn.Module.__getattr__ (Python 3.12 checks runtime protocols with inspect.getattr_static).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ContextUpdate(Protocol):
    """f(c, x) and the size of c: what the fixed-point solvers need (a model, or a toy map in a test)."""

    context_dim: int

    def update(self, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ContextModel(ContextUpdate, Protocol):
    """A context-vector LM, c_t = f(c_{t-1}, x_t): Phase 1 trains its f; Phase 2 can run f by Jacobi
    sweeps, freeze it (updater_parameters) or reconstruct [c_{t-1}; x_t] from its contexts."""

    embed_dim: int

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def recurrence(self, x: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor: ...

    def initial_context(self, batch: int, device: torch.device | None = None) -> torch.Tensor: ...

    def contexts_window(self, ids: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor: ...

    def updater_parameters(self) -> list[nn.Parameter]: ...


@runtime_checkable
class OptimizerRecipe(Protocol):
    """A model whose reference trains it with its own AdamW settings (the transformer: nanoGPT's betas, and
    weight decay on >= 2-D tensors only); Phase 2 builds its optimizer from these. Models without them get
    AdamW's default betas and weight decay on every trained tensor."""

    adam_betas: tuple[float, float]

    def param_groups(self, params: list[nn.Parameter], weight_decay: float) -> list[dict]: ...
