"""Every command in docs/results.md still runs (issue 24 item 7): its quick variant, end to end.

A result regenerates only if its command does. docs/results.md writes each command a table came from on an
indented line of its own (`    [VAR=value ...] python ...`, a trailing backslash continues it); this test
finds every one and runs it with a tail that shrinks the work to seconds -- training=quick, a step cap, one
trial and one re-run seed for an Optuna preset, a grid's first value, seed 1 and a tiny config for the
Phase-1 controls benchmark -- into a temporary folder. The tail only lowers budgets: it never replaces a
key the command sets, so a renamed preset, group or key in a documented command fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLI_ENV, REPO, run_in_process

RESULTS = REPO / "docs" / "results.md"
COMMAND = re.compile(r"^ {4}((?:[A-Z_]+=\S+ )*python .*)$")
QUICK = ["training=quick", "training.phase2.max_steps=10", "training.phase2.eval_every=5", "progress=false"]
RECALL_QUICK = ["data.num_train=200", "data.num_val=50", "data.num_test=50"]
QUICK_CONTROLS = ["training=quick", "data.num_conversations=300", "tokenizer.vocab_size=512"]


def _unset(tail: list[str], args: list[str]) -> list[str]:
    """The tail's overrides for keys the command does not set itself."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    return [t for t in tail if t.split("=", 1)[0] not in given]


def documented_commands(text: str) -> list[str]:
    """The indented command lines of a markdown text, continuation lines joined, comments dropped."""
    commands, pending = [], ""
    for line in text.splitlines():
        if pending:
            line = "    " + pending + line.strip()
            pending = ""
        match = COMMAND.match(line)
        if not match:
            continue
        command = match.group(1).split(" # ")[0].strip()
        if command.endswith("\\"):
            pending = command[:-1].rstrip() + " "
            continue
        commands.append(command)
    return commands


def test_the_parser_finds_indented_commands_only():
    text = ("Run `python -m newllm.run inline` like this:\n\n"
            "    python -m newllm.run seed=1   # first\n"
            "    OMP_NUM_THREADS=1 python -m newllm.run -m \\\n      seed=1,2\n"
            "    | a table row |\n")
    assert documented_commands(text) == ["python -m newllm.run seed=1",
                                         "OMP_NUM_THREADS=1 python -m newllm.run -m seed=1,2"]


def _preset_text(args: list[str]) -> str:
    """The sweep presets a command names (+sweep=x or +sweep=[x,y]) and the presets their defaults list,
    concatenated (compare_models_sota is compare_models plus studies)."""
    todo = [n for a in args if a.startswith("+sweep=") for n in a.removeprefix("+sweep=").strip("[]").split(",")]
    texts = []
    while todo:
        path = REPO / "sweeps" / f"{todo.pop()}.yaml"
        if path.is_file():
            texts.append(path.read_text())
            todo += [d for d in (yaml.safe_load(texts[-1]) or {}).get("defaults", []) if isinstance(d, str)]
    return "".join(texts)


def _first_value(arg: str) -> str:
    """key=a,b,c (a grid of the basic sweeper) -> key=a: one job checks the key and the sweep machinery."""
    key, _, value = arg.partition("=")
    if not value or key.startswith(("+sweep", "hydra.")) or value.startswith(("[", "'", '"')) or "(" in value:
        return arg
    return f"{key}={value.split(',')[0]}"


def _newllm_run(args: list[str], tmp: Path) -> None:
    tail = [*QUICK, f"paths.output_root={tmp / 'outputs'}"]
    preset = _preset_text(args)
    if "override /data: recall" in preset:  # generated sequences: a few hundred, not 20,000 per job
        tail += RECALL_QUICK
    if "-m" in args or "--multirun" in args:
        tail.append(f"hydra.sweep.dir={tmp / 'sweep'}")
        if "newllm_optuna" in preset:
            tail.append("hydra.sweeper.n_trials=1")
        else:
            args = [_first_value(a) for a in args]
        if "rerun_best" in preset:
            tail.append("hydra.sweeper.rerun_best.seeds=[1]")
    run_in_process([*args, *_unset(tail, args)], cwd=tmp)


def _phase1_controls(args: list[str], tmp: Path) -> None:
    ours, overrides = (args[: args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    if "--seeds" in ours:
        i = ours.index("--seeds")
        ours = ours[:i] + ours[i + 2:]
    subprocess.run([sys.executable, *ours, "--seeds", "1", "--out", str(tmp / "controls.csv"), "--",
                    *overrides, *_unset(QUICK_CONTROLS, overrides)],
                   cwd=REPO, env={**os.environ, **CLI_ENV}, check=True, capture_output=True, text=True)
    assert (tmp / "controls.csv").read_text().count("\n") == 7  # header + trained + five controls


RUNNERS = {("-m", "newllm.run"): _newllm_run, ("benchmarks/phase1_controls.py",): _phase1_controls}


def test_every_documented_command_is_one_this_test_can_run():
    commands = documented_commands(RESULTS.read_text())
    assert len(commands) >= 8, commands  # the tables of docs/results.md each name theirs
    for command in commands:
        argv = [a for a in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S+", a)]
        assert argv[0] == "python" and any(tuple(argv[1:1 + len(k)]) == k for k in RUNNERS), command


@pytest.mark.slow
@pytest.mark.parametrize("command", documented_commands(RESULTS.read_text()))
def test_the_quick_variant_of_a_documented_command_runs(command, tmp_path):
    argv = [a for a in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S+", a)][1:]
    for prefix, runner in RUNNERS.items():
        if tuple(argv[: len(prefix)]) == prefix:
            runner(argv[len(prefix):] if prefix[0] == "-m" else argv, tmp_path)
            return
    pytest.fail(f"no runner for {command}")
