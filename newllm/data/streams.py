"""Documents -> token id streams and per-token loss masks, tokenized once and cached by `datasets`.

The assistant mask comes from exact character spans of the assistant turns, mapped through the
tokenizer's offsets -- never by matching decoded text.

Cache: one Arrow file per (tokenizer, documents) under <cache_dir>/tokens/, written by
`Dataset.map(cache_file_name=...)`, which writes a temp file and moves it into place only when the
whole map succeeded. A file that does not read back as the expected table (one row per document,
ids and mask of equal length, every id below the vocabulary size) is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer

from newllm.data.corpora import Conversation
from newllm.data.tokenizer import END_OF_TEXT, IM_END, IM_START
from newllm.runtime.fileio import writing

log = logging.getLogger(__name__)
Spans = list[tuple[int, int]]
FEATURES = datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                              "mask": datasets.List(datasets.Value("bool"))})
CACHE_VERSION = "tokens-v1"  # bump when the encoding below changes


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


def _encode_batch(tokenizer: Tokenizer, batch: dict) -> dict:
    encodings = tokenizer.encode_batch(batch["text"], add_special_tokens=False)
    masks = [spans_to_mask(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2),
                           np.asarray(spans, dtype=np.int64).reshape(-1, 2))
             for enc, spans in zip(encodings, batch["spans"], strict=True)]
    return {"ids": [enc.ids for enc in encodings], "mask": masks}


def _content_key(tokenizer: Tokenizer, texts: list[str], spans: list[Spans]) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(tokenizer.to_str().encode())
    for text, sp in zip(texts, spans, strict=True):
        h.update(b"\0" + text.encode("utf-8", "surrogatepass") + b"\0" + repr(sp).encode())
    return h.hexdigest()[:20]


def _rows_are_valid(ds: datasets.Dataset, n_docs: int, vocab_size: int) -> bool:
    """One row per document, ids and mask of equal non-zero length per row, every id an embedding row.

    A table can parse and still be wrong (an entry written by another tokenizer version, a damaged
    file): an out-of-range id would only fail epochs later, as an IndexError in the embedding.
    """
    if ds.features != FEATURES or ds.num_rows != n_docs:
        return False
    ids, mask = ds.data.column("ids"), ds.data.column("mask")
    lengths = pc.list_value_length(ids)
    if not pc.all(pc.equal(lengths, pc.list_value_length(mask))).as_py() or pc.min(lengths).as_py() < 1:
        return False
    low, high = pc.min_max(pc.list_flatten(ids)).values()
    return low.as_py() >= 0 and high.as_py() < vocab_size


def _read_cached(path: Path, n_docs: int, vocab_size: int) -> datasets.Dataset | None:
    """The cached table, or None (and the file removed) when it is missing, unreadable or not ours."""
    if not path.exists():
        return None
    try:
        ds = datasets.Dataset.from_file(str(path))
        if _rows_are_valid(ds, n_docs, vocab_size):
            return ds
    except Exception as err:  # noqa: BLE001 -- any read failure means a corrupt entry: rebuild it
        log.warning("tokenized-data cache %s is unreadable (%s): rebuilding it", path, type(err).__name__)
    else:
        log.warning("tokenized-data cache %s does not match its documents or vocabulary: rebuilding it", path)
    path.unlink(missing_ok=True)
    return None


def encode_cached(tokenizer: Tokenizer, texts: list[str], spans: list[Spans], cache_dir: Path
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Concatenated documents: ids (N,) long, assistant mask (N,) bool, tokens per document (D,) long,
    and whether the cache served them."""
    if not texts:
        empty = torch.empty(0, dtype=torch.long)
        return empty, torch.empty(0, dtype=torch.bool), empty.clone(), True
    path = Path(cache_dir) / "tokens" / f"{_content_key(tokenizer, texts, spans)}.arrow"
    ds = _read_cached(path, len(texts), tokenizer.get_vocab_size())
    hit = ds is not None
    if ds is None:
        with writing(path):  # datasets writes the cache file itself (a temp file, renamed): no atomic_write here
            path.parent.mkdir(parents=True, exist_ok=True)
            docs = datasets.Dataset.from_dict({"text": texts, "spans": [[list(s) for s in sp] for sp in spans]})
            ds = docs.map(lambda b: _encode_batch(tokenizer, b), batched=True, batch_size=256,
                          remove_columns=["text", "spans"], features=FEATURES, cache_file_name=str(path),
                          load_from_cache_file=False, new_fingerprint=path.stem)
    ids = pc.list_flatten(ds.data.column("ids")).to_numpy().astype(np.int64)
    mask = pc.list_flatten(ds.data.column("mask")).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(ds.data.column("ids")).to_numpy().astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(bool)), torch.from_numpy(lengths), hit
