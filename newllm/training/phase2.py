"""Phase 2 -- next-token prediction, the same code for context models and baselines.

The stream is cut into windows of seq_len + 1 tokens; every model reads a window from a fresh
state (c = 0 for context models) and position t predicts token t+1, where the target's loss
mask is set (assistant tokens for dialogue; targets may differ from the next input where the data
says so: data=recall's answers). Evaluation uses the same windows on validation, through the one
evaluation loop (newllm.training.evaluation.evaluate, which recall's accuracy uses too), so
perplexities of all models are measured identically. Validation runs every eval_every steps
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from newllm import keys, metrics
from newllm.config import Phase2Config  # what run.typed hands the training functions
from newllm.errors import ConfigError, DataError, TrainingError
from newllm.models import ContextModel, OptimizerRecipe, evaluating
from newllm.runtime.lifecycle import Phase2State, TrainTally
from newllm.training.evaluation import evaluate
from newllm.training.instruments import document_positions
from newllm.training.progress import Progress
from newllm.training.solvers import jacobi_window

ContextsCache = Callable[[torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


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
            self.best_epoch, self.best_step, self.time_to_best_s = row["epoch"], row["step"], row[keys.P2_TIME_S]
            self.best_state = copy.deepcopy(model.state_dict())
        self.bad = 0 if improved else self.bad + 1
        return self.bad >= self.patience

    def state(self) -> dict:
        return dict(vars(self))

    def load(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def make_windows(ids: torch.Tensor, mask: torch.Tensor, seq_len: int, what: str,
                 targets: torch.Tensor | None = None, key: str = "training.phase2.seq_len") -> tuple[torch.Tensor, ...]:
    """(inputs (W, T), targets (W, T), target mask (W, T)) from non-overlapping windows; `key` names the
    setting of the window length. `targets`: the target stream where it differs from the ids
    (TokenData.targets; None: the ids). Views of the stream: a memory-mapped one is not copied; ids keep
    its dtype, made int64 one batch at a time."""
    w = (ids.numel() - 1) // seq_len
    if w < 1:
        raise DataError(f"the {what} stream has {ids.numel()} tokens, fewer than one window of "
                        f"{key} + 1 = {seq_len + 1}")
    span = w * seq_len
    inputs = ids[:span].reshape(w, seq_len)
    targets = (ids if targets is None else targets)[1 : span + 1].reshape(w, seq_len)
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


def _sequential_window(model: ContextModel, inputs: torch.Tensor, cfg: Any) -> torch.Tensor:
    return model.contexts_window(inputs)


def _jacobi_window(model: ContextModel, inputs: torch.Tensor, cfg: Any) -> torch.Tensor:
    sweeps = cfg.jacobi_sweeps or inputs.shape[1]
    contexts, _ = jacobi_window(model.update, model.embed(inputs), model.initial_context(inputs.shape[0]), sweeps,
                                cfg.jacobi_tol, cfg.jacobi_grad_sweeps)
    return contexts


# training.phase2.solver -> (context model, (B, T) ids, Phase2Config) -> training-time contexts (B, T, C).
WINDOW_SOLVERS: dict[str, Callable[[ContextModel, torch.Tensor, Any], torch.Tensor]] = {
    "sequential": _sequential_window, "jacobi": _jacobi_window,
}


def train_contexts_window(model: nn.Module, inputs: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Training-time contexts of (B, T) windows by the configured solver (baselines run their own forward)."""
    if not isinstance(model, ContextModel):
        return model.contexts_window(inputs)
    return WINDOW_SOLVERS[cfg.solver](model, inputs, cfg)


