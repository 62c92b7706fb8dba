"""Repetition training: a phrase of p tokens repeated n times should drive the context onto a
cycle of period p, c_t = c_{t-p}. It generalises the per-token fixed point (p = 1).

Stages p = 1, 2, 3, ... are trained in order (one optimizer throughout). Per step, every phrase of
the stage is read from c = 0 (the recurrence, batched over phrases) and

    loss = (1 - w) MSE(c_t, sg(c_{t-p})) + w L_div(C) + ce_weight CE(head(c_t), token_{t+1}),   t >= p

with sg = stop-gradient: c_{t-p} is the target, as the previous pass is in Phase 1 (the gradient
still reaches earlier steps through c_t's own history). The diversity term (the same
training/diversity group and dist_reg_weight as Phase 1) is what keeps "ignore the tokens, sit on
one point" from being a perfect solution; without it, watch change_rate fall to 0 with the loss.

Metrics (on a stage's phrases, no grad): conv_loss = MSE(c_t, c_{t-p}), change_rate = mean
||c_t - c_{t-1}||, cycle_distance = mean ||c_t - c_{t-p}||. For each stage they are measured
before it trains, after it trains, and once more after all stages (what later stages undid);
with held-out `val_stages` (phrases never trained on) also on those, as repetition/val/p{p}/*,
and on held-out `test_stages` once, after all stages, as repetition/test/p{p}/*.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from newllm import keys
from newllm.config import RepetitionConfig
from newllm.errors import TrainingError
from newllm.training.diversity import Diversity
from newllm.training.progress import Progress

if TYPE_CHECKING:
    from newllm.data.repetition import RepetitionStage


@dataclass
class RepetitionResult:
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def cycle_stats(contexts: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """conv_loss, change_rate, cycle_distance of (B, T, C) contexts for period p (t >= p)."""
    if contexts.shape[1] <= p:
        raise TrainingError(f"a trajectory of {contexts.shape[1]} tokens has no position t >= p = {p}: "
                            "raise data.repetitions")
    cycle = contexts[:, p:] - contexts[:, :-p]
    change = contexts[:, 1:] - contexts[:, :-1]
    return {"conv_loss": cycle.pow(2).mean(), "change_rate": change.norm(dim=-1).mean(),
            "cycle_distance": cycle.norm(dim=-1).mean()}


def repetition_loss(model: nn.Module, ids: torch.Tensor, p: int, w: float, diversity: Diversity,
                    ce_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    contexts = model.contexts_window(ids)
    conv = (contexts[:, p:] - contexts[:, :-p].detach()).pow(2).mean()
    div = diversity(contexts)
    loss = (1 - w) * conv + w * div
    parts = {"conv_loss": float(conv.detach()), "diversity_loss": float(div.detach())}
    if ce_weight > 0:
        logits = model.head(contexts[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + ce_weight * ce
        parts["ce"] = float(ce.detach())
    return loss, parts


@torch.no_grad()
def measure(model: nn.Module, stage: RepetitionStage, device: torch.device) -> dict[str, float]:
    model.eval()
    contexts = model.contexts_window(stage.ids.to(device))
    return {k: float(v) for k, v in cycle_stats(contexts, stage.phrase_length).items()}


def train_repetition(model: nn.Module, stages: list[RepetitionStage], cfg: RepetitionConfig, dist_reg_weight: float,
                     diversity: Diversity, device: torch.device, on_step: Callable[[dict], None] | None = None,
                     progress: bool = True, val_stages: list[RepetitionStage] | None = None,
                     test_stages: list[RepetitionStage] | None = None) -> RepetitionResult:
    if not stages:
        raise TrainingError("repetition training needs phrase stages: use data=repetition")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    result = RepetitionResult()
    t0, step = time.perf_counter(), 0
    for stage in stages:
        p, ids = stage.phrase_length, stage.ids.to(device)
        key = keys.rep_stage(p)
        result.metrics.update({f"{key}/{k}_initial": v for k, v in measure(model, stage, device).items()})
        diversity.reset()  # state carried across steps (EMAVariance's running mean) is per stage
        for _ in Progress(range(cfg.steps_per_stage), f"repetition p={p}", progress):
            model.train()
            loss, parts = repetition_loss(model, ids, p, dist_reg_weight, diversity, cfg.ce_weight)
            if not torch.isfinite(loss):
                raise TrainingError(f"repetition loss became non-finite at stage p={p}, step {step}; "
                                    "lower training.repetition.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            row = {keys.HISTORY_PHASE: keys.REPETITION, keys.HISTORY_STEP: step,
                   keys.REP_STAGE: p, keys.REP_LOSS: float(loss.detach()),
                   **{keys.rep_part(k): v for k, v in parts.items()}, keys.REP_TIME_S: time.perf_counter() - t0}
            result.history.append(row)
            if on_step is not None:
                on_step(row)
        result.metrics.update({f"{key}/{k}": v for k, v in measure(model, stage, device).items()})
        for val in [v for v in val_stages or [] if v.phrase_length == p]:  # held-out phrases of this p
            result.metrics.update({keys.rep_stage(p, k, "val"): v for k, v in measure(model, val, device).items()})
    for stage in stages:  # after every stage: how much of the earlier cycles survived
        end = measure(model, stage, device)
        result.metrics.update({keys.rep_stage(stage.phrase_length, k, "end"): v for k, v in end.items()})
    for test in test_stages or []:  # held-out phrases, read once by the final weights
        result.metrics.update({keys.rep_stage(test.phrase_length, k, "test"): v
                               for k, v in measure(model, test, device).items()})
    result.metrics[keys.REP_STEPS] = step
    result.metrics[keys.REP_TRAIN_TIME_S] = time.perf_counter() - t0
    return result
