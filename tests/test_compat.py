"""newllm.sweep.compat: each wrapper of a private Optuna / Hydra API does what it says, on a real in-memory study."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState
from packaging.specifiers import SpecifierSet

from newllm.errors import CompatError, NewllmError
from newllm.sweep import compat

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def study() -> optuna.Study:
    return optuna.create_study(directions=["minimize", "minimize"])


def test_ids_and_storage_are_the_study_s_own(study):
    trial = study.ask()
    storage = compat.study_storage(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    assert compat.study_id(study) == storage.get_study_id_from_name(study.study_name)
    assert storage.get_trial(compat.trial_id(trial)).number == trial.number
    frozen = study.get_trials(deepcopy=False)[0]
    assert compat.trial_id(frozen) == compat.trial_id(trial)


def test_attrs_reach_live_and_frozen_trials(study):
    trial = study.ask()
    compat.set_trial_system_attr(study, trial, "newllm:owner", "host:1")
    frozen = study.get_trials(deepcopy=False)[0]
    compat.set_trial_user_attr(study, frozen, "fail_reason", "why")
    stored = study.get_trials()[0]
    assert stored.system_attrs["newllm:owner"] == "host:1" and stored.user_attrs["fail_reason"] == "why"


def test_trial_of_reports_to_the_same_trial():
    study = optuna.create_study(direction="minimize")
    trial = study.ask()
    handle = compat.trial_of(study, compat.trial_id(trial))
    handle.report(0.5, step=3)
    assert study.get_trials()[0].intermediate_values == {3: 0.5}


def test_open_storage_opens_the_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="s", storage=url)
    assert [s.study_name for s in compat.open_storage(url).get_all_studies()] == ["s"]


def test_finish_pruned_stores_the_objectives_not_the_intermediate_value(study):
    trial = study.ask()
    compat.finish_pruned(study, trial, [1.0, 2.0])
    stored = study.get_trials()[0]
    assert stored.state == TrialState.PRUNED and stored.values == [1.0, 2.0]
    other = study.ask()
    compat.finish_pruned(study, other, None)
    assert study.get_trials()[1].state == TrialState.PRUNED and study.get_trials()[1].values is None


def test_compute_hypervolume_of_two_points():
    points = np.array([[1.0, 2.0], [2.0, 1.0]])
    # two 2x1 boxes up to (3, 3), overlapping in a 1x1 square: 2 + 2 - 1
    assert compat.compute_hypervolume(points, np.array([3.0, 3.0])) == pytest.approx(3.0)


def test_job_error_is_what_the_failed_job_raised():
    err = ValueError("boom")
    ret = JobReturn(status=JobStatus.FAILED, _return_value=err)
    assert compat.job_error(ret) is err


def test_optuna_sweeper_impl_has_what_the_newllm_sweeper_calls():
    impl, create_params = compat.optuna_sweeper_impl()
    assert all(callable(getattr(impl, name)) for name in compat.SWEEPER_IMPL_METHODS)
    space, fixed, _ = create_params(["a=choice(1,2)", "b=3"])
    assert set(space) == {"a"} and fixed == {"b": "3"}  # fixed values stay override strings


def test_installed_versions_are_the_tested_ones():
    ranges = compat.tested_ranges()
    assert set(ranges) == set(compat.TESTED_PACKAGES)  # every package compat wraps is pinned in pyproject.toml
    assert compat.untested_versions() == []


def test_a_version_outside_the_range_is_one_line_naming_package_version_and_range(monkeypatch):
    found = importlib.metadata.version("optuna")
    [line] = compat.untested_versions({"optuna": SpecifierSet("<1")})
    assert line.startswith(f"optuna {found} is outside the range newllm is tested with (optuna<1)")
    monkeypatch.setattr(compat, "tested_ranges", lambda: {"optuna": SpecifierSet("<1")})
    with pytest.warns(compat.CompatWarning) as record:
        compat.check_versions()
    assert [str(w.message) for w in record] == [line]


def test_a_removed_private_api_is_a_compat_error_naming_the_versions():
    with pytest.raises(CompatError) as err:
        compat.study_id(object())  # type: ignore[arg-type]
    assert isinstance(err.value, NewllmError) and isinstance(err.value, ImportError)  # Hydra skips the plugin
    message = str(err.value)
    assert "object._study_id is gone in optuna " in message and "newllm is tested with optuna==" in message


def test_a_sweeper_base_without_a_method_we_call_is_a_compat_error(monkeypatch):
    monkeypatch.setattr(compat, "SWEEPER_IMPL_METHODS", (*compat.SWEEPER_IMPL_METHODS, "_gone"))
    with pytest.raises(CompatError, match=r"OptunaSweeperImpl has no _gone in hydra-optuna-sweeper \S+ \(newllm is "
                                          r"tested with hydra-optuna-sweeper=="):
        compat.optuna_sweeper_impl()
