"""Phase 1 -- context vector fixed-point learning (CVFP).

The training stream is read again and again; the context carries over from the end of one pass
to the start of the next. After one sequential no-grad pass (pass 0), every iteration is a
Jacobi sweep over ALL positions at once:

    Cin = [P_N, P_1, ..., P_{N-1}]  (detached; optional noise)   C = f(Cin, X)
    loss = (1 - w) MSE(C, P) + w L_div(C)        one optimizer step
    converged_t = mean_d (C_t - P_t)^2 < threshold,   P <- C.detach()

`mode=per_token` is the earliest variant: each token repeated forever from c = 0, i.e. the
sweep input of a position is its own previous context.

What the rates measure. Pass 0 already IS the fixed point of the frozen f (but for the carried-over
first position), so the *training* rate only says how little the last optimizer step moved the
trajectory: `phase1/train_step_stability`, ~1 for an untrained or lr ~ 0 run by construction.
Whether f reaches a fixed point is measured on held-out tokens from a cold start (c = 0, see
`evaluate_phase1`): `phase1/val_convergence_rate` (selection, early stop) and `phase1/test_*`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

import torch

from newllm import keys, metrics
from newllm.config import Phase1Config  # what run.typed hands the training functions
from newllm.errors import TrainingError
from newllm.models import evaluating
from newllm.runtime.lifecycle import Phase1State
from newllm.training.diversity import Diversity
from newllm.training.progress import Progress
from newllm.training.solvers import PASS0, jacobi_sweep, jacobi_sweeps, sequential_pass, sweep_inputs, zeros_init

STOP_CONVERGED, STOP_MAX_ITERATIONS, STOP_UNTRAINED = "val_converged", "max_iterations", "untrained"


@dataclass
class Phase1Result:
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float | str] = field(default_factory=dict)
    val_contexts: torch.Tensor | None = None  # (N, C) held-out validation contexts after the cold-start sweeps


def as_streams(ids: torch.Tensor, num_streams: int) -> torch.Tensor:
    """(N,) -> (S, N // S): S parallel streams (a tail that does not fill a row is dropped)."""
    n = ids.numel() // num_streams
    if n < 2:
        raise TrainingError(f"{ids.numel()} tokens cannot form {num_streams} streams of >= 2 tokens")
    return ids[: n * num_streams].reshape(num_streams, n)


def phase1_ids(ids: torch.Tensor, cfg: Phase1Config) -> torch.Tensor:
    """The (S, N) training positions Phase 1 iterates over: streams, or each distinct token once (per_token)."""
    ids = ids[: cfg.max_tokens].long()  # stored ids may be int16/int32 (memory-mapped): only this piece is copied
    return unique_tokens(ids, cfg.max_tokens) if cfg.mode == "per_token" else as_streams(ids, cfg.num_streams)


def held_out_ids(ids: torch.Tensor, cfg: Phase1Config, what: str = "validation") -> torch.Tensor:
    """The (S, N) held-out positions `evaluate_phase1` measures: val_streams streams, each read from c = 0
    (side by side, so the reference pass takes N steps, not S N), or each distinct token once (per_token)."""
    ids = ids[: cfg.max_tokens].long()
    if cfg.mode == "per_token":
        return unique_tokens(ids, cfg.max_tokens)
    streams = as_streams(ids, cfg.val_streams)
    if streams.shape[1] <= cfg.val_iterations:
        raise TrainingError(f"the {what} stream ({ids.numel()} tokens) cut into training.phase1.val_streams="
                            f"{cfg.val_streams} streams of {streams.shape[1]} tokens is too short to measure "
                            f"val_iterations={cfg.val_iterations} sweeps: lower val_streams or val_iterations")
    return streams


def initial_contexts(model: torch.nn.Module, x: torch.Tensor, cfg: Phase1Config) -> torch.Tensor:
    """Pass 0: the first guess P that the sweeps improve (the fixed point does not depend on it).

    A measurement of f, so in eval mode (no dropout) whatever mode training left the model in.
    """
    if cfg.mode == "per_token":  # independent positions: no stream to run a recurrence along
        return zeros_init(model, x)
    with evaluating(model):
        return PASS0[cfg.init](model, x, cfg)


def unique_tokens(ids: torch.Tensor, limit: int) -> torch.Tensor:
    """per_token mode: each distinct token once, as S=1 'stream' of independent positions."""
    return torch.unique(ids)[:limit].unsqueeze(0)


class SweepStats(NamedTuple):
    """What one sweep measured, detached: MSE to the previous sweep, the regulariser, per-token MSE (S, N)."""

    mse: torch.Tensor
    diversity: torch.Tensor
    token_mse: torch.Tensor


def sweep_loss(c: torch.Tensor, target: torch.Tensor, w: float, diversity: Diversity,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, diversity, per-token mse) of a whole sweep: one per-token MSE feeds loss and convergence."""
    token_mse = metrics.per_token_mse(c, target)  # target: the previous sweep, never overwritten before this
    mse, div = token_mse.mean(), diversity(c)
    return (1 - w) * mse + w * div, mse, div, token_mse


def _rng_snapshot(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_restore(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def sweep(model: torch.nn.Module, ids: torch.Tensor, c_in: torch.Tensor, target: torch.Tensor, out: torch.Tensor,
          w: float, diversity: Diversity, chunk_size: int, train: bool) -> SweepStats:
    """One Jacobi sweep out = f(c_in, X) and its loss; with `train`, the loss's gradients land in .grad.

    The loss is always that of the WHOLE sweep, whatever chunk_size (a memory knob): with one chunk,
    one forward + backward. With several, f runs chunk by chunk without a graph, the loss of all of
    `out` is differentiated w.r.t. a detached copy (dL/dC), and each chunk is re-run with its graph and
    back-propagated with its slice of dL/dC: exactly the gradient of the unchunked loss (dropout
    masks replayed), for one extra forward.
    """
    n = ids.shape[1]
    spans = [(a, min(n, a + chunk_size)) for a in range(0, n, chunk_size)]
    if train and len(spans) == 1:
        c = jacobi_sweep(model.update, None, model.embed(ids), inputs=c_in)
        loss, mse, div, token_mse = sweep_loss(c, target, w, diversity)
        loss.backward()
        out.copy_(c.detach())
        return SweepStats(mse.detach(), div.detach(), token_mse.detach())
    device, rng = c_in.device, []
    with torch.no_grad():
        x = model.embed(ids)
        for a, b in spans:
            rng.append(_rng_snapshot(device))
            out[:, a:b] = jacobi_sweep(model.update, None, x, inputs=c_in, start=a, stop=b)
    if not train:
        with torch.no_grad():
            _, mse, div, token_mse = sweep_loss(out, target, w, diversity)
        return SweepStats(mse, div, token_mse)
    after = _rng_snapshot(device)
    leaf = out.clone().requires_grad_(True)
    loss, mse, div, token_mse = sweep_loss(leaf, target, w, diversity)
    loss.backward()
    for (a, b), state in zip(spans, rng, strict=True):
        _rng_restore(state, device)  # the same dropout masks as the no-grad forward
        # the chunk's own embedding: its graph (the embedding is trained) is built per chunk, like f's
        jacobi_sweep(model.update, None, model.embed(ids[:, a:b]), inputs=c_in[:, a:b]).backward(leaf.grad[:, a:b])
    _rng_restore(after, device)
    return SweepStats(mse.detach(), div.detach(), token_mse.detach())


class Phase1Loop:
    """Phase 1 as init / step / finish around `sweep`: the loop state lives in `self.state` (Phase1State)."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, val: torch.Tensor, cfg: Phase1Config,
                 dist_reg_weight: float, diversity: Diversity, saved: dict | None) -> None:
        self.model, self.ids, self.val, self.cfg, self.w = model, ids, val, cfg, dist_reg_weight
        self.train = not cfg.untrained
        self.params = model.updater_parameters()
        self.state = Phase1State(optimizer=torch.optim.Adam(self.params, lr=cfg.lr), diversity=diversity)
        if saved is None:
            diversity.reset()  # state carried across sweeps (EMAVariance) starts fresh with the run
            with torch.no_grad():
                self.state.contexts = initial_contexts(model, model.embed(ids), cfg)
        else:
            self.state.restore(saved, ids.device)
        self.stop_reason = STOP_MAX_ITERATIONS
        # Preallocated once: the sweep's inputs and its output (swapped with P after every sweep).
        p = self.state.contexts
        self.new, self.c_in = torch.empty_like(p), (None if cfg.mode == "per_token" else torch.empty_like(p))
        self.zero = torch.zeros((), device=ids.device)
        model.train(self.train)
        self.state.start_clock()

    def step(self, k: int) -> tuple[dict, bool]:
        """Iteration k: one sweep, one optimizer step, the history row; and whether Phase 1 ends here."""
        cfg, st = self.cfg, self.state
        st.optimizer.zero_grad(set_to_none=True)
        p = st.contexts
        c_in = sweep_inputs(p, per_token=self.c_in is None, out=self.c_in)
        if self.train and cfg.context_noise > 0:
            c_in = c_in + cfg.context_noise * torch.randn_like(c_in)
        with torch.set_grad_enabled(self.train):
            stats = sweep(self.model, self.ids, c_in, p, self.new, self.w, st.diversity, cfg.chunk_size, self.train)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if self.train else self.zero
        if self.train:
            st.optimizer.step()
        row = self.history_row(k, stats, grad_norm)
        st.contexts, self.new = self.new, p
        st.iteration = k
        last = self.measure(k, row)
        st.history.append(row)
        return row, last

    def history_row(self, k: int, stats: SweepStats, grad_norm: torch.Tensor) -> dict:
        # The one host-device sync of the sweep: every scalar the history needs, at once.
        scalars = torch.stack([stats.mse, stats.diversity,
                               (stats.token_mse < self.cfg.convergence_threshold).float().mean(),
                               (stats.token_mse * self.new.shape[-1]).sqrt().mean(),  # residual: mean L2
                               grad_norm.to(stats.mse.dtype)])
        mse, div, stability, residual, grad = scalars.tolist()
        if not math.isfinite(mse) or not math.isfinite(div):
            raise TrainingError(f"phase 1 loss became non-finite at iteration {k} (mse={mse}, "
                                f"diversity={div}); lower training.phase1.lr or training.dist_reg_weight")
        return {keys.HISTORY_PHASE: keys.PHASE1, keys.HISTORY_STEP: k,
                keys.P1_CVFP_LOSS: mse, keys.P1_DIVERSITY_LOSS: div,
                keys.P1_LOSS: (1 - self.w) * mse + self.w * div, keys.P1_TRAIN_STEP_STABILITY: stability,
                keys.P1_RESIDUAL: residual, keys.P1_GRAD_NORM: grad,
                keys.P1_TIME_S: self.state.elapsed()}

    def measure(self, k: int, row: dict) -> bool:
        """The held-out check and the rank, when due (added to `row`); True when Phase 1 stops at k."""
        cfg = self.cfg
        last = k == cfg.max_iterations
        if not self.train and k >= cfg.min_iterations:
            last, self.stop_reason = True, STOP_UNTRAINED  # f cannot change: more sweeps would measure nothing new
        if k % cfg.val_every == 0 or last:
            t_check = time.perf_counter()
            with evaluating(self.model):
                row.update(evaluate_phase1(self.model, self.val, cfg, memory=False))
            self.state.measuring_s += time.perf_counter() - t_check  # timed apart from training
            if self.train and k >= cfg.min_iterations and held_out_converged(row, cfg):
                last, self.stop_reason = True, STOP_CONVERGED
        if k % cfg.erank_every == 0 or last:
            row[keys.P1_EFFECTIVE_RANK] = metrics.effective_rank(self.state.contexts, cfg.erank_samples)
        return last

    def finish(self, test: torch.Tensor | None) -> Phase1Result:
        """The run's Phase-1 metrics: of the last sweep, then held-out validation (and test) from a cold start."""
        cfg, st, model = self.cfg, self.state, self.model
        train_time = st.elapsed() - st.measuring_s
        model.eval()
        contexts = st.contexts.reshape(-1, st.contexts.shape[-1])
        c_dim, n_tokens, iterations = contexts.shape[-1], self.ids.numel(), len(st.history)
        last = st.history[-1]  # max_iterations >= 1: at least one sweep ran
        erank = metrics.effective_rank(contexts, cfg.erank_samples)
        m: dict[str, float | str] = {
            keys.P1_TRAIN_STEP_STABILITY: last[keys.P1_TRAIN_STEP_STABILITY],  # of the last sweep
            keys.P1_RESIDUAL: last[keys.P1_RESIDUAL],
            keys.P1_ITERATIONS: iterations,
            keys.P1_STOP_REASON: self.stop_reason,
            keys.P1_EFFECTIVE_RANK: erank,
            keys.P1_EFFECTIVE_RANK_RATIO: erank / c_dim,
            keys.P1_EFFECTIVE_RANK_SAMPLES: min(cfg.erank_samples, contexts.shape[0]),
            keys.P1_PARTICIPATION_RATIO: metrics.participation_ratio(contexts, cfg.erank_samples),
            keys.P1_TOKENS: n_tokens,
            keys.P1_TRAIN_TIME_S: train_time,
            keys.P1_TOKEN_ITERATIONS_PER_S: n_tokens * iterations / max(train_time, 1e-9),
            keys.P1_IDENTITY_SCORE: metrics.identity_mapping_score(model.update, c_dim, model.embed_dim,
                                                                    device=contexts.device, dtype=contexts.dtype),
        }
        t_final = time.perf_counter()
        val_metrics, val_contexts = evaluate_phase1(model, self.val, cfg, return_contexts=True)
        m.update(val_metrics)
        if test is not None:
            m.update(evaluate_phase1(model, test, cfg, split="test"))
        m[keys.P1_HELD_OUT_TIME_S] = st.measuring_s + time.perf_counter() - t_final
        return Phase1Result(history=st.history, metrics=m, val_contexts=val_contexts.cpu())


