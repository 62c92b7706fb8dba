"""Pure metric functions on tensors. No training state, no I/O: each is unit-tested by hand.

Conventions: a context matrix is (N, C), one row per position. Convergence uses the SAME
per-token MSE as the Phase-1 loss (the research code newllm re-implements mixed MSE for training and
L2 for the check).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def sample_rows(contexts: torch.Tensor, max_rows: int, seed: int = 0) -> torch.Tensor:
    """At most `max_rows` rows, chosen with a fixed seed so runs compare on the same count."""
    contexts = contexts.reshape(-1, contexts.shape[-1])
    if contexts.shape[0] <= max_rows:
        return contexts
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(contexts.shape[0], generator=g)[:max_rows]
    return contexts[idx.to(contexts.device)]


def singular_values(contexts: torch.Tensor, max_rows: int = 4096, centered: bool = False) -> torch.Tensor:
    m = sample_rows(contexts.detach().float(), max_rows)
    if centered:
        m = m - m.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(m.double().cpu()).float()


def effective_rank_from_singular_values(s: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values.

    In float64, and over p > 0 only: a collapsed matrix has singular values ~1e-11 of the largest
    (and denormals) whose p underflows to 0 in float32, and 0 * log 0 made its rank NaN.
    """
    p = s.double() / s.double().sum() if s.numel() else s
    p = p[p > 0]
    if p.numel() == 0:
        return 0.0
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(contexts: torch.Tensor, max_rows: int = 4096, centered: bool = False) -> float:
    """Effective rank of the (N, C) context matrix, on at most `max_rows` sampled rows.

    Uncentred by default, as the research code newllm re-implements measured it; `centered=True` removes the
    mean row first (then a constant offset shared by all contexts no longer counts as a direction).
    """
    return effective_rank_from_singular_values(singular_values(contexts, max_rows, centered))


def participation_ratio(contexts: torch.Tensor, max_rows: int = 4096, centered: bool = True) -> float:
    """(sum lambda)^2 / sum lambda^2 over the eigenvalues lambda = s^2 (centred by default)."""
    lam = singular_values(contexts, max_rows, centered).double() ** 2
    denom = float((lam**2).sum())
    return float(lam.sum() ** 2 / denom) if denom > 0 else 0.0


