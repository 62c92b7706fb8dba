"""`hydra/sweeper=newllm_optuna`: the official Optuna sweeper, extended where its users need more.

Reused from hydra-optuna-sweeper: config schema, sampler configs and instantiation, the `params`
grammar (`create_params_from_overrides`), trial configuration and grid handling. Added:
  - pruning: each job gets its study/storage/trial id (env, via hydra.job.env_set) and reports
    intermediate values itself (newllm.sweep.hooks); a job that stops raises TrialPruned -> PRUNED;
  - failures: raising or NaN/inf-returning jobs are FAIL with `fail_reason` and are replaced; the sweep
    stops once this run has more than max_failure_rate x n_trials failures; every result is stored
    before anything raises;
  - resume: n_trials counts COMPLETE + PRUNED (+ running) trials of the whole study, and a re-run reseeds
    the sampler from (seed, trials in the study), so it continues the search instead of replaying it; a trial
    left RUNNING by a killed sweep is recovered from its job folder when its job had finished, else FAIL;
  - job folders: named by trial number; the sweep folder and each job folder carry an owner record
    (OWNER_FILE: storage, study, trial), and a sweep never writes into a folder it does not own;
  - names and values: the study's metric names are the config's `objectives`; a pruned trial's value is its
    objective at the step it stopped, not the intermediate value the pruner compared;
  - passwords: what this sweeper writes or logs shows the storage URL masked (newllm.sweep.storage); each job
    resolves the real URL in its own environment (newllm.sweep.hooks.job_storage_url);
  - traceability: run_dir, overrides and every metric of metrics.json in each trial's user attrs;
  - sampler seeds: every study's sampler is seeded from (hydra.sweeper.sampler.seed, the study's name)
    (study_seed), so studies of different models never share proposals;
  - several studies in one command (`studies`: a label -> fixed overrides and extra params), and the best
    trial of each re-run with `rerun_best.seeds` as trials of study <study>_reruns (user attrs rerun_of,
    rerun_seed, rerun_label; their folder holds rerun_best.json with the tuned params).
The private parts of hydra-optuna-sweeper and Optuna it relies on (the `_impl` base class, storage and
trial ids, a job's exception) are reached only through newllm.sweep.compat, which checks their versions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import socket
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from hydra_plugins.newllm_sweeper import config as _config  # noqa: F401  (registers configs + presets)
from newllm.config import check_directions
from newllm.errors import ConfigError, FolderOwned, SweepAborted, exit_one_line  # importable from here as before
from newllm.runtime import rundirs
from newllm.runtime.fileio import save_text
from newllm.sweep import compat, hooks
from newllm.sweep import storage as storages

log = logging.getLogger(__name__)
OWNER = f"{socket.gethostname()}:{os.getpid()}"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
OWNER_FILE = rundirs.OWNER_FILE  # in the sweep folder and in each job folder: which study (and trial) owns it
SAMPLERS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")  # what the official plugin instantiates
OptunaSweeperImpl, create_params_from_overrides = compat.optuna_sweeper_impl()  # private in hydra-optuna-sweeper


@dataclasses.dataclass
class StudyPlan:
    """One study of a sweep: what differs between the studies of one command (`studies`, `<study>_reruns`).

    The sweeper's own attributes hold only what every study shares (storage, directions, launcher); each study's
    name, search space, sampler, folder and trial count travel in its plan."""

    name: str | None
    sweep_dir: Path
    params: dict[str, Any]  # the search space as in hydra.sweeper.params: key -> override grammar
    sampler: Any
    sampler_config: Any
    n_trials: int
    label: str | None = None

    def search_overrides(self) -> list[str]:
        return [f"{k!s}={v}" for k, v in self.params.items()]

    def reruns(self) -> StudyPlan:
        """Study <name>_reruns, folder <sweep_dir>/reruns: where the best trial is re-run per seed."""
        return dataclasses.replace(self, name=f"{self.name}_reruns", sweep_dir=self.sweep_dir / "reruns")


class NewllmOptunaSweeper(OptunaSweeper):
    def __init__(self, *, pruner: Any, early_stop: Any, report: Sequence[str], subdir: str, studies: Any = None,
                 rerun_best: Any = None, **official: Any) -> None:
        super().__init__(**official)  # instantiates the sampler exactly as the official plugin does
        self.sweeper = NewllmOptunaSweeperImpl(
            self.sweeper.sampler, **{k: v for k, v in official.items() if k != "sampler"},
            sampler_config=official["sampler"], pruner=pruner, early_stop=early_stop, report=report, subdir=subdir,
            studies=_plain(studies) or {}, rerun_seeds=list((_plain(rerun_best) or {}).get("seeds") or []))

    def sweep(self, arguments: list[str]) -> None:
        try:
            return self.sweeper.sweep(arguments)
        except ConfigError as err:  # bad settings or a folder it does not own: one line, as newllm.run prints them
            exit_one_line(err)


class NewllmOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, sampler: Any, *, sampler_config: Any, pruner: Any, early_stop: Any, report: Sequence[str],
                 subdir: str, studies: dict | None = None, rerun_seeds: Sequence[int] = (), **official: Any) -> None:
        super().__init__(sampler, **official)
        self.studies = dict(studies or {})
        self.rerun_seeds = [int(s) for s in rerun_seeds]
        self.sampler_config = sampler_config
        self.task_spec = {"pruner": _plain(pruner), "early_stop": _plain(early_stop), "report": list(report)}
        self.subdir = subdir
        self.last_failure = ""

    # ------------------------------------------------------------------ the loop
    def sweep(self, arguments: list[str]) -> None:
        self._check_settings()
        self._process_searchspace_config()
        self.storage = _absolute_sqlite(self.storage)
        for plan, overrides in self._plans():
            self._sweep_study([*arguments, *overrides], plan)

    def _plans(self) -> list[tuple[StudyPlan, list[str]]]:
        """Each study this command runs (several with `studies`, one after another, or just this one) with its
        fixed overrides; each study's sampler seeded from its name (study_seed)."""
        base_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        plans = []
        for label, study in (self.studies or {None: {}}).items():
            name = self.study_name if label is None else f"{self.study_name}_{label}"
            sampler_config = _seeded_for(self.sampler_config, name)
            fresh = sampler_config and (label is not None or sampler_config is not self.sampler_config)
            sampler = instantiate(sampler_config, _execution_whitelist_=SAMPLERS) if fresh else self.sampler
            plan = StudyPlan(name=name, sweep_dir=base_dir if label is None else base_dir / label,
                             params={**(self.params or {}), **(study.get("params") or {})}, sampler=sampler,
                             sampler_config=sampler_config, n_trials=self.n_trials, label=label)
            plans.append((plan, list(study.get("overrides") or [])))
        return plans

    def _sweep_study(self, arguments: list[str], plan: StudyPlan) -> None:
        space, fixed_params, fixed_overrides = create_params_from_overrides(plan.search_overrides() + arguments)
        for name in fixed_params:
            space.pop(name, None)
        if isinstance(plan.sampler, functools.partial) and plan.sampler.func is optuna.samplers.GridSampler:
            grid = {k: self._to_grid_sampler_choices(d) for k, d in space.items()}
            plan.sampler = plan.sampler(grid)
            plan.n_trials = min(plan.n_trials, math.prod(len(v) for v in grid.values()))
        directions = self._get_directions()
        names = None if "objectives" in space else self._objective_names(directions)
        self._check_sweep_dir_owner(plan)  # before the study is opened: a refusal leaves no trace
        study = self._open_study(plan, directions, names)
        if plan.label is not None:
            study.set_user_attr("label", plan.label)
        self._fail_abandoned(plan, study)
        self._continue_search(plan, study)
        self._claim_sweep_dir(plan, study)

        launched = failures = 0
        while (todo := plan.n_trials - len(study.get_trials(deepcopy=False, states=COUNTED))) > 0:
            trials = self._ask(plan, study, min(todo, self.n_jobs))
            if not trials:
                continue
            overrides = self._configure_trials(trials, space, fixed_params, fixed_overrides)
            failures += self._launch(plan, study, trials, overrides, len(directions))
            launched += len(trials)
            if failures > self.max_failure_rate * plan.n_trials:
                self._save_results(plan, study, directions)
                raise SweepAborted(
                    f"sweep stopped: {failures} of {launched} trials failed in this run, more than max_failure_rate="
                    f"{self.max_failure_rate} x n_trials={plan.n_trials} (last: {self.last_failure}); every reason "
                    f"is in user attr fail_reason of study {study.study_name!r}")
        self._save_results(plan, study, directions)
        if self.rerun_seeds:
            self._rerun_best(plan, study, space, fixed_params, fixed_overrides, directions, names)

    def _launch(self, plan: StudyPlan, study: optuna.Study, trials: list[optuna.Trial],
                overrides: Sequence[Sequence[str]], n_objectives: int) -> int:
        """Run the trials' jobs in their own folders and tell the study; returns how many failed."""
        folders = self._make_job_folders(plan, study, trials)
        overrides = [(*o, *self._job_overrides(plan, study, t, f)) for o, t, f in zip(overrides, trials, folders,
                                                                                       strict=True)]
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        except BaseException as err:  # launcher crash / Ctrl-C: no trial stays RUNNING
            for t in trials:
                self._tell_fail(study, t, f"launcher: {type(err).__name__}: {err}")
            raise
        self.job_idx += len(returns)
        return sum(self._tell(study, trial, ret, n_objectives, folder) == TrialState.FAIL
                   for trial, ret, folder in zip(trials, returns, folders, strict=True))

    def _rerun_best(self, tuned: StudyPlan, study: optuna.Study, space: dict, fixed_params: dict,
                    fixed_overrides: list[str], directions: list[str], names: list[str] | None) -> None:
        """The best trial's params once per seed in rerun_best.seeds: trials of study <study>_reruns (the same
        distributions, enqueued values), so they carry every metric in their user attrs like any trial."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete or len(directions) != 1:
            raise ConfigError(f"hydra.sweeper.rerun_best.seeds={self.rerun_seeds} needs a single-objective study "
                              f"with a complete trial; study {study.study_name!r} has {len(complete)}")
        best, plan = study.best_trial, tuned.reruns()
        self._check_sweep_dir_owner(plan)
        reruns = self._open_study(plan, directions, names, planned=len(self.rerun_seeds))
        self._claim_sweep_dir(plan, reruns)
        done = {t.user_attrs.get("rerun_seed") for t in reruns.get_trials(deepcopy=False, states=COUNTED)}
        todo = [s for s in self.rerun_seeds if s not in done]
        tag = {"rerun_of": best.number, "rerun_study": study.study_name, "rerun_label": tuned.label}
        for seed in todo:
            reruns.enqueue_trial(best.params, user_attrs={**tag, "rerun_seed": seed}, skip_if_exists=False)
        trials = [reruns.ask() for _ in todo]
        overrides = [(*o, f"seed={t.user_attrs['rerun_seed']}")
                     for o, t in zip(self._configure_trials(trials, space, {k: v for k, v in fixed_params.items()
                                                                             if k != "seed"}, fixed_overrides),
                                     trials, strict=True)]
        if trials:
            self._launch(plan, reruns, trials, overrides, len(directions))
        record = {**tag, "label": tuned.label, "best_value": best.value, "params": best.params,
                  "fixed": {k: v for k, v in fixed_params.items() if k != "seed"}, "seeds": self.rerun_seeds}
        save_text(plan.sweep_dir / "rerun_best.json", json.dumps(record, indent=1, default=str) + "\n")
        self._save_results(plan, reruns, directions)

    # ------------------------------------------------------------------ settings
    def _check_settings(self) -> None:
        """Settings that would leak a password, share job folders or run nothing: refused before anything is opened."""
        if self.n_trials < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials} is not allowed: expected an integer >= 1")
        storages.check_not_written(self.config)  # newllm.runtime.preflight checked it already, for any sweeper
        if self.subdir.format(number=0) == self.subdir.format(number=1):
            raise ConfigError(f"hydra.sweeper.subdir={self.subdir!r} is not allowed: it must contain {{number}}, "
                              "so that every trial gets a job folder of its own")

    def _objective_names(self, directions: list[str]) -> list[str]:
        """The config's `objectives`: what the task returns, in order, hence the study's metric names."""
        names = [str(n) for n in self.config.get("objectives") or []]
        check_directions(names, directions)
        return names

    # ------------------------------------------------------------------ study and trials
    def _open_study(self, plan: StudyPlan, directions: list[str], names: list[str] | None,
                    planned: int | None = None) -> optuna.Study:
        """The study (created if new), checked against the directions and names; `planned`: its trial count
        as logged (n_trials; a reruns study runs one per seed)."""
        study = storages.create_study(study_name=plan.name, storage=self.storage, sampler=plan.sampler,
                                      directions=directions)  # many workers may start on a fresh database at once
        have = [d.name.lower() for d in study.directions]
        if have != list(directions):
            raise ConfigError(f"hydra.sweeper.direction={list(directions)} does not match study "
                             f"{study.study_name!r}, which has {have}: pick another hydra.sweeper.study_name")
        if names is not None and study.metric_names is None:
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what every client reads
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)  # what optuna-dashboard, the optuna CLI and newllm.analysis show
        elif names is not None and list(study.metric_names) != names:
            raise ConfigError(f"objectives={names} do not match study {study.study_name!r}, which optimises "
                              f"{study.metric_names}: pick another hydra.sweeper.study_name")
        if self.storage is None:
            hooks.IN_PROCESS_STUDIES[study.study_name] = study
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        log.info("Study %s in %s: %d of %d trials done; sampler %s, directions %s", study.study_name,
                 storages.masked(self.storage), done, planned or plan.n_trials, type(plan.sampler).__name__,
                 directions)
        return study

    def _continue_search(self, plan: StudyPlan, study: optuna.Study) -> None:
        """A seeded sampler restarts its random stream in every process: re-running a study would propose again
        what the first run proposed (TPE's startup points, NSGA-II's first generation). Reseeding it from (seed,
        trials in the study) keeps a fresh study's seed, continues a resumed one, and both stay reproducible.
        QMC continues its sequence by sample id and a grid picks unvisited points: they keep their seed."""
        seed = (plan.sampler_config or {}).get("seed")
        trials = len(study.get_trials(deepcopy=False))
        if seed is None or trials == 0 or isinstance(plan.sampler, (optuna.samplers.QMCSampler,
                                                                     optuna.samplers.GridSampler)):
            return
        new_seed = int(np.random.SeedSequence([int(seed), trials]).generate_state(1)[0])
        plan.sampler = instantiate(OmegaConf.merge(plan.sampler_config, {"seed": new_seed}),
                                   _execution_whitelist_=SAMPLERS)
        study.sampler = plan.sampler
        log.info("Sampler reseeded from seed %d to %d: the study holds %d trials, so this run continues its "
                 "search instead of replaying the seed's proposals", seed, new_seed, trials)

    # ------------------------------------------------------------------ folders it owns
    def _owner(self, study: optuna.Study, trial: optuna.Trial | None = None) -> dict[str, Any]:
        record = {"storage": storages.masked(self.storage) or "memory (hydra.sweeper.storage=null)",
                  "storage_id": storages.identity(self.storage),
                  "study": study.study_name, "study_id": compat.study_id(study)}
        return record if trial is None else {**record, "trial": trial.number}

    def _check_sweep_dir_owner(self, plan: StudyPlan) -> None:
        owner = _read_owner(plan.sweep_dir)
        if owner and (owner.get("storage_id"), owner.get("study")) != (storages.identity(self.storage), plan.name):
            raise FolderOwned(f"hydra.sweep.dir={plan.sweep_dir} holds the job folders of study {owner.get('study')!r} "
                              f"in {owner.get('storage')}: a sweep writes only into its own folders; pick another "
                              "hydra.sweep.dir")

    def _claim_sweep_dir(self, plan: StudyPlan, study: optuna.Study) -> None:
        """Record this study as the sweep folder's owner. A folder without a record (made before newllm kept one)
        is claimed only if each job folder in it is the run_dir of one of this study's trials."""
        owner = _read_owner(plan.sweep_dir)
        if owner is None:
            made = {str(t.user_attrs.get("run_dir")) for t in study.get_trials(deepcopy=False)}
            foreign = [p for p in _job_folders(plan.sweep_dir) if str(p) not in made]
            if foreign:
                raise FolderOwned(f"hydra.sweep.dir={plan.sweep_dir} holds job folders that are not trials of study "
                                  f"{study.study_name!r} (e.g. {foreign[0].name}): pick another hydra.sweep.dir")
            _write_owner(plan.sweep_dir, self._owner(study))
        elif owner.get("study_id") != compat.study_id(study):
            raise FolderOwned(f"hydra.sweep.dir={plan.sweep_dir} belongs to an earlier study {study.study_name!r} "
                              f"(id {owner.get('study_id')}) in {owner.get('storage')}, since deleted: pick another "
                              "hydra.sweep.dir")

    def _make_job_folders(self, plan: StudyPlan, study: optuna.Study, trials: list[optuna.Trial]) -> list[Path]:
        """Each trial's job folder, made here (it must not exist yet) with its owner record, before any job runs."""
        made: list[Path] = []
        for trial in trials:
            folder = plan.sweep_dir / self.subdir.format(number=trial.number)
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                for path in made:  # nothing ran in them: leave no empty job folders behind
                    shutil.rmtree(path)
                reason = (f"job folder {folder} exists: trial {trial.number} of study {study.study_name!r} writes "
                          "only into a folder it made; move that folder away or pick another hydra.sweep.dir")
                for t in trials:
                    self._tell_fail(study, t, reason)
                raise FolderOwned(reason) from None
            _write_owner(folder, self._owner(study, trial))
            made.append(folder)
        return made

    def _ask(self, plan: StudyPlan, study: optuna.Study, n: int) -> list[optuna.Trial]:
        """Ask n trials; one that another worker made surplus in the meantime is dropped (FAIL, not counted)."""
        trials = []
        for _ in range(n):
            trial = study.ask()
            compat.set_trial_system_attr(study, trial, "newllm:owner", OWNER)
            ahead = sum(t.number < trial.number for t in study.get_trials(deepcopy=False, states=COUNTED))
            if ahead >= plan.n_trials:
                self._tell_fail(study, trial, f"surplus: the study already held n_trials={plan.n_trials} trials")
            else:
                trials.append(trial)
        return trials

    def _fail_abandoned(self, plan: StudyPlan, study: optuna.Study) -> None:
        """RUNNING trials left by a sweep process on this host that no longer exists (killed, crashed): a trial
        whose job finished before the kill is recovered from its folder (`_recover`), the others are FAIL."""
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get("newllm:owner", "")
            h, _, pid = owner.rpartition(":")
            if h == host and pid.isdigit() and not _alive(int(pid)) and not self._recover(plan, study, t, owner):
                self._tell_fail(study, t, f"abandoned: sweep process {owner} is gone")

    def _recover(self, plan: StudyPlan, study: optuna.Study, trial: FrozenTrial, owner: str) -> bool:
        """Tell the study a trial whose job finished although its sweep process was killed before telling it: the
        job folder this sweeper made for it (its owner record names this study and trial) holds the complete
        metrics.json (written atomically, last) and the overrides it ran with, which must hold the trial's params.
        Its values are the objectives of the job's own config, as the task returned them. False: not finished."""
        folder = plan.sweep_dir / self.subdir.format(number=trial.number)
        record = _read_owner(folder) or {}
        job = _finished_job(folder)
        if job is None or (record.get("study_id"), record.get("trial")) != (compat.study_id(study), trial.number):
            return False
        overrides, objectives, metrics = job
        if any(f"{name}={value}" not in overrides for name, value in trial.params.items()):
            return False  # not the params the study gave this trial: not its result
        reason = f"recovered from {folder}: its job finished, sweep process {owner} was gone before recording it"
        for key, value in {"run_dir": str(folder), "overrides": overrides, **metrics, "recovered": reason}.items():
            compat.set_trial_user_attr(study, trial, key, value)
        returned = [float(metrics.get(name, math.nan)) for name in objectives]  # what newllm.run returned
        values, problem = _objective_values(returned[0] if len(returned) == 1 else returned, len(study.directions))
        if problem:
            self._tell_fail(study, trial, problem)
        else:
            study.tell(trial.number, values)
            log.info("Trial %d %s", trial.number, reason)
        return True

    def _job_overrides(self, plan: StudyPlan, study: optuna.Study, trial: optuna.Trial, folder: Path) -> list[str]:
        compat.set_trial_system_attr(study, trial, hooks.SPEC_ATTR, self.task_spec)
        # Hydra writes env_set resolved into the job's .hydra/hydra.yaml: the storage goes there masked, and the
        # job resolves the real URL in its own environment (hooks.job_storage_url).
        env = {hooks.ENV_STORAGE: storages.masked(self.storage), hooks.ENV_STUDY: study.study_name,
               hooks.ENV_TRIAL: str(compat.trial_id(trial))}
        return [f"hydra.sweep.dir={_quote(str(plan.sweep_dir))}",  # the folder made above, wherever the job runs
                f"hydra.sweep.subdir={_quote(str(folder.relative_to(plan.sweep_dir)))}",
                *(f"++hydra.job.env_set.{k}={_quote(v)}" for k, v in env.items())]

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn, n_objectives: int,
              folder: Path) -> TrialState:
        # a job that died before Hydra set it up (killed on a cluster) returns no config: its folder is still `folder`
        run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else folder
        attrs = {"run_dir": str(run_dir), "overrides": list(ret.overrides or [])}
        if run_dir is not None:
            attrs.update(_metrics(run_dir) or {})
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, hooks.Pruned):
            return self._tell_pruned(study, trial, ret.return_value.reason, ret.return_value.values)
        if ret.status == JobStatus.FAILED:
            err = compat.job_error(ret)
            if isinstance(err, optuna.TrialPruned):
                return self._tell_pruned(study, trial, str(err), getattr(err, "values", None))
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

    def _tell_pruned(self, study: optuna.Study, trial: optuna.Trial, reason: str,
                     values: list[float] | None) -> TrialState:
        """PRUNED, valued by its objectives at the step it stopped (none if they were not all measured yet).

        study.tell(state=PRUNED) would store the last *intermediate* value: what the pruner compared (a
        validation loss, 1 - convergence), so a pruned trial showed 5.2 among perplexities of 200. Pruners and
        samplers read the intermediate values, which stay as reported; this does what tell() does otherwise.
        """
        trial.set_user_attr("pruned_reason", reason)
        values = [float(v) for v in values] if values and len(values) == len(study.directions) else None
        compat.finish_pruned(study, trial, values)
        log.info("Trial %d pruned: %s", trial.number, reason)
        return TrialState.PRUNED

    def _tell_fail(self, study: optuna.Study, trial: optuna.Trial | FrozenTrial, reason: str) -> TrialState:
        compat.set_trial_user_attr(study, trial, "fail_reason", reason)
        study.tell(trial.number, state=TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, reason)
        self.last_failure = reason
        return TrialState.FAIL

    def _save_results(self, plan: StudyPlan, study: optuna.Study, directions: list[str]) -> None:
        """optimization_results.yaml in the official format, plus the study's trial counts."""
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name,
                                   "storage": storages.masked(self.storage)}
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete and len(directions) == 1:
            results.update(best_params=study.best_trial.params, best_value=study.best_trial.value)
        elif complete:
            results["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
        results["n_trials"] = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
                               for s in TrialState}
        save_text(plan.sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(OmegaConf.create(results)))


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


