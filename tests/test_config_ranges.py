"""Every numeric key of every schema declares its range, and a value just outside it is one line and exit 2.

In-process through `newllm.run.main`, the task function the CLI runs (Hydra's decorator calls it directly
when given a config), so the walk over ~100 keys takes seconds; tests/test_errors_cli.py runs the real CLI
on the cases issue 26 reported.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from newllm import config
from newllm.config import INT64_MAX, RANGE, Range, register_configs, schema_ranges
from tests.conftest import REPO

# Options that bring every schema into a composed config (the defaults bring the rest).
OPTIONS = [[], ["model/updater=residual"], ["model=gru"], ["model=transformer"],
           ["training/diversity=ema_variance"], ["training/diversity=vicreg"], ["training/diversity=dim_usage"],
           ["training/diversity=none"], ["model=mamba"]]  # model=mamba: HFModelConfig (every transformers family)


def schemas() -> set[type]:
    """Every schema in newllm/config.py: the registered ones, what they nest, and the sweeper's early_stop."""
    found = {obj for obj in vars(config).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)
             and obj.__module__ == config.__name__ and obj is not Range}
    register_configs()
    registered = {OmegaConf.get_type(ConfigStore.instance().load(name).node) for name in ConfigStore.instance().list("")
                  if name.endswith("_schema.yaml")}
    assert registered <= found
    return found


def numeric(hint: typing.Any) -> bool:
    args = typing.get_args(hint)
    return any(numeric(a) for a in args) if args else hint in (int, float)


def test_every_numeric_field_of_every_schema_declares_its_range():
    found = schemas()
    assert len(found) >= 15  # Config, the three models, updaters, data, tokenizer, diversity options, phases...
    undeclared = [f"{s.__name__}.{f.name}" for s in found for f in dataclasses.fields(s)
                  if numeric(typing.get_type_hints(s)[f.name]) and RANGE not in f.metadata]
    assert undeclared == []


def test_every_default_lies_in_its_range():
    bad = [f"{s.__name__}.{name}" for s in schemas() for name, (rng, _) in schema_ranges(s).items()
           for value in _defaults(s, name) if not rng.allows(value)]
    assert bad == []


def _defaults(schema: type, name: str) -> list[typing.Any]:
    f = next(f for f in dataclasses.fields(schema) if f.name == name)
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value if isinstance(value, list) else [value]


def outside(rng: Range, integer: bool) -> list[int | float]:
    """Values just outside `rng`: below its low end and above its high end (an int64 overflow for integers
    without one). Floats step to the next representable number, so a check off by one ulp fails."""
    values: list[int | float] = []
    if rng.lo != -math.inf:
        values.append(rng.lo if rng.lo_open else rng.lo - 1 if integer else math.nextafter(rng.lo, -math.inf))
    if integer:
        values.append(rng.hi if rng.hi_open else rng.hi + 1)  # INT64_MAX + 1 where no upper end is declared
    elif rng.hi != math.inf:
        values.append(rng.hi if rng.hi_open else math.nextafter(rng.hi, math.inf))
    return values


def typed_keys(node: DictConfig, prefix: str = ""):
    """(dotted key, schema, field name) of every ranged field in a composed config."""
    schema = OmegaConf.get_type(node)
    ranges = schema_ranges(schema) if dataclasses.is_dataclass(schema) else {}
    for key, value in node.items_ex(resolve=False):
        if key in ranges:
            yield f"{prefix}{key}", schema, key
        if isinstance(value, DictConfig) and node[key] is not None:
            yield from typed_keys(value, f"{prefix}{key}.")


@pytest.fixture(scope="module")
def composed() -> list[DictConfig]:
    import newllm.run  # noqa: F401 -- registers the schemas and the run's resolvers

    with initialize_config_dir(config_dir=str(REPO / "conf")):
        return [compose("config", options, return_hydra_config=True) for options in OPTIONS]


@pytest.fixture(scope="module")
def study_sweep() -> DictConfig:
    """A newllm_optuna sweep as Hydra composes it: its early_stop node is a newllm schema."""
    import newllm.run  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf")):
        return compose("config", ["hydra/sweeper=newllm_optuna", "objectives=[phase2/val_ppl]"],
                       return_hydra_config=True)


def as_run(composition: DictConfig, run_dir: Path) -> DictConfig:
    """What Hydra hands the task: the config without its hydra node, HydraConfig set to a run in run_dir."""
    composition = copy.deepcopy(composition)
    with read_write(composition.hydra):
        composition.hydra.runtime.output_dir = str(run_dir)
        composition.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(composition)
    task = copy.deepcopy(composition)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def refusal(task: DictConfig, capsys) -> tuple[int | str | None, list[str]]:
    """Exit status and stderr lines of the CLI's task function on `task`."""
    from newllm.run import main

    with pytest.raises(SystemExit) as exit_:
        main(task)
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def test_every_numeric_key_just_outside_its_range_is_one_line_and_exit_2(composed, tmp_path, capsys):
    """The property: for every ranged key of every schema, each value just outside its range stops the run
    before any work with one line naming the key and the allowed values."""
    walked, wrong = set(), []
    for composition in composed:
        base = as_run(composition, tmp_path / "run")
        for key, schema, name in typed_keys(base):
            if (schema, name) in walked:  # a field shared by several options (data.*, training.*): once
                continue
            rng, integer = schema_ranges(schema)[name]
            walked.add((schema, name))
            for value in outside(rng, integer):
                task = copy.deepcopy(base)
                OmegaConf.update(task, key, [value] if isinstance(OmegaConf.select(task, key), ListConfig) else value)
                code, lines = refusal(task, capsys)
                ok = code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}=") and \
                    rng.describe(integer) in lines[0]
                if not ok:
                    wrong.append((key, value, code, lines))
    every = {(s, n) for s in schemas() for n in schema_ranges(s)}
    assert every - walked - {(config.EarlyStopConfig, n) for n in schema_ranges(config.EarlyStopConfig)} == set()
    assert wrong == []
    assert not (tmp_path / "run").exists()  # refused before any work: nothing written


