"""Evaluation of a model on held-out windows: the one loop Phase 2's validation and test and data=recall's
answer accuracy all go through.

Every window is read from a fresh state (c = 0 for context models) and position t predicts target t + 1
where the mask is set. `evaluate` gives the masked loss, perplexity, top-1 accuracy, the loss by position
bucket (newllm.training.instruments) and, given each target's `distance` (data=recall: positions back to
the evidence), the accuracy by distance bucket.
"""

from __future__ import annotations

import torch
from torch import nn

from newllm import keys, metrics
from newllm.data.recall import RecallSplit
from newllm.training.instruments import PositionLoss, bucket_edges, bucket_labels

Windows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (inputs, targets, target mask), each (W, T)


def accuracy_by_distance(hit: torch.Tensor, distance: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
    """Top-1 accuracy and answer count per distance bucket (1-8, 9-16, 17-32, ...) of answers whose hits
    and distances are given in the same order; buckets without answers are left out."""
    hit, d = hit.double().cpu(), distance.cpu()
    top = max(int(d.max()), 1) if d.numel() else 1
    edges, labels = torch.tensor(bucket_edges(top)), bucket_labels(top)
    b = torch.bucketize(d, edges)
    n = torch.zeros(len(edges), dtype=torch.float64).index_add_(0, b, torch.ones_like(hit))
    s = torch.zeros(len(edges), dtype=torch.float64).index_add_(0, b, hit)
    return ({k: float(s[i] / n[i]) for i, k in enumerate(labels) if n[i] > 0},
            {k: int(n[i]) for i, k in enumerate(labels) if n[i] > 0})


@torch.no_grad()
def evaluate(model: nn.Module, windows: Windows | list[torch.Tensor], batch_size: int,
             distance: torch.Tensor | None = None,
             positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Masked CE, perplexity and top-1 accuracy over all windows, the loss, token and document counts by
    position bucket (`positions`: each target's position within its document and the document, from
    phase2.window_positions; None: the position in the window), and with `distance` ((W, T), aligned with
    the targets) the accuracy and answers by distance."""
    model.eval()
    inputs, targets, mask = windows
    sums = torch.zeros(3, dtype=torch.float64, device=inputs.device)  # summed on the device, read once
    hits = []
    by_pos = PositionLoss(inputs.shape[1], int(positions[1].max()) + 1 if positions is not None else 0)
    for i in range(0, inputs.shape[0], batch_size):
        m = mask[i : i + batch_size]
        # windows keep the stream's stored dtype (int16/int32, memory-mapped): int64 one batch at a time
        logits = model.head(model.contexts_window(inputs[i : i + batch_size].long()))
        ce, hit = metrics.masked_token_losses(logits, targets[i : i + batch_size].long(), m)  # dense (B, T)
        where = [p[i : i + batch_size] for p in positions] if positions is not None else [None, None]
        by_pos.add_losses(ce, m, *where)  # the same per-token CE, bucketed by position
        sums += torch.stack([ce.double().sum(), hit.sum().double(), m.sum().double()])
        if distance is not None:
            hits.append(hit)
    ce_sum, correct, count = sums.tolist()
    count = int(count)
    loss = ce_sum / max(count, 1)
    pos_loss, pos_tokens = by_pos.result()
    out = {"loss": loss, "ppl": metrics.perplexity(loss), "acc": correct / max(count, 1), "tokens": count,
           "loss_by_position": pos_loss, "tokens_by_position": pos_tokens,
           "documents_by_position": by_pos.documents()}
    if distance is not None:  # row-major over mask's True entries, the order of the hits
        answers = mask.bool()
        out["acc_by_distance"], out["answers_by_distance"] = accuracy_by_distance(
            torch.cat(hits)[answers], distance.to(mask.device)[answers])
    return out


def recall_windows(split: RecallSplit) -> tuple[Windows, torch.Tensor]:
    """One window per sequence (inputs, targets, mask) and the targets' distances: position t predicts t + 1."""
    return (split.ids[:, :-1], split.targets[:, 1:], split.mask[:, 1:]), split.distance[:, 1:]


def recall_metrics(model: nn.Module, splits: dict[str, RecallSplit], batch_size: int,
                   device: torch.device) -> dict:
    """recall/{val,test}_accuracy and their accuracy and answer counts by distance (the kept weights)."""
    out = {}
    for name in ("val", "test"):
        if name in splits:
            windows, distance = recall_windows(splits[name])
            r = evaluate(model, [t.to(device) for t in windows], batch_size, distance)
            out.update({keys.recall_split(name, "accuracy"): r["acc"],
                        keys.recall_split(name, "accuracy_by_distance"): r["acc_by_distance"],
                        keys.recall_split(name, "answers_by_distance"): r["answers_by_distance"]})
    return out
