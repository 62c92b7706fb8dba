"""Trial side of `hydra/sweeper=newllm_optuna`: report intermediate values, prune, stop by rules.

The sweeper hands each job its study, storage and trial id through environment variables (set
per job with hydra.job.env_set, so they reach joblib/submitit workers too; the storage URL there has
its password masked, see job_storage_url). `attach_trial`
re-attaches to that trial through the shared storage and registers a RunTracker hook, which sees
every Phase-1 iteration and Phase-2 epoch row. It raises `TrialPruned` when the pruner or an
early-stop rule says so; the run returns `Pruned` and the sweeper records the trial as PRUNED with
the reason, valued by its objectives at that step. Optuna's private parts (the storage of an
in-process study, a trial handle from its id) are reached through newllm.sweep.compat.

Intermediate values (single-objective studies only; Optuna forbids report() with several):
  Phase 1 iteration k -> step k, value -val_converged_gain (maximize studies: val_converged_gain, the
                         Phase-1 objective), at the iterations that measure validation (every
                         training.phase1.val_every)
  Phase 2 evaluation e -> step phase1.max_iterations + 1 + e (from 1; one per epoch unless eval_every),
                         value val_loss (maximize: -val_loss)
so every trial of a study reports each phase at the same steps, and PhaseWisePruner lets the
configured pruner see only the current phase of the trial: pruners compare like with like.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hydra
import optuna
import torch
from omegaconf import DictConfig

from newllm import keys, metrics
from newllm.config import EarlyStopConfig
from newllm.errors import ConfigError, first_line
from newllm.models import evaluating
from newllm.sweep import compat
from newllm.sweep import storage as storages

ENV_STORAGE, ENV_STUDY, ENV_TRIAL = "NEWLLM_OPTUNA_STORAGE", "NEWLLM_OPTUNA_STUDY", "NEWLLM_OPTUNA_TRIAL_ID"
SPEC_ATTR = "newllm:task"  # trial system attr: {"pruner": cfg, "early_stop": rules, "report": [phases]}
IN_PROCESS_STUDIES: dict[str, Any] = {}  # studies without storage, reachable only by in-process jobs


class TrialPruned(optuna.TrialPruned):
    """Stop this trial; the sweeper records it PRUNED with this message as `pruned_reason` and `values` (the
    objectives at the step it stopped; None until all of them were measured) as its values."""

    def __init__(self, reason: str, values: list[float] | None = None) -> None:
        super().__init__(reason)
        self.values = values


@dataclass(frozen=True)
class Pruned:
    """What a pruned run returns to the sweeper: a result, so its run.log says 'trial pruned', not 'Job failed'."""

    reason: str
    values: list[float] | None


class PhaseWisePruner(optuna.pruners.BasePruner):
    """The configured pruner, shown only the current phase's intermediate values of this trial.

    Pruners such as MedianPruner compare a trial's *best* value so far with other trials at the
    current step; Phase-1 values (the converged gain, in [-1, 1]) and Phase-2 losses are not comparable.
    Other trials are compared at the same step, hence within the same phase already.
    """

    def __init__(self, pruner: optuna.pruners.BasePruner, phase2_start: int) -> None:
        self.pruner, self.phase2_start = pruner, phase2_start

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        in_phase2 = (trial.last_step or 0) >= self.phase2_start
        trial = copy.deepcopy(trial)
        trial.intermediate_values = {s: v for s, v in trial.intermediate_values.items()
                                     if (s >= self.phase2_start) == in_phase2}
        return self.pruner.prune(study, trial)


def early_stop_reason(row: dict, rules: EarlyStopConfig, context_dim: int, identity_score: Callable[[], float]
                      ) -> str | None:
    """The first early-stop rule this history row breaks, as a one-line reason (None: carry on).

    The rank rule reads the training contexts' rank (every erank_every iterations) and the held-out
    one (every val_every): a collapsed f converges from c = 0 in one sweep. The Phase-1 objective
    (phase1/val_converged_gain) already scores it 0, like a memoryless f; the rule stops such a trial early.
    """
    if rules.nan_loss:
        bad = {k: v for k, v in row.items() if k.endswith("loss") and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            return f"nan_loss: {bad} at {row.get(keys.HISTORY_PHASE)} step {row.get(keys.HISTORY_STEP)}"
    if row.get(keys.HISTORY_PHASE) != keys.PHASE1 or row.get(keys.HISTORY_STEP, 0) < rules.grace_iterations:
        return None
    ratio = rules.min_effective_rank_ratio
    for key, which in ((keys.P1_EFFECTIVE_RANK, "effective rank"),
                       (keys.P1_VAL_EFFECTIVE_RANK, "held-out effective rank")):
        erank = row.get(key)
        if ratio > 0 and erank is not None and not erank / context_dim >= ratio:  # `not >=`: NaN collapses too
            return (f"effective_rank_collapse: {which} {erank:.2f}/{context_dim} = {erank / context_dim:.3f} "
                    f"< min_effective_rank_ratio={ratio} at iteration {row['step']}")
    limit = rules.max_identity_score
    if limit is not None and keys.P1_EFFECTIVE_RANK in row:  # checked with the rank, every erank_every iterations
        score = identity_score()
        if score > limit:
            return (f"identity_mapping: identity score {score:.3f} > max_identity_score={limit} "
                    f"at iteration {row['step']}")
    return None


def phase2_start(cfg: DictConfig) -> int:
    """Step of Phase-2 epoch 0: after every possible Phase-1 iteration, the same in every trial."""
    return int(cfg.training.phase1.max_iterations) + 1


class TrialReporter:
    """RunTracker hook bound to one Optuna trial."""

    def __init__(self, trial: Any, spec: dict, cfg: DictConfig, model: torch.nn.Module) -> None:
        self.trial = trial
        self.rules = EarlyStopConfig(**(spec.get("early_stop") or {}))  # the schema's defaults, not .get's
        self.report = set(spec.get("report") or [])
        directions = trial.study.directions
        self.sign = -1.0 if directions[0].name == "MAXIMIZE" else 1.0
        self.single = len(directions) == 1
        self.context_dim = int(getattr(model, "context_dim", 0) or cfg.model.context_dim)
        self.phase2_offset = phase2_start(cfg)
        self.objectives = [str(name) for name in cfg.objectives]
        self.model = model

    def identity_score(self) -> float:
        m = self.model
        with evaluating(m):  # a measurement mid-training: no dropout
            return metrics.identity_mapping_score(m.update, m.context_dim, m.embed_dim,
                                                  device=next(m.parameters()).device)

    def __call__(self, row: dict) -> None:
        reason = early_stop_reason(row, self.rules, self.context_dim, self.identity_score)
        if reason:
            raise TrialPruned(reason, self.objective_values(row))
        value, step = self.intermediate(row)
        if not self.single or value is None or not math.isfinite(value):
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            pruner = type(getattr(self.trial.study.pruner, "pruner", self.trial.study.pruner)).__name__
            raise TrialPruned(f"{pruner}: intermediate value {value:.4g} at step {step} "
                              f"(phase {row['phase']}) is worse than the trials it was compared with",
                              self.objective_values(row))

    def objective_values(self, row: dict) -> list[float] | None:
        """The objectives as this row measured them (a Phase-2 epoch row holds phase2/val_ppl...), or None."""
        values = [row.get(name) for name in self.objectives]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return [float(v) for v in values]
        return None

    def intermediate(self, row: dict) -> tuple[float | None, int]:
        phase = row.get(keys.HISTORY_PHASE)
        if phase == keys.PHASE1 and keys.PHASE1 in self.report and keys.P1_VAL_CONVERGED_GAIN in row:
            return -self.sign * float(row[keys.P1_VAL_CONVERGED_GAIN]), int(row[keys.HISTORY_STEP])
        if phase == keys.PHASE2 and keys.PHASE2 in self.report and keys.P2_VAL_LOSS in row:
            evaluation = int(row.get("evaluation", row.get("epoch", 0)))
            return self.sign * float(row[keys.P2_VAL_LOSS]), self.phase2_offset + evaluation
        return None, 0


def job_storage_url(recorded: str) -> str:
    """The storage URL this job connects with. The environment holds it as recorded in .hydra/hydra.yaml, with
    any password masked; the password then comes from the sweeper's storage setting resolved here, in this
    job's own environment (${oc.env:...} on the node that runs it), and is never written down."""
    if storages.password(recorded) != storages.MASK:
        return recorded
    from hydra.core.hydra_config import HydraConfig

    try:
        url = storages.absolute_sqlite(str(HydraConfig.get().sweeper.storage))
    except Exception as err:  # e.g. ${oc.env:NEWLLM_DB_PASSWORD} is not set where this job runs
        raise ConfigError(f"hydra.sweeper.storage cannot be resolved in this job ({first_line(err)}): "
                          "set the variables it reads in the environment the jobs run in") from None
    if storages.masked(url) != recorded:
        raise ConfigError(f"hydra.sweeper.storage resolves to {storages.masked(url)} in this job but to {recorded} "
                          "in the sweep process: give jobs the same environment")
    return url


def attach_trial(hooks: list[Callable[[dict], None]], cfg: DictConfig, model: torch.nn.Module) -> None:
    """Register the reporter when the newllm_optuna sweeper launched this run (no-op otherwise)."""
    trial_id = os.environ.get(ENV_TRIAL)
    if not trial_id:
        return
    url, name = job_storage_url(os.environ.get(ENV_STORAGE, "")), os.environ[ENV_STUDY]
    if not url and name not in IN_PROCESS_STUDIES:
        raise ConfigError("hydra.sweeper.storage=null keeps the study inside the sweep process; trials run by "
                          "another process (joblib, submitit) need a storage URL such as sqlite:///outputs/optuna.db")
    storage = compat.open_storage(url) if url else compat.study_storage(IN_PROCESS_STUDIES[name])
    spec = storage.get_trial_system_attrs(int(trial_id)).get(SPEC_ATTR, {})
    pruner = hydra.utils.instantiate(spec.get("pruner") or {"_target_": "optuna.pruners.NopPruner"},
                                     _execution_whitelist_=("optuna.pruners.*",))
    pruner = PhaseWisePruner(pruner, phase2_start(cfg))
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    hooks.append(TrialReporter(compat.trial_of(study, int(trial_id)), spec, cfg, model))