def test_every_sweeper_key_newllm_types_just_outside_its_range_is_one_line_and_exit_2(study_sweep, capsys):
    """hydra.sweeper.early_stop.* (EarlyStopConfig), through the callback every sweep passes first."""
    from newllm.runtime.preflight import Preflight

    walked, wrong = set(), []
    for key, schema, name in typed_keys(study_sweep.hydra.sweeper, "hydra.sweeper."):
        rng, integer = schema_ranges(schema)[name]
        walked.add((schema, name))
        for value in outside(rng, integer):
            sweep = copy.deepcopy(study_sweep)
            with read_write(sweep.hydra):
                OmegaConf.update(sweep, key, value)
            with pytest.raises(SystemExit) as exit_:
                Preflight().on_multirun_start(config=sweep)
            lines = capsys.readouterr().err.strip().splitlines()
            if not (exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}=")):
                wrong.append((key, value, exit_.value.code, lines))
    assert walked == {(config.EarlyStopConfig, n) for n in schema_ranges(config.EarlyStopConfig)}
    assert wrong == []


# The values issue 26 found accepted (or failing late, or with a traceback), each refused at once.
ISSUE_CASES = [
    ("training.phase2.grad_clip", -1.0, "a positive number"),  # flipped the gradients: val ppl 181,847
    ("training.phase1.grad_clip", -5.0, "a positive number"),
    ("training.phase2.weight_decay", -1.0, "a number >= 0"),  # a traceback after Phase 1
    ("tokenizer.min_frequency", -3, "an integer >= 0"),  # OverflowError in the tokenizer trainer
    ("seed", 99999999999999999999, "an integer in [0, 4294967295]"),  # torch.manual_seed overflow
    ("training.phase2.max_steps_per_epoch", 0, "null (no cap) or a positive integer"),  # ran uncapped
    ("training.phase2.max_steps_per_epoch", -5, "null (no cap) or a positive integer"),  # batches[:-5]
    ("training.phase2.max_val_tokens", 0, "null (no cap) or a positive integer"),  # silently no cap
    ("data.max_val_tokens", 0, "null (no cap) or a positive integer"),
    ("training.diversity.momentum", 5.0, "a number in [0, 1)"),  # with training/diversity=ema_variance
]


@pytest.mark.parametrize(("key", "value", "allowed"), ISSUE_CASES, ids=[f"{k}={v}" for k, v, _ in ISSUE_CASES])
def test_values_issue_26_found_accepted_are_one_line(composed, tmp_path, capsys, key, value, allowed):
    composition = composed[4] if key.startswith("training.diversity") else composed[0]
    task = as_run(composition, tmp_path / "run")
    OmegaConf.update(task, key, value)
    code, lines = refusal(task, capsys)
    assert (code, lines) == (2, [f"error: {key}={OmegaConf.select(task, key)!r} is not allowed: expected {allowed}"])


@pytest.mark.parametrize(("objectives", "says"), [
    (["nope/metric"], "'nope/metric' is not a metric a run reports as a number"),  # logged nan, exit 0
    (["phase2/val_pp"], "did you mean phase2/val_ppl?"),
    (["phase2/test_ppl"], "'phase2/test_ppl' is not a metric"),  # nothing selects on the test split
    ([], "expected a non-empty list of metric keys"),
])
def test_objectives_must_be_keys_a_run_reports(composed, tmp_path, capsys, objectives, says):
    task = as_run(composed[0], tmp_path / "run")
    task.objectives = objectives
    code, lines = refusal(task, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: objectives={objectives!r} is not allowed")
    assert says in lines[0]


def test_objective_keys_accept_what_the_sweeps_and_docs_use():
    from newllm.keys import is_objective

    for key in ("phase1/val_convergence_rate", "phase2/val_ppl", "phase2/val_loss", "model/params",
                "recall/val_accuracy", "repetition/val/p3/cycle_distance", "time/wall_s"):
        assert is_objective(key), key
    for key in ("nope/metric", "phase2/test_ppl", "phase2/val_loss_by_position", "phase2/val_ppl2"):
        assert not is_objective(key), key


@pytest.mark.parametrize("argv", [["model=5"], ["-m", "model=5,6"], ["training/diversity=3"], ["data=1.5"]])
def test_a_group_given_a_number_is_one_line(monkeypatch, capsys, argv):
    """`model=5` failed inside Hydra's composer with a traceback; the command line is checked first."""
    import sys

    from newllm.run import cli

    monkeypatch.setattr(sys, "argv", ["newllm.run", "training=quick", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli()
    lines = capsys.readouterr().err.strip().splitlines()
    group = argv[-1].split("=")[0]
    assert exit_.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {argv[-1]} is not allowed: {group} is a config group; expected the name")


def test_the_int64_bound_applies_to_every_integer_key():
    assert Range.parse("[1, inf)").for_type(True).hi == INT64_MAX
    assert not Range.parse("[1, inf)").for_type(True).allows(INT64_MAX + 1)
    assert Range.parse("[1, inf)").for_type(False).allows(1e300)
