"""The private Optuna and Hydra APIs newllm relies on, each behind one small named function.

The sweeper (hydra_plugins/newllm_sweeper), the trial side (newllm.sweep.hooks) and newllm.analysis
call these instead of reaching into `study._storage`, `trial._trial_id`, `optuna._hypervolume` or
`hydra_plugins.hydra_optuna_sweeper._impl` themselves, so a release that moves one of them breaks
here, with a message naming the package, the version found and the range newllm is tested with.

At import, every package listed in TESTED_PACKAGES is compared with newllm's own pin of it
(pyproject.toml, as installed): a version outside that range is one CompatWarning; a private API
that is gone is a CompatError (a NewllmError: one line at the CLI).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from hydra.core.utils import JobReturn
from optuna.trial import FrozenTrial, TrialState
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from newllm.errors import CompatError

TESTED_PACKAGES = ("optuna", "hydra-core", "hydra-optuna-sweeper")
# What NewllmOptunaSweeperImpl calls on its (private) base class besides the public Sweeper interface.
SWEEPER_IMPL_METHODS = ("_process_searchspace_config", "_parse_sweeper_params_config", "_to_grid_sampler_choices",
                        "_get_directions", "_configure_trials")


class CompatWarning(UserWarning):
    """An Optuna or Hydra version outside the range newllm is tested with."""


# ----------------------------------------------------------------------------- versions
def tested_ranges() -> dict[str, SpecifierSet]:
    """newllm's pins of TESTED_PACKAGES (its installed requirements); {} when newllm is not installed."""
    try:
        requires = importlib.metadata.requires("newllm") or []
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path: no pins to compare with
        return {}
    pins = (Requirement(line) for line in requires)
    return {r.name: r.specifier for r in pins if r.name in TESTED_PACKAGES and r.marker is None}


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_note(package: str) -> str:
    """`<package> <found> (newllm is tested with <package><range>)`, for messages about that package."""
    tested = tested_ranges().get(package)
    found = installed_version(package) or "(not installed)"
    return f"{package} {found}" + (f" (newllm is tested with {package}{tested})" if tested else "")


def untested_versions(ranges: dict[str, SpecifierSet] | None = None) -> list[str]:
    """One line per installed package whose version lies outside its tested range."""
    lines = []
    for package, tested in (tested_ranges() if ranges is None else ranges).items():
        found = installed_version(package)
        if found is not None and not tested.contains(found, prereleases=True):  # our pins are release candidates
            lines.append(f"{package} {found} is outside the range newllm is tested with ({package}{tested}): "
                         f"newllm.sweep.compat relies on private {package} APIs that may have changed")
    return lines


def check_versions() -> None:
    """Warn (CompatWarning) once per package installed outside its tested range."""
    for line in untested_versions():
        warnings.warn(line, CompatWarning, stacklevel=2)


def _private(obj: Any, name: str, package: str) -> Any:
    """obj.<name>, or a CompatError naming the package and its versions when a release removed it."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise CompatError(f"{type(obj).__name__}.{name} is gone in {version_note(package)}: install the "
                          "tested version") from None


# ----------------------------------------------------------------------------- Optuna
def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (Optuna keeps it private as `study._storage`)."""
    return _private(study, "_storage", "optuna")


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study: unlike its name, a study deleted and created again gets a new one."""
    return int(_private(study, "_study_id", "optuna"))


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (unique across studies; `trial.number` counts within one study)."""
    return int(_private(trial, "_trial_id", "optuna"))


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage behind a URL, as optuna.load_study / create_study open it."""
    return optuna.storages.get_storage(url)


def trial_of(study: optuna.Study, storage_trial_id: int) -> optuna.Trial:
    """A live handle on a RUNNING trial of `study`, from another process (report / should_prune through it)."""
    return optuna.trial.Trial(study, storage_trial_id)


def set_trial_system_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    """A system attr of a trial (Trial.set_system_attr is gone from Optuna's public API)."""
    study_storage(study).set_trial_system_attr(trial_id(trial), key, value)


def set_trial_user_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    """A user attr of any trial of `study`, a FrozenTrial included (it has no setter of its own)."""
    study_storage(study).set_trial_user_attr(trial_id(trial), key, value)


def finish_pruned(study: optuna.Study, trial: optuna.Trial, values: list[float] | None) -> None:
    """Finish a trial as PRUNED with these objective values, telling the sampler as study.tell() would.

    study.tell(state=PRUNED) stores the last *intermediate* value instead; samplers and pruners still
    read the intermediate values, which stay as reported."""
    storage, key = study_storage(study), trial_id(trial)
    study.sampler.after_trial(study, storage.get_trial(key), TrialState.PRUNED, values)
    storage.set_trial_state_values(key, TrialState.PRUNED, values)


def compute_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of points (minimisation form) dominated below `reference`: Optuna's own WFG
    implementation (the one plot_hypervolume_history uses), private as optuna._hypervolume."""
    try:
        from optuna._hypervolume import compute_hypervolume as wfg
    except ImportError:
        raise CompatError(f"optuna._hypervolume.compute_hypervolume is gone in {version_note('optuna')}: "
                          "install the tested version") from None
    return float(wfg(points, reference))


# ----------------------------------------------------------------------------- Hydra
def job_error(ret: JobReturn) -> BaseException:
    """The exception a FAILED job raised (JobReturn.return_value would raise it again)."""
    return _private(ret, "_return_value", "hydra-core")


def optuna_sweeper_impl() -> tuple[type, Callable[..., Any]]:
    """(OptunaSweeperImpl, create_params_from_overrides) of hydra-optuna-sweeper's private `_impl` module,
    checked for the methods the newllm sweeper calls on it."""
    try:
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
    except ImportError as err:
        raise CompatError(f"hydra_plugins.hydra_optuna_sweeper._impl cannot be imported from "
                          f"{version_note('hydra-optuna-sweeper')} ({err})") from None
    missing = [name for name in SWEEPER_IMPL_METHODS if not hasattr(OptunaSweeperImpl, name)]
    if missing:
        raise CompatError(f"OptunaSweeperImpl has no {', '.join(missing)} in {version_note('hydra-optuna-sweeper')}:"
                          " install the tested version")
    return OptunaSweeperImpl, create_params_from_overrides


check_versions()
