"""The fast tier stays fast: a test that starts a process without `@pytest.mark.slow` fails."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli


def test_starting_the_cli_outside_the_slow_tier_fails_before_the_process_starts(tmp_path: Path):
    with pytest.raises(pytest.fail.Exception, match="starts a process .*newllm.run.* not marked slow"):
        run_cli(["--help"], cwd=tmp_path)


def test_any_process_counts_not_only_the_cli():
    import subprocess

    with pytest.raises(pytest.fail.Exception, match="not marked slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.slow
def test_a_slow_test_may_start_the_cli(tmp_path: Path):
    assert "newllm" in run_cli(["--help"], cwd=tmp_path).stdout
