"""Control models for Phase 1: the fs that any Phase-1 objective must rank below a trained f (issue 24).

Each one is a way to score well on a fixed-point measure without doing what Phase 1 is for:
  untrained      the initial f, no optimizer step
  lr_zero        Phase 1 run with lr = 1e-12: the whole training loop, f unchanged
  collapsed      every context the same vector (rank 1): the last block's LayerNorm has gain 0, its bias
                 is the one context
  memoryless     c_t = g(x_t): the first block reads no context (its context weights are 0) and forgets
                 it (forget gate shut); the later blocks see only that function of x_t
  near_identity  c_t ~ c_{t-1}: every block's forget gate open, input gate almost shut, so each token
                 moves the context by ~0.25 % before the LayerNorm
The weight edits (`EDITS`) act in place on a copy of the f they are given: applied to a trained f they
remove one property and keep the rest (embedding, other blocks). They need the gated updater (the
default); the residual updater has no gates to shut.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from newllm.models.updaters import GatedUpdater

LR_ZERO = 1e-12
# Gate pre-activations: sigmoid(-50) ~ 2e-22 is 0 next to float32 contexts of unit RMS; sigmoid(-6) ~ 0.0025.
SHUT, OPEN, AJAR = -50.0, 50.0, -6.0
CONTROLS = ("untrained", "lr_zero", "collapsed", "memoryless", "near_identity")


def _gated_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = list(getattr(model, "blocks", []))
    if not blocks or not all(isinstance(b.updater, GatedUpdater) for b in blocks):
        raise TypeError(f"the Phase-1 controls edit gated context LMs (model.updater=gated); got {type(model).__name__}"
                        f" with {sorted({type(b.updater).__name__ for b in blocks})}")
    return blocks


def _set_gate(gate: nn.Linear, bias: float) -> None:
    gate.weight.zero_()
    gate.bias.fill_(bias)


@torch.no_grad()
def collapse_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every context the same unit-RMS vector: rank 1, converged after one sweep, no information."""
    norm = _gated_blocks(model)[-1].updater.norm
    norm.weight.zero_()
    norm.bias.copy_(torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(seed)))
    return model


@torch.no_grad()
def forget_context_(model: nn.Module) -> nn.Module:
    """c_t = g(x_t): block 0 neither reads the previous context nor keeps it."""
    first = _gated_blocks(model)[0]
    first.fnn[0].weight[:, : model.context_dim] = 0  # the first Linear reads [c; x]: its context columns
    _set_gate(first.updater.forget, SHUT)
    return model


@torch.no_grad()
def near_identity_(model: nn.Module) -> nn.Module:
    """c_t ~ c_{t-1}: the context kept whole, each token adding ~0.25 % of its update."""
    for block in _gated_blocks(model):
        _set_gate(block.updater.forget, OPEN)
        _set_gate(block.updater.input, AJAR)
    return model


EDITS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "collapsed": collapse_, "memoryless": forget_context_, "near_identity": near_identity_,
}


def phase1_controls(fresh: Callable[[], nn.Module], train: Callable[[nn.Module, float], None],
                    lr: float) -> dict[str, nn.Module]:
    """The trained f and every control, each in eval mode: `fresh()` builds the initial f (seeded: the same
    weights each call), `train(model, lr)` runs Phase 1 on it in place. The edits are applied to copies
    of the trained f."""
    trained = fresh()
    train(trained, lr)
    lr_zero = fresh()
    train(lr_zero, LR_ZERO)
    models = {"trained": trained, "untrained": fresh(), "lr_zero": lr_zero}
    models.update({name: edit(copy.deepcopy(trained)) for name, edit in EDITS.items()})
    return {name: m.eval() for name, m in models.items()}
