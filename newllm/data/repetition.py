"""data=repetition: generated phrases of p tokens, each repeated n times, in stages p = 1, 2, 3 ...

Phrase tokens are whole-word tokens of the run's tokenizer (byte-level BPE entries 'Ġword', i.e.
" word"), drawn with a seeded generator; the tokenizer itself is trained on the embedded
chatterbot corpus (or is tokenizer.pretrained), so phrases decode to readable words. Tokens within
a phrase are distinct, so the phrase's smallest period -- the cycle length of its repetition --
is exactly p. Validation and test phrases are held out: never used in training at any stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from newllm.errors import DataError

WORD_TOKEN = re.compile(r"^Ġ[A-Za-z]+$")


@dataclass
class RepetitionStage:
    phrase_length: int  # the cycle length p: c_t should equal c_{t-p}
    ids: torch.LongTensor  # (num_phrases, phrase_length * repetitions): each row one phrase repeated


def phrase_vocabulary(tokenizer: Tokenizer) -> torch.Tensor:
    """Ids of whole-word tokens; any non-special token when the tokenizer has no 'Ġword' entries."""
    vocab = tokenizer.get_vocab()
    words = sorted(i for t, i in vocab.items() if WORD_TOKEN.match(t))
    if not words:
        special = set(tokenizer.get_added_tokens_decoder())  # ids of special/added tokens
        words = sorted(set(vocab.values()) - special)
    return torch.tensor(words, dtype=torch.long)


def sample_phrases(words: torch.Tensor, phrase_length: int, count: int, g: torch.Generator) -> torch.Tensor:
    """(count, phrase_length) distinct phrases, each of distinct tokens."""
    if len(words) < phrase_length or math.perm(len(words), phrase_length) < count:
        raise DataError(f"cannot draw {count} distinct phrases (training + held-out) of {phrase_length} distinct "
                        f"tokens from {len(words)} word tokens: lower data.phrases_per_stage or raise "
                        "tokenizer.vocab_size")
    rows: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(rows) < count:  # rejection of repeats; a handful of rounds even when count ~ |words|
        draw = torch.rand(count, len(words), generator=g).argsort(dim=1)[:, :phrase_length]
        for row in map(tuple, words[draw].tolist()):
            if row not in seen and len(rows) < count:
                seen.add(row)
                rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def make_stages(tokenizer: Tokenizer, phrase_lengths: list[int], repetitions: int, n_train: int, n_val: int,
                n_test: int, seed: int) -> tuple[list[RepetitionStage], ...]:
    """(training, validation, test) stages with disjoint phrases, one stage per phrase length."""
    g = torch.Generator().manual_seed(seed)
    words = phrase_vocabulary(tokenizer)
    train, val, test = [], [], []
    for p in phrase_lengths:
        phrases = sample_phrases(words, p, n_train + n_val + n_test, g)
        ids = phrases.repeat(1, repetitions)  # row i: phrase i, phrase i, ... (n times)
        train.append(RepetitionStage(p, ids[:n_train]))
        val.append(RepetitionStage(p, ids[n_train : n_train + n_val]))
        test.append(RepetitionStage(p, ids[n_train + n_val :]))
    return train, val, test


def stream(stages: list[RepetitionStage]) -> torch.Tensor:
    """All rows of all stages, one after another: the token stream Phase 1 and Phase 2 read."""
    return torch.cat([s.ids.reshape(-1) for s in stages])
