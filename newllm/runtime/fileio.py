"""Atomic file writes: every artifact newllm leaves (caches, metrics, checkpoints, plots, tables)."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it into place.

    Readers (and a run killed mid-write) never see half a file; a failed write leaves nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save, atomically (a kill mid-write leaves the previous file intact)."""
    import torch  # here, not at the top: the analysis CLI imports this module and answers without torch

    atomic_write(path, lambda tmp: torch.save(payload, tmp))
