"""Phase 1 -- context vector fixed-point learning (CVFP).

The training stream is read again and again; the context carries over from the end of one pass
to the start of the next. After one sequential no-grad pass (pass 0), every iteration is a
Jacobi sweep over ALL positions at once:

    Cin = [P_N, P_1, ..., P_{N-1}]  (detached; optional noise)   C = f(Cin, X)
    loss = (1 - w) MSE(C, P) + w L_div(C)        one optimizer step
    converged_t = mean_d (C_t - P_t)^2 < threshold,   P <- C.detach()

`mode=per_token` is the earliest variant: each token repeated forever from c = 0, i.e. the
sweep input of a position is its own previous context.

Reading the rates: pass 0 (init=sequential) already IS the fixed point of the frozen f except at
the carried-over first position, so the training rate measures how far each optimizer step moves
the trajectory (untrained: ~1 by construction). Whether f contracts onto the steady state is what
the validation rate measures, from zeros (val_init).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from newllm import metrics
from newllm.checkpoint import load_module_state, module_state, rng_state, set_rng_state
from newllm.errors import TrainingError
from newllm.training.diversity import Diversity
from newllm.training.solvers import chunked_pass, sequential_pass, shifted_inputs, shifted_into, zeros_init


@dataclass
class Phase1Result:
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    val_contexts: torch.Tensor | None = None  # (N, C) final validation contexts


def as_streams(ids: torch.Tensor, num_streams: int) -> torch.Tensor:
    """(N,) -> (S, N // S): S parallel streams (a tail that does not fill a row is dropped)."""
    n = ids.numel() // num_streams
    if n < 2:
        raise TrainingError(f"{ids.numel()} tokens cannot form {num_streams} streams of >= 2 tokens")
    return ids[: n * num_streams].reshape(num_streams, n)


def initial_contexts(model: torch.nn.Module, x: torch.Tensor, cfg: DictConfig, init: str | None = None) -> torch.Tensor:
    """Pass 0: the first guess P that the sweeps improve (the fixed point does not depend on it)."""
    init = init or cfg.init
    if cfg.mode == "per_token" or init == "zeros":
        return zeros_init(model.update, x)
    if init == "chunked":
        return chunked_pass(model.update, x, cfg.init_chunks)
    return sequential_pass(model.update, x)


def sweep_inputs(p: torch.Tensor, mode: str) -> torch.Tensor:
    return p if mode == "per_token" else shifted_inputs(p)


def unique_tokens(ids: torch.Tensor, limit: int) -> torch.Tensor:
    """per_token mode: each distinct token once, as S=1 'stream' of independent positions."""
    return torch.unique(ids)[:limit].unsqueeze(0)


def train_phase1(model: torch.nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: DictConfig,
                 dist_reg_weight: float, diversity: Diversity, device: torch.device,
                 on_iteration: Callable[[dict], None] | None = None, progress: bool = True,
                 state: dict | None = None, checkpoint: Callable[[dict], None] | None = None) -> Phase1Result:
    """Train f towards a diverse fixed point of the training stream; measure it on validation.

    `checkpoint(loop_state)` is called every training.phase1.checkpoint_every iterations; passing
    that loop state back as `state` continues from there exactly (model weights restored by the caller).
    """
    w = dist_reg_weight
    if cfg.mode == "per_token":
        ids = unique_tokens(train_ids[: cfg.max_tokens], cfg.max_tokens).to(device)
    else:
        ids = as_streams(train_ids[: cfg.max_tokens], cfg.num_streams).to(device)
    train = not cfg.untrained
    params = model.updater_parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    result = Phase1Result()
    n_tokens = ids.numel()

    model.train(train)
    rate, residual, start, elapsed_before = 0.0, math.nan, 1, 0.0
    if state is None:
        with torch.no_grad():
            p = initial_contexts(model, model.embed(ids), cfg)
    else:
        p, start = state["contexts"].to(device), state["iteration"] + 1
        optimizer.load_state_dict(state["optimizer"])
        load_module_state(diversity, state["diversity"])
        result.history = list(state["history"])
        rate, residual = result.history[-1]["phase1/convergence_rate"], result.history[-1]["phase1/residual"]
        elapsed_before = state.get("elapsed_s", 0.0)  # time up to that checkpoint, in earlier processes
        set_rng_state(state["rng"])
    every = cfg.get("checkpoint_every", 0)
    t0 = time.perf_counter() - elapsed_before  # times below are totals over every resume
    bar = tqdm(range(start, cfg.max_iterations + 1), desc="phase1", disable=not progress, leave=False)
    # Preallocated once: the sweep's inputs and its output (swapped with p after every sweep).
    new, c_in_all = torch.empty_like(p), (p if cfg.mode == "per_token" else torch.empty_like(p))
    zero, c_dim = torch.zeros((), device=device), p.shape[-1]
    for k in bar:
        diversity.reset()
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, device=device)  # mse, diversity, converged count, residual norms
        n_pos = p.shape[1]
        c_in_all = p if cfg.mode == "per_token" else shifted_into(c_in_all, p)
        for a in range(0, n_pos, cfg.chunk_size):
            b = min(n_pos, a + cfg.chunk_size)
            c_in = c_in_all[:, a:b]
            if train and cfg.context_noise > 0:
                c_in = c_in + cfg.context_noise * torch.randn_like(c_in)
            with torch.set_grad_enabled(train):
                c = model.update(c_in, model.embed(ids[:, a:b]))
                target = p[:, a:b]  # the previous sweep: never overwritten before the loss
                token_mse = metrics.per_token_mse(c, target)  # one pass feeds loss, convergence, residual
                mse = token_mse.mean()
                div = diversity(c)
                loss = ((1 - w) * mse + w * div) * ((b - a) / n_pos)
            if train:
                loss.backward()
            with torch.no_grad():
                token_mse = token_mse.detach()
                sums += torch.stack([mse * (b - a), div * (b - a), (token_mse < cfg.convergence_threshold).sum(),
                                     (token_mse * c_dim).sqrt().sum()])  # sum of ||C_t - P_t|| (L2)
                new[:, a:b] = c.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if train else zero
        if train:
            optimizer.step()
        # The one host-device sync of the iteration: every scalar the history needs, at once.
        scalars = torch.cat([sums / torch.tensor([n_pos, n_pos, n_tokens, n_tokens], device=device),
                             grad_norm.to(sums.dtype).reshape(1)])
        mse_v, div_v, conv, residual, grad_norm = scalars.tolist()
        if not math.isfinite(mse_v) or not math.isfinite(div_v):
            raise TrainingError(f"phase 1 loss became non-finite at iteration {k} (mse={mse_v}, "
                                f"diversity={div_v}); lower training.phase1.lr or training.dist_reg_weight")
        rate = conv
        p, new = new, p
        row = {"phase": 1, "step": k, "phase1/cvfp_loss": mse_v, "phase1/diversity_loss": div_v,
               "phase1/loss": (1 - w) * mse_v + w * div_v, "phase1/convergence_rate": rate,
               "phase1/residual": residual, "phase1/grad_norm": grad_norm,
               "phase1/time_s": time.perf_counter() - t0}
        last = (k >= cfg.min_iterations and rate >= cfg.convergence_target) or k == cfg.max_iterations
        if k % cfg.erank_every == 0 or last:
            row["phase1/effective_rank"] = metrics.effective_rank(p, cfg.erank_samples)
        result.history.append(row)
        if on_iteration is not None:
            on_iteration(row)
        bar.set_postfix(loss=f"{row['phase1/loss']:.4f}", conv=f"{rate:.3f}")
        if last:
            break
        if checkpoint is not None and every and k % every == 0:
            checkpoint({"iteration": k, "elapsed_s": time.perf_counter() - t0, "contexts": p,
                        "optimizer": optimizer.state_dict(), "diversity": module_state(diversity),
                        "history": result.history, "rng": rng_state()})
    train_time = time.perf_counter() - t0
    model.eval()

    c_dim = p.shape[-1]
    train_contexts = p.reshape(-1, c_dim)
    erank = metrics.effective_rank(train_contexts, cfg.erank_samples)
    m = {
        "phase1/convergence_rate": rate,
        "phase1/residual": residual,
        "phase1/iterations": len(result.history),
        "phase1/effective_rank": erank,
        "phase1/effective_rank_ratio": erank / c_dim,
        "phase1/effective_rank_samples": min(cfg.erank_samples, train_contexts.shape[0]),
        "phase1/participation_ratio": metrics.participation_ratio(train_contexts, cfg.erank_samples),
        "phase1/tokens": n_tokens,
        "phase1/train_time_s": train_time,
        "phase1/token_iterations_per_s": n_tokens * len(result.history) / max(train_time, 1e-9),
        "phase1/identity_score": metrics.identity_mapping_score(model.update, c_dim, model.embed_dim,
                                                                device=device),
    }
    m.update(evaluate_phase1(model, val_ids, cfg, device, result))
    result.metrics = m
    return result


