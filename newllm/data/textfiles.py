"""data=text: plain UTF-8 files cut into documents without ever holding a file as one string.

Each file is memory-mapped and its separators found by a bytes regex running over the map, the pages
passed handed back as the scan goes (the page cache holds the file, not the process); documents are
then read one at a time with os.pread. Indexing records each document's (file, byte offset, byte
length), whitespace stripped at both ends; a document's text is read and decoded (and checked to be
UTF-8) only when it is used (dedup keys, BPE training, tokenization). No file size limit beyond the
address space, and memory per document is 20 bytes of index.

Units (data.split_by): paragraph -- documents separated by blank lines (lines of only spaces/tabs count
as blank, as in WikiText); line -- one document per line (\\n, \\r\\n, \\r; also \\v, \\f, \\x1c-\\x1e);
file -- one document per file (that document is held in memory while used); auto -- paragraphs when any
file has a blank line between non-blank text, otherwise lines. Whitespace here is ASCII whitespace.
"""

from __future__ import annotations

import mmap
import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from newllm.errors import DataError

SEPARATORS = {"paragraph": re.compile(rb"\n[ \t\r\f\v]*\n\s*"), "line": re.compile(rb"\r\n|[\n\r\v\f\x1c-\x1e]")}
WHITESPACE = b" \t\n\r\v\f"


RELEASE_BYTES = 64 << 20  # a scan hands the pages it has passed back every this many bytes


def _open(path: Path) -> mmap.mmap:
    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _release(mm: mmap.mmap, start: int, end: int) -> int:
    """Drop the pages of [start, end) from this process's resident set (the page cache keeps them): a scan
    of a file bigger than memory must not count it all as its own. Returns where the next release starts."""
    start -= start % mmap.PAGESIZE
    end -= end % mmap.PAGESIZE
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    return max(start, end)


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
    released = 0
    for m in SEPARATORS[unit].finditer(mm, start, end):
        yield start, m.start()
        start = m.end()
        if start - released > RELEASE_BYTES:
            released = _release(mm, released, start)
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
        found = SEPARATORS["paragraph"].search(mm, start, end)  # C over the map: ~1 s a GB when there is none
        mm.close()
        if found:
            return "paragraph"
    return "line"


@dataclass
class TextFiles:
    """The documents of plain-text files, by index: [i] reads one with os.pread and decodes it (no mapping
    stays resident: the process holds only the document in use)."""

    paths: list[Path]
    unit: str
    file: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (D,) which file
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (D,) first byte
    length: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (D,) bytes
    separator: str = ""  # appended to every document: the one that cut them (corpora.TEXT_UNITS)
    _files: list[BinaryIO] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.offset)

    def __getitem__(self, i: int) -> str:
        f, start = int(self.file[i]), int(self.offset[i])
        raw = os.pread(self._files[f].fileno(), int(self.length[i]), start)
        return _decode(raw, self.paths[f], start) + self.separator

    def nbytes(self, i: int) -> int:
        return int(self.length[i])


def index_text_files(paths: list[Path], unit: str, limit: int | None, separators: dict[str, str]) -> TextFiles:
    """Index every document of the files (at most `limit`), refusing a file with no text as it goes (UTF-8 is
    checked when a document is read: TextFiles.__getitem__)."""
    unit = resolve_unit(paths, unit)
    # compact arrays, not lists of Python ints: 20 bytes per document however many there are
    files, offsets, lengths, handles = array("i"), array("q"), array("q"), []
    for f, path in enumerate(paths):
        if limit and len(offsets) >= limit:
            break
        mm = _open(path)
        handles.append(path.open("rb"))
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
        mm.close()
        if len(offsets) == before:
            raise DataError(f"data.files: {str(path)!r} holds only whitespace")
    as_np = lambda a, dtype: np.frombuffer(a, dtype=dtype).copy() if len(a) else np.zeros(0, dtype)
    return TextFiles(paths, unit, as_np(files, np.int32), as_np(offsets, np.int64), as_np(lengths, np.int64),
                     separators[unit], handles)
