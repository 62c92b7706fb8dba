"""What a whole command can be refused for, once Hydra has composed it and before anything is written.

`Preflight` is a Hydra callback (conf/config.yaml, hydra.callbacks, before RunFolders claims a folder),
so every run and every sweeper passes through it -- Hydra's own, the official Optuna sweeper, newllm's:
  - the sweeper's storage URL holds no password Hydra would write into .hydra/ (newllm.sweep.storage);
  - the sweeper's settings that newllm's schemas type (early_stop) lie in their declared ranges;
  - an Optuna sweep has one direction per objective (else it ran a whole trial before failing);
  - a grid (Hydra's basic sweeper): each job's config passes newllm.config.validate, so a bad value in one
    cell refuses the grid in one line before any job runs. A grid's cells are one experiment: running the
    others and failing at the end costs their whole run time and leaves a grid with a hole, to be run again.
    (An Optuna sweep samples its values per trial: a trial that fails them is recorded FAIL with the line.)
A single run checks its values in newllm.run, after Hydra has recorded it, so `analyze runs` lists a
refused run with its error.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from newllm.config import check_directions, check_schema_node, validate
from newllm.errors import ConfigError, NewllmError, exit_one_line

log = logging.getLogger(__name__)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def task_config(config: DictConfig) -> DictConfig:
    """A composed config without its hydra node: what the task function receives."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def _overrides(config: DictConfig) -> list[str]:
    """The sweeper's `params` and the command line's task overrides, as the basic sweeper reads them."""
    params = config.hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def check_objective_directions(config: DictConfig) -> None:
    """An Optuna-style sweeper (it has `direction`) gets one direction per objective, unless objectives is swept."""
    sweeper = config.hydra.sweeper
    if "direction" not in sweeper:
        return
    parsed = OverridesParser.create().parse_overrides(_overrides(config))
    if any(o.key_or_group == "objectives" and o.is_sweep_override() for o in parsed):
        return
    direction = OmegaConf.to_container(sweeper, resolve=True, enum_to_str=True)["direction"]
    directions = [direction] if isinstance(direction, str) else list(direction)
    check_directions([str(o) for o in config.objectives], [str(d).lower() for d in directions])


def grid_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper will launch them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(_overrides(config))
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_grid(config: DictConfig) -> None:
    """Every job of a basic-sweeper grid passes validate, before any of them runs."""
    loader = GlobalHydra.instance().config_loader()
    jobs = grid_jobs(config)
    for number, job in enumerate(jobs):
        try:
            job_config = task_config(loader.load_sweep_config(master_config=config, sweep_overrides=job))
        except Exception as err:  # noqa: BLE001 -- Hydra reports a job it cannot compose as it launches it
            log.debug("job %d not checked before the sweep: %s", number, err)
            continue
        try:
            validate(job_config)
        except ConfigError as err:
            raise ConfigError(f"{err} (job {number} of the {len(jobs)} in this sweep; no job was started)") from None


class Preflight(Callback):
    """Refuses a run or a sweep that cannot work before Hydra writes anything (one line, exit status 2)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from newllm.sweep.storage import check_not_written  # sqlalchemy: loaded only by commands that run

        try:
            check_not_written(config)
        except NewllmError as err:
            exit_one_line(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from newllm.sweep.storage import check_not_written

        try:
            check_not_written(config)
            check_schema_node(config.hydra.sweeper, "hydra.sweeper.")
            check_objective_directions(config)
            if config.hydra.sweeper.get("_target_") == BASIC_SWEEPER and not config.get("resume"):
                check_grid(config)
        except NewllmError as err:
            exit_one_line(err)