@torch.no_grad()
def evaluate_phase1(model: torch.nn.Module, val_ids: torch.Tensor, cfg: DictConfig, device: torch.device,
                    result: Phase1Result | None = None) -> dict[str, float]:
    """The same iteration on the validation stream, without optimizer steps.

    It starts from `cfg.val_init` (default zeros), not from a sequential pass: a sequential pass
    already IS the fixed point of a fixed f (up to the carried-over first position), so sweeps
    started there converge trivially whatever f is. From zeros, the rate after val_iterations
    sweeps measures whether f contracts onto the stream's steady state.
    """
    if cfg.mode == "per_token":
        ids = unique_tokens(val_ids[: cfg.max_tokens], cfg.max_tokens).to(device)
    else:
        ids = as_streams(val_ids[: cfg.max_tokens], cfg.num_streams).to(device)
    x = model.embed(ids)
    p = initial_contexts(model, x, cfg, cfg.get("val_init", "zeros"))
    rate, residual = 0.0, math.nan
    for _ in range(cfg.val_iterations):
        new = model.update(sweep_inputs(p, cfg.mode), x)
        rate = metrics.convergence_rate(new, p, cfg.convergence_threshold)
        residual = metrics.mean_residual(new, p)
        p = new
    contexts = p.reshape(-1, p.shape[-1])
    erank = metrics.effective_rank(contexts, cfg.erank_samples)
    collapse = metrics.collapse_stats(contexts, ids.reshape(-1))
    if result is not None:
        result.val_contexts = contexts.cpu()
    return {
        "phase1/val_convergence_rate": rate,
        "phase1/val_residual": residual,
        "phase1/val_effective_rank": erank,
        "phase1/val_effective_rank_ratio": erank / p.shape[-1],
        "phase1/val_tokens": ids.numel(),
        **{f"phase1/val_{k}": v for k, v in collapse.items()},
    }
