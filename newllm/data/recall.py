"""data=recall: seeded synthetic memory tasks, token ids generated directly (no text, no BPE).

Every sequence is exactly data.seq_len tokens, so with training.phase2.seq_len (and eval_seq_len)
equal to it each Phase-2 window is one sequence read from a fresh state. Only answer tokens are
in the loss mask; `distance` holds, per answer, how many positions back its evidence lies.

  mqar:           k1 v1 k2 v2 ... kP vP | noise x gap | q1 a1 q2 a2 ... (queries of earlier keys, a = its value), pad
  copy:           x1 ... xL SEP x1 ... xL                       (L = (seq_len - 1) // 2), pad
  selective_copy: noise with L data tokens scattered, SEP, the L data tokens in order, pad

Ids: 0 pad, 1 separator, 2 noise; mqar keys [3, 3 + K), values [3 + K, vocab) with K = (vocab - 3) // 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from newllm.errors import DataError

PAD, SEP, NOISE, FIRST = 0, 1, 2, 3


@dataclass
class RecallSplit:
    ids: torch.Tensor  # (N, T) long
    mask: torch.Tensor  # (N, T) bool: answer tokens (the targets scored)
    distance: torch.Tensor  # (N, T) long: positions back to the evidence (0 where not an answer)


def id_tokenizer(vocab_size: int) -> Tokenizer:
    """A real (saveable, hashable) word-level tokenizer whose tokens are just t0 ... t{V-1}."""
    return Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))


def _mqar(n: int, t: int, vocab: int, pairs: int, g: torch.Generator,
          gap: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, ...]:
    """Pairs, then `gap` noise tokens (uniform in [gap_min, gap_max] per sequence), then the queries:
    the gap sets how far back the evidence lies (the distance knob)."""
    n_keys = (vocab - FIRST) // 2
    gap_min, gap_max = gap
    queries = (t - 2 * pairs - gap_max) // 2
    if not 0 <= gap_min <= gap_max:
        raise DataError(f"data.query_gap_min={gap_min}, data.query_gap_max={gap_max} are not allowed: "
                        "expected 0 <= query_gap_min <= query_gap_max")
    if pairs > n_keys or queries < 1:
        raise DataError(f"data.num_pairs={pairs} is not allowed with data.vocab_size={vocab}, data.seq_len={t}, "
                        f"data.query_gap_max={gap_max}: expected 1 <= num_pairs <= {n_keys} (distinct keys) and "
                        "2 * num_pairs + query_gap_max + 2 <= seq_len")
    keys = torch.rand(n, n_keys, generator=g).argsort(1)[:, :pairs] + FIRST
    values = torch.randint(FIRST + n_keys, vocab, (n, pairs), generator=g)
    # which pair each query asks (distinct while there are enough pairs)
    if queries <= pairs:
        asked = torch.rand(n, pairs, generator=g).argsort(1)[:, :queries]
    else:
        asked = torch.randint(0, pairs, (n, queries), generator=g)
    gaps = torch.randint(gap_min, gap_max + 1, (n, 1), generator=g) if gap_max else torch.zeros(n, 1, dtype=torch.long)
    ids = torch.full((n, t), PAD, dtype=torch.long)
    ids[:, : 2 * pairs + gap_max] = NOISE  # the gap (the rest of it is overwritten by queries below)
    ids[:, 0 : 2 * pairs : 2], ids[:, 1 : 2 * pairs : 2] = keys, values
    q_pos = 2 * pairs + gaps + 2 * torch.arange(queries)  # (n, Q) query key positions; the answer follows
    ids.scatter_(1, q_pos, keys.gather(1, asked))
    ids.scatter_(1, q_pos + 1, values.gather(1, asked))
    mask = torch.zeros(n, t, dtype=torch.bool).scatter_(1, q_pos + 1, True)
    distance = torch.zeros(n, t, dtype=torch.long).scatter_(1, q_pos + 1, (q_pos + 1) - (2 * asked + 1))
    return ids, mask, distance


def _copy(n: int, t: int, vocab: int, selective: bool, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    length = (t - 1) // 2
    if length < 1 or vocab <= FIRST:
        raise DataError(f"data.seq_len={t} / data.vocab_size={vocab} are too small for a copy task: "
                        "expected seq_len >= 3 and vocab_size >= 4")
    data = torch.randint(FIRST, vocab, (n, length), generator=g)
    ids = torch.full((n, t), PAD, dtype=torch.long)
    if selective:  # data tokens at sorted random positions of a noise span of `length` tokens
        span = length
        data = data[:, : max(1, span // 2)]
        length = data.shape[1]
        slots = torch.rand(n, span, generator=g).argsort(1)[:, :length].sort(1).values
        ids[:, :span] = NOISE
        ids.scatter_(1, slots, data)
        src = slots
        start = span + 1
    else:
        ids[:, :length] = data
        src = torch.arange(length).expand(n, length)
        start = length + 1
    ids[:, start - 1] = SEP
    ans = start + torch.arange(length)
    ids[:, ans] = data
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[:, ans] = True
    distance = torch.zeros(n, t, dtype=torch.long)
    distance[:, ans] = ans - src
    return ids, mask, distance


# data.task -> generator (n, seq_len, vocab, num_pairs, g, gap) -> (ids, answer mask, answer distance)
TASKS = {
    "mqar": _mqar,
    "copy": lambda n, t, vocab, pairs, g, gap: _copy(n, t, vocab, False, g),
    "selective_copy": lambda n, t, vocab, pairs, g, gap: _copy(n, t, vocab, True, g),
}


def generate(task: str, n: int, seq_len: int, vocab_size: int, num_pairs: int, g: torch.Generator,
             gap: tuple[int, int] = (0, 0)):
    """n sequences of `task` (a newllm.config.RecallTask: Hydra checks the name at compose time)."""
    return TASKS[task](n, seq_len, vocab_size, num_pairs, g, gap)


def make_splits(task: str, counts: tuple[int, int, int], seq_len: int, vocab_size: int, num_pairs: int,
                seed: int, gap: tuple[int, int] = (0, 0)) -> tuple[RecallSplit, RecallSplit, RecallSplit]:
    """Disjoint (train, val, test): duplicates and held-out rows seen in training are dropped."""
    g = torch.Generator().manual_seed(seed)
    total = sum(counts)
    ids, mask, dist = generate(task, total, seq_len, vocab_size, num_pairs, g, gap)
    _, first = _first_occurrence(ids)
    keep = first
    splits, start = [], 0
    for c in counts:
        rows = torch.arange(start, start + c)
        rows = rows[keep[rows]]
        splits.append(RecallSplit(ids[rows], mask[rows], dist[rows]))
        start += c
    for s in splits:
        if s.ids.shape[0] == 0:
            raise DataError(f"data=recall: a split has no distinct sequences (data.num_train/val/test={counts})")
    return tuple(splits)


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse, is_first): whether each row is the first of its identical rows (in row order)."""
    _, inverse = torch.unique(ids, dim=0, return_inverse=True)
    order = torch.arange(len(inverse))
    firsts = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long).scatter_reduce(
        0, inverse, order, reduce="amin")
    return inverse, firsts[inverse] == order
