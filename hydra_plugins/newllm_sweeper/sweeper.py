"""`hydra/sweeper=newllm_optuna`: the official Optuna sweeper, extended where its users need more.

Reused from hydra-optuna-sweeper: config schema, sampler configs and instantiation, the `params`
grammar (`create_params_from_overrides`), trial configuration and grid handling. Added:
  - pruning: each job gets its study/storage/trial id (env, via hydra.job.env_set) and reports
    intermediate values itself (newllm.sweeping); a job that stops raises TrialPruned -> PRUNED;
  - failures: raising or NaN/inf-returning jobs are FAIL with `fail_reason` and are replaced; the sweep
    stops once this run has more than max_failure_rate x n_trials failures; every result is stored
    before anything raises;
  - resume: n_trials counts COMPLETE + PRUNED (+ running) trials of the whole study, and each job
    folder is named by its trial number, so a re-run continues and never overwrites;
  - traceability: run_dir, overrides and every metric of metrics.json in each trial's user attrs.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.newllm_sweeper import config as _config  # noqa: F401  (registers configs + presets)
from newllm import sweeping
from newllm.errors import NewllmError

log = logging.getLogger(__name__)
OWNER = f"{socket.gethostname()}:{os.getpid()}"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class SweepAborted(NewllmError):
    """Too many failed trials (every result was stored before this was raised)."""


class NewllmOptunaSweeper(OptunaSweeper):
    def __init__(self, *, pruner: Any, early_stop: Any, report: Sequence[str], subdir: str, **official: Any) -> None:
        super().__init__(**official)  # instantiates the sampler exactly as the official plugin does
        self.sweeper = NewllmOptunaSweeperImpl(
            self.sweeper.sampler, **{k: v for k, v in official.items() if k != "sampler"},
            pruner=pruner, early_stop=early_stop, report=report, subdir=subdir)


class NewllmOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, sampler: Any, *, pruner: Any, early_stop: Any, report: Sequence[str], subdir: str,
                 **official: Any) -> None:
        super().__init__(sampler, **official)
        self.task_spec = {"pruner": _plain(pruner), "early_stop": _plain(early_stop), "report": list(report)}
        self.subdir = subdir
        self.last_failure = ""
        if self.n_trials < 1:
            raise ValueError(f"hydra.sweeper.n_trials={self.n_trials} is not allowed: expected an integer >= 1")

    # ------------------------------------------------------------------ the loop
    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        space, fixed_params, fixed_overrides = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments))
        for name in fixed_params:
            space.pop(name, None)
        if isinstance(self.sampler, functools.partial) and self.sampler.func is optuna.samplers.GridSampler:
            grid = {k: self._to_grid_sampler_choices(d) for k, d in space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        directions = self._get_directions()
        study = self._open_study(directions)
        self._fail_abandoned(study)

        launched = failures = 0
        while (todo := self.n_trials - len(study.get_trials(deepcopy=False, states=COUNTED))) > 0:
            trials = self._ask(study, min(todo, self.n_jobs))
            if not trials:
                continue
            overrides = self._configure_trials(trials, space, fixed_params, fixed_overrides)
            overrides = [(*o, *self._job_overrides(study, t)) for o, t in zip(overrides, trials, strict=True)]
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException as err:  # launcher crash / Ctrl-C: no trial stays RUNNING
                for t in trials:
                    self._tell_fail(study, t, f"launcher: {type(err).__name__}: {err}")
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                failures += self._tell(study, trial, ret, len(directions)) == TrialState.FAIL
            launched += len(returns)
            if failures > self.max_failure_rate * self.n_trials:
                self._save_results(study, directions)
                raise SweepAborted(
                    f"sweep stopped: {failures} of {launched} trials failed in this run, more than max_failure_rate="
                    f"{self.max_failure_rate} x n_trials={self.n_trials} (last: {self.last_failure}); every reason "
                    f"is in user attr fail_reason of study {study.study_name!r}")
        self._save_results(study, directions)

    # ------------------------------------------------------------------ study and trials
    def _open_study(self, directions: list[str]) -> optuna.Study:
        self.storage = _absolute_sqlite(self.storage)
        for attempt in range(5):
            try:
                study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                            directions=directions, load_if_exists=True)
                break
            except sqlalchemy.exc.IntegrityError:  # another worker is creating the same empty schema right now
                if attempt == 4:
                    raise
                time.sleep(1.0 + attempt)
        have = [d.name.lower() for d in study.directions]
        if have != list(directions):
            raise ValueError(f"hydra.sweeper.direction={list(directions)} does not match study "
                             f"{study.study_name!r}, which has {have}: pick another hydra.sweeper.study_name")
        if self.storage is None:
            sweeping.IN_PROCESS_STUDIES[study.study_name] = study
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        log.info("Study %s in %s: %d of %d trials done; sampler %s, directions %s", study.study_name,
                 self.storage, done, self.n_trials, type(self.sampler).__name__, directions)
        return study

    def _ask(self, study: optuna.Study, n: int) -> list[optuna.Trial]:
        """Ask n trials; one that another worker made surplus in the meantime is dropped (FAIL, not counted)."""
        trials = []
        for _ in range(n):
            trial = study.ask()
            study._storage.set_trial_system_attr(trial._trial_id, "newllm:owner", OWNER)
            ahead = sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=COUNTED))
            if ahead >= self.n_trials:
                self._tell_fail(study, trial, f"surplus: the study already held n_trials={self.n_trials} trials")
            else:
                trials.append(trial)
        return trials

    def _fail_abandoned(self, study: optuna.Study) -> None:
        """RUNNING trials left by a sweep process on this host that no longer exists (killed, crashed)."""
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get("newllm:owner", "")
            h, _, pid = owner.rpartition(":")
            if h == host and pid.isdigit() and not _alive(int(pid)):
                self._tell_fail(study, t, f"abandoned: sweep process {owner} is gone")

    def _job_overrides(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        study._storage.set_trial_system_attr(trial._trial_id, sweeping.SPEC_ATTR, self.task_spec)
        env = {sweeping.ENV_STORAGE: self.storage or "", sweeping.ENV_STUDY: study.study_name,
               sweeping.ENV_TRIAL: str(trial._trial_id)}
        return [f"hydra.sweep.subdir={self.subdir.format(number=trial.number)}",
                *(f"++hydra.job.env_set.{k}={_quote(v)}" for k, v in env.items())]

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn, n_objectives: int) -> TrialState:
        run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else None
        attrs = {"run_dir": str(run_dir), "overrides": list(ret.overrides or [])}
        if run_dir is not None and (run_dir / "metrics.json").is_file():
            attrs.update(json.loads((run_dir / "metrics.json").read_text()))
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if ret.status == JobStatus.FAILED:
            err = ret._return_value
            if isinstance(err, optuna.TrialPruned):
                trial.set_user_attr("pruned_reason", str(err))
                study.tell(trial, state=TrialState.PRUNED)
                log.info("Trial %d pruned: %s", trial.number, err)
                return TrialState.PRUNED
            return self._tell_fail(study, trial, f"{type(err).__name__}: {err}")
        values, problem = _objective_values(ret.return_value, n_objectives)
        if problem:
            return self._tell_fail(study, trial, problem)
        try:
            study.tell(trial, values)
        except RuntimeError as err:  # GridSampler calls study.stop() once the grid is done; the trial is stored
            if "Study.stop" not in str(err):
                raise
        return TrialState.COMPLETE

    def _tell_fail(self, study: optuna.Study, trial: optuna.Trial | FrozenTrial, reason: str) -> TrialState:
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, reason)
        self.last_failure = reason
        return TrialState.FAIL

    def _save_results(self, study: optuna.Study, directions: list[str]) -> None:
        """optimization_results.yaml in the official format, plus the study's trial counts."""
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "storage": self.storage}
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete and len(directions) == 1:
            results.update(best_params=study.best_trial.params, best_value=study.best_trial.value)
        elif complete:
            results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
        results["n_trials"] = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                               for s in TrialState}
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")


def _objective_values(ret: Any, n: int) -> tuple[list[float], str | None]:
    try:
        values = [float(ret)] if n == 1 else [float(v) for v in ret]
    except (TypeError, ValueError):
        return [], f"the task returned {ret!r}: expected {'a float' if n == 1 else f'{n} floats'}"
    if len(values) != n:
        return [], f"the task returned {len(values)} values for {n} objectives"
    if not all(math.isfinite(v) for v in values):
        return [], f"the task returned a non-finite objective: {values}"
    return values, None


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _absolute_sqlite(url: str | None) -> str | None:
    """sqlite:///rel/path -> sqlite:////abs/path (jobs may run elsewhere); creates the parent folder."""
    if not url or not str(url).startswith("sqlite:///"):
        return url
    path = Path(str(url).removeprefix("sqlite:///")).resolve()  # sqlite:////abs keeps its leading /
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
