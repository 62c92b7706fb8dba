"""A document source -> prepared token streams, built once and cached as memory-mapped files.

    documents (a list, or an index of text files decoded one at a time) -> dedup keys -> first occurrences
    -> splits (seeded, or the source's own) -> BPE trained on training documents, at most a byte budget
    -> held-out splits tokenized up to their caps, their n-grams hashed (the contamination report)
    -> training split tokenized up to its cap, its n-grams looked up -> <cache_dir>/prepared/<key>/

An entry holds tokenizer.json, per split <split>.ids / .mask / .lengths.npy (newllm.data.streams) and
info.json (the counts and reports for metrics.json). Its key is the source's identity -- for text files
their paths, sizes and modification times, so a cached rerun reads no text at all; for the other sources
the documents read -- and every setting that changes the streams (dedup, split, caps, tokenizer). An entry
whose files do not match its info.json is deleted and rebuilt; one is written to a temporary folder and
renamed into place, so a failed build leaves nothing.

BPE training reads the training documents in split order up to tokenizer.max_train_bytes, or when that
is null and data.max_train_tokens is set, up to BPE_BYTES_PER_CAPPED_TOKEN bytes per capped token (about
4x the text the cap keeps, in English), else all of them: a cap bounds the cost of a big corpus. A data-
scaling study that wants one tokenizer across budgets sets tokenizer.max_train_bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tokenizers import Tokenizer

from newllm import keys
from newllm.data.dedup import NGRAM, ContaminationCheck, dedup_keys, first_of
from newllm.data.splits import Split, assign
from newllm.data.streams import Spans, read_split, write_split
from newllm.data.tokenizer import SPECIAL_TOKENS, load_pretrained, train_bpe
from newllm.errors import first_line
from newllm.runtime.fileio import atomic_write, writing

log = logging.getLogger(__name__)

PREPARED_VERSION = 1  # bump when what an entry holds, or how it is made, changes
BPE_BYTES_PER_CAPPED_TOKEN = 16
KEY_PIECE_DOCUMENTS = 4096  # documents hashed for deduplication at a time
CONTAMINATION_SAMPLE = 20_000  # held-out documents per split the report measures (all, below this)
SPLITS = ("train", "val", "test")
DATA_SETTINGS = ("name", "dedup", "split_seed", "val_fraction", "test_fraction", "val_protocol",
                 "max_train_tokens", "max_val_tokens", "max_test_tokens")
TOKENIZER_SETTINGS = ("vocab_size", "min_frequency", "pretrained", "max_train_bytes")


@dataclass
class Documents:
    """What a document source reads: texts (a list, or a lazy sequence such as textfiles.TextFiles),
    assistant spans per text (None: plain text, every token predicted), source info for metrics, the
    split each text comes from when the source has its own (data=hf), and dedup keys if already computed."""

    texts: Sequence[str]
    spans: Sequence[Spans] | None = None
    info: dict = field(default_factory=dict)
    given: list[str] | None = None
    keys: np.ndarray | None = None

    def dedup_keys(self) -> np.ndarray:
        if self.keys is None:  # in pieces: a lazy sequence decodes only a piece at a time
            n, step = len(self.texts), KEY_PIECE_DOCUMENTS
            self.keys = np.concatenate([dedup_keys([self.texts[i] for i in range(a, min(a + step, n))])
                                        for a in range(0, n, step)] or [np.zeros(0, np.uint64)])
        return self.keys

    def identity(self) -> str:
        """A hash of everything read (for sources held in memory; text files use their file identity)."""
        h = hashlib.sha256()
        for i, text in enumerate(self.texts):
            h.update(b"\0" + text.encode("utf-8", "surrogatepass"))
            if self.spans is not None:
                h.update(repr(self.spans[i]).encode())
        h.update(repr((self.given, sorted(self.info.items()))).encode())
        return h.hexdigest()


def file_identity(paths: list[str], *settings: object) -> str:
    """Text files by path, size and modification time (not content: a cached rerun reads no text)."""
    stats = [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(repr((stats, settings)).encode()).hexdigest()


def entry_key(identity: str, d: DictConfig, tok: DictConfig) -> str:
    settings = {"version": PREPARED_VERSION, "source": identity, **{f"data.{k}": str(d[k]) for k in DATA_SETTINGS},
                **{f"tokenizer.{k}": str(tok[k]) for k in TOKENIZER_SETTINGS}}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _bpe_budget(d: DictConfig, tok: DictConfig) -> int | None:
    if tok.max_train_bytes is not None:
        return tok.max_train_bytes
    return d.max_train_tokens * BPE_BYTES_PER_CAPPED_TOKEN if d.max_train_tokens is not None else None


def _bpe_texts(texts: Sequence[str], order: Sequence[int], budget: int | None) -> Iterator[str]:
    """Training documents in split order up to `budget` bytes (the one crossing it included)."""
    used = 0
    for i in order:
        text = texts[i]
        yield text
        used += texts.nbytes(i) if hasattr(texts, "nbytes") else len(text.encode("utf-8", "surrogatepass"))
        if budget is not None and used >= budget:
            return


def _tokenizer(docs: Documents, order: Sequence[int], d: DictConfig, tok: DictConfig) -> Tokenizer:
    if tok.pretrained:
        return load_pretrained(tok.pretrained)
    return train_bpe(_bpe_texts(docs.texts, order, _bpe_budget(d, tok)), tok.vocab_size, tok.min_frequency)


def _splits(docs: Documents, d: DictConfig) -> tuple[dict[str, list[int]], int]:
    """({split: document indices in order}, duplicates removed)."""
    kept = first_of(docs.dedup_keys()) if d.dedup else np.arange(len(docs.texts))
    given = [docs.given[i] for i in kept] if docs.given is not None else None
    local = assign(len(kept), given, d)
    return {name: kept[idx].tolist() for name, idx in zip(SPLITS, local, strict=True)}, len(docs.texts) - len(kept)


def build(docs: Documents, d: DictConfig, tok: DictConfig, folder: Path) -> None:
    """Write an entry into `folder` (an empty directory)."""
    order, removed = _splits(docs, d)
    tokenizer = _tokenizer(docs, order["train"], d, tok)
    caps = {"train": d.max_train_tokens, "val": d.max_val_tokens, "test": d.max_test_tokens}
    check = ContaminationCheck(NGRAM, CONTAMINATION_SAMPLE)
    seen: dict[str, Callable[[list[str]], None]] = {
        "val": lambda t: check.add_held_out("val", t), "test": lambda t: check.add_held_out("test", t),
        "train": check.add_train}
    tokens = {}
    for name in ("val", "test", "train"):  # held-out first: the training pass looks their n-grams up
        write_split(folder, name, tokenizer, docs.texts, docs.spans, order[name], caps[name], seen[name])
        tokens[name] = int(np.load(folder / f"{name}.lengths.npy").sum())
    counts = check.counts()
    if d.val_protocol == "subset_of_train":  # validation is the tail of the training stream itself
        counts["val"] = (1, 1)
    if d.test_fraction == 0:
        counts.pop("test", None)
    info = {keys.DATA_DOCUMENTS: len(docs.texts) - removed, keys.DATA_DEDUP: bool(d.dedup),
            keys.DATA_DUPLICATES_REMOVED: removed, **docs.info, keys.DATA_CONTAMINATION_NGRAM: NGRAM,
            **{keys.data_contamination(k): hit / max(total, 1) for k, (hit, total) in counts.items()}}
    atomic_write(folder / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    meta = {"version": PREPARED_VERSION, "tokens": tokens, "mask": docs.spans is not None, "info": info}
    atomic_write(folder / "info.json", lambda tmp: Path(tmp).write_text(json.dumps(meta), encoding="utf-8"))


def read(folder: Path) -> tuple[dict[str, Split], Tokenizer, dict]:
    """(splits, tokenizer, info) of an entry; ValueError (or OSError) when it is incomplete or damaged."""
    meta = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    if meta.get("version") != PREPARED_VERSION:
        raise ValueError(f"entry version {meta.get('version')}, expected {PREPARED_VERSION}")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if any(tokenizer.token_to_id(s) is None for s in SPECIAL_TOKENS):
        raise ValueError("tokenizer.json lacks newllm's special tokens")
    splits = {name: Split(*read_split(folder, name, tokenizer.get_vocab_size(), meta["tokens"][name], meta["mask"]))
              for name in SPLITS}
    return splits, tokenizer, meta["info"]


def _hits(entry: Path, tok: DictConfig, hit: bool) -> dict:
    if tok.pretrained:  # a hub tokenizer, by its name: nothing trained, nothing cached
        return {keys.DATA_TOKENIZER: tok.pretrained, keys.DATA_TOKENS_CACHE_HIT: hit}
    return {keys.DATA_TOKENIZER: str(entry / "tokenizer.json"), keys.DATA_TOKENIZER_CACHE_HIT: hit,
            keys.DATA_TOKENS_CACHE_HIT: hit}


def prepare_documents(d: DictConfig, tok: DictConfig, cache_dir: Path, identity: str | None,
            read_source: Callable[[], Documents]) -> tuple[dict[str, Split], Tokenizer, dict]:
    """The prepared splits of a document source, from the cache or built (and cached). `identity`: the
    source's identity when it is known without reading it (text files), else None (read, then hashed)."""
    docs = None
    if identity is None:
        docs = read_source()
        identity = docs.identity()
    entry = cache_dir / "prepared" / entry_key(identity, d, tok)
    if entry.is_dir():
        try:
            splits, tokenizer, info = read(entry)
            return splits, tokenizer, {**info, **_hits(entry, tok, True)}
        except Exception as err:  # noqa: BLE001 -- any damage (missing file, bad JSON, wrong sizes): rebuild
            log.warning("prepared-data cache %s is damaged (%s): rebuilding it", entry, first_line(err))
            shutil.rmtree(entry, ignore_errors=True)
    docs = docs or read_source()
    with writing(entry):  # disk full, no permission: one line naming the entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            build(docs, d, tok, tmp)
            try:
                os.rename(tmp, entry)
            except OSError:  # another run built the same entry meanwhile: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    splits, tokenizer, info = read(entry)
    return splits, tokenizer, {**info, **_hits(entry, tok, False)}
