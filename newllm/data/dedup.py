r"""Deduplication of documents before the split, and the contamination report after it.

Deduplication (data.dedup, on by default): a document is dropped when its normalised text --
casefolded, every run of whitespace one space, ends stripped -- equals an earlier document's. For
dialogue sources the document is the whole rendered conversation (roles and turns), so two
conversations are duplicates only when every turn matches. The first occurrence is kept, so the
order of the rest does not change. This runs before the split: no document can sit on both sides.

Contamination (the n-gram overlap test of the GPT-3 paper, Brown et al. 2020, appendix C): a held-out
document is contaminated when it shares an n-gram of n = NGRAM = 13 words with any training document.
Words, as in that paper, not the run's BPE tokens: the figure must not change with tokenizer.vocab_size
(13 tokens of a 320-token vocabulary are ~3 words, of a 4,096-token one ~9). A word is a maximal run of
word bytes of the casefolded UTF-8 text -- ASCII letters, digits and underscore, and any non-ASCII
character (so "café" is one word, and so is "don’t" with a curly apostrophe) -- with the ChatML markup
(<|im_start|>role, <|im_end|>, <|endoftext|>) removed first, so markup alone never makes an n-gram;
n-grams never cross documents. A document shorter than n words has no 13-gram: it counts as one n-gram
of its whole length (padded), so it is contaminated exactly when a training document has the same word
sequence ("whole-document match"; after deduplication only a difference in punctuation can leave such a
pair). A document cut by a token cap (data.max_*_tokens) counts whole. Reported per held-out split as
the fraction of its documents; above CONTAMINATION_SAMPLE held-out documents a split is measured on
the first that many of its seeded order, a uniform random sample (newllm.data.prepare).

Speed: nothing runs per word or per document in Python. Texts are hashed as bytes with numpy: every
word and every normalised document becomes a 64-bit polynomial hash (segment_hashes), every n-gram one
more (13 vectorised passes); the held-out n-grams are sorted once and the training split's looked up in
them piece by piece (a byte map of hash prefixes first, then binary search), so the cost is O(N) for N
training n-grams, never pairwise between documents, and the training split is read in bounded pieces.
A false match needs two different n-grams (or documents) with equal 64-bit hashes (probability ~ N * H
/ 2^64, nil at these sizes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import numpy as np

from newllm.data.tokenizer import END_OF_TEXT, IM_END, IM_START

NGRAM = 13
MARKUP = re.compile("|".join(map(re.escape, (IM_END, END_OF_TEXT))) + f"|{re.escape(IM_START)}\\w*")
PIECE_DOCUMENTS = 4096  # training documents hashed at a time: bounds the memory of the report
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection mod 2^64
Stream = tuple[np.ndarray, np.ndarray]  # (word hashes or ids (N,), words per document (D,)) of concatenated documents


def normalise(text: str) -> str:
    """The text two documents are compared by: casefolded, whitespace runs collapsed to one space."""
    return " ".join(text.casefold().split())


# Byte classes of UTF-8 text (after casefolding): what str.split() takes for whitespace among ASCII bytes,
# and word bytes -- ASCII letters, digits, underscore, and every byte of a non-ASCII character.
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_WORD = np.zeros(256, dtype=bool)
_WORD[[*range(48, 58), *range(65, 91), 95, *range(97, 123), *range(128, 256)]] = True
_UNICODE_SPACE = re.compile("[\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_P = np.uint64(0x100000001B3)  # odd: a bijection mod 2^64


_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32  # ASCII casefolding is lowercasing


def _utf8(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of the casefolded texts, concatenated (B,) uint8; start of each text (D,) int64). The texts
    are joined by NUL, casefolded and encoded in one call each (ASCII lowercased by a table), then the NULs
    are dropped; texts holding a NUL themselves are casefolded one by one."""
    joined = "\x00".join(texts)
    if joined.count("\x00") != max(len(texts) - 1, 0):
        encoded = [t.casefold().encode("utf-8", "surrogatepass") for t in texts]
        sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return np.frombuffer(b"".join(encoded), dtype=np.uint8), np.cumsum(sizes) - sizes
    if joined.isascii():
        b = _LOWER[np.frombuffer(joined.encode("ascii"), dtype=np.uint8)]
    else:
        b = np.frombuffer(joined.casefold().encode("utf-8", "surrogatepass"), dtype=np.uint8)
    nul = np.flatnonzero(b == 0)
    start = np.concatenate([[0], nul + 1]).astype(np.int64) - np.arange(len(texts))
    return np.delete(b, nul), start if len(texts) else np.zeros(0, np.int64)