@torch.no_grad()
def contexts_of(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Fixed contexts (context=fixed): features of f, so computed in eval mode (no dropout)."""
    with evaluating(model):
        return torch.cat([model.contexts_window(inputs[i : i + batch_size].long())
                          for i in range(0, inputs.shape[0], batch_size)])


def window_positions(lengths: torch.Tensor | None, windows: list[torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each target's position within its document and the document (instruments.document_positions) for
    windows cut from a stream with these document lengths, on the windows' device; None without them."""
    if lengths is None or windows is None:
        return None
    positions = document_positions(lengths.cpu(), windows[0].shape[0], windows[0].shape[1])
    return tuple(p.to(windows[0].device) for p in positions)


def eval_length(model: nn.Module, cfg: Phase2Config) -> int:
    """training.phase2.eval_seq_len (null = seq_len); both window lengths checked against a transformer's
    max_len before any step (not as a failure mid-training)."""
    length = cfg.eval_seq_len or cfg.seq_len
    max_len = getattr(model, "max_len", None)
    for key, value in (("seq_len", cfg.seq_len), ("eval_seq_len", length)):
        if max_len is not None and value > max_len:
            raise ConfigError(f"training.phase2.{key}={value} is not allowed: this model reads at most "
                              f"model.max_len={max_len} positions")
    return length


@dataclass
class Windows:
    """The (inputs, targets, mask) windows of each split, on the device; test is None without a test split.
    val/test_positions: each target's position within its document and the document (window_positions)."""

    train: list[torch.Tensor]
    val: list[torch.Tensor]
    test: list[torch.Tensor] | None
    eval_len: int
    val_positions: tuple[torch.Tensor, torch.Tensor] | None = None
    test_positions: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module, data, cfg: Phase2Config, device: torch.device) -> Windows:
        targets = getattr(data, "targets", None) or {}
        train = [t.to(device) for t in make_windows(data.train_ids, data.train_mask, cfg.seq_len, "training",
                                                    targets.get("train"))]
        val_ids, val_mask, val_targets = data.val_ids, data.val_mask, targets.get("val")
        if cfg.max_val_tokens:
            cut = slice(0, cfg.max_val_tokens + 1)
            val_ids, val_mask = val_ids[cut], val_mask[cut]
            val_targets = None if val_targets is None else val_targets[cut]
        eval_len = eval_length(model, cfg)
        key = "training.phase2.eval_seq_len" if cfg.eval_seq_len else "training.phase2.seq_len"
        val = [t.to(device) for t in make_windows(val_ids, val_mask, eval_len, "validation", val_targets, key)]
        if not bool(val[2].any()):  # not sum(): that makes an int64 copy of the windows' mask
            raise DataError("the validation windows hold no tokens to predict (loss mask all false); "
                            "use data.loss_on=all or more validation data")
        test_ids = getattr(data, "test_ids", None)
        test = None
        if test_ids is not None and test_ids.numel() > 0:
            test = [t.to(device) for t in make_windows(test_ids, data.test_mask, eval_len, "test",
                                                       targets.get("test"), key)]
        return cls(train, val, test, eval_len, window_positions(getattr(data, "val_doc_lengths", None), val),
                   window_positions(getattr(data, "test_doc_lengths", None), test))

    @classmethod
    def check(cls, model: nn.Module, data, cfg: Phase2Config) -> None:
        """What `build` would refuse (a window longer than a stream, max_len, an empty loss mask), said before
        Phase 1 instead of after it: the windows are views of the streams, so this costs no copy."""
        cls.build(model, data, cfg, torch.device("cpu"))


