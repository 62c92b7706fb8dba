"""Splits: a split's concatenated documents (Split) and which documents each split holds.

Every choice is seeded by data.split_seed; each split lists its documents in a seeded random order, so
a token cap (data.max_*_tokens) keeps a random sample of documents rather than the first topics of a
corpus stored topic by topic.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from newllm.data import repetition
from newllm.data.repetition import RepetitionStage
from newllm.errors import DataError

FINGERPRINT_CHUNK = 1 << 22  # tokens hashed at a time: the fingerprint never copies a whole stream


@dataclass
class Split:
    """One split's documents, concatenated: ids (N,), loss mask (N,), tokens per document (D,), and the
    targets (N,) where they differ from the ids (TokenData.targets). Ids are int64 for generated data and
    the stored dtype (int16 / int32, memory-mapped) for documents."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor | None = None

    @classmethod
    def of_rows(cls, stages: list[RepetitionStage]) -> Split:
        """data=repetition: every phrase row (a phrase repeated n times) is one document."""
        ids = repetition.stream(stages)
        lengths = torch.cat([torch.full((s.ids.shape[0],), s.ids.shape[1], dtype=torch.long) for s in stages])
        return cls(ids, torch.ones_like(ids, dtype=torch.bool), lengths)

    def tokens(self, start: int = 0, stop: int | None = None) -> Split:
        """Tokens [start, stop); documents cut by either end keep their remaining part."""
        stop = len(self.ids) if stop is None else min(stop, len(self.ids))
        ends = self.lengths.cumsum(0)
        kept = (torch.minimum(ends, torch.tensor(stop)) - torch.clamp(ends - self.lengths, min=start)).clamp(min=0)
        return Split(self.ids[start:stop], self.mask[start:stop], kept[kept > 0],
                     None if self.targets is None else self.targets[start:stop])


def held_out_count(n: int, fraction: float) -> int:
    """Documents (or phrases) a fraction holds out of n: at least one unless the fraction is 0."""
    return max(1, round(n * fraction)) if fraction > 0 else 0


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int, hold_out_val: bool = True
           ) -> tuple[list[int], list[int], list[int]]:
    """Seeded disjoint (train, val, test) document indices.

    Each split lists its documents in a seeded random order, so a token cap (data.max_*_tokens) keeps
    a random sample of documents rather than the first topics of a corpus stored topic by topic.
    hold_out_val=False (val_protocol=subset_of_train): validation is cut from the training stream later.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = held_out_count(n, val_fraction) if hold_out_val else 0
    n_test = held_out_count(n, test_fraction)
    if n_val + n_test >= n:
        raise DataError(f"{n} documents are too few to hold out data.val_fraction={val_fraction} for validation "
                        f"and data.test_fraction={test_fraction} for test and keep some for training: use more "
                        "data (data.num_conversations) or smaller fractions")
    return order[n_val + n_test:], order[:n_val], order[n_val : n_val + n_test]


def assign(n: int, given: list[str] | None, d: DictConfig) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) indices of n documents: newllm's seeded split, or the source's own splits (given),
    where a held-out split the source lacks is cut from its training documents the same way."""
    by_conversation = d.val_protocol == "by_conversation"
    if given is None:
        return split_indices(n, d.val_fraction, d.test_fraction, d.split_seed, hold_out_val=by_conversation)
    own = {k: [i for i, g in enumerate(given) if g == k] for k in ("train", "val", "test")}
    need_val, need_test = by_conversation and not own["val"], d.test_fraction > 0 and not own["test"]
    train = own["train"]
    cut = split_indices(len(train), d.val_fraction if need_val else 0, d.test_fraction if need_test else 0,
                        d.split_seed, hold_out_val=need_val)
    held = []
    for ours, keep, part in (("val", by_conversation, cut[1]), ("test", d.test_fraction > 0, cut[2])):
        docs = own[ours] if keep else []
        random.Random(d.split_seed).shuffle(docs)  # a seeded order, as split_indices gives: caps keep a random sample
        held.append(docs + [train[i] for i in part])
    return [train[i] for i in cut[0]], held[0], held[1]


def fingerprint(splits: dict[str, Split]) -> str:
    """A short hash of every split's token ids (as int64), loss mask and targets (where they differ from the
    ids): equal fingerprints, identical data. Read in chunks, so a memory-mapped stream is never copied whole."""
    h = hashlib.sha256()
    for name in sorted(splits):
        s = splits[name]
        h.update(name.encode())
        for stream in (s.ids, s.mask, *([] if s.targets is None else [s.targets])):
            for i in range(0, len(stream), FINGERPRINT_CHUNK):
                piece = stream[i : i + FINGERPRINT_CHUNK]
                h.update((piece if piece.dtype == torch.bool else piece.long()).numpy().tobytes())
    return h.hexdigest()[:16]
