"""Loop progress (newllm/training/progress.py): a bar on a terminal, a few log lines in a file."""

from __future__ import annotations

import io
import logging

import pytest

from newllm.training.progress import Pacer, Progress
from tests.conftest import TINY, run_cli


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "newllm.training.progress"]


def test_in_a_file_a_long_loop_writes_four_lines_and_no_bar(caplog):
    clock, out = Clock(), io.StringIO()
    pacer = Pacer(every_s=60.0, clock=clock)
    seen = []
    with caplog.at_level(logging.INFO):
        bar = Progress(range(1000), "phase1", stream=out, pacer=pacer)
        for i in bar:
            clock.now += 1.0  # 1 s a step: every quarter is more than a minute after the last line
            bar.set_postfix(loss=f"{-i / 1000:.4f}")
            seen.append(i)
    assert seen == list(range(1000)) and out.getvalue() == ""
    assert lines(caplog) == ["phase1: 250/1000 (25%) in 250 s, loss=-0.2490",
                             "phase1: 500/1000 (50%) in 500 s, loss=-0.4990",
                             "phase1: 750/1000 (75%) in 750 s, loss=-0.7490",
                             "phase1: 1000/1000 (100%) in 1000 s, loss=-0.9990"]


def test_in_a_file_many_short_loops_write_about_a_line_a_minute(caplog):
    """50 epochs of 20 steps, 0.5 s a step (10 s an epoch, 500 s in all): one line a minute at most, at an
    epoch's quarter mark, instead of 4 per epoch."""
    clock = Clock()
    pacer = Pacer(every_s=60.0, clock=clock)
    with caplog.at_level(logging.INFO):
        for epoch in range(1, 51):
            for _ in Progress(range(20), f"phase2 epoch {epoch}", stream=io.StringIO(), pacer=pacer):
                clock.now += 0.5
    written = lines(caplog)
    assert 7 <= len(written) <= 8, written  # 500 s / 60 s
    assert written[0] == "phase2 epoch 6: 20/20 (100%) in 10 s"  # the first mark a minute after the start


def test_a_loop_of_seconds_writes_no_line(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO):
        for _ in Progress(range(100), "phase1", stream=io.StringIO(), pacer=Pacer(60.0, clock)):
            clock.now += 0.1
    assert lines(caplog) == []


def test_on_a_terminal_a_bar(caplog):
    out = Terminal()
    with caplog.at_level(logging.INFO):
        bar = Progress(range(50), "phase1", stream=out, pacer=Pacer(0.0))
        for _ in bar:
            bar.set_postfix(loss="0.5")
    assert "\r" in out.getvalue() and "phase1" in out.getvalue() and "loss=0.5" in out.getvalue()
    assert lines(caplog) == []


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["file", "terminal"])
def test_disabled_writes_nothing(caplog, stream):
    with caplog.at_level(logging.INFO):
        assert list(Progress(range(10), "phase1", enabled=False, stream=stream, pacer=Pacer(0.0))) == list(range(10))
    assert stream.getvalue() == "" and lines(caplog) == []


@pytest.mark.slow
def test_a_run_whose_output_is_a_file_draws_no_bar(tmp_path):
    """The CLI with progress on (the default) and stderr a pipe: no carriage-return bar in its output
    (the same run wrote 19 bar redraws, 1.3 kB, to stderr before; a default run ~30 kB)."""
    args = [o for o in TINY if o != "progress=false"]
    proc = run_cli([*args, "progress=true", f"hydra.run.dir={tmp_path / 'run'}",
                    f"paths.output_root={tmp_path / 'outputs'}"], cwd=tmp_path)
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "phase 2: val ppl" in proc.stdout and len(proc.stderr) < 200, proc.stderr[-2000:]
