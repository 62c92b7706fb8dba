"""data=recall: seeded synthetic memory tasks, token ids generated directly (no text, no BPE).

Every sequence is exactly data.seq_len tokens; with training.phase2.seq_len = data.seq_len (the
default: conf/data/recall.yaml sets it) each Phase-2 window is one sequence read from a fresh state.
A task yields four (N, T) tensors: the input `ids`; the `targets`, aligned with the ids (targets[t]
is what position t - 1 is scored on; equal to ids[t] except where an answer exists only as a label);
the answer `mask` (the only targets in the loss); and `distance`: per answer, how many positions
back from the answer's position lies the stored token it repeats (mqar: the queried pair's value,
the same number as from the query back to its key; copy: the source token).

  mqar:           k1 v1 k2 v2 ... kP vP  then filler with every key queried once, at power-law positions
  copy:           x1 ... xL SEP x1 ... xL                       (L = (seq_len - 1) // 2), pad
  selective_copy: noise with L data tokens scattered, SEP, the L data tokens in order, pad

mqar follows Zoology's `multiquery_ar` (Arora, Eyuboglu et al. 2023, zoology/data/multiquery_ar.py):
P keys drawn without replacement from the key ids, P values without replacement from the value ids,
the pairs first; the query region after them has (T - 2P) // 2 two-token slots, and each key is
queried exactly once, in a slot drawn without replacement with probability proportional to
i^(power_a - 1) for slot i = 1, 2, ... (power_a = 0.01 favours slots near the pairs; 1 is uniform);
key j takes the j-th slot drawn, as in Zoology. The input holds the query key; the value is only
the target at the next position (the input there is filler), so no answer is ever fed back and
none can be copied from an earlier query. Zoology's assertions hold: vocab_size > seq_len, and
2P + 2P <= seq_len (P slots for P queries).
Where it departs, and why:
- Filler is one token (NOISE), Zoology's `random_non_queries=False`, not its default of uniform
  random tokens: at the small vocabularies a CPU run affords, random filler writes a queried key
  into the query region before its query -- a second, false "pair" that an induction-style lookup
  would copy from -- for 8.9 % of the queries at seq_len 64, vocab 128, 4 pairs (0.16 % at
  Zoology's vocab 8,192; docs/data.md).
- Ids 0 pad, 1 separator, 2 noise are reserved; keys are [3, 3 + K), values [3 + K, V) with
  K = (V - 3) // 2 (Zoology: keys [1, V // 2), values [V // 2, V), 0 is its filler).
- Odd seq_len is allowed (Zoology asserts even): the last position is filler then.
copy and selective_copy are teacher-forced, as a language model reads them: each answer is also
the next input, which is no leak (each data token is asked once, after its own prediction).
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
    ids: torch.Tensor  # (N, T) long: the inputs
    targets: torch.Tensor  # (N, T) long: targets[:, t] is scored at position t - 1 (ids where no answer hides)
    mask: torch.Tensor  # (N, T) bool: answer targets (the only ones scored)
    distance: torch.Tensor  # (N, T) long: positions back to the evidence (0 where not an answer)


def id_tokenizer(vocab_size: int) -> Tokenizer:
    """A real (saveable, hashable) word-level tokenizer whose tokens are just t0 ... t{V-1}."""
    return Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))


def mqar_ids(vocab: int) -> tuple[int, int]:
    """(number of key ids, number of value ids): keys [FIRST, FIRST + K), values [FIRST + K, vocab)."""
    n_keys = (vocab - FIRST) // 2
    return n_keys, vocab - FIRST - n_keys


def check_mqar(t: int, vocab: int, pairs: int, power_a: float) -> None:
    """Zoology's conditions, as one line naming the keys (before any sequence is drawn)."""
    if vocab <= t:
        raise DataError(f"data.vocab_size={vocab} is not allowed with data.task=mqar and data.seq_len={t}: "
                        "expected vocab_size > seq_len (Zoology's multiquery_ar asserts it)")
    if not 1 <= pairs <= t // 4:
        raise DataError(f"data.num_pairs={pairs} is not allowed with data.seq_len={t}: expected "
                        f"1 <= num_pairs <= seq_len // 4 = {t // 4} (2 tokens per pair, and a query slot of 2 "
                        "tokens per key)")
    if not power_a > 0:
        raise DataError(f"data.power_a={power_a} is not allowed: expected a number > 0 (slot i is drawn with "
                        "weight i^(power_a - 1); 1 is uniform)")


