"""Phase 2 -- next-token prediction, the same code for context models and baselines.

The stream is cut into windows of seq_len + 1 tokens; every model reads a window from a fresh
state (c = 0 for context models) and position t predicts token t+1, where the target's loss
mask is set (assistant tokens for dialogue). Evaluation uses the same windows on validation,
so perplexities of all models are measured identically. Validation runs every eval_every steps
(0: once per epoch); it picks the weights that are kept (the best evaluation, restored at the end)
and feeds the stopping rule -- `patience` evaluations without a val-loss gain > min_delta stop the
run ("plateau"), else the epochs / max_steps budget does ("cap") -- and pruning. The kept weights
are then evaluated once on the test split (phase2/test_*), which nothing selects on.

context=propagate: run f over each window (truncated BPTT over seq_len), train head and f
                   (f frozen with freeze_updater).
context=fixed:     contexts computed once by the Phase-1 f (no grad), head trained on them in
                   parallel -- "contexts as features".
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from newllm import metrics
from newllm.checkpoint import rng_state, set_rng_state
from newllm.config import ConfigError
from newllm.errors import DataError, TrainingError
from newllm.models import ContextModel, evaluating
from newllm.training.instruments import PositionLoss
from newllm.training.solvers import jacobi_window


@dataclass
class Phase2Result:
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Plateau:
    """Early stopping on validation: stop after `patience` evaluations in a row that did not lower the best
    val loss by more than `min_delta`; keeps the best weights and when they were reached."""

    patience: int
    min_delta: float
    best_state: dict
    best: dict = field(default_factory=lambda: {"loss": math.inf})
    bad: int = 0
    evaluations: int = 0
    best_evaluation: int = 0
    best_epoch: int = 0
    best_step: int = 0
    time_to_best_s: float = 0.0

    def update(self, row: dict, val: dict, model: nn.Module) -> bool:
        self.evaluations += 1
        improved = val["loss"] < self.best["loss"] - self.min_delta  # what resets the patience count
        if val["loss"] < self.best["loss"]:  # the kept weights are the best seen, however small the gain
            self.best, self.best_evaluation = val, self.evaluations
            self.best_epoch, self.best_step, self.time_to_best_s = row["epoch"], row["step"], row["phase2/time_s"]
            self.best_state = copy.deepcopy(model.state_dict())
        self.bad = 0 if improved else self.bad + 1
        return self.bad >= self.patience

    def state(self) -> dict:
        return dict(vars(self))

    def load(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def make_windows(ids: torch.Tensor, mask: torch.Tensor, seq_len: int, what: str) -> tuple[torch.Tensor, ...]:
    """(inputs (W, T), targets (W, T), target mask (W, T)) from non-overlapping windows."""
    w = (ids.numel() - 1) // seq_len
    if w < 1:
        raise DataError(f"the {what} stream has {ids.numel()} tokens, fewer than one window of "
                        f"training.phase2.seq_len + 1 = {seq_len + 1}")
    span = w * seq_len
    inputs = ids[:span].reshape(w, seq_len)
    targets = ids[1 : span + 1].reshape(w, seq_len)
    target_mask = mask[1 : span + 1].reshape(w, seq_len)
    return inputs, targets, target_mask


class ReconstructionDecoder(nn.Module):
    """c_t -> [c_{t-1}; x_t]: Linear(C -> C+E), ReLU, Linear(C+E -> C+E) (the autoencoder idea)."""

    def __init__(self, context_dim: int, embed_dim: int) -> None:
        super().__init__()
        d = context_dim + embed_dim
        self.net = nn.Sequential(nn.Linear(context_dim, d), nn.ReLU(), nn.Linear(d, d))

    def loss(self, contexts: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        previous = torch.cat([torch.zeros_like(contexts[:, :1]), contexts[:, :-1]], dim=1)
        target = torch.cat([previous, embedded], dim=-1).detach()
        return F.mse_loss(self.net(contexts), target)


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    m = mask.flatten().float()
    return (ce * m).sum() / m.sum().clamp(min=1)


def train_contexts_window(model: nn.Module, inputs: torch.Tensor, cfg: DictConfig) -> torch.Tensor:
    """Training-time contexts of (B, T) windows: the sequential loop, or Jacobi sweeps (solver=jacobi)."""
    if cfg.get("solver", "sequential") != "jacobi" or not isinstance(model, ContextModel):
        return model.contexts_window(inputs)
    x = model.embed(inputs)
    sweeps = cfg.jacobi_sweeps or inputs.shape[1]
    contexts, _ = jacobi_window(model.update, x, model.initial_context(inputs.shape[0]), sweeps,
                                cfg.jacobi_tol, cfg.jacobi_grad_sweeps)
    return contexts


@torch.no_grad()
def contexts_of(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Fixed contexts (context=fixed): features of f, so computed in eval mode (no dropout)."""
    with evaluating(model):
        return torch.cat([model.contexts_window(inputs[i : i + batch_size])
                          for i in range(0, inputs.shape[0], batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, windows: tuple[torch.Tensor, ...], batch_size: int) -> dict:
    """Masked CE, perplexity and top-1 accuracy over all windows (fresh state per window), and the
    loss and token counts by position bucket (newllm.training.instruments)."""
    model.eval()
    inputs, targets, mask = windows
    ce_sum, correct, count = 0.0, 0, 0
    by_pos = PositionLoss(inputs.shape[1])
    for i in range(0, inputs.shape[0], batch_size):
        logits = model.head(model.contexts_window(inputs[i : i + batch_size]))
        ce, hit = metrics.masked_token_losses(logits, targets[i : i + batch_size], mask[i : i + batch_size])
        by_pos.add_losses(ce, mask[i : i + batch_size])  # the same per-token CE, bucketed by position
        ce_sum, correct, count = ce_sum + float(ce.sum()), correct + int(hit.sum()), count + ce.numel()
    loss = ce_sum / max(count, 1)
    pos_loss, pos_tokens = by_pos.result()
    return {"loss": loss, "ppl": metrics.perplexity(loss), "acc": correct / max(count, 1), "tokens": count,
            "loss_by_position": pos_loss, "tokens_by_position": pos_tokens}


def eval_length(model: nn.Module, cfg: DictConfig) -> int:
    """training.phase2.eval_seq_len (null = seq_len), checked against a transformer's max_len."""
    length = cfg.get("eval_seq_len") or cfg.seq_len
    max_len = getattr(model, "max_len", None)
    if max_len is not None and length > max_len:
        raise ConfigError(f"training.phase2.eval_seq_len={length} is not allowed: this model reads at most "
                          f"model.max_len={max_len} positions")
    return length


def train_phase2(model: nn.Module, data, cfg: DictConfig, device: torch.device, seed: int,
                 on_epoch: Callable[[dict], None] | None = None, progress: bool = True,
                 state: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
                 contexts_cache: Callable[[torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor] | None = None,
                 ) -> Phase2Result:
    """Train next-token prediction. `checkpoint(loop_state)` is called every
    training.phase2.checkpoint_every epochs; passing it back as `state` continues exactly (model weights
    restored by the caller). `contexts_cache(inputs, compute)` may serve the fixed-mode contexts."""
    train_w = [t.to(device) for t in make_windows(data.train_ids, data.train_mask, cfg.seq_len, "training")]
    val_ids, val_mask = data.val_ids, data.val_mask
    if cfg.max_val_tokens:
        val_ids, val_mask = val_ids[: cfg.max_val_tokens + 1], val_mask[: cfg.max_val_tokens + 1]
    eval_len = eval_length(model, cfg)
    val_w = [t.to(device) for t in make_windows(val_ids, val_mask, eval_len, "validation")]
    if int(val_w[2].sum()) == 0:
        raise DataError("the validation windows hold no tokens to predict (loss mask all false); "
                        "use data.loss_on=all or more validation data")
    test_ids = getattr(data, "test_ids", None)
    test_w = None
    if test_ids is not None and test_ids.numel() > 0:
        test_w = [t.to(device) for t in make_windows(test_ids, data.test_mask, eval_len, "test")]

    is_context = isinstance(model, ContextModel)
    fixed = cfg.context == "fixed"
    freeze = is_context and (cfg.freeze_updater or fixed)
    for p in (model.updater_parameters() if is_context else []):
        p.requires_grad_(not freeze)
    decoder = None
    if cfg.reconstruction_weight > 0 and is_context and not freeze:
        decoder = ReconstructionDecoder(model.context_dim, model.embed_dim).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if decoder is not None:
        trainable += list(decoder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    compute = lambda: contexts_of(model, train_w[0], cfg.batch_size * 4)
    train_contexts = None
    if fixed:
        train_contexts = (compute() if contexts_cache is None else contexts_cache(train_w[0], compute)).to(device)
    g = torch.Generator().manual_seed(seed)
    result = Phase2Result()
    stop = Plateau(cfg.patience, cfg.min_delta, copy.deepcopy(model.state_dict()))
    step, n_seen, start, elapsed_before = 0, 0, 1, 0.0
    running = [0.0, 0, 0]  # train CE sum, correct, count since the last evaluation
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if decoder is not None:
            decoder.load_state_dict(state["decoder"])
        g.set_state(state["generator"])
        result.history = list(state["history"])
        stop.load(state["stop"])
        step, n_seen, start = state["step"], state["n_seen"], state["epoch"] + 1
        running = list(state["running"])
        elapsed_before = state.get("elapsed_s", 0.0)  # time up to that checkpoint, in earlier processes
        set_rng_state(state["rng"])
    every = cfg.get("checkpoint_every", 0)
    t0 = time.perf_counter() - elapsed_before  # times and tokens/s below are totals over every resume
    reason = "cap"

    def evaluation(epoch: int) -> bool:
        """Validate now, log the row, update the plateau rule; True when it says stop."""
        train_loss = running[0] / max(running[2], 1)
        val = evaluate(model, val_w, cfg.batch_size * 4)
        row = {"phase": 2, "step": step, "epoch": epoch, "evaluation": stop.evaluations + 1,
               "phase2/train_loss": train_loss, "phase2/train_ppl": metrics.perplexity(train_loss),
               "phase2/train_acc": running[1] / max(running[2], 1),
               "phase2/val_loss": val["loss"], "phase2/val_ppl": val["ppl"], "phase2/val_acc": val["acc"],
               "phase2/time_s": time.perf_counter() - t0}
        running[:] = [0.0, 0, 0]
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        return stop.update(row, val, model)

    for epoch in range(start, cfg.epochs + 1):
        model.train()
        order = torch.randperm(train_w[0].shape[0], generator=g).to(device)
        batches = order.split(cfg.batch_size)
        if cfg.max_steps_per_epoch:
            batches = batches[: cfg.max_steps_per_epoch]
        for idx in tqdm(batches, desc=f"phase2 epoch {epoch}", disable=not progress, leave=False):
            inputs, targets, mask = (t[idx] for t in train_w)
            contexts = train_contexts[idx] if fixed else train_contexts_window(model, inputs, cfg)
            logits = model.head(contexts)
            loss = _masked_ce(logits, targets, mask)
            if decoder is not None:
                loss = loss + cfg.reconstruction_weight * decoder.loss(contexts, model.embed(inputs))
            if not torch.isfinite(loss):
                raise TrainingError(f"phase 2 loss became non-finite at epoch {epoch}, step {step}; "
                                    "lower training.phase2.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            step += 1
            n_seen += inputs.numel()
            s, c, n = metrics.masked_token_stats(logits.detach(), targets, mask)
            running[0], running[1], running[2] = running[0] + s, running[1] + c, running[2] + n
            capped = cfg.max_steps is not None and step >= cfg.max_steps
            if (cfg.eval_every and step % cfg.eval_every == 0) or capped:
                if evaluation(epoch):
                    reason = "plateau"
                if capped or reason == "plateau":
                    break
                model.train()
        else:  # the epoch ran to its end
            last_epoch = epoch == cfg.epochs
            pending = running[2] > 0 or not result.history  # steps not yet validated
            if (not cfg.eval_every or (last_epoch and pending)) and evaluation(epoch):
                reason = "plateau"
            if reason != "plateau":
                if checkpoint is not None and every and epoch % every == 0 and not last_epoch:
                    checkpoint({"epoch": epoch, "elapsed_s": time.perf_counter() - t0,
                                "optimizer": optimizer.state_dict(), "generator": g.get_state(),
                                "decoder": decoder.state_dict() if decoder is not None else None,
                                "history": result.history, "stop": stop.state(), "step": step,
                                "n_seen": n_seen, "running": list(running), "rng": rng_state()})
                continue
        break  # a plateau, or the max_steps cap
    train_time = time.perf_counter() - t0
    if stop.best_epoch == 0:
        raise TrainingError("phase 2 validation loss was never finite; lower training.phase2.lr")
    model.load_state_dict(stop.best_state)  # report (and keep) the best validation evaluation
    # train_* of the same evaluation as the kept weights and val_*; the last one's under last_epoch_*
    best_row = result.history[stop.best_evaluation - 1]
    last = result.history[-1]
    best = stop.best
    result.metrics = {
        "phase2/val_loss": best["loss"], "phase2/val_ppl": best["ppl"], "phase2/val_acc": best["acc"],
        "phase2/val_tokens": best["tokens"], "phase2/best_epoch": stop.best_epoch, "phase2/eval_seq_len": eval_len,
        "phase2/val_loss_by_position": best["loss_by_position"],
        "phase2/val_tokens_by_position": best["tokens_by_position"],
        "phase2/best_step": stop.best_step, "phase2/best_evaluation": stop.best_evaluation,
        "phase2/time_to_best_s": stop.time_to_best_s, "phase2/stop_reason": reason,
        "phase2/epochs": last["epoch"], "phase2/steps": step, "phase2/evaluations": stop.evaluations,
        **{f"phase2/train_{k}": best_row[f"phase2/train_{k}"] for k in ("loss", "ppl", "acc")},
        **{f"phase2/last_epoch_train_{k}": last[f"phase2/train_{k}"] for k in ("loss", "ppl", "acc")},
        "phase2/uniform_ppl": float(model.vocab_size),
        "phase2/train_time_s": train_time, "phase2/tokens_per_s": n_seen / max(train_time, 1e-9),
        "phase2/tokens_seen": n_seen,
    }
    if test_w is not None:  # once, with the kept weights: the unbiased figure to report
        test = evaluate(model, test_w, cfg.batch_size * 4)
        result.metrics.update({"phase2/test_loss": test["loss"], "phase2/test_ppl": test["ppl"],
                               "phase2/test_acc": test["acc"], "phase2/test_tokens": test["tokens"],
                               "phase2/test_loss_by_position": test["loss_by_position"],
                               "phase2/test_tokens_by_position": test["tokens_by_position"]})
    return result
