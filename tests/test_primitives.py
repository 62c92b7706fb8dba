"""The primitives every layer shares, each implemented once: flatten, ..."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from newllm import analysis
from newllm.utils import flatten

CONFIG = {"model": {"layers": 2, "updater": {"_target_": "g", "gates": [1, 2]}, "extra": {}},
          "data": {"files": ["a.txt", {"b": 1}], "name": "text"}, "seed": None}


def test_flatten_nested_dicts_to_dotted_keys_lists_kept_as_leaves():
    assert flatten(CONFIG) == {"model.layers": 2, "model.updater._target_": "g", "model.updater.gates": [1, 2],
                               "data.files": ["a.txt", {"b": 1}], "data.name": "text", "seed": None}
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": 1}
    assert flatten({}) == {}


def test_runs_table_config_cells_hold_lists_as_json(tmp_path: Path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    row = analysis.read_run(tmp_path)
    assert row["model.updater.gates"] == "[1, 2]" and row["data.files"] == '["a.txt", {"b": 1}]'
    assert row["model.layers"] == 2 and row["seed"] is None and "model.extra" not in row


def test_checkpoint_module_sits_below_tracking():
    """checkpoint.py writes through fileio, not tracking (arrows point down); the old import path still works."""
    from newllm import fileio, tracking

    probe = "import sys, newllm.checkpoint; print('newllm.tracking' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert tracking.save_checkpoint is fileio.save_checkpoint and tracking.save_json is fileio.save_json
