"""data=text: plain UTF-8 files cut into documents without ever holding a file as one string.

Each file is memory-mapped and its separators found by a bytes regex running over the map (the page
cache holds the file, not the process). Indexing records each document's (file, byte offset, byte
length), whitespace stripped at both ends; a document's text is decoded (and checked to be UTF-8) from
the map only when it is used (dedup keys, BPE training, tokenization), a piece at a time. No file size
limit beyond the address space, and memory per document is ~24 bytes of index.

Units (data.split_by): paragraph -- documents separated by blank lines (lines of only spaces/tabs count
as blank, as in WikiText); line -- one document per line (\\n, \\r\\n, \\r; also \\v, \\f, \\x1c-\\x1e);
file -- one document per file (that document is held in memory while used); auto -- paragraphs when any
file has a blank line between non-blank text, otherwise lines. Whitespace here is ASCII whitespace.
"""

from __future__ import annotations

import mmap
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from newllm.errors import DataError

SEPARATORS = {"paragraph": re.compile(rb"\n[ \t\r\f\v]*\n\s*"), "line": re.compile(rb"\r\n|[\n\r\v\f\x1c-\x1e]")}
WHITESPACE = b" \t\n\r\v\f"


def _open(path: Path) -> mmap.mmap:
    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _content(mm: mmap.mmap) -> tuple[int, int]:
    """[start, end) of the file's bytes without leading and trailing whitespace (end <= start: none)."""
    start, end = 0, len(mm)
    while start < end and mm[start] in WHITESPACE:
        start += 1
    while end > start and mm[end - 1] in WHITESPACE:
        end -= 1
    return start, end


def _pieces(mm: mmap.mmap, unit: str) -> Iterator[tuple[int, int]]:
    """[start, end) byte ranges between separators (whole file for unit=file), before stripping."""
    start, end = _content(mm)
    if unit == "file":
        yield start, end
        return
    for m in SEPARATORS[unit].finditer(mm, start, end):
        yield start, m.start()
        start = m.end()
    yield start, end


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        at = offset + err.start
        raise DataError(f"data.files: {path} has bytes that are not UTF-8 (at byte {at}: "
                        f"{raw[err.start:err.start + 4]!r})") from err


def resolve_unit(paths: list[Path], unit: str) -> str:
    """unit=auto: paragraph when any file has a blank line between non-blank text, else line."""
    if unit != "auto":
        return unit
    for path in paths:
        mm = _open(path)
        start, end = _content(mm)
        if SEPARATORS["paragraph"].search(mm, start, end):
            return "paragraph"
    return "line"


@dataclass
class TextFiles:
    """The documents of plain-text files, by index: text(i) decodes one from its file's memory map."""

    paths: list[Path]
    unit: str
    file: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (D,) which file
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (D,) first byte
    length: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (D,) bytes
    separator: str = ""  # appended to every document: the one that cut them (corpora.TEXT_UNITS)
    _maps: list[mmap.mmap] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.offset)

    def __getitem__(self, i: int) -> str:
        f, start = int(self.file[i]), int(self.offset[i])
        return _decode(self._maps[f][start : start + int(self.length[i])], self.paths[f], start) + self.separator

    def nbytes(self, i: int) -> int:
        return int(self.length[i])


def index_text_files(paths: list[Path], unit: str, limit: int | None, separators: dict[str, str]) -> TextFiles:
    """Index every document of the files (at most `limit`), checking UTF-8 and emptiness as it goes."""
    unit = resolve_unit(paths, unit)
    # compact arrays, not lists of Python ints: 20 bytes per document however many there are
    files, offsets, lengths, maps = array("i"), array("q"), array("q"), []
    for f, path in enumerate(paths):
        if limit and len(offsets) >= limit:
            break
        mm = _open(path)
        maps.append(mm)
        before = len(offsets)
        for start, end in _pieces(mm, unit):
            raw = mm[start:end]
            text = raw.strip(WHITESPACE)
            if not text:
                continue
            lead = len(raw) - len(raw.lstrip(WHITESPACE))
            files.append(f)
            offsets.append(start + lead)
            lengths.append(len(text))
            if limit and len(offsets) >= limit:
                break
        if len(offsets) == before:
            raise DataError(f"data.files: {str(path)!r} holds only whitespace")
    as_np = lambda a, dtype: np.frombuffer(a, dtype=dtype).copy() if len(a) else np.zeros(0, dtype)
    return TextFiles(paths, unit, as_np(files, np.int32), as_np(offsets, np.int64), as_np(lengths, np.int64),
                     separators[unit], maps)
