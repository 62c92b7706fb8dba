"""Loss by position within documents: does a model use what lies far back in the text it reads?

Evaluation windows are cut from the concatenated stream, so a window's start is rarely a document's.
A target's position counts the tokens read since its document began, never more than the window
holds: position = min(t, k) for the target at window position t (1-based: it is predicted from the
window's first t tokens) that is the k-th token of its document (k = 1: its first token, predicted
right after the previous document's end). Where a window holds one document from its start,
position = t; a document that starts inside the window restarts the count. So a bucket holds only
targets of documents at least as long as the bucket's first position: a short-document corpus leaves
its late buckets empty (NaN) rather than filling them with another document's prefix. Without
document boundaries (a stream given as one document) position = t.

Buckets are log2: 1-8, 9-16, 17-32, ... (the last one ends at the window length). Sums and counts are
accumulated on the device the losses are on (no host sync, no scatter of floats: a column sum per batch
when position = t, a one-hot contraction over the buckets otherwise), and read once; the documents
reaching each bucket are counted too (documents_by_position), by integer adds.
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


def document_positions(lengths: torch.Tensor, n_windows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position (W, T), document (W, T)) of every target of the windows phase2.make_windows cuts from
    a stream whose documents have these lengths (tokens, in stream order): position = min(t, k) as
    defined above, document = the target's index in `lengths`."""
    t = torch.arange(1, seq_len + 1)
    stream_index = (torch.arange(n_windows) * seq_len)[:, None] + t  # the target's index in the stream
    ends = lengths.cumsum(0)
    document = torch.searchsorted(ends, stream_index, right=True).clamp(max=len(lengths) - 1)
    k = stream_index - (ends - lengths)[document] + 1
    return torch.minimum(t.expand_as(k), k), document


class PositionLoss:
    """Accumulates masked per-token cross-entropy per position bucket over (B, T) batches, and which
    documents (of n_documents) reach each bucket."""

    def __init__(self, seq_len: int, n_documents: int = 0) -> None:
        edges = torch.tensor(bucket_edges(seq_len))
        self.labels = bucket_labels(seq_len)
        # bucket of each 1-based position (first edge >= position), as a (T, buckets) 0/1 matrix: bucketing the
        # per-position sums is then one small matmul on their device (deterministic, unlike a scatter-add)
        bucket_of = torch.bucketize(torch.arange(1, seq_len + 1), edges)
        self.buckets = torch.nn.functional.one_hot(bucket_of, len(edges)).double()
        self.bucket_of = bucket_of
        self.position_sums: torch.Tensor | None = None  # (2, T) float64: loss sum and count per position
        self.bucket_sums: torch.Tensor | None = None  # (2, buckets): the same, by position within documents
        self.n_documents = n_documents
        self.reached: torch.Tensor | None = None  # (n_documents, buckets) int64: targets per document and bucket

    def add(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            positions: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> None:
        self.add_losses(masked_token_losses(logits, targets, mask)[0], mask, positions, documents)

    def add_losses(self, ce: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None,
                   documents: torch.Tensor | None = None) -> None:
        """ce (B, T): per-token CE, 0 where mask is False (metrics.masked_token_losses). positions,
        documents (B, T): from document_positions (None: position = t, one document)."""
        if positions is None:
            sums = torch.stack([ce.detach().double().sum(0), mask.double().sum(0)])
            self.position_sums = sums if self.position_sums is None else self.position_sums + sums
            return
        bucket = self.bucket_of.to(ce.device)[positions - 1]  # (B, T)
        one_hot = torch.nn.functional.one_hot(bucket, len(self.labels)).double()
        both = torch.einsum("sbt,btk->sk", torch.stack([ce.detach().double(), mask.double()]), one_hot)
        self.bucket_sums = both if self.bucket_sums is None else self.bucket_sums + both
        if documents is not None and self.n_documents:
            if self.reached is None:
                self.reached = torch.zeros(self.n_documents, len(self.labels), dtype=torch.long, device=ce.device)
            self.reached.index_put_((documents.flatten(), bucket.flatten()), mask.flatten().long(), accumulate=True)

    def documents(self) -> dict[str, int]:
        """{bucket: documents with a scored target in it} (of the n_documents given)."""
        counts = [0] * len(self.labels) if self.reached is None else (self.reached > 0).sum(0).tolist()
        return dict(zip(self.labels, counts, strict=True))

    def result(self) -> tuple[dict[str, float], dict[str, int]]:
        """({bucket: mean loss (NaN when no target there)}, {bucket: token count}): one read of the device."""
        parts = []  # summed where they live, so the device is read once (tolist), not once per part
        if self.position_sums is not None:
            parts.append(self.position_sums @ self.buckets.to(self.position_sums.device))
        if self.bucket_sums is not None:
            parts.append(self.bucket_sums)
        total = sum(parts[1:], parts[0]) if parts else torch.zeros(2, len(self.labels), dtype=torch.float64)
        sums, counts = total.tolist()
        return ({k: s / n if n else math.nan for k, s, n in zip(self.labels, sums, counts, strict=True)},
                {k: int(n) for k, n in zip(self.labels, counts, strict=True)})
