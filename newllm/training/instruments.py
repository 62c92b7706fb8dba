"""Loss by position in the evaluation window: does a model use what lies far back?

Positions are 1-based (position t predicts token t+1 from the first t tokens of the window) and
grouped in log2 buckets 1-8, 9-16, 17-32, ... (the last one ends at the window length). Sums and
counts are accumulated per position on the device the losses are on (a column sum per batch, never a
loop over positions, no host sync), and bucketed once when read.
"""

from __future__ import annotations

import math

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
        # bucket of each 1-based position (first edge >= position), as a (T, buckets) 0/1 matrix: bucketing the
        # per-position sums is then one small matmul on their device (deterministic, unlike a scatter-add)
        bucket_of = torch.bucketize(torch.arange(1, seq_len + 1), edges)
        self.buckets = torch.nn.functional.one_hot(bucket_of, len(edges)).double()
        self.position_sums: torch.Tensor | None = None  # (2, T) float64: loss sum and count per position

    def add(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        self.add_losses(masked_token_losses(logits, targets, mask)[0], mask)

    def add_losses(self, ce: torch.Tensor, mask: torch.Tensor) -> None:
        """ce (B, T): per-token CE, 0 where mask is False (metrics.masked_token_losses)."""
        sums = torch.stack([ce.detach().double().sum(0), mask.double().sum(0)])
        self.position_sums = sums if self.position_sums is None else self.position_sums + sums

    def result(self) -> tuple[dict[str, float], dict[str, int]]:
        """({bucket: mean loss (NaN when no target there)}, {bucket: token count}): one read of the device."""
        if self.position_sums is None:
            sums, counts = [0.0] * len(self.labels), [0.0] * len(self.labels)
        else:
            sums, counts = (self.position_sums @ self.buckets.to(self.position_sums.device)).tolist()
        return ({k: s / n if n else math.nan for k, s, n in zip(self.labels, sums, counts, strict=True)},
                {k: int(n) for k, n in zip(self.labels, counts, strict=True)})