def make_optimizer(model: nn.Module, params: list[nn.Parameter], cfg: Phase2Config) -> torch.optim.AdamW:
    """AdamW at training.phase2.lr / weight_decay; a model with its reference's recipe (OptimizerRecipe) sets
    the betas and which tensors decay, the others get AdamW's defaults with every tensor decayed."""
    if isinstance(model, OptimizerRecipe):
        return torch.optim.AdamW(model.param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=model.adam_betas)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Phase2Loop:
    """Phase 2 as init / step / finish: `step` is one optimizer step, `evaluation` one validation, the loop
    state lives in `self.state` (Phase2State)."""

    def __init__(self, model: nn.Module, windows: Windows, cfg: Phase2Config, device: torch.device, seed: int,
                 on_epoch: Callable[[dict], None] | None, contexts_cache: ContextsCache | None) -> None:
        self.model, self.windows, self.cfg, self.on_epoch = model, windows, cfg, on_epoch
        is_context = isinstance(model, ContextModel)
        self.fixed = cfg.context == "fixed"
        freeze = is_context and (cfg.freeze_updater or self.fixed)
        for p in (model.updater_parameters() if is_context else []):
            p.requires_grad_(not freeze)
        decoder = None
        if cfg.reconstruction_weight > 0 and is_context and not freeze:
            decoder = ReconstructionDecoder(model.context_dim, model.embed_dim).to(device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if decoder is not None:
            self.trainable += list(decoder.parameters())
        self.train_contexts = self.fixed_contexts(contexts_cache).to(device) if self.fixed else None
        self.state = Phase2State(
            optimizer=make_optimizer(model, self.trainable, cfg),
            generator=torch.Generator().manual_seed(seed), decoder=decoder,
            stop=Plateau(cfg.patience, cfg.min_delta, copy.deepcopy(model.state_dict())))

    def fixed_contexts(self, cache: ContextsCache | None) -> torch.Tensor:
        inputs = self.windows.train[0]
        compute = lambda: contexts_of(self.model, inputs, self.cfg.batch_size * 4)
        return compute() if cache is None else cache(inputs, compute)

    def batches(self) -> list[torch.Tensor]:
        """This epoch's batches of window indices, in the seeded random order."""
        order = torch.randperm(self.windows.train[0].shape[0], generator=self.state.generator)
        batches = order.to(self.windows.train[0].device).split(self.cfg.batch_size)
        return list(batches[: self.cfg.max_steps_per_epoch] if self.cfg.max_steps_per_epoch else batches)

    def step(self, idx: torch.Tensor, epoch: int) -> None:
        """One optimizer step on the windows `idx`."""
        cfg, st = self.cfg, self.state
        inputs, targets, mask = (t[idx] for t in self.windows.train)
        inputs, targets = inputs.long(), targets.long()  # windows keep the stored dtype (int16/int32)
        contexts = self.train_contexts[idx] if self.fixed else train_contexts_window(self.model, inputs, cfg)
        logits = self.model.head(contexts)
        loss = metrics.masked_cross_entropy(logits, targets, mask)
        if st.decoder is not None:
            loss = loss + cfg.reconstruction_weight * st.decoder.loss(contexts, self.model.embed(inputs))
        # No host sync per step: the loss joins the tally on the device, and a non-finite one is caught when
        # the tally is read (the next evaluation), naming the steps since the last one.
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
        st.optimizer.step()
        st.step += 1
        st.n_seen += inputs.numel()
        st.tally.add(metrics.masked_token_sums(logits.detach(), targets, mask), loss)

    def evaluation(self, epoch: int) -> bool:
        """Validate now, log the row, update the plateau rule; True when it says stop."""
        st = self.state
        ce_sum, correct, count, loss_sum = st.tally.read()
        if not math.isfinite(loss_sum):
            raise TrainingError(f"phase 2 loss became non-finite in epoch {epoch}, within steps "
                                f"{st.step - st.tally.steps + 1}-{st.step}; lower training.phase2.lr")
        train_loss = ce_sum / max(count, 1)
        val = evaluate(self.model, self.windows.val, self.cfg.batch_size * 4,
                       positions=self.windows.val_positions)
        row = {keys.HISTORY_PHASE: keys.PHASE2, keys.HISTORY_STEP: st.step,
               "epoch": epoch, "evaluation": st.stop.evaluations + 1,
               keys.P2_TRAIN_LOSS: train_loss, keys.P2_TRAIN_PPL: metrics.perplexity(train_loss),
               keys.P2_TRAIN_ACC: correct / max(count, 1),
               keys.P2_VAL_LOSS: val["loss"], keys.P2_VAL_PPL: val["ppl"], keys.P2_VAL_ACC: val["acc"],
               keys.P2_TIME_S: st.elapsed()}
        st.tally = TrainTally()
        st.history.append(row)
        if self.on_epoch is not None:
            self.on_epoch(row)
        return st.stop.update(row, val, self.model)

    def epoch(self, epoch: int, progress: bool) -> str | None:
        """Train one epoch with its evaluations; "plateau" or "cap" when the run ends in it, else None."""
        cfg, st = self.cfg, self.state
        self.model.train()
        for idx in Progress(self.batches(), f"phase2 epoch {epoch}", progress):
            self.step(idx, epoch)
            capped = cfg.max_steps is not None and st.step >= cfg.max_steps
            if (cfg.eval_every and st.step % cfg.eval_every == 0) or capped:
                if self.evaluation(epoch):
                    return "plateau"
                if capped:
                    return "cap"
                self.model.train()
        pending = st.tally.steps > 0 or not st.history  # steps not yet validated
        if (not cfg.eval_every or (epoch == cfg.epochs and pending)) and self.evaluation(epoch):
            return "plateau"
        st.epoch = epoch
        return None

    def finish(self, reason: str) -> Phase2Result:
        """Restore the best evaluation's weights; its metrics, and the test split's once."""
        st, stop = self.state, self.state.stop
        train_time = st.elapsed()
        if stop.best_epoch == 0:
            raise TrainingError("phase 2 validation loss was never finite; lower training.phase2.lr")
        self.model.load_state_dict(stop.best_state)  # report (and keep) the best validation evaluation
        result = Phase2Result(history=st.history, metrics=self.best_metrics(reason, train_time))
        if self.windows.test is not None:  # once, with the kept weights: the unbiased figure to report
            test = evaluate(self.model, self.windows.test, self.cfg.batch_size * 4,
                            positions=self.windows.test_positions)
            result.metrics.update({keys.p2_split("test", k): test[k] for k in keys.P2_EVAL_MEASURES})
        return result

    def best_metrics(self, reason: str, train_time: float) -> dict:
        st, stop, best = self.state, self.state.stop, self.state.stop.best
        # train_* of the same evaluation as the kept weights and val_*; the last one's under last_epoch_*
        best_row, last = st.history[stop.best_evaluation - 1], st.history[-1]
        return {
            **{keys.p2_split("val", k): best[k] for k in keys.P2_EVAL_MEASURES},  # what the test split reports
            keys.P2_BEST_EPOCH: stop.best_epoch, keys.P2_EVAL_SEQ_LEN: self.windows.eval_len,
            keys.P2_BEST_STEP: stop.best_step, keys.P2_BEST_EVALUATION: stop.best_evaluation,
            keys.P2_TIME_TO_BEST_S: stop.time_to_best_s, keys.P2_STOP_REASON: reason,
            keys.P2_EPOCHS: last["epoch"], keys.P2_STEPS: st.step, keys.P2_EVALUATIONS: stop.evaluations,
            **{keys.p2_split("train", k): best_row[keys.p2_split("train", k)] for k in ("loss", "ppl", "acc")},
            **{keys.p2_last_epoch_train(k): last[keys.p2_split("train", k)] for k in ("loss", "ppl", "acc")},
            keys.P2_UNIFORM_PPL: float(self.model.vocab_size),
            keys.P2_TRAIN_TIME_S: train_time, keys.P2_TOKENS_PER_S: st.n_seen / max(train_time, 1e-9),
            keys.P2_TOKENS_SEEN: st.n_seen,
        }


def train_phase2(model: nn.Module, data, cfg: Phase2Config, device: torch.device, seed: int,
                 on_epoch: Callable[[dict], None] | None = None, progress: bool = True,
                 state: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
                 contexts_cache: ContextsCache | None = None) -> Phase2Result:
    """Train next-token prediction. `checkpoint(loop_state)` is called every
    training.phase2.checkpoint_every epochs; passing it back as `state` continues exactly (model weights
    restored by the caller). `contexts_cache(inputs, compute)` may serve the fixed-mode contexts."""
    loop = Phase2Loop(model, Windows.build(model, data, cfg, device), cfg, device, seed, on_epoch, contexts_cache)
    if state is not None:
        loop.state.restore(state)
    loop.state.start_clock()  # times and tokens/s are totals over every resume
    for epoch in range(loop.state.epoch + 1, cfg.epochs + 1):
        reason = loop.epoch(epoch, progress)
        if reason is not None:
            return loop.finish(reason)
        if checkpoint is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 \
                and epoch != cfg.epochs:
            checkpoint(loop.state.save())
    return loop.finish("cap")