def per_token_mse(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """mean_d (new_t - old_t)^2 for every position: shape new.shape[:-1]."""
    return (new - old).pow(2).mean(dim=-1)


def converged_fraction(new: torch.Tensor, old: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fraction of positions whose per-token MSE to the previous sweep is below `threshold` (0-d, on the device)."""
    return (per_token_mse(new, old) < threshold).float().mean()


def residual_norm(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm ||f(c) - c|| over positions (0-d, on the device)."""
    return (new - old).norm(dim=-1).mean()


def convergence_rate(new: torch.Tensor, old: torch.Tensor, threshold: float) -> float:
    return float(converged_fraction(new, old, threshold))


def mean_residual(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(residual_norm(new, old))


def identity_mapping_score(update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           context_dim: int, embed_dim: int, n: int = 256, seed: int = 0,
                           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Mean cos(c, f(c, x)) on random (c, x); above ~0.95 f learned a (near) identity map."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, context_dim, generator=g).to(device, dtype)
    x = torch.randn(n, embed_dim, generator=g).to(device, dtype)
    with torch.no_grad():
        out = update(c, x)
    return float(torch.nn.functional.cosine_similarity(c, out, dim=-1).mean())


def collapse_stats(contexts: torch.Tensor, token_ids: torch.Tensor | None = None,
                   max_pairs: int = 4096, seed: int = 0) -> dict[str, float]:
    """Global-attractor / collapse diagnostics on (N, C) contexts.

    mean_norm: mean ||c||; spread: mean ||c - mean(c)||; pairwise_distance: mean ||c_i - c_j||
    over random pairs of positions holding *different* tokens (when ids are given).
    All near 0 means every context fell onto one point.
    """
    m = contexts.detach().float().reshape(-1, contexts.shape[-1])
    stats = {
        "mean_norm": float(m.norm(dim=-1).mean()),
        "spread": float((m - m.mean(0, keepdim=True)).norm(dim=-1).mean()),
    }
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, m.shape[0], (max_pairs,), generator=g)
    j = torch.randint(0, m.shape[0], (max_pairs,), generator=g)
    keep = i != j
    if token_ids is not None:
        ids = token_ids.reshape(-1).cpu()
        keep &= ids[i] != ids[j]
    i, j = i[keep].to(m.device), j[keep].to(m.device)
    stats["pairwise_distance"] = float((m[i] - m[j]).norm(dim=-1).mean()) if i.numel() else 0.0
    return stats


def perplexity(mean_cross_entropy: float) -> float:
    """exp(mean CE over predicted tokens), inf past float range instead of an overflow error."""
    return math.exp(mean_cross_entropy) if mean_cross_entropy < 700 else math.inf


def masked_token_losses(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, top-1 hit) of every position (..., T): 0 and False where mask is False.

    Dense, not gathered by the mask: a boolean index has a data-dependent size, i.e. a host-device sync on
    CUDA, and these run once per training step and evaluation batch."""
    mask = mask.bool()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
    hit = (logits.argmax(-1) == targets) & mask
    return ce.view(targets.shape).masked_fill(~mask, 0.0), hit


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean CE over mask's tokens (0 where the mask is empty, so a window with nothing to score adds no
    gradient): the Phase-2 training loss, from the same per-token CE that evaluation reports."""
    ce, _ = masked_token_losses(logits, targets, mask)
    return ce.sum() / mask.sum().clamp(min=1)


def masked_token_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum of CE, correct top-1 predictions, predicted tokens] over mask: a float64 (3,) tensor on logits'
    device, to be summed over steps there and read once (`.tolist()`), not once per step."""
    ce, hit = masked_token_losses(logits, targets, mask)
    return torch.stack([ce.double().sum(), hit.sum().double(), mask.sum().double()])


# Ridge penalty of the next-token probe, relative to the mean diagonal of its Gram matrix (a scale-free
# choice: contexts are LayerNorm outputs of any width). Measured on the default run (seed 42): 1e-3 and 1e-1
# rank trained, untrained and the controls alike (docs/measurement.md, "The Phase-1 objective").
PROBE_RIDGE = 1e-3
_PROBE_CHUNK_ELEMENTS = 1 << 22  # eval positions x target classes scored at once (memory bound)


def next_token_probe(fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     scored: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     ridge: float = PROBE_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 hits of a closed-form probe that reads the context beside the current token, and of the bigram.

    `fit` and `scored` are (contexts (M, C), current tokens (M,), next tokens (M,)) of disjoint positions.
    The memoryless reference is the bigram fitted on `fit` (its argmax; a token never seen there backs off
    to the unigram): the best any function of the current token alone does, in the same currency. The
    probe adds a ridge regression of the next token's one-hot on the context's deviation from the mean
    context of its current token (its mean over `fit`): the least-squares fit on [context; one-hot current
    token], by Frisch-Waugh-Lovell, without the V x V one-hot block. A context that is a function of the
    current token (memoryless, collapsed) deviates by exactly 0, so its probe IS the bigram: hits equal.
    A scored token unseen in `fit` has no mean to deviate from and reads the unigram like the bigram.
    Returns (probe hits, bigram hits), bool (M_scored,).
    """
    (cf, xf, yf), (cs, xs, ys) = fit, scored
    cf, cs = cf.detach().double().cpu(), cs.detach().double().cpu()
    xf, yf, xs, ys = (t.cpu() for t in (xf, yf, xs, ys))
    classes, target = torch.unique(yf, return_inverse=True)
    tokens, group = torch.unique(xf, return_inverse=True)
    counts = torch.sparse_coo_tensor(torch.stack([group, target]), torch.ones_like(yf, dtype=torch.float64),
                                     (len(tokens), len(classes)), check_invariants=True).coalesce()
    size = torch.bincount(group, minlength=len(tokens)).double()
    mean = torch.zeros(len(tokens), cf.shape[1], dtype=torch.float64).index_add_(0, group, cf) / size[:, None]
    # A deviation below float32 resolution of the contexts is rounding (the mean of identical rows), not
    # information: zeroed, so that a memoryless f scores exactly the bigram, ties broken alike.
    tol = 1e-5 * float(cf.pow(2).sum(-1).mean().sqrt())
    resid = _above(cf - mean[group], tol)
    gram = resid.T @ resid
    gram += ridge * float(gram.diagonal().mean().clamp(min=1e-12)) * torch.eye(len(gram), dtype=gram.dtype)
    # right-hand side resid^T one-hot(y); resid^T bigram(x) is 0, the residuals of a token summing to 0
    rhs = torch.zeros(cf.shape[1], len(classes), dtype=torch.float64).index_add_(1, target, resid.T)
    weights = torch.linalg.solve(gram, rhs)
    at = torch.searchsorted(tokens, xs).clamp(max=len(tokens) - 1)
    seen = tokens[at] == xs
    unigram = torch.bincount(target, minlength=len(classes)).double() / len(yf)
    probe, bigram = torch.zeros(len(ys), dtype=torch.bool), torch.zeros(len(ys), dtype=torch.bool)
    step = max(1, _PROBE_CHUNK_ELEMENTS // len(classes))
    for a in range(0, len(ys), step):
        s = slice(a, a + step)
        rows = torch.index_select(counts, 0, at[s]).to_dense()
        rows = torch.where(seen[s, None], rows / size[at[s], None], unigram)
        bigram[s] = classes[rows.argmax(-1)] == ys[s]
        deviation = torch.where(seen[s, None], _above(cs[s] - mean[at[s]], tol), 0.0)
        probe[s] = classes[(rows + deviation @ weights).argmax(-1)] == ys[s]
    return probe, bigram


def _above(rows: torch.Tensor, tol: float) -> torch.Tensor:
    """`rows` with every row of L2 norm <= tol set to exactly 0."""
    return torch.where(rows.norm(dim=-1, keepdim=True) > tol, rows, 0.0)
