"""conf/ holds only what differs from the structured-config defaults (newllm/config.py is the one source)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from newllm.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
CHECKED = sorted(p for group in ("model", "training", "logger", "data") for p in (CONF / group).rglob("*.yaml"))
# A data option names its source even where that is the default (data=chatterbot): `name` is what it selects.
IDENTITY = {"name"}


def schema_of(path: Path) -> DictConfig:
    """The node a group file is merged onto: its own `/X_schema@_here_` default, or a sibling option it
    extends (that option composed), else the main schema's group."""
    register_configs()
    store = ConfigStore.instance()
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


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(CONF)))
def test_group_files_set_only_what_differs_from_the_schema(path):
    raw, schema = OmegaConf.load(path), schema_of(path)
    missing = object()
    repeated = [f"{key}={value!r}" for key, value in leaves(raw) if key not in IDENTITY
                and OmegaConf.select(schema, key, default=missing, throw_on_missing=False) is not missing
                and OmegaConf.select(schema, key, throw_on_missing=False) == value]
    assert not repeated, f"{path.relative_to(CONF)} repeats schema defaults: {repeated}"


def test_sequential_is_layerwise_but_for_the_architecture():
    register_configs()
    with initialize_config_dir(str(CONF), version_base=None):
        layerwise = OmegaConf.to_container(compose("config", overrides=["model=layerwise"]).model)
        sequential = OmegaConf.to_container(compose("config", overrides=["model=sequential"]).model)
    assert layerwise.pop("architecture") == "layerwise" and sequential.pop("architecture") == "sequential"
    assert layerwise == sequential


def option_overrides() -> list[str]:
    """`group=option` for every option file of every group (model/updater and training/diversity included)."""
    return sorted(f"{'/'.join(p.relative_to(CONF).parts[:-1])}={p.stem}" for p in CHECKED)


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
