"""Evaluation of a trained model on held-out data that needs more than the Phase-2 loss: recall accuracy
on data=recall's answers, overall and by how far back the evidence lies."""

from __future__ import annotations

import torch

from newllm import keys
from newllm.data.recall import RecallSplit
from newllm.training.instruments import bucket_edges, bucket_labels


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, distance: torch.Tensor
                    ) -> tuple[float, dict[str, float], dict[str, int]]:
    """Top-1 accuracy on answer targets, overall and by distance bucket (1-8, 9-16, 17-32, ...)."""
    hit = (logits.argmax(-1) == targets)[mask].double()
    d = distance[mask]
    top = max(int(d.max()), 1) if d.numel() else 1
    edges, labels = torch.tensor(bucket_edges(top)), bucket_labels(top)
    b = torch.bucketize(d, edges)
    n = torch.zeros(len(edges), dtype=torch.float64).index_add_(0, b, torch.ones_like(hit))
    s = torch.zeros(len(edges), dtype=torch.float64).index_add_(0, b, hit)
    by = {k: float(s[i] / n[i]) for i, k in enumerate(labels) if n[i] > 0}
    counts = {k: int(n[i]) for i, k in enumerate(labels) if n[i] > 0}
    return float(hit.mean()) if hit.numel() else float("nan"), by, counts


@torch.no_grad()
def evaluate_recall(model, split: RecallSplit, batch_size: int, device) -> tuple[float, dict, dict]:
    """The model reads each sequence from a fresh state; position t predicts token t+1."""
    model.eval()
    logits = torch.cat([model.head(model.contexts_window(split.ids[i : i + batch_size, :-1].to(device))).cpu()
                        for i in range(0, split.ids.shape[0], batch_size)])
    return answer_accuracy(logits, split.ids[:, 1:], split.mask[:, 1:], split.distance[:, 1:])


def recall_metrics(model, splits: dict[str, RecallSplit], batch_size: int, device) -> dict:
    out = {}
    for name in ("val", "test"):
        if name in splits:
            acc, by, counts = evaluate_recall(model, splits[name], batch_size, device)
            out.update({keys.recall_split(name, "accuracy"): acc, keys.recall_split(name, "accuracy_by_distance"): by,
                        keys.recall_split(name, "answers_by_distance"): counts})
    return out
