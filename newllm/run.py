"""One run: compose config -> data -> model -> Phase 1 -> Phase 2 -> metrics, plots, checkpoint.

Orchestration only; the math lives in newllm.training and newllm.metrics.
    python -m newllm.run model=layerwise training=quick
    python -m newllm.run -m model.layers=1,2,4 model.context_dim=64,128,256
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from newllm import checkpoint as ckpt
from newllm.config import TRUSTED_TARGETS, ConfigError, instantiate, register_configs, to_container, validate
from newllm.data import load_data, phase1_sample
from newllm.data.recall import recall_metrics
from newllm.errors import NewllmError, describe, exit_one_line
from newllm.memory import check_model_fits, out_of_memory_guard
from newllm.models import ContextModel, build_model, count_parameters, pretrained
from newllm.models.sizing import solve_core_params
from newllm.sweeping import Pruned, TrialPruned, attach_trial
from newllm.tracking import RunTracker
from newllm.training.accel import autocast, maybe_compile
from newllm.training.instruments import save_position_plot
from newllm.training.phase1 import train_phase1
from newllm.training.phase2 import train_phase2
from newllm.training.repetition import train_repetition
from newllm.utils import flatten

log = logging.getLogger("newllm")
register_configs()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NewllmError(f"device={name!r} is not available: no CUDA device here (use device=auto or cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def objective_values(metrics: dict, names: list[str]) -> float | list[float]:
    values = []
    for name in names:
        if name not in metrics:
            log.warning("objective %s is not among this run's metrics: returning nan", name)
        values.append(float(metrics.get(name, math.nan)))
    return values[0] if len(values) == 1 else values


def run(cfg: DictConfig, run_dir: str | Path) -> tuple[dict, float | list[float]]:
    """The whole experiment in one call (used by the CLI and by tests in-process).

    With cfg.resume=<run dir>, that run continues in its own dir with its own config (device and
    progress may change) from its last checkpoint.
    """
    resumed = None
    if cfg.get("resume"):
        run_dir = Path(cfg.resume)
        stored, resumed = ckpt.resume_config(run_dir)
        stored.device, stored.progress, stored.resume = cfg.device, cfg.progress, None
        cfg = stored
    embedding = cfg.model.get("embedding") or {}
    pretrained_files = None
    if embedding.get("pretrained"):  # fetched first: offline, this fails before any work
        pretrained_files = pretrained.fetch(embedding["pretrained"])
        if not cfg.tokenizer.pretrained:
            cfg.tokenizer.pretrained = embedding["pretrained"]  # its vocabulary is what the matrix indexes
    validate(cfg)
    budget = cfg.model.get("core_params")
    if budget is not None:  # the width that meets the budget; core parameters do not depend on the data
        solved = solve_core_params(cfg.model, budget)
        cfg.model.context_dim, cfg.model.hidden_dim = solved.context_dim, solved.hidden_dim
        log.info("model.core_params=%d: model.context_dim=%d, model.hidden_dim=%s", budget, solved.context_dim,
                 solved.hidden_dim)
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    check_model_fits(cfg, device)  # a model that can never fit is refused before any work
    seed_everything(cfg.seed)
    tracker = RunTracker(run_dir, cfg.logger)
    tracker.log_params(flatten(to_container(cfg)))
    wall_before = 0.0  # wall time of earlier processes of this run, up to the checkpoint resumed from
    if resumed is not None:
        tracker.history = list(resumed["history"])
        wall_before = resumed.get("wall_s", 0.0)

    data = load_data(cfg.data, cfg.tokenizer, cfg.paths.cache_dir, min_tokens=cfg.training.phase2.seq_len + 1)
    data.tokenizer.save(str(run_dir / "tokenizer.json"))
    log.info("data: %d train / %d val tokens, vocab %d", len(data.train_ids), len(data.val_ids), data.vocab_size)

    with out_of_memory_guard(cfg, "building the model"):
        model = maybe_compile(build_model(cfg.model, data.vocab_size).to(device), cfg.training.compile)
    metrics: dict = {"seed": cfg.seed, "device": str(device), **data.info,
                     **{f"model/{k}": v for k, v in count_parameters(model).items()},
                     "model/context_dim": model.context_dim}
    if getattr(model, "hidden_dim", None) is not None:
        metrics["model/hidden_dim"] = model.hidden_dim
    if budget is not None:
        metrics["model/core_params_budget"] = budget
    if pretrained_files is not None:
        metrics.update(pretrained.apply_pretrained(model, embedding["pretrained"], pretrained_files, data.tokenizer))
    log.info("model: %s, %d parameters", type(model).__name__, metrics["model/params"])
    attach_trial(tracker.hooks, cfg, model)  # reports to its Optuna trial when the newllm_optuna sweeper runs it

    stage = resumed["stage"] if resumed is not None else "phase1"
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        metrics.update(resumed["metrics"])
        log.info("resuming %s from %s", stage, run_dir / ckpt.RESUME_FILE)

    def save_resume(stage: str, loop: dict | None) -> None:
        ckpt.save(run_dir / ckpt.RESUME_FILE, "resume", {
            "stage": stage, "loop": loop, "config": to_container(cfg), "model": model.state_dict(),
            "metrics": ckpt.primitive(metrics), "history": tracker.history, "rng": ckpt.rng_state(),
            "wall_s": wall_before + time.perf_counter() - t_start})

    p1_cfg = cfg.training.phase1
    contexts_dir = run_dir / "checkpoints"  # fixed-mode Phase-2 contexts are cached next to the Phase-1 weights
    if p1_cfg.from_run:
        contexts_dir = ckpt.phase1_checkpoint_path(p1_cfg.from_run).parent
    if stage == "phase1" and p1_cfg.from_run:
        source = ckpt.load_phase1(p1_cfg.from_run, to_container(cfg.model), data.tokenizer)
        model.load_state_dict({k: v for k, v in source["model"].items() if not k.startswith("head.")}, strict=False)
        metrics.update(source["metrics"])
        metrics["phase1/from_run"] = str(ckpt.phase1_checkpoint_path(p1_cfg.from_run))
        log.info("phase 1: skipped, weights from %s", metrics["phase1/from_run"])
    elif stage == "phase1" and p1_cfg.enabled and isinstance(model, ContextModel):
        diversity = instantiate(cfg.training.diversity).to(device)
        # Whole training documents in a seeded random order (data.split_seed), not the corpus's first files.
        p1_ids, p1_documents = phase1_sample(data, p1_cfg.max_tokens, cfg.data.split_seed)
        with autocast(device, cfg.training.precision), out_of_memory_guard(cfg, "phase 1"):
            p1 = train_phase1(model, p1_ids, data.val_ids, p1_cfg, cfg.training.dist_reg_weight,
                              diversity, device, on_iteration=tracker.log, progress=cfg.progress,
                              state=resumed["loop"] if resumed is not None else None,
                              checkpoint=lambda loop: save_resume("phase1", loop),
                              test_ids=getattr(data, "test_ids", None))  # TokenData.test_ids: the test split
        p1.metrics["phase1/documents"] = p1_documents  # kept with the Phase-1 checkpoint (from_run)
        metrics.update(p1.metrics)
        if cfg.save_contexts and p1.val_contexts is not None:
            torch.save(p1.val_contexts, run_dir / "phase1_val_contexts.pt")
        ckpt.save(run_dir / ckpt.PHASE1_FILE, "phase1", {
            "config": to_container(cfg), "model": model.state_dict(), "metrics": ckpt.primitive(p1.metrics),
            "tokenizer_hash": ckpt.tokenizer_hash(data.tokenizer), "vocab_size": data.vocab_size})
        log.info("phase 1: %d iterations (%s); held-out from c = 0: convergence %.3f after %d sweeps, "
                 "memory length %d%s, effective rank %.1f/%d", p1.metrics["phase1/iterations"],
                 p1.metrics["phase1/stop_reason"], p1.metrics["phase1/val_convergence_rate"], p1_cfg.val_iterations,
                 p1.metrics["phase1/val_memory_length"], " (capped)" if p1.metrics["phase1/val_memory_length_capped"]
                 else "", p1.metrics["phase1/val_effective_rank"], model.context_dim)
    if stage == "phase1" and cfg.training.repetition.enabled:
        stages = getattr(data, "stages", None)
        if not stages:
            raise ConfigError(f"training.repetition.enabled=true needs phrase stages: use data=repetition "
                              f"(got data={cfg.data.name})")
        with out_of_memory_guard(cfg, "repetition training"):
            rep = train_repetition(model, stages, cfg.training.repetition, cfg.training.dist_reg_weight,
                                   instantiate(cfg.training.diversity).to(device), device, on_step=tracker.log,
                                   progress=cfg.progress, val_stages=getattr(data, "val_stages", None),
                                   test_stages=getattr(data, "test_stages", None))
        metrics.update(rep.metrics)
        log.info("repetition: %s", ", ".join(f"p={s.phrase_length} cycle_distance "
                                            f"{rep.metrics[f'repetition/p{s.phrase_length}/cycle_distance']:.3f}"
                                            for s in stages))
    if stage == "phase1":
        save_resume("phase2", None)
    elif resumed is not None and resumed["loop"] is None:
        ckpt.set_rng_state(resumed["rng"])  # killed before Phase 2's first checkpoint: its start state

    def contexts_cache(inputs: torch.Tensor, compute) -> torch.Tensor:
        weights = [v for k, v in model.state_dict().items() if not k.startswith("head.")]
        key = ckpt.contexts_key(inputs, weights, cfg.training.precision)
        return ckpt.cached_contexts(contexts_dir, key, compute)

    if cfg.training.phase2.enabled:
        with autocast(device, cfg.training.precision), out_of_memory_guard(cfg, "phase 2"):
            p2 = train_phase2(model, data, cfg.training.phase2, device, cfg.seed, on_epoch=tracker.log,
                              progress=cfg.progress, checkpoint=lambda loop: save_resume("phase2", loop),
                              state=resumed["loop"] if stage == "phase2" else None,
                              contexts_cache=contexts_cache)
        metrics.update(p2.metrics)
        save_position_plot(p2.metrics, run_dir / "loss_by_position.png")
        if data.recall is not None:
            metrics.update(recall_metrics(model, data.recall, cfg.training.phase2.batch_size * 4, device))
        log.info("phase 2: val ppl %.2f (uniform %d), val acc %.3f; test ppl %.2f", p2.metrics["phase2/val_ppl"],
                 data.vocab_size, p2.metrics["phase2/val_acc"], p2.metrics.get("phase2/test_ppl", math.nan))

    metrics["time/wall_s_this_process"] = time.perf_counter() - t_start
    metrics["time/wall_s"] = wall_before + metrics["time/wall_s_this_process"]
    if cfg.save_checkpoint:
        ckpt.save(run_dir / "checkpoint.pt", "final", {
            "model": model.state_dict(), "config": to_container(cfg), "vocab_size": data.vocab_size,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
        })
    tracker.finish(metrics)
    (run_dir / ckpt.RESUME_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
    return metrics, objective_values(metrics, list(cfg.objectives))


@hydra.main(config_path="../conf", config_name="config", execution_whitelist=TRUSTED_TARGETS)
def main(cfg: DictConfig) -> float | list[float] | Pruned:
    # Run folders are claimed and resume= is validated before this, by newllm.rundirs.RunFolders.
    hc = HydraConfig.get()
    try:
        _, objectives = run(cfg, hc.runtime.output_dir)
    except TrialPruned as pruned:  # stopped by its Optuna pruner or an early-stop rule: a result, not an error
        log.info("trial pruned: %s", pruned)
        return Pruned(str(pruned), pruned.values)
    except NewllmError as err:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed job with this message
        log.error("%s", err)
        exit_one_line(err)
    except Exception as err:
        log.error("%s", describe(err))  # run.log (the runs table's `error`): type and whole message, one line
        raise
    log.info("objectives %s = %s", list(cfg.objectives), objectives)
    return objectives


if __name__ == "__main__":
    main()
