"""Fixed-point solvers for c_t = f(c_{t-1}, x_t) over a batch of streams, as small functions.

Shapes: ids/embedded tokens X (S, N, E) for S parallel streams of N positions, contexts (S, N, C).
`update(c, x)` is the model's f, position-wise, so one call covers every position. Passes that start
from zeros take the model itself (`f`: a ContextUpdate, whose context_dim sets the state size); the
Jacobi sweeps are given their start c0 and take `update` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch

from newllm import metrics
from newllm.models.interface import ContextModel, ContextUpdate

Update = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A whole left-to-right pass, (S, N, E) embedded tokens and an optional start (S, C) -> contexts (S, N, C):
# a model's own fast loop (ContextLM.recurrence hoists the input projections), equal to stepping `update`.
Recurrence = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def sequential_pass(f: ContextUpdate, x: torch.Tensor, c0: torch.Tensor | None = None,
                    recurrence: Recurrence | None = None) -> torch.Tensor:
    """The one true recurrence, token by token (the only per-position Python loop of Phase 1).

    `recurrence`, when given, runs the same loop faster (hoisted input projections).
    """
    # Matrix-vector steps are latency-bound (per-op overhead, not FLOPs): no per-token slicing or
    # copies beyond f itself, and no autocast, which would re-cast every weight at every token (no
    # weight cache under no_grad), so pass 0 stays fp32 even under training.precision=bf16.
    if recurrence is not None:
        with torch.autocast(x.device.type, enabled=False):
            return recurrence(x, c0)
    c = c0 if c0 is not None else x.new_zeros(x.shape[0], _context_dim(f))
    out = []
    with torch.autocast(x.device.type, enabled=False):
        for x_t in x.unbind(1):
            c = f.update(c, x_t)
            out.append(c)
    return torch.stack(out, dim=1) if out else x.new_zeros(*x.shape[:2], c.shape[-1])


@torch.no_grad()
def chunked_pass(f: ContextUpdate, x: torch.Tensor, chunks: int, recurrence: Recurrence | None = None,
                 ) -> torch.Tensor:
    """Pass 0 on `chunks` slices of every stream at once, each slice from c = 0.

    Same fixed point as `sequential_pass` (only the starting guess differs), K times fewer steps.
    """
    return burn_in_pass(f, x, chunks, 0, recurrence=recurrence)


@torch.no_grad()
def burn_in_pass(f: ContextUpdate, x: torch.Tensor, chunks: int, burn_in: int,
                 recurrence: Recurrence | None = None) -> torch.Tensor:
    """Pass 0 on `chunks` slices at once, each slice started `burn_in` tokens early from c = 0.

    A slice that reaches back to the stream's start is exact; the others differ from `sequential_pass`
    only by how much of c_0 = 0 is still remembered `burn_in` tokens later (f's memory): for a
    contracting f the error falls geometrically with burn_in, and burn_in >= N is the exact pass.
    """
    s, n, e = x.shape
    k = max(1, min(chunks, n))
    length = -(-n // k)
    starts = torch.arange(k, device=x.device) * length
    window_starts = (starts - burn_in).clamp(min=0)
    width = int(min(burn_in, n)) + length
    idx = (window_starts[:, None] + torch.arange(width, device=x.device)).clamp(max=n - 1)  # (K, W)
    out = sequential_pass(f, x[:, idx].reshape(s * k, width, e), recurrence=recurrence)
    keep = (starts - window_starts)[:, None] + torch.arange(length, device=x.device)  # (K, length)
    out = out.reshape(s, k, width, -1).gather(2, keep[None, :, :, None].expand(s, k, length, out.shape[-1]))
    return out.reshape(s, k * length, -1)[:, :n]


def zeros_init(f: ContextUpdate, x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], _context_dim(f))


def _pass0_sequential(model: ContextModel, x: torch.Tensor, cfg: Any) -> torch.Tensor:
    return sequential_pass(model, x, recurrence=model.recurrence)


def _pass0_zeros(model: ContextModel, x: torch.Tensor, cfg: Any) -> torch.Tensor:
    return zeros_init(model, x)


def _pass0_chunked(model: ContextModel, x: torch.Tensor, cfg: Any) -> torch.Tensor:
    return chunked_pass(model, x, cfg.init_chunks, recurrence=model.recurrence)


def _pass0_burn_in(model: ContextModel, x: torch.Tensor, cfg: Any) -> torch.Tensor:
    return burn_in_pass(model, x, cfg.init_chunks, cfg.init_burn_in, recurrence=model.recurrence)


# training.phase1.init -> pass 0: (model, embedded stream (S, N, E), Phase1Config) -> first contexts (S, N, C).
# Every one reaches the same fixed point; they differ in cost and in how close the first guess is.
PASS0: dict[str, Callable[[ContextModel, torch.Tensor, Any], torch.Tensor]] = {
    "sequential": _pass0_sequential, "zeros": _pass0_zeros, "chunked": _pass0_chunked, "burn_in": _pass0_burn_in,
}


def shifted_inputs(contexts: torch.Tensor, first: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Inputs of a Jacobi sweep: position t reads c_{t-1} of the previous sweep.

    Position 0 reads `first` (S, C) when given (an open chain from a known start), otherwise the
    previous sweep's LAST context (the stream read again and again: the context carries over).
    `out`, when given, is a preallocated (S, N, C) buffer written in place (no new tensor per sweep).
    """
    if out is None:
        head = contexts[:, -1:] if first is None else first.unsqueeze(1)
        return torch.cat([head, contexts[:, :-1]], dim=1)
    out[:, 0] = contexts[:, -1] if first is None else first
    out[:, 1:] = contexts[:, :-1]
    return out


def sweep_inputs(contexts: torch.Tensor, first: torch.Tensor | None = None, per_token: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """What each position reads in the next Jacobi sweep: c_{t-1} of the previous sweep (`shifted_inputs`),
    or, per_token (each position its own chain, the token repeated forever), its own previous c_t."""
    return contexts if per_token else shifted_inputs(contexts, first, out)


def jacobi_sweep(update: Update, contexts: torch.Tensor | None, x: torch.Tensor, first: torch.Tensor | None = None,
                 *, per_token: bool = False, start: int = 0, stop: int | None = None,
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
    """THE Jacobi sweep: every c_t = f(c_{t-1}^{prev}, x_t) in one batched call, positions [start, stop).

    What each position reads of the previous sweep `contexts` is `sweep_inputs` (first / carry-over /
    per_token); `inputs`, when given, are those already built (Phase-1 training builds them into a buffer
    and may add noise; `contexts` is then unused). Phase-1 training (`phase1.sweep`, chunk by chunk), the
    held-out measurement (`phase1.cold_start_rates`) and Phase 2's `jacobi_window` all sweep here.
    """
    if inputs is None:
        inputs = sweep_inputs(contexts, first, per_token)
    return update(inputs[:, start:stop], x[:, start:stop])


def jacobi_sweeps(update: Update, x: torch.Tensor, contexts: torch.Tensor, first: torch.Tensor,
                  per_token: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """No-grad Jacobi sweeps from `contexts` (S, N, C), updated in place: after sweep k yields
    (start, per-token MSE change of the positions it recomputed, (S, N - start)).

    Open chain (position 0 reads `first`): after k sweeps the first k positions are exact (their inputs
    were), so sweep k + 1 recomputes positions >= k only and N sweeps are exact for any f. per_token:
    each position is its own chain (`first` unused) and every sweep recomputes all of them. Endless:
    the caller stops.
    """
    n, k = x.shape[1], 0
    while True:
        start = 0 if per_token else min(k, n)
        with torch.no_grad():
            tail = jacobi_sweep(update, contexts, x, first, per_token=per_token, start=start)
            change = metrics.per_token_mse(tail, contexts[:, start:])
            contexts[:, start:] = tail
        k += 1
        yield start, change


def jacobi_window(update: Update, x: torch.Tensor, c0: torch.Tensor, max_sweeps: int, tol: float,
                  grad_sweeps: int = 1) -> tuple[torch.Tensor, int]:
    """The open-chain recurrence of a window from c0 (B, C) by parallel sweeps: contexts (B, T, C).

    No-grad sweeps until the max per-token change is <= tol (or `max_sweeps`; T sweeps are exact
    for any f), then `grad_sweeps` sweeps that keep the graph: the gradient is that of a
    `grad_sweeps`-step truncated BPTT around the converged trajectory. Returns (contexts, sweeps).
    """
    n = x.shape[1]
    contexts = c0.unsqueeze(1).expand(-1, n, -1).clone()
    sweeps = 0
    for _, change in islice(jacobi_sweeps(update, x, contexts, c0), max(0, min(max_sweeps, n))):
        sweeps += 1
        if float(change.max()) <= tol:
            break
    for _ in range(grad_sweeps):
        contexts = jacobi_sweep(update, contexts, x, c0)
    return contexts, sweeps + grad_sweeps


def _context_dim(f: ContextUpdate) -> int:
    if not isinstance(f, ContextUpdate):
        raise TypeError(f"pass the model (an object with update(c, x) and context_dim), not {type(f).__name__}")
    return f.context_dim
