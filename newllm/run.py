"""One run: compose config -> data -> model -> Phase 1 -> Phase 2 -> metrics, plots, checkpoint.

Orchestration only; the math lives in newllm.training and newllm.metrics.
    python -m newllm.run model=layerwise training=quick
    python -m newllm.run -m model.layers=1,2,4 model.context_dim=64,128,256
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from newllm.config import TRUSTED_TARGETS, ConfigError, instantiate, register_configs, to_container, validate
from newllm.data import load_data
from newllm.errors import NewllmError
from newllm.models import build_model, count_parameters
from newllm.tracking import RunTracker, save_checkpoint
from newllm.training.phase1 import train_phase1
from newllm.training.phase2 import train_phase2
from newllm.training.repetition import train_repetition

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


def flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def objective_values(metrics: dict, names: list[str]) -> float | list[float]:
    values = []
    for name in names:
        if name not in metrics:
            log.warning("objective %s is not among this run's metrics: returning nan", name)
        values.append(float(metrics.get(name, math.nan)))
    return values[0] if len(values) == 1 else values


def run(cfg: DictConfig, run_dir: str | Path) -> tuple[dict, float | list[float]]:
    """The whole experiment in one call (used by the CLI and by tests in-process)."""
    validate(cfg)
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    tracker = RunTracker(run_dir, cfg.logger)
    tracker.log_params(flatten(to_container(cfg)))

    data = load_data(cfg.data, cfg.tokenizer, cfg.paths.cache_dir, cfg.seed)
    data.tokenizer.save(str(run_dir / "tokenizer.json"))
    log.info("data: %d train / %d val tokens, vocab %d", len(data.train_ids), len(data.val_ids), data.vocab_size)

    model = build_model(cfg.model, data.vocab_size).to(device)
    metrics: dict = {"seed": cfg.seed, "device": str(device), **data.info,
                     **{f"model/{k}": v for k, v in count_parameters(model).items()}}
    log.info("model: %s, %d parameters", type(model).__name__, metrics["model/params"])

    if cfg.training.phase1.enabled and getattr(model, "is_context_model", False):
        diversity = instantiate(cfg.training.diversity).to(device)
        p1 = train_phase1(model, data.train_ids, data.val_ids, cfg.training.phase1, cfg.training.dist_reg_weight,
                          diversity, device, on_iteration=tracker.log, progress=cfg.progress)
        metrics.update(p1.metrics)
        if cfg.save_contexts and p1.val_contexts is not None:
            torch.save(p1.val_contexts, run_dir / "phase1_val_contexts.pt")
        log.info("phase 1: convergence %.3f after %d iterations, effective rank %.1f/%d (val conv %.3f)",
                 p1.metrics["phase1/convergence_rate"], p1.metrics["phase1/iterations"],
                 p1.metrics["phase1/effective_rank"], model.context_dim, p1.metrics["phase1/val_convergence_rate"])
    if cfg.training.repetition.enabled:
        stages = getattr(data, "stages", None)
        if not stages:
            raise ConfigError(f"training.repetition.enabled=true needs phrase stages: use data=repetition "
                              f"(got data={cfg.data.name})")
        rep = train_repetition(model, stages, cfg.training.repetition, cfg.training.dist_reg_weight,
                               instantiate(cfg.training.diversity).to(device), device, on_step=tracker.log,
                               progress=cfg.progress, val_stages=getattr(data, "val_stages", None))
        metrics.update(rep.metrics)
        log.info("repetition: %s", ", ".join(f"p={s.phrase_length} cycle_distance "
                                            f"{rep.metrics[f'repetition/p{s.phrase_length}/cycle_distance']:.3f}"
                                            for s in stages))
    if cfg.training.phase2.enabled:
        p2 = train_phase2(model, data, cfg.training.phase2, device, cfg.seed, on_epoch=tracker.log,
                          progress=cfg.progress)
        metrics.update(p2.metrics)
        log.info("phase 2: val ppl %.2f (uniform %d), val acc %.3f", p2.metrics["phase2/val_ppl"],
                 data.vocab_size, p2.metrics["phase2/val_acc"])

    metrics["time/wall_s"] = time.perf_counter() - t_start
    if cfg.save_checkpoint:
        save_checkpoint(run_dir / "checkpoint.pt", {
            "model": model.state_dict(), "config": to_container(cfg), "vocab_size": data.vocab_size,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
        })
    tracker.finish(metrics)
    return metrics, objective_values(metrics, list(cfg.objectives))


@hydra.main(config_path="../conf", config_name="config", execution_whitelist=TRUSTED_TARGETS)
def main(cfg: DictConfig) -> float | list[float]:
    hc = HydraConfig.get()
    try:
        _, objectives = run(cfg, hc.runtime.output_dir)
    except NewllmError as err:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records the failed job with this message
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    log.info("objectives %s = %s", list(cfg.objectives), objectives)
    return objectives


if __name__ == "__main__":
    main()
