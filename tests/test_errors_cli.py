"""Every documented error through the CLI's entry points: exit status 2 and exactly one line on stderr naming the
bad value (in-process, tests.conftest.run_in_process; one case of each kind also as a real process).

The cases follow the one-line errors of README and docs/ (value checks, budgets, memory, data and hub options,
resume and run folders, from_run, pretrained embeddings, sweep settings and folders, the analysis
CLI). Most fire before any work; the few that need data read a tiny corpus (tests.conftest.TINY).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch

from newllm import errors
from newllm.errors import first_line
from tests.conftest import TINY, run_cli, run_in_process

Setup = Callable[[Path], None]
# Optuna logs to stderr itself ("[I 2026-12-02 10:00:00,000] Using an existing study ..."): not an error line.
OPTUNA_LOG = re.compile(r"\[[DIW] \d{4}-\d\d-\d\d ")


def _folder_with_a_file(tmp: Path) -> None:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "notes.txt").write_text("not a run\n")


def _empty_folder(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def _sweep_dir_of_another_study(tmp: Path) -> None:
    (tmp / "sweep").mkdir()
    owner = {"storage": "sqlite:///elsewhere.db", "storage_id": "elsewhere", "study": "other", "study_id": 1}
    (tmp / "sweep" / ".newllm-owner.json").write_text(json.dumps(owner))


def _study(direction: str, names: list[str] | None = None) -> Setup:
    def make(tmp: Path) -> None:
        study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp / 'optuna.db'}", direction=direction)
        if names:
            study.set_metric_names(names)

    return make


SWEEP = ["-m", "hydra/sweeper=newllm_optuna", "hydra.sweep.dir={tmp}/sweep"]
STUDY = [*SWEEP, "hydra.sweeper.storage=sqlite:///{tmp}/optuna.db", "hydra.sweeper.study_name=s"]

# (id, CLI arguments ({tmp}: the test's folder), text the one stderr line must hold, setup, module)
CASES: list[tuple[str, list[str], str, Setup | None, str]] = [
    ("value_range", ["model.context_dim=-4"], "model.context_dim=-4 is not allowed", None, "newllm.run"),
    ("non_finite", ["training.phase1.lr=inf"], "training.phase1.lr=inf is not allowed", None, "newllm.run"),
    ("appended_unknown_key", ["+training.phase1.max_iteration=9"],
     "Phase1Config has no key 'max_iteration' (did you mean training.phase1.max_iterations?)", None, "newllm.run"),
    ("group_with_a_dot", ["training.diversity=vicreg"], "training.diversity='vicreg' is not allowed", None,
     "newllm.run"),
    ("recall_window", ["data=recall", "training.phase2.seq_len=32"], "training.phase2.seq_len=32 is not allowed",
     None, "newllm.run"),
    ("core_params_budget", ["model.core_params=10"], "model.core_params=10 is not allowed", None, "newllm.run"),
    ("memory", ["model.context_dim=100000"], "model.context_dim=100000", None, "newllm.run"),
    ("vocab_size", ["tokenizer.vocab_size=200"], "tokenizer.vocab_size=200 is too small", None, "newllm.run"),
    ("split_too_small", ["data.max_val_tokens=10"], "data.max_val_tokens=10", None, "newllm.run"),
    ("text_without_files", ["data=text"], "data=text needs data.files", None, "newllm.run"),
    ("missing_file", ["data=ultrachat", "data.path=missing.jsonl"], "data.path='missing.jsonl' does not exist",
     None, "newllm.run"),
    ("hub_offline_data", ["data=ultrachat"], "data=ultrachat cannot reach", None, "newllm.run"),
    ("hub_offline_tokenizer", ["tokenizer.pretrained=no-such/tokenizer"],
     "tokenizer.pretrained='no-such/tokenizer' cannot be loaded", None, "newllm.run"),
    ("hub_offline_embedding", ["model.embedding.pretrained=no-such/model"],
     "model.embedding.pretrained='no-such/model' cannot be loaded", None, "newllm.run"),
    ("eval_seq_len_beyond_max_len", ["model=transformer", "model.max_len=16", "training.phase2.seq_len=8",
                                     "training.phase2.eval_seq_len=32"],
     "training.phase2.eval_seq_len=32 is not allowed", None, "newllm.run"),
    ("seq_len_beyond_max_len", ["model=transformer", "model.max_len=16", "training.phase2.seq_len=32"],
     "training.phase2.seq_len=32 is not allowed", None, "newllm.run"),
    ("from_run_missing", ["training.phase1.from_run={tmp}/nothing"], "training.phase1.from_run=", None,
     "newllm.run"),
    ("resume_missing", ["resume={tmp}/nothing"], "is not a run directory", None, "newllm.run"),
    ("resume_not_a_run", ["resume={tmp}/empty"], "is not a run directory", _empty_folder, "newllm.run"),
    ("run_folder_taken", ["hydra.run.dir={tmp}/taken"], "hydra.run.dir=", _folder_with_a_file, "newllm.run"),
    ("n_trials", [*SWEEP, "hydra.sweeper.n_trials=0", "hydra.sweeper.storage=null", "objectives=[phase2/val_ppl]"],
     "hydra.sweeper.n_trials=0 is not allowed", None, "newllm.run"),
    ("storage_password", [*SWEEP, "hydra.sweeper.storage=postgresql+psycopg://u:pw@localhost/optuna"],
     "hydra.sweeper.storage holds a password", None, "newllm.run"),
    ("sweep_dir_owned", [*SWEEP, "hydra.sweeper.storage=sqlite:///{tmp}/optuna.db",
                         "hydra.sweeper.direction=[maximize,minimize]"],
     "holds the job folders of study 'other'", _sweep_dir_of_another_study, "newllm.run"),
    ("study_direction", [*STUDY, "hydra.sweeper.direction=maximize", "objectives=[phase2/val_ppl]"],
     "hydra.sweeper.direction=['maximize'] does not match study 's'", _study("minimize"), "newllm.run"),
    ("study_objectives", [*STUDY, "hydra.sweeper.direction=minimize", "objectives=[phase2/val_loss]"],
     "objectives=['phase2/val_loss'] do not match study 's'", _study("minimize", ["phase2/val_ppl"]), "newllm.run"),
    ("analyze_nothing", ["runs", "{tmp}/nothing"], "{tmp}/nothing", None, "newllm.analyze"),
    # issue 26: accepted, or a traceback, on 360fac1 (every numeric key: tests/test_config_ranges.py, in-process)
    ("negative_grad_clip", ["training.phase2.grad_clip=-1"],
     "training.phase2.grad_clip=-1.0 is not allowed: expected a positive number", None, "newllm.run"),
    ("seed_beyond_the_rngs", ["seed=99999999999999999999"],
     "seed=99999999999999999999 is not allowed: expected an integer in [0, 4294967295]", None, "newllm.run"),
    ("objective_no_run_reports", ["objectives=[nope/metric]"], "'nope/metric' is not a metric a run reports", None,
     "newllm.run"),
    ("group_given_a_number", ["model=5"], "model=5 is not allowed: model is a config group", None, "newllm.run"),
    ("grid_with_a_bad_job", ["-m", "model.layers=0,1", "hydra.sweep.dir={tmp}/grid"],
     "model.layers=0 is not allowed: expected a positive integer (job 0 of the 2 in this sweep; no job was started)",
     None, "newllm.run"),
    ("eval_windows_longer_than_the_data", ["training.phase2.eval_seq_len=100000000"],
     "fewer than one window of training.phase2.eval_seq_len + 1 = 100000001", None, "newllm.run"),
    ("official_sweeper_password", ["-m", "hydra/sweeper=optuna", "hydra.sweep.dir={tmp}/sweep",
                                   "hydra.sweeper.storage=postgresql+psycopg://u:p@ss@localhost/optuna"],
     "hydra.sweeper.storage holds a password", None, "newllm.run"),
    ("official_sweeper_directions", ["-m", "hydra/sweeper=optuna", "hydra.sweep.dir={tmp}/sweep",
                                     "hydra.sweeper.storage=null"],
     "has 2 name(s) for hydra.sweeper.direction=['minimize']", None, "newllm.run"),
]
if not torch.cuda.is_available():  # the one case that depends on the machine
    CASES.append(("device", ["device=cuda"], "device='cuda' is not available", None, "newllm.run"))


def _run_settings(args: list[str], tmp: Path) -> list[str]:
    """TINY (resume= takes no overrides but paths.* and hydra.*), a run folder unless the case names one."""
    tiny = [] if any(a.startswith("resume=") for a in args) else TINY
    folder = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir={tmp / 'run'}"]
    return [*tiny, *folder, f"paths.output_root={tmp / 'outputs'}"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names in a setup
@pytest.mark.parametrize(("args", "expected", "setup", "module"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_documented_error_is_one_line_and_exit_2(tmp_path, args, expected, setup, module):
    if setup is not None:
        setup(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    if module == "newllm.run":
        args = [*_run_settings(args, tmp_path), *args]
    proc = run_in_process(args, cwd=tmp_path, module=module, check=False)
    lines = [line for line in proc.stderr.splitlines() if not OPTUNA_LOG.match(line)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert expected.format(tmp=tmp_path) in lines[0]


# Choice fields are Enums (newllm.config): Hydra refuses any other value while composing, before newllm
# runs, with its own message (exit 1) -- as for a misspelt key or a wrong type.
CHOICES = [
    ("training.phase2.solver=newton", "Invalid value 'newton', expected one of [sequential, jacobi]"),
    ("model.architecture=deep", "Invalid value 'deep', expected one of [sequential, layerwise]"),
    ("data.name=wikipedia", "Invalid value 'wikipedia', expected one of [chatterbot, ultrachat, text, repetition, "
                            "recall, hf]"),
    ("training.phase1.init=magic", "Invalid value 'magic', expected one of [sequential, zeros, chunked, burn_in]"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "expected"), CHOICES, ids=[c[0].split("=")[0] for c in CHOICES])
def test_a_value_outside_a_choice_fails_at_compose_naming_key_value_and_options(tmp_path, override, expected):
    proc = run_in_process([*_run_settings([], tmp_path), override], cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert expected in proc.stderr and f"full_key: {override.split('=')[0]}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()  # nothing started


# The tests above run each entry point in-process (tests.conftest.run_in_process): one case of each kind
# again as a real process, which must give the same exit status, stderr and stdout (timestamps aside).
TIMESTAMP = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]", re.MULTILINE)
REAL = [("newllm.run", ["model.context_dim=-4"], 2),  # newllm's one-line error
        ("newllm.run", ["training.phase1.init=magic"], 1),  # Hydra refuses at compose time
        ("newllm.analyze", ["runs", "{tmp}/nothing"], 2)]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "status"), REAL, ids=["run_error", "compose_error", "analyze_error"])
def test_a_real_process_gives_what_the_in_process_run_gives(tmp_path, module, args, status):
    args = [a.format(tmp=tmp_path) for a in args]
    if module == "newllm.run":
        args = [*_run_settings(args, tmp_path), *args]
    inside = run_in_process(args, cwd=tmp_path, module=module, check=False)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)  # the run folder it claimed: the process claims it anew
    real = run_cli(args, cwd=tmp_path, module=module, check=False, timeout=300)
    assert real.returncode == inside.returncode == status, real.stderr[-3000:]
    assert real.stderr == inside.stderr and real.stderr.strip()
    assert TIMESTAMP.sub("", real.stdout) == TIMESTAMP.sub("", inside.stdout)


# ----------------------------------------------------------------------------- the contract itself (fast)
def _subclasses(cls: type) -> set[type]:
    return {c for sub in cls.__subclasses__() for c in {sub, *_subclasses(sub)}}


def test_every_newllm_error_lives_in_newllm_errors():
    import newllm

    for info in pkgutil.walk_packages(newllm.__path__, "newllm."):  # every module, so every class is defined
        importlib.import_module(info.name)
    found = {f"{c.__module__}.{c.__qualname__}" for c in _subclasses(errors.NewllmError)}
    assert {f for f in found if not f.startswith("newllm.errors.")} == set()
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.GenerationError, ValueError)


def test_first_line_is_the_type_and_the_first_line_of_the_message():
    assert first_line(ValueError("bad value\n  more detail")) == "ValueError: bad value"
    assert first_line(RuntimeError("\n  indented\nrest")) == "RuntimeError: indented"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("abcdef"), limit=3) == "OSError: abc"