def train_phase1(model: torch.nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: Phase1Config,
                 dist_reg_weight: float, diversity: Diversity, device: torch.device,
                 on_iteration: Callable[[dict], None] | None = None, progress: bool = True,
                 state: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
                 test_ids: torch.Tensor | None = None) -> Phase1Result:
    """Train f towards a diverse fixed point of the training stream; measure it on held-out streams.

    Every training.phase1.val_every iterations the validation stream is measured from a cold start
    (`evaluate_phase1`, no optimizer); training stops early once that held-out rate reaches
    convergence_target (after min_iterations). The reason is `phase1/stop_reason`. `test_ids`, when
    given, is measured once at the end as `phase1/test_*`.

    `checkpoint(loop_state)` is called every training.phase1.checkpoint_every iterations; passing
    that loop state back as `state` continues from there exactly (model weights restored by the caller).
    """
    ids = phase1_ids(train_ids, cfg).to(device)
    # held-out positions built first: a stream too short to measure fails before any work
    val = held_out_ids(val_ids, cfg).to(device)
    test = held_out_ids(test_ids, cfg, "test").to(device) if test_ids is not None else None
    loop = Phase1Loop(model, ids, val, cfg, dist_reg_weight, diversity, state)
    bar = Progress(range(loop.state.iteration + 1, cfg.max_iterations + 1), keys.PHASE1, progress)
    for k in bar:
        row, last = loop.step(k)
        if on_iteration is not None:
            on_iteration(row)
        bar.set_postfix(loss=f"{row['phase1/loss']:.4f}", stab=f"{row['phase1/train_step_stability']:.3f}")
        if last:
            break
        if checkpoint is not None and cfg.checkpoint_every and k % cfg.checkpoint_every == 0:
            checkpoint(loop.state.save())
    return loop.finish(test)


