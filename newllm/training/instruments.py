"""Loss by position in the evaluation window: does a model use what lies far back?

Positions are 1-based (position t predicts token t+1 from the first t tokens of the window) and
grouped in log2 buckets 1-8, 9-16, 17-32, ... (the last one ends at the window length). Sums and
counts are accumulated per bucket with one scatter-add per batch, never a loop over positions.
"""

from __future__ import annotations

import torch

from newllm.metrics import masked_token_losses


def bucket_edges(seq_len: int) -> list[int]:
    """Upper (inclusive) positions of the buckets: 8, 16, 32, ... capped at seq_len."""
    edges, hi = [], 8
    while hi < seq_len:
        edges.append(hi)
        hi *= 2
    return edges + [seq_len]


def bucket_labels(seq_len: int) -> list[str]:
    edges = bucket_edges(seq_len)
    return [f"{lo}-{hi}" for lo, hi in zip([1] + [e + 1 for e in edges[:-1]], edges, strict=True)]


class PositionLoss:
    """Accumulates masked per-token cross-entropy per position bucket over (B, T) batches."""

    def __init__(self, seq_len: int) -> None:
        edges = torch.tensor(bucket_edges(seq_len))
        self.labels = bucket_labels(seq_len)
        # bucket index of each 1-based position: first edge >= position
        self.bucket_of = torch.bucketize(torch.arange(1, seq_len + 1), edges)
        self.sums = torch.zeros(len(edges), dtype=torch.float64)
        self.counts = torch.zeros(len(edges), dtype=torch.float64)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        self.add_losses(masked_token_losses(logits, targets, mask)[0], mask)

    def add_losses(self, ce: torch.Tensor, mask: torch.Tensor) -> None:
        """ce: per-token CE of mask's True entries in row-major order (metrics.masked_token_losses)."""
        positions = mask.bool().nonzero()[:, 1].cpu()
        idx = self.bucket_of[positions]
        self.sums.index_add_(0, idx, ce.detach().double().cpu())
        self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def result(self) -> tuple[dict[str, float], dict[str, int]]:
        """({bucket: mean loss (NaN when no target there)}, {bucket: token count})."""
        mean = self.sums / self.counts.clamp(min=1)
        mean[self.counts == 0] = float("nan")
        return ({k: float(v) for k, v in zip(self.labels, mean, strict=True)},
                {k: int(n) for k, n in zip(self.labels, self.counts, strict=True)})