def _mqar(n: int, t: int, vocab: int, pairs: int, power_a: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    check_mqar(t, vocab, pairs, power_a)
    n_keys, n_values = mqar_ids(vocab)
    keys = torch.rand(n, n_keys, generator=g).argsort(1)[:, :pairs] + FIRST  # without replacement
    values = torch.rand(n, n_values, generator=g).argsort(1)[:, :pairs] + FIRST + n_keys  # without replacement
    slots = (t - 2 * pairs) // 2
    weight = torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    slot = torch.multinomial(weight.repeat(n, 1), pairs, replacement=False, generator=g)  # key j -> slot[:, j]
    query = 2 * pairs + 2 * slot  # (n, P) position of each key's query; its answer is scored at query + 1
    ids = torch.full((n, t), NOISE, dtype=torch.long)
    ids[:, 0 : 2 * pairs : 2], ids[:, 1 : 2 * pairs : 2] = keys, values
    ids.scatter_(1, query, keys)
    targets = ids.clone().scatter_(1, query + 1, values)  # the answer is a label only: ids hold filler there
    mask = torch.zeros(n, t, dtype=torch.bool).scatter_(1, query + 1, True)
    # answer position (query + 1) back to the pair's value (2j + 1) = query back to the pair's key (2j)
    distance = torch.zeros(n, t, dtype=torch.long).scatter_(1, query + 1, query - 2 * torch.arange(pairs))
    return ids, targets, mask, distance


def copy_length(t: int, selective: bool) -> int:
    """Data tokens a copy sequence of t tokens asks back: (t - 1) // 2; selective: half of that (>= 1)."""
    span = (t - 1) // 2
    return max(1, span // 2) if selective else span


def _copy(n: int, t: int, vocab: int, selective: bool, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    span = (t - 1) // 2
    if span < 1 or vocab <= FIRST:
        raise DataError(f"data.seq_len={t} / data.vocab_size={vocab} are too small for a copy task: "
                        "expected seq_len >= 3 and vocab_size >= 4")
    length = copy_length(t, selective)
    data = torch.randint(FIRST, vocab, (n, length), generator=g)
    ids = torch.full((n, t), PAD, dtype=torch.long)
    if selective:  # data tokens at sorted random positions of a noise span of `span` tokens
        src = torch.rand(n, span, generator=g).argsort(1)[:, :length].sort(1).values
        ids[:, :span] = NOISE
        ids.scatter_(1, src, data)
    else:
        ids[:, :length] = data
        src = torch.arange(length).expand(n, length)
    ids[:, span] = SEP
    ans = span + 1 + torch.arange(length)
    ids[:, ans] = data
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[:, ans] = True
    distance = torch.zeros(n, t, dtype=torch.long)
    distance[:, ans] = ans - src
    return ids, ids.clone(), mask, distance


# data.task -> generator (n, seq_len, vocab, num_pairs, power_a, g) -> (ids, targets, answer mask, distance)
TASKS = {
    "mqar": _mqar,
    "copy": lambda n, t, vocab, pairs, power_a, g: _copy(n, t, vocab, False, g),
    "selective_copy": lambda n, t, vocab, pairs, power_a, g: _copy(n, t, vocab, True, g),
}


def chance_accuracy(task: str, seq_len: int, vocab_size: int, num_pairs: int) -> dict[str, float]:
    """Accuracy on answers without recall, from the task's parameters alone.

    no_past: the best a model that sees only the current token (and its position) can do. mqar:
    the value of a key is uniform over the value ids whatever the key and slot, so 1 / (value ids);
    copy: data tokens are uniform over [FIRST, V), so 1 / (V - FIRST). An untrained model guessing
    over the whole vocabulary gets 1 / V, below both.
    stored_value: a model that knows which tokens this sequence stored but not which one is asked,
    and picks one uniformly. mqar: 1 / P (values are distinct); copy: the L data tokens are drawn
    with replacement, so 1 / L + (1 - 1 / L) / (V - FIRST).
    """
    if task == "mqar":
        return {"no_past": 1 / mqar_ids(vocab_size)[1], "stored_value": 1 / num_pairs}
    length, n = copy_length(seq_len, task == "selective_copy"), vocab_size - FIRST
    return {"no_past": 1 / n, "stored_value": 1 / length + (1 - 1 / length) / n}


def generate(task: str, n: int, seq_len: int, vocab_size: int, num_pairs: int, g: torch.Generator,
             power_a: float = 0.01) -> tuple[torch.Tensor, ...]:
    """n sequences of `task` (a newllm.config.RecallTask: Hydra checks the name at compose time)."""
    return TASKS[task](n, seq_len, vocab_size, num_pairs, power_a, g)


def make_splits(task: str, counts: tuple[int, int, int], seq_len: int, vocab_size: int, num_pairs: int,
                seed: int, power_a: float = 0.01) -> tuple[RecallSplit, RecallSplit, RecallSplit]:
    """Disjoint (train, val, test): duplicates and held-out rows seen in training are dropped."""
    g = torch.Generator().manual_seed(seed)
    ids, targets, mask, dist = generate(task, sum(counts), seq_len, vocab_size, num_pairs, g, power_a)
    keep = _first_occurrence(ids)  # the ids fix the targets: equal inputs are equal sequences
    splits, start = [], 0
    for c in counts:
        rows = torch.arange(start, start + c)
        rows = rows[keep[rows]]
        splits.append(RecallSplit(ids[rows], targets[rows], mask[rows], dist[rows]))
        start += c
    for s in splits:
        if s.ids.shape[0] == 0:
            raise DataError(f"data=recall: a split has no distinct sequences (data.num_train/val/test={counts})")
    return tuple(splits)


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Whether each row is the first of its identical rows (in row order)."""
    _, inverse = torch.unique(ids, dim=0, return_inverse=True)
    order = torch.arange(len(inverse))
    firsts = torch.full((int(inverse.max()) + 1,), len(inverse), dtype=torch.long).scatter_reduce(
        0, inverse, order, reduce="amin")
    return firsts[inverse] == order