def study_seed(seed: int, study_name: str) -> int:
    """The sampler seed study `study_name` runs with: SeedSequence([seed, CRC-32 of the name]). Studies of
    different models over one space (compare_models' studies, compare_architectures' two commands) would
    otherwise get the same proposals from one hydra.sweeper.sampler.seed; the same study gets the same seed
    on every run (and a resumed one is reseeded from it, _continue_search)."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(study_name.encode())]).generate_state(1)[0])


def _seeded_for(sampler_config: Any, study_name: str | None) -> Any:
    """sampler_config with its seed replaced by study_seed(seed, study_name); the same object if it has no seed
    (or the study no name: Optuna then makes one up)."""
    seed = (sampler_config or {}).get("seed")
    if seed is None or study_name is None:
        return sampler_config
    derived = study_seed(seed, study_name)
    log.info("Study %s: sampler seed %d (study_seed of hydra.sweeper.sampler.seed=%s and the study name)",
             study_name, derived, seed)
    return OmegaConf.merge(sampler_config, {"seed": derived})


def _metrics(run_dir: Path) -> dict[str, Any] | None:
    """A job's metrics.json (written atomically when the run finished), or None."""
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finished_job(folder: Path) -> tuple[list[str], list[str], dict[str, Any]] | None:
    """(overrides, objectives, metrics) of a job that finished in `folder`, from what Hydra and the run wrote there;
    None when it did not finish (no metrics.json) or its .hydra/ files are missing."""
    metrics = _metrics(folder)
    hydra_dir = folder / ".hydra"
    if metrics is None or not (hydra_dir / "overrides.yaml").is_file() or not (hydra_dir / "config.yaml").is_file():
        return None
    overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    objectives = [str(o) for o in OmegaConf.load(hydra_dir / "config.yaml").get("objectives") or []]
    return overrides, objectives, metrics


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _absolute_sqlite(url: str | None) -> str | None:
    """sqlite:///rel/path -> sqlite:////abs/path (jobs may run elsewhere); creates the parent folder."""
    url = storages.absolute_sqlite(url)
    if url and url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url


def _read_owner(folder: Path) -> dict[str, Any] | None:
    path = folder / OWNER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_owner(folder: Path, owner: dict[str, Any]) -> None:
    save_text(folder / OWNER_FILE, json.dumps(owner, indent=1) + "\n")


def _job_folders(folder: Path) -> list[Path]:
    """Folders below `folder` that Hydra made for a job (they hold .hydra/)."""
    return sorted(p.parent.parent for p in folder.glob("**/.hydra/config.yaml")) if folder.is_dir() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