class ColdStart(NamedTuple):
    """What `cold_start_rates` measured: per sweep from c = 0, the converged fraction and the mean L2
    distance to the reference; the reference contexts (stream: the fixed point, i.e. the sequential pass;
    per_token: the contexts after `sweeps` iterations) and the contexts after `sweeps` sweeps (S, N, C)."""

    rates: list[float]
    distances: list[float]
    reference: torch.Tensor
    swept: torch.Tensor


@torch.no_grad()
def cold_start_rates(model: torch.nn.Module, x: torch.Tensor, cfg: Phase1Config, sweeps: int,
                     until: int | None = None) -> ColdStart:
    """Sweeps from c = 0 over embedded held-out tokens x (S, N, E), no optimizer (`ColdStart`).

    stream: each held-out stream is read once from c_0 = 0 (an open chain, as Phase 2 and generation
    read text); its fixed point is the sequential pass, which k sweeps from zeros reproduce exactly at
    the first k positions and, further on, as the context of the last k tokens alone. Position t >= k
    is converged when mean_d (C_t^k - C*_t)^2 < convergence_threshold (positions t < k are exact by
    construction and left out): the reference is the fixed point itself, so a sweep that merely moved
    little (f(0, x) ~ 0 at sweep 1, say) does not count.
    per_token: c <- f(c, x) for each distinct token; converged when the residual of c = f(c, x),
    mean_d (c^k - c^(k-1))^2, is below the threshold (the equation has no trajectory to compare with).
    With `until`, sweeping goes on (up to `until` sweeps in all) while the fraction is below convergence_target.
    """
    per_token = cfg.mode == "per_token"
    reference = None if per_token else sequential_pass(model, x, recurrence=model.recurrence)
    p = zeros_init(model, x)  # swept in place
    per_sweep: list[torch.Tensor] = []  # (rate, distance) of each sweep, on the device
    swept = p
    sweeping = jacobi_sweeps(model.update, x, p, p.new_zeros(x.shape[0], p.shape[-1]), per_token)
    for k, (_, change) in enumerate(islice(sweeping, max(sweeps, until or 0)), start=1):
        if per_token:  # the residual of c = f(c, x) is this sweep's change
            stats = [(change < cfg.convergence_threshold).float().mean(), (change * p.shape[-1]).sqrt().mean()]
        else:  # positions t < k are exact by construction: measured from min(k, N - 1) on
            start = min(k, x.shape[1] - 1)
            stats = [metrics.converged_fraction(p[:, start:], reference[:, start:], cfg.convergence_threshold),
                     metrics.residual_norm(p[:, start:], reference[:, start:])]
        per_sweep.append(torch.stack(stats))
        if k == sweeps:
            swept = p.clone()
        # Read on the host only when it decides something: past `sweeps`, with `until`, once per sweep.
        if k >= sweeps and (until is None or float(per_sweep[-1][0]) >= cfg.convergence_target):
            break
    rates, distances = torch.stack(per_sweep, dim=1).tolist()
    return ColdStart(rates, distances, swept if per_token else reference, swept)


