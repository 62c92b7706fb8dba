"""Documents -> token id streams and loss masks, written once as memory-mapped files and read back
without copying.

A split's stream is one flat file of token ids in the smallest dtype that holds the vocabulary
(int16 up to 32,768 ids, uint16 up to 65,536 -- read back as int32, since torch computes little in
uint16 -- else int32), one file of tokens per document (int64) and, for dialogue, one of loss-mask
bytes (the assistant tokens; text needs none: every token is predicted). Documents are tokenized in
batches of about BATCH_BYTES of text, in the split's order, and tokenization stops at the split's
token cap (data.max_*_tokens): no token past a cap is ever computed.

The assistant mask comes from exact character spans of the assistant turns, mapped through the
tokenizer's offsets -- never by matching decoded text. Text without spans is encoded with
`encode_batch_fast` (no offsets).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from newllm.data.corpora import Conversation
from newllm.data.tokenizer import END_OF_TEXT, IM_END, IM_START
from newllm.runtime.fileio import atomic_write

Spans = list[tuple[int, int]]
BATCH_BYTES = 4 << 20  # text encoded per call: large enough for the tokenizer's threads, bounded in memory
BATCH_DOCUMENTS = 4096


def render_chatml(conversation: Conversation) -> tuple[str, Spans]:
    """ChatML text and the [start, end) character spans to learn (assistant content + <|im_end|>).

    Roles are checked where the conversation is read (corpora.check_conversation).
    """
    parts: list[str] = []
    spans: Spans = []
    pos = 0
    for turn in conversation:
        head = f"{IM_START}{turn['role']}\n"
        body = f"{turn['content']}{IM_END}"
        if turn["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts) + END_OF_TEXT, spans


def spans_to_mask(offsets: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """True for tokens lying wholly inside one span. offsets (T, 2), spans (S, 2): sorted, [start, end)."""
    if len(spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    start, end = offsets[:, 0], offsets[:, 1]
    k = np.searchsorted(spans[:, 1], start, side="right")  # first span ending after the token starts
    inside = k < len(spans)
    k = np.minimum(k, len(spans) - 1)
    return inside & (spans[k, 0] <= start) & (end <= spans[k, 1]) & (end > start)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype of the stored ids for this vocabulary."""
    if vocab_size <= 1 << 15:
        return np.dtype(np.int16)
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _batches(docs: Sequence[str], order: Sequence[int]) -> Iterator[list[int]]:
    """Lists of document indices of about BATCH_BYTES of text (at most BATCH_DOCUMENTS), in order."""
    batch, size = [], 0
    for i in order:
        batch.append(i)
        size += len(docs[i]) if not hasattr(docs, "nbytes") else docs.nbytes(i)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, texts: list[str], spans: list[Spans] | None, dtype: np.dtype
            ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(ids, assistant mask or None) per text."""
    if spans is None:
        return [(np.asarray(e.ids, dtype=dtype), None)
                for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    out = []
    for e, sp in zip(tokenizer.encode_batch(texts, add_special_tokens=False), spans, strict=True):
        offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        mask = spans_to_mask(offsets, np.asarray(sp, dtype=np.int64).reshape(-1, 2))
        out.append((np.asarray(e.ids, dtype=dtype), mask))
    return out


def write_split(folder: Path, name: str, tokenizer: Tokenizer, docs: Sequence[str], spans: Sequence[Spans] | None,
                order: Sequence[int], cap: int | None, seen: Callable[[list[str]], None] | None = None) -> list[int]:
    """Tokenize docs[order] into <folder>/<name>.ids (+ .mask with spans, + .lengths.npy), stopping at
    `cap` tokens (the last document cut). `seen(texts)` gets each batch of the documents used.
    Returns the indices of the documents used (the last one possibly cut). The ids and mask files grow
    as batches are encoded: `folder` is a temporary folder that prepare renames into place whole."""
    dtype, total, used, lengths = id_dtype(tokenizer.get_vocab_size()), 0, [], []
    with ExitStack() as files:
        ids_f = files.enter_context((folder / f"{name}.ids").open("wb"))
        mask_f = files.enter_context((folder / f"{name}.mask").open("wb")) if spans is not None else None
        for batch in _batches(docs, order):
            texts = [docs[i] for i in batch]
            encoded = _encode(tokenizer, texts, [spans[i] for i in batch] if spans is not None else None, dtype)
            for k, (i, (ids, mask)) in enumerate(zip(batch, encoded, strict=True)):
                keep = len(ids) if cap is None else min(len(ids), cap - total)
                ids_f.write(ids[:keep].tobytes())
                if mask_f is not None:
                    mask_f.write(mask[:keep].astype(np.uint8).tobytes())
                total += keep
                used.append(i)
                lengths.append(keep)
                if cap is not None and total >= cap:
                    if seen is not None:
                        seen(texts[: k + 1])
                    return _finish_split(folder, name, lengths, used)
            if seen is not None:
                seen(texts)
    return _finish_split(folder, name, lengths, used)


def _finish_split(folder: Path, name: str, lengths: list[int], used: list[int]) -> list[int]:
    array = np.asarray(lengths, dtype=np.int64)
    atomic_write(folder / f"{name}.lengths.npy", lambda tmp: np.save(open(tmp, "wb"), array))  # noqa: SIM115
    return used


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="c", shape=(n,))  # copy-on-write: writable for torch, never written


def read_split(folder: Path, name: str, vocab_size: int, tokens: int, with_mask: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, loss mask, tokens per document) of a written split, memory-mapped (uint16 ids as an int32 copy).
    Raises ValueError when the files do not match what was written (sizes, lengths, ids past the vocabulary)."""
    dtype = id_dtype(vocab_size)
    path = folder / f"{name}.ids"
    if path.stat().st_size != tokens * dtype.itemsize:
        raise ValueError(f"{path.name}: {path.stat().st_size} bytes, expected {tokens * dtype.itemsize}")
    ids = _memmap(path, dtype, tokens)
    lengths = np.load(folder / f"{name}.lengths.npy", mmap_mode="c")  # mapped like the ids, not read
    if lengths.dtype != np.int64 or int(lengths.sum()) != tokens or (tokens and int(lengths.min()) < 1):
        raise ValueError(f"{name}.lengths.npy does not add up to {tokens} tokens of non-empty documents")
    if tokens and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        raise ValueError(f"{path.name} holds ids outside [0, {vocab_size})")
    if with_mask:
        mask_path = folder / f"{name}.mask"
        if mask_path.stat().st_size != tokens:
            raise ValueError(f"{mask_path.name}: {mask_path.stat().st_size} bytes, expected {tokens}")
        mask = torch.from_numpy(_memmap(mask_path, np.dtype(np.bool_), tokens))
    else:
        mask = torch.ones(1, dtype=torch.bool).expand(tokens)  # every token predicted: no bytes at all
    as_torch = torch.from_numpy(ids.astype(np.int32) if dtype == np.uint16 else ids)
    return as_torch, mask, torch.from_numpy(lengths)
