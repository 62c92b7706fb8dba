"""atomic_write: all or nothing, and files get the mode an ordinary open(..., "w") gives them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from newllm.runtime.fileio import atomic_write, save_checkpoint, save_json


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_files_get_the_mode_an_ordinary_write_gives(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what any other tool would create
        f.write("x")
    save_json(tmp_path / "metrics.json", {"a": 1.0})
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"w": torch.zeros(2)})
    atomic_write(tmp_path / "table.csv", lambda tmp: Path(tmp).write_text("a,b\n"))
    expected = 0o666 & ~mask
    assert mode(tmp_path / "plain.txt") == expected
    for name in ("metrics.json", "checkpoints/last.pt", "table.csv"):
        assert mode(tmp_path / name) == expected, (name, oct(mode(tmp_path / name)))


def test_a_failed_write_leaves_neither_file_nor_temp_file(tmp_path):
    atomic_write(tmp_path / "keep.txt", lambda tmp: Path(tmp).write_text("old"))

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "keep.txt", fail)
    assert (tmp_path / "keep.txt").read_text() == "old" and sorted(tmp_path.iterdir()) == [tmp_path / "keep.txt"]
