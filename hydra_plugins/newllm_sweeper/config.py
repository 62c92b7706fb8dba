"""Config schema of `hydra/sweeper=newllm_optuna`: the official OptunaSweeperConf plus pruning,
early-stop rules and newllm's defaults; pruner options; and the sweep presets in sweeps/.

Imported by Hydra's plugin scan at every start-up, so it stays light (no optuna, no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import MISSING, OmegaConf

from newllm.config import EarlyStopConfig  # one schema, read by the trial side too (newllm.sweep.hooks)


@dataclass
class PrunerConfig:
    _target_: str = MISSING


@dataclass
class NopPrunerConfig(PrunerConfig):
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConfig(PrunerConfig):
    """https://optuna.readthedocs.io/en/stable/reference/generated/optuna.pruners.MedianPruner.html"""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class HyperbandPrunerConfig(PrunerConfig):
    """https://optuna.readthedocs.io/en/stable/reference/generated/optuna.pruners.HyperbandPruner.html"""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class StudyConfig:
    """One of several studies a single `-m` command runs in turn (hydra.sweeper.studies.<label>)."""

    overrides: list[str] = field(default_factory=list)  # fixed for this study, e.g. [model=gru]
    params: dict[str, str] = field(default_factory=dict)  # search space added to hydra.sweeper.params


@dataclass
class RerunBestConfig:
    """After a study: its best trial re-run once per seed, in study <study>_reruns (folder <sweep dir>/reruns)."""

    seeds: list[int] = field(default_factory=list)  # empty: no reruns


@dataclass
class NewllmOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.newllm_sweeper.sweeper.NewllmOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    pruner: PrunerConfig = MISSING
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    # Which phases report intermediate values to the pruner (single objective only).
    report: list[str] = field(default_factory=lambda: ["phase1", "phase2"])
    # A SQLite file under outputs/ so studies outlive the process; any SQLAlchemy URL works.
    storage: Any | None = "sqlite:///${paths.output_root}/optuna.db"
    study_name: str | None = "newllm"
    # n_trials counts COMPLETE + PRUNED trials in the whole study (re-running continues it).
    n_trials: int = 20
    # This run stops once more than max_failure_rate x n_trials of its trials failed (0.0: the first).
    max_failure_rate: float = 0.0
    n_jobs: int = 1  # trials per batch (run in parallel by the joblib/submitit launchers)
    # Job folder under hydra.sweep.dir, named by trial number so re-runs never overwrite one.
    subdir: str = "trial_{number}"
    # label -> StudyConfig: one study per label, named <study_name>_<label>, folder <sweep dir>/<label>,
    # each with n_trials and a freshly seeded sampler (the same search budget for every label).
    studies: dict[str, StudyConfig] = field(default_factory=dict)
    rerun_best: RerunBestConfig = field(default_factory=RerunBestConfig)


def sweeps_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "sweeps"


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="newllm_optuna", node=NewllmOptunaSweeperConf, provider="newllm")
    pruners = {"none": NopPrunerConfig, "median": MedianPrunerConfig, "hyperband": HyperbandPrunerConfig}
    for name, node in pruners.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="newllm")
    # Tuned pruners of the presets: sweeps/pruner/<name>.yaml, typed by the option its _target_ names.
    by_target = {node._target_: node for node in pruners.values()}
    for path in sorted((sweeps_dir() / "pruner").glob("*.yaml")):
        settings = OmegaConf.load(path)
        node = OmegaConf.merge(OmegaConf.structured(by_target[settings._target_]), settings)
        cs.store(group="hydra/sweeper/pruner", name=path.stem, node=node, provider="newllm")
    # Presets: sweeps/<name>.yaml becomes `+sweep=<name>` (a global package, like `# @package _global_`).
    for path in sorted(sweeps_dir().glob("*.yaml")):
        cs.store(group="sweep", name=path.stem, node=OmegaConf.load(path), package="_global_", provider="newllm")


register()