def probe_metrics(ids: torch.Tensor, fixed: torch.Tensor, swept: torch.Tensor, sweeps: int, threshold: float,
                  split: str) -> dict[str, float]:
    """What the held-out contexts tell the next-token head beyond the current token (stream mode).

    Positions t = sweeps .. N-2 of every stream (a next token, and the history the convergence rate asks
    for), in stream order, cut into two halves: a probe fitted on the fixed-point contexts of one half
    (`metrics.next_token_probe`: the bigram plus a ridge read-out of the context) predicts token t+1 of
    the other half from the contexts that `sweeps` cold-start sweeps reached there, and the other way round.

    Keys phase1/{split}_<measure> (keys.P1_PROBE_MEASURES):
    probe_accuracy, bigram_accuracy  top-1 of the probe and of the memoryless reference
    probe_gain       their difference: 0 exactly for any f whose context depends on the current token
                     alone (memoryless, collapsed); < 0 where the probe reads noise
    converged_gain   the gain counted only at positions converged after `sweeps` sweeps, per position:
                     contexts that reached their fixed point AND inform the head (the Phase-1 objective)
    """
    n, dim = ids.shape[1], fixed.shape[-1]
    tokens, targets = ids[:, sweeps:-1].reshape(-1).cpu(), ids[:, sweeps + 1:].reshape(-1).cpu()
    half = len(tokens) // 2
    if half == 0:
        return {keys.p1_held_out(split, k): math.nan for k in keys.P1_PROBE_MEASURES}
    fixed, swept = (c[:, sweeps : n - 1].reshape(-1, dim) for c in (fixed, swept))
    probe, bigram = torch.zeros(len(tokens), dtype=torch.bool), torch.zeros(len(tokens), dtype=torch.bool)
    for fit, scored in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        probe[scored], bigram[scored] = metrics.next_token_probe((fixed[fit], tokens[fit], targets[fit]),
                                                                 (swept[scored], tokens[scored], targets[scored]))
    gain = probe.double() - bigram.double()
    converged = (metrics.per_token_mse(swept, fixed) < threshold).cpu()
    return {keys.p1_held_out(split, "probe_accuracy"): float(probe.double().mean()),
            keys.p1_held_out(split, "bigram_accuracy"): float(bigram.double().mean()),
            keys.p1_held_out(split, "probe_gain"): float(gain.mean()),
            keys.p1_held_out(split, "converged_gain"): float((gain * converged).mean())}


