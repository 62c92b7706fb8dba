"""Shared test helpers: run the real CLI in a temporary directory, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# Tiny, fast settings shared by end-to-end tests (seconds per run on 2 CPU cores).
TINY = [
    "training=quick", "progress=false", "model.context_dim=32", "model.embed_dim=24",
    "tokenizer.vocab_size=512", "data.num_conversations=300",
]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread: tiny CLI runs on a busy 2-core box are ~3x faster without thread contention.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def run_cli(args: list[str], cwd: Path, module: str = "newllm.run", timeout: int = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def tiny_run(tmp_path: Path):
    """Run `python -m newllm.run` with TINY settings into tmp_path/<name>; returns the run dir."""

    def _run(name: str = "run", *overrides: str, check: bool = True):
        run_dir = tmp_path / name
        proc = run_cli([*TINY, f"hydra.run.dir={run_dir}", f"paths.output_root={tmp_path / 'outputs'}",
                        *overrides], cwd=tmp_path, check=check)
        return run_dir, proc

    return _run
