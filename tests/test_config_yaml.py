"""conf/ holds only what differs from the defaults (newllm/config.py's dataclasses, and for conf/logger/ the
signature of each logger class): conf/config.yaml and every group option."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from newllm.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIONS = sorted(p for group in ("model", "training", "logger", "data") for p in (CONF / group).rglob("*.yaml"))
CHECKED = [CONF / "config.yaml", *OPTIONS]
# A data option names its source even where that is the default (data=chatterbot): `name` is what it selects;
# a logger option names its class (`_target_`) for the same reason.
IDENTITY = {"name", "_target_"}


def logger_schema(path: Path) -> DictConfig:
    """conf/logger/ is untyped (Config.logger: Any): each entry is the keyword arguments of its `_target_`
    class, so that class's signature is its schema -- the arguments RunTracker does not pass (run_dir),
    with their defaults (MISSING where there is none)."""
    schema = {}
    for name, entry in OmegaConf.load(path).items():
        if name == "defaults":
            continue
        params = inspect.signature(get_class(entry["_target_"])).parameters.values()
        schema[name] = {"_target_": entry["_target_"], **{
            p.name: "???" if p.default is inspect.Parameter.empty else p.default
            for p in params if p.name != "run_dir" and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}}
    return OmegaConf.create(schema)


def schema_of(path: Path) -> DictConfig:
    """The node a file is merged onto: the root schema for conf/config.yaml; its own `/X_schema@_here_`
    default, or a sibling option it extends (that option composed); its class's signature for a logger;
    else the main schema's group."""
    register_configs()
    store = ConfigStore.instance()
    if path == CONF / "config.yaml":
        return OmegaConf.structured(store.load("config_schema.yaml").node)
    if path.parent == CONF / "logger":
        return logger_schema(path)
    for entry in OmegaConf.load(path).get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/") and entry.endswith("_schema@_here_"):
            return OmegaConf.structured(store.load(entry[1:].split("@")[0] + ".yaml").node)
        sibling = path.parent / f"{entry}.yaml"
        if isinstance(entry, str) and sibling.is_file():
            own = OmegaConf.load(sibling)
            own.pop("defaults", None)
            return OmegaConf.merge(schema_of(sibling), own)
    root = OmegaConf.structured(store.load("config_schema.yaml").node)
    return OmegaConf.select(root, ".".join(path.relative_to(CONF).parts[:-1]))


def leaves(node: DictConfig, prefix: str = ""):
    for key, value in node.items_ex(resolve=False):
        if key == "defaults":
            continue
        if isinstance(value, DictConfig):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def restated(raw: DictConfig, schema: DictConfig) -> list[str]:
    """`key=value` for each value of `raw` equal to the schema's default for that key."""
    missing = object()
    return [f"{key}={value!r}" for key, value in leaves(raw) if key.rsplit(".", 1)[-1] not in IDENTITY
            and OmegaConf.select(schema, key, default=missing, throw_on_missing=False) is not missing
            and OmegaConf.select(schema, key, throw_on_missing=False) == value]


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(CONF)))
def test_yaml_files_set_only_what_differs_from_the_schema(path):
    repeated = restated(OmegaConf.load(path), schema_of(path))
    assert not repeated, f"{path.relative_to(CONF)} repeats schema defaults: {repeated}"


@pytest.mark.parametrize(("path", "added", "found"), [
    ("config.yaml", {"seed": 42, "device": "auto", "resume": None, "paths": {"output_root": "outputs"}},
     ["seed=42", "device='auto'", "resume=None", "paths.output_root='outputs'"]),
    ("config.yaml", {"objectives": ["phase1/val_converged_gain", "phase2/val_ppl"]}, ["objectives="]),
    ("logger/tensorboard.yaml", {"tensorboard": {"subdir": "tensorboard"}}, ["tensorboard.subdir='tensorboard'"]),
    ("logger/mlflow.yaml", {"mlflow": {"experiment_name": "newllm", "run_name": None}},
     ["mlflow.experiment_name='newllm'", "mlflow.run_name=None"]),
])
def test_the_check_catches_a_restated_default_in_config_yaml_and_in_a_logger(path, added, found):
    """The two schemas that are not a dataclass group -- the root Config for conf/config.yaml, a class's
    signature for conf/logger/ -- hold the defaults: a file restating them fails the check above."""
    raw = OmegaConf.merge(OmegaConf.load(CONF / path), added)
    repeated = restated(raw, schema_of(CONF / path))
    assert [r for r in repeated if any(r.startswith(f) for f in found)] == repeated and len(repeated) == len(found)


@pytest.mark.parametrize("path", sorted((CONF / "logger").glob("*.yaml")), ids=lambda p: p.name)
def test_logger_options_set_only_arguments_of_their_class(path):
    """A misspelt logger key would pass compose (logger/ is untyped) and fail only when a run instantiates
    it: every key of a shipped option is an argument of its `_target_`."""
    schema = logger_schema(path)
    for name, entry in OmegaConf.load(path).items():
        if name != "defaults":
            assert set(entry) <= set(schema[name]), f"{path.name}: {sorted(set(entry) - set(schema[name]))}"


def test_sequential_is_layerwise_but_for_the_architecture():
    register_configs()
    with initialize_config_dir(str(CONF), version_base=None):
        layerwise = OmegaConf.to_container(compose("config", overrides=["model=layerwise"]).model)
        sequential = OmegaConf.to_container(compose("config", overrides=["model=sequential"]).model)
    assert layerwise.pop("architecture") == "layerwise" and sequential.pop("architecture") == "sequential"
    assert layerwise == sequential


def option_overrides() -> list[str]:
    """`group=option` for every option file of every group (model/updater and training/diversity included)."""
    return sorted(f"{'/'.join(p.relative_to(CONF).parts[:-1])}={p.stem}" for p in OPTIONS)


@pytest.mark.parametrize("override", option_overrides())
def test_every_option_passes_the_known_key_check(override):
    """No option sets a key its schema lacks: the unknown-key check refuses only what a user appended."""
    from newllm.config import validate

    register_configs()
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", [override])
    validate(cfg)


@pytest.mark.parametrize(("override", "says"), [
    ("+training.phase1.max_iteration=9", "training.phase1.max_iteration=9 is not allowed: Phase1Config has no key "
                                         "'max_iteration' (did you mean training.phase1.max_iterations?)"),
    ("+model.foo=1", "model.foo=1 is not allowed: ContextModelConfig has no key 'foo'"),
    ("+training.diversity.wieght=2", "training.diversity.wieght=2 is not allowed: DiversityConfig has no key"),
    ("+seeed=3", "seeed=3 is not allowed: Config has no key 'seeed' (did you mean seed?)"),
])
def test_a_key_appended_with_plus_that_no_schema_has_is_refused(override, says):
    """Hydra's `+key=value` appends even to a dataclass-typed node: newllm's check is what catches the typo."""
    from newllm.config import validate
    from newllm.errors import ConfigError

    register_configs()
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", [override])
    with pytest.raises(ConfigError, match=re.escape(says)):
        validate(cfg)
