"""Atomic file writes: every artifact newllm leaves (caches, metrics, checkpoints, plots, tables).

Every write goes through `atomic_write` (tests/test_fileio.py checks the package's source for others): a temp
file beside the target, renamed into place, so readers and a run killed mid-write never see half a file. A
write the file system refuses (disk full, read-only, no permission) is one OutputError line naming the file;
temp files a killed process left behind are removed when its run resumes (`remove_stale_temps`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from newllm.errors import OutputError

TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # what _create_temp names: .<name>.<8 hex>.tmp


def _create_temp(folder: Path, name: str) -> Path:
    """A new empty file beside `name`, mode 0666 less the umask like any open(..., "w").

    (tempfile.mkstemp makes 0600 files whatever the umask: results shared by a team would be
    unreadable to it.)
    """
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """OSError while writing `path` -> one OutputError line naming it and the reason (e.g. ENOSPC)."""
    try:
        yield
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0)
        reason = f"{err.strerror or err} ({code})" if code else str(err.strerror or err)
        raise OutputError(f"cannot write {path}: {reason}") from err


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it into place.

    Readers (and a run killed mid-write) never see half a file; a failed write leaves nothing, and a write the
    file system refuses is an OutputError.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path.parent, path.name)
        try:
            write(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files of `atomic_write` below `folder` (a run killed mid-write leaves one, e.g.
    checkpoints/.last.pt.1a2b3c4d.tmp). Only for a folder no other process writes: a resumed run's own."""
    stale = [p for p in Path(folder).rglob("*.tmp") if p.is_file() and TEMP_NAME.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_text(path: str | Path, text: str) -> Path:
    """A text file (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": valid JSON, read back by float()
    return value


def save_json(path: Path, data: dict) -> None:
    """A flat dict as sorted, indented JSON (metrics.json); non-finite floats as the strings "nan"/"inf"."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump({k: _json_safe(v) for k, v in data.items()}, f, indent=2, sort_keys=True)
    atomic_write(path, write)


class _Recording:
    """A file torch.save writes through, keeping the OSError of a failed write: torch raises its own RuntimeError
    ('unexpected pos 576 vs 534') in its place, which says nothing of a full disk."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(payload: Any, tmp: str) -> None:
    import torch  # here, not at the top: the analysis CLI imports this module and answers without torch

    with open(tmp, "wb") as f:
        recording = _Recording(f)
        try:
            torch.save(payload, recording)
        except RuntimeError:
            if recording.error is not None:
                raise recording.error from None
            raise


def save_checkpoint(path: Path, payload: Any) -> None:
    """torch.save, atomically (a kill mid-write leaves the previous file intact)."""
    atomic_write(path, lambda tmp: _torch_save(payload, tmp))