def segment_hashes(b: np.ndarray, begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """A 64-bit polynomial hash of every segment b[begin : begin + length] (uint64).

    Vectorised over segments: pass k adds byte k of every segment longer than k (segments sorted by
    length, so a pass touches only those), so the work is the segments' total length plus one numpy
    call per byte of the longest."""
    order = np.argsort(-length, kind="stable")
    first, size = begin[order], length[order]
    h = np.zeros(len(order), dtype=np.uint64)
    for k in range(int(size[0]) if len(size) else 0):
        m = int(np.searchsorted(-size, -k, side="left"))  # segments longer than k
        h[:m] = h[:m] * _P + b[first[:m] + k].astype(np.uint64) + np.uint64(1)
    out = np.empty_like(h)
    out[order] = h
    return out


def dedup_keys(texts: Sequence[str]) -> np.ndarray:
    """(D,) uint64: a 64-bit hash of each text's normalise()d form (equal normalised texts, equal keys; two
    different ones collide with probability ~2^-64), computed with numpy over the bytes, not per text.

    Each text is framed by a space on both sides, then every whitespace run becomes its first byte (a
    space): that gives " " + normalise(text) + " " (or " " for blank text), one-to-one with normalise(text),
    without looking for the ends."""
    framed = [" " + (t if t.isascii() else _UNICODE_SPACE.sub(" ", t)) + " " for t in texts]
    b, start = _utf8(framed)
    ws = _WS[b]
    run = np.concatenate([[False], ws[:-1]]) & ws  # whitespace after whitespace: dropped
    run[start] = False  # never across texts
    keep = ~run
    lengths = np.add.reduceat(keep.view(np.uint8), start, dtype=np.int64) if len(start) else np.zeros(0, np.int64)
    return segment_hashes(np.where(ws, np.uint8(32), b)[keep], np.cumsum(lengths) - lengths, lengths)


def first_of(keys: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the first document of each group with equal keys."""
    return np.sort(np.unique(np.asarray(keys, dtype=np.uint64), return_index=True)[1])


def first_occurrences(texts: Sequence[str]) -> list[int]:
    """Indices of the documents to keep: the first of each group with equal normalised text, in order."""
    return first_of(dedup_keys(texts)).tolist()


def word_stream(texts: Sequence[str]) -> Stream:
    """(hash of every word (N,) uint64, words per document (D,)) of the documents, markup removed.

    A word is a maximal run of word bytes (_WORD) of the casefolded UTF-8 text within one document."""
    texts = [MARKUP.sub(" ", t) if "<|" in t else t for t in texts]
    b, start = _utf8(texts)
    if not len(b):
        return np.zeros(0, np.uint64), np.zeros(len(texts), np.int64)
    word = _WORD[b]
    first = np.zeros(len(b), dtype=bool)
    first[start[start < len(b)]] = True  # a document's first byte starts a word whatever came before
    last = np.zeros(len(b), dtype=bool)
    last[(np.append(start[1:], len(b)) - 1)[np.diff(np.append(start, len(b))) > 0]] = True
    begins = np.flatnonzero(word & (first | ~np.concatenate([[False], word[:-1]])))
    ends = np.flatnonzero(word & (last | ~np.concatenate([word[1:], [False]]))) + 1
    doc = np.searchsorted(start, begins, side="right") - 1
    return segment_hashes(b, begins, ends - begins), np.bincount(doc, minlength=len(texts)).astype(np.int64)


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


class ContaminationCheck:
    """The contamination report built while the data is prepared: held-out documents first (at most
    `sample` per split, the first of its seeded order: a uniform random sample), then the training
    documents in pieces, each looked up in the held-out n-grams and dropped."""

    def __init__(self, n: int = NGRAM, sample: int | None = None) -> None:
        self.n, self.sample = n, sample
        self.held: dict[str, list[Stream]] = {}
        self.table: np.ndarray | None = None

    def add_held_out(self, name: str, texts: Sequence[str]) -> None:
        taken = sum(len(s[1]) for s in self.held.get(name, []))
        room = len(texts) if self.sample is None else max(self.sample - taken, 0)
        self.held.setdefault(name, []).append(word_stream(texts[:room]))

    def _build(self) -> None:
        self.hashes = {}
        for name, pieces in self.held.items():
            ids = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.uint64)
            lengths = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int64)
            self.hashes[name] = (*ngram_hashes((ids, lengths), self.n), len(lengths))
        all_h = [h for h, _, _ in self.hashes.values()] or [np.zeros(0, np.uint64)]
        self.table, self.inverse = np.unique(np.concatenate(all_h), return_inverse=True)
        self.found = np.zeros(len(self.table), dtype=bool)
        # a byte per top-24-bit prefix: most training n-grams are ruled out by one lookup, the rest searched
        self.maybe = np.zeros(1 << 24, dtype=bool)
        self.maybe[self.table >> np.uint64(40)] = True

    def add_train(self, texts: Iterable[str]) -> None:
        if self.table is None:
            self._build()
        for piece in _pieces(texts):
            h, _ = ngram_hashes(piece, self.n)
            h = h[self.maybe[h >> np.uint64(40)]]
            if len(self.table) and len(h):
                at = np.minimum(np.searchsorted(self.table, h), len(self.table) - 1)
                self.found[at[self.table[at] == h]] = True

    def counts(self) -> dict[str, tuple[int, int]]:
        """{split: (contaminated documents, documents measured)}."""
        if self.table is None:
            self._build()
        result, offset = {}, 0
        for name, (h, doc, n_docs) in self.hashes.items():
            hit = self.found[self.inverse[offset : offset + len(h)]]
            offset += len(h)
            result[name] = (int(np.unique(doc[hit]).size), n_docs)
        return result


def contamination(train: Iterable[str], held_out: dict[str, Sequence[str]], n: int = NGRAM
                  ) -> dict[str, tuple[int, int]]:
    """{split: (contaminated documents, documents)}: held-out documents sharing an n-word n-gram with
    a training document (texts; the training ones read in pieces of PIECE_DOCUMENTS)."""
    check = ContaminationCheck(n)
    for name, texts in held_out.items():
        check.add_held_out(name, list(texts))
    check.add_train(train)
    return check.counts()