def held_out_converged(m: dict, cfg: Phase1Config, split: str = "val") -> bool:
    """Phase 1's early stop: contexts reach their fixed point AND carry what the current token alone does not.

    A convergence_target fraction converged after val_iterations cold-start sweeps, and (stream mode) a
    probe gain of at least min_probe_gain over the bigram: a memoryless or collapsed f converges in one
    sweep but gains exactly 0, so it never stops Phase 1 as converged. per_token mode has no next token
    (its fixed points are memoryless by design): the rate alone.
    """
    if not m[keys.p1_held_out(split, "convergence_rate")] >= cfg.convergence_target:
        return False
    return cfg.mode == "per_token" or m[keys.p1_held_out(split, "probe_gain")] >= cfg.min_probe_gain


def memory_length(rates: list[float], target: float, cap: int) -> tuple[int, bool]:
    """(first sweep count whose converged fraction reaches target, False) or (cap, True) if none did."""
    reached = next((k for k, r in enumerate(rates[:cap], start=1) if r >= target), None)
    return (cap, True) if reached is None else (reached, False)


@torch.no_grad()
def evaluate_phase1(model: torch.nn.Module, ids: torch.Tensor, cfg: Phase1Config, split: str = "val",
                    memory: bool = True, return_contexts: bool = False):
    """The fixed-point property on held-out positions (S, N) from `held_out_ids`, from a cold start.

    Every context starts at c = 0 and sweeps run without optimizer steps (`cold_start_rates`): after
    k sweeps, position t of a stream holds the context f computes from the last k tokens only, so a
    converged position is one whose context has forgotten, to within convergence_threshold, what came
    more than k tokens earlier. Nothing here is 1 by construction: untrained and lr ~ 0 runs score what
    their f does. A collapsed f (one attractor) converges in a few sweeps: read the rate beside the rank.

    Keys phase1/{split}_<measure> (keys.p1_held_out), split val (selection) or test (report):
    convergence_rate      converged fraction after val_iterations sweeps
    fixed_point_distance  mean ||C^k - C*|| (L2) after val_iterations sweeps (per_token: the residual)
    memory_length         sweeps needed for a convergence_target fraction (memory=True);
                          memory_length_capped = 1 when memory_cap sweeps (or, on streams shorter than
                          that, length - 1: N sweeps are exact for any f) did not get there; the figure
                          is then a lower bound
    effective_rank(_ratio) and collapse statistics: of the held-out contexts themselves (the sequential
                          pass; per_token: the contexts after val_iterations iterations)
    """
    x = model.embed(ids)
    cap = cfg.memory_cap if cfg.mode == "per_token" else min(cfg.memory_cap, ids.shape[1] - 1)
    cold = cold_start_rates(model, x, cfg, cfg.val_iterations, cap if memory else None)
    contexts = cold.reference.reshape(-1, cold.reference.shape[-1])
    erank = metrics.effective_rank(contexts, cfg.erank_samples)
    out: dict[str, float] = {
        keys.p1_held_out(split, "convergence_rate"): cold.rates[cfg.val_iterations - 1],
        keys.p1_held_out(split, "fixed_point_distance"): cold.distances[cfg.val_iterations - 1],
        keys.p1_held_out(split, "effective_rank"): erank,
        keys.p1_held_out(split, "effective_rank_ratio"): erank / contexts.shape[-1],
    }
    if cfg.mode != "per_token":
        out.update(probe_metrics(ids, cold.reference, cold.swept, cfg.val_iterations, cfg.convergence_threshold,
                                 split))
    if memory:
        length, capped = memory_length(cold.rates, cfg.convergence_target, cap)
        collapse = metrics.collapse_stats(contexts, ids.reshape(-1))
        out.update({keys.p1_held_out(split, "memory_length"): length,
                    keys.p1_held_out(split, "memory_length_capped"): int(capped),
                    keys.p1_held_out(split, "tokens"): ids.numel(),
                    **{keys.p1_held_out(split, k): v for k, v in collapse.items()}})
    return (out, contexts) if return_contexts else out
