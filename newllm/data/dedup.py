r"""Deduplication of documents before the split, and the contamination report after it.

Deduplication (data.dedup, on by default): a document is dropped when its normalised text --
casefolded, every run of whitespace one space, ends stripped -- equals an earlier document's. For
dialogue sources the document is the whole rendered conversation (roles and turns), so two
conversations are duplicates only when every turn matches. The first occurrence is kept, so the
order of the rest does not change. This runs before the split: no document can sit on both sides.

Contamination (the n-gram overlap test of the GPT-3 paper, Brown et al. 2020, appendix C): a held-out
document is contaminated when it shares an n-gram of n = NGRAM = 13 words with any training document.
Words, as in that paper, not the run's BPE tokens: the figure must not change with tokenizer.vocab_size
(13 tokens of a 320-token vocabulary are ~3 words, of a 4,096-token one ~9). A word is a run of letters,
digits or underscores of the casefolded text (`\w+`), with the ChatML markup (<|im_start|>role, <|im_end|>,
<|endoftext|>) removed first, so markup alone never makes an n-gram; n-grams never cross documents. A
document shorter than n words has no 13-gram: it counts as one n-gram of its whole length (padded), so
it is contaminated exactly when a training document has the same word sequence ("whole-document match";
after deduplication only a difference in punctuation can leave such a pair). A document cut by a token
cap (data.max_*_tokens) counts whole. Reported per held-out split as the fraction of its documents.

Speed: every word becomes a 64-bit hash (Python's str hash), every n-gram one uint64 polynomial hash of
those (13 vectorised passes); the held-out n-grams are sorted once and the training split's looked up in
them piece by piece (binary search), so the cost is O(N log H) for N training and H held-out n-grams,
never pairwise between documents, and the training split is read in bounded pieces. A false match
needs two different n-grams with equal 64-bit hashes (probability ~ N * H / 2^64, nil at these sizes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import numpy as np

from newllm.data.tokenizer import END_OF_TEXT, IM_END, IM_START

NGRAM = 13
WORD = re.compile(r"\w+")
MARKUP = re.compile("|".join(map(re.escape, (IM_END, END_OF_TEXT))) + f"|{re.escape(IM_START)}\\w*")
PIECE_DOCUMENTS = 4096  # training documents hashed at a time: bounds the memory of the report
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection mod 2^64
Stream = tuple[np.ndarray, np.ndarray]  # (word hashes or ids (N,), words per document (D,)) of concatenated documents


def normalise(text: str) -> str:
    """The text two documents are compared by: casefolded, whitespace runs collapsed to one space."""
    return " ".join(text.casefold().split())


def _key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def first_occurrences(texts: Iterable[str]) -> list[int]:
    """Indices of the documents to keep: the first of each group with equal normalised text, in order."""
    seen: set[bytes] = set()
    kept = []
    for i, text in enumerate(texts):
        key = _key(text)
        if key not in seen:
            seen.add(key)
            kept.append(i)
    return kept


def word_stream(texts: Iterable[str]) -> Stream:
    """(hash of every word (N,) uint64, words per document (D,)) of the documents, markup removed."""
    words = [WORD.findall(MARKUP.sub(" ", t).casefold()) for t in texts]
    hashes = np.fromiter((hash(w) for ws in words for w in ws), dtype=np.int64, count=sum(map(len, words)))
    return hashes.view(np.uint64), np.fromiter(map(len, words), dtype=np.int64, count=len(words))


def _pieces(texts: Iterable[str]) -> Iterator[Stream]:
    it = iter(texts)
    while piece := list(islice(it, PIECE_DOCUMENTS)):
        yield word_stream(piece)


def ngram_hashes(stream: Stream, n: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """(hash (H,) uint64, its document (H,)) of every n-gram inside each document of a stream.

    A document shorter than n is padded to n with a value no word has (so it yields one n-gram that
    only the identical sequence matches); an empty document yields none.
    """
    ids, lengths = np.asarray(stream[0]), np.asarray(stream[1], dtype=np.int64)
    padded = np.where(lengths > 0, np.maximum(lengths, n), 0)
    start, padded_start = np.cumsum(lengths) - lengths, np.cumsum(padded) - padded
    x = np.zeros(int(padded.sum()), dtype=np.uint64)  # 0 = padding; token t is stored as t + 1
    x[np.arange(len(ids)) - np.repeat(start - padded_start, lengths)] = ids.astype(np.uint64) + np.uint64(1)
    windows = np.maximum(padded - n + 1, 0)
    doc = np.repeat(np.arange(len(lengths)), windows)
    first = np.arange(int(windows.sum())) - np.repeat(np.cumsum(windows) - windows - padded_start, windows)
    h = np.zeros(len(first), dtype=np.uint64)
    for k in range(n):
        h = h * _BASE + x[first + k]
    return h, doc


def overlap(train: Iterable[Stream], held_out: dict[str, Stream], n: int = NGRAM) -> dict[str, tuple[int, int]]:
    """{split: (contaminated documents, documents)} of each held-out stream against the training stream,
    which may come in several pieces (each a stream of whole documents), read one at a time."""
    hashes = {name: ngram_hashes(s, n) for name, s in held_out.items()}
    table, inverse = np.unique(np.concatenate([h for h, _ in hashes.values()] or [np.zeros(0, np.uint64)]),
                               return_inverse=True)
    found = np.zeros(len(table), dtype=bool)
    for piece in train:
        h, _ = ngram_hashes(piece, n)
        at = np.minimum(np.searchsorted(table, h), max(len(table) - 1, 0))
        if len(table):
            found[at[table[at] == h]] = True
    result, offset = {}, 0
    for name, (h, doc) in hashes.items():
        hit = found[inverse[offset : offset + len(h)]]
        offset += len(h)
        result[name] = (int(np.unique(doc[hit]).size), len(held_out[name][1]))
    return result


def contamination(train: Iterable[str], held_out: dict[str, Sequence[str]], n: int = NGRAM
                  ) -> dict[str, tuple[int, int]]:
    """{split: (contaminated documents, documents)}: held-out documents sharing an n-word n-gram with
    a training document (texts; the training ones read in pieces of PIECE_DOCUMENTS)."""
    return overlap(_pieces(train), {name: word_stream(texts) for name, texts in held_out.items()}, n)
