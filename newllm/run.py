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
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from newllm import keys
from newllm.analysis.plots import save_position_plot
from newllm.config import (
    TRUSTED_TARGETS,
    ConfigError,
    Phase1Config,
    Phase2Config,
    RepetitionConfig,
    check_group_overrides,
    flatten,
    instantiate,
    register_configs,
    to_container,
    validate,
)
from newllm.data import load_data, phase1_sample
from newllm.errors import NewllmError, describe, exit_one_line
from newllm.keys import PHASE1, PHASE2
from newllm.models import ContextModel, build_model, costs, count_parameters, pretrained
from newllm.models.sizing import solve_core_params, solve_state_floats
from newllm.runtime import checkpoint as ckpt
from newllm.runtime.fileio import save_text
from newllm.runtime.lifecycle import RunLifecycle, final_payload
from newllm.runtime.memory import check_model_fits, out_of_memory_guard
from newllm.runtime.tracking import RunTracker
from newllm.sweep.hooks import Pruned, TrialPruned, attach_trial
from newllm.training.accel import autocast, maybe_compile
from newllm.training.evaluation import recall_metrics
from newllm.training.phase1 import train_phase1
from newllm.training.phase2 import Windows, train_phase2
from newllm.training.repetition import train_repetition

log = logging.getLogger("newllm")
CONF = Path(__file__).resolve().parents[1] / "conf"  # @hydra.main's config_path
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


def typed(node: DictConfig, schema: type):
    """The dataclass instance (Phase1Config, ...) a config section stands for: loops read plain attributes,
    never `.get` defaults. Interpolations (${data.seq_len}) resolve against the whole config."""
    section = OmegaConf.to_object(node)
    if not isinstance(section, schema):  # a config built by hand, or read back without config.retyped
        raise TypeError(f"{node._get_full_key(None)} is not a {schema.__name__} node: compose it, or config.retyped")
    return section


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
    progress may change) from its last checkpoint (newllm.runtime.lifecycle).
    """
    life = RunLifecycle.open(cfg, run_dir)
    cfg = life.cfg
    pretrained_files = prepare_config(cfg)
    device = resolve_device(cfg.device)
    check_model_fits(cfg, device)  # a model that can never fit is refused before any work
    seed_everything(cfg.seed)
    tracker = RunTracker(life.run_dir, cfg.logger)
    tracker.log_params(flatten(to_container(cfg)))

    data = load_run_data(cfg, life.run_dir)
    model, metrics = build(cfg, data, device, pretrained_files)
    if cfg.training.phase2.enabled:  # its windows fit the data: checked now, not after Phase 1
        Windows.check(model, data, typed(cfg.training.phase2, Phase2Config))
    attach_trial(tracker.hooks, cfg, model)  # reports to its Optuna trial when the newllm_optuna sweeper runs it
    life.restore(model, metrics, tracker.history)

    if life.stage == PHASE1:
        metrics.update(phase1_stage(cfg, model, data, device, tracker, life))
        metrics.update(repetition_stage(cfg, model, data, device, tracker))
    life.enter_phase2()
    if cfg.training.phase2.enabled:
        metrics.update(phase2_stage(cfg, model, data, device, tracker, life))

    metrics[keys.WALL_S_THIS_PROCESS] = life.this_process_s()
    metrics[keys.WALL_S] = life.wall_s()
    if cfg.save_checkpoint:
        ckpt.save(life.run_dir / ckpt.FINAL_FILE, "final", final_payload(model, cfg, data.vocab_size, metrics))
    tracker.finish(metrics)
    life.close()
    return metrics, objective_values(metrics, list(cfg.objectives))


def prepare_config(cfg: DictConfig) -> dict[str, Path] | None:
    """Fetch pretrained embeddings (offline, this fails before any work), check every value, and solve
    model.core_params into a width. Returns the fetched embedding files, if any."""
    embedding = cfg.model.get("embedding") or {}
    files = None
    if embedding.get("pretrained"):
        files = pretrained.fetch(embedding["pretrained"])
        if not cfg.tokenizer.pretrained:
            cfg.tokenizer.pretrained = embedding["pretrained"]  # its vocabulary is what the matrix indexes
    validate(cfg)
    budget, state = cfg.model.get("core_params"), cfg.model.get("state_floats")
    if budget is not None:  # the width that meets the budget; core parameters do not depend on the data
        solved = solve_core_params(cfg.model, budget)
        cfg.model.context_dim, cfg.model.hidden_dim = solved.context_dim, solved.hidden_dim
        log.info("model.core_params=%d: model.context_dim=%d, model.hidden_dim=%s", budget, solved.context_dim,
                 solved.hidden_dim)
    elif state is not None:  # the state at the evaluation window (a KV cache grows with it)
        p2 = cfg.training.phase2
        solved = solve_state_floats(cfg.model, state, p2.eval_seq_len or p2.seq_len)
        cfg.model.context_dim, cfg.model.hidden_dim = solved.context_dim, solved.hidden_dim
        log.info("model.state_floats=%d: model.context_dim=%d", state, solved.context_dim)
    return files


def load_run_data(cfg: DictConfig, run_dir: Path):
    data = load_data(cfg.data, cfg.tokenizer, cfg.paths.cache_dir, min_tokens=cfg.training.phase2.seq_len + 1)
    save_text(run_dir / "tokenizer.json", data.tokenizer.to_str())
    log.info("data: %d train / %d val tokens, vocab %d", len(data.train_ids), len(data.val_ids), data.vocab_size)
    return data


def build(cfg: DictConfig, data, device: torch.device, pretrained_files) -> tuple[torch.nn.Module, dict]:
    """The model on its device, and the metrics that describe the run before any training."""
    p2_cfg = cfg.training.phase2
    with out_of_memory_guard(cfg, "building the model"):
        model = maybe_compile(build_model(cfg.model, data.vocab_size).to(device), cfg.training.compile)
    metrics: dict = {"seed": cfg.seed, "device": str(device), **data.info,
                     **{keys.model_key(k): v for k, v in count_parameters(model).items()},
                     keys.MODEL_CONTEXT_DIM: model.context_dim,
                     # at the evaluation window: the transformer's KV cache grows with it
                     keys.MODEL_STATE_FLOATS: costs.state_floats(model, p2_cfg.eval_seq_len or p2_cfg.seq_len)}
    if getattr(model, "hidden_dim", None) is not None:
        metrics[keys.MODEL_HIDDEN_DIM] = model.hidden_dim
    if cfg.model.get("core_params") is not None:
        metrics[keys.MODEL_CORE_PARAMS_BUDGET] = cfg.model.core_params
    if cfg.model.get("state_floats") is not None:
        metrics[keys.MODEL_STATE_FLOATS_BUDGET] = cfg.model.state_floats
    if hasattr(model, "kernel"):  # a transformers model: the library's reference path or a fast kernel
        metrics[keys.MODEL_KERNEL] = model.kernel(device)
    if pretrained_files is not None:
        metrics.update(pretrained.apply_pretrained(model, cfg.model.embedding.pretrained, pretrained_files,
                                                   data.tokenizer))
    log.info("model: %s, %d parameters", type(model).__name__, metrics[keys.MODEL_PARAMS])
    return model, metrics


def phase1_stage(cfg: DictConfig, model, data, device: torch.device, tracker: RunTracker,
                 life: RunLifecycle) -> dict:
    """Phase 1: reused from another run (training.phase1.from_run), trained here, or skipped."""
    p1_cfg = cfg.training.phase1
    if p1_cfg.from_run:
        return phase1_from_run(cfg, model, data)
    if not (p1_cfg.enabled and isinstance(model, ContextModel)):
        return {}
    diversity = instantiate(cfg.training.diversity).to(device)
    # Whole training documents in a seeded random order (data.split_seed), not the corpus's first files.
    p1_ids, p1_documents = phase1_sample(data, p1_cfg.max_tokens, cfg.data.split_seed)
    with autocast(device, cfg.training.precision), out_of_memory_guard(cfg, "phase 1"):
        p1 = train_phase1(model, p1_ids, data.val_ids, typed(p1_cfg, Phase1Config), cfg.training.dist_reg_weight,
                          diversity, device,
                          on_iteration=tracker.log, progress=cfg.progress, state=life.loop_state(PHASE1),
                          checkpoint=life.checkpointer(PHASE1), test_ids=getattr(data, "test_ids", None))
    p1.metrics[keys.P1_DOCUMENTS] = p1_documents  # kept with the Phase-1 checkpoint (from_run)
    p1.metrics[keys.P1_TRAIN_FLOPS] = costs.phase1_train_flops(model, p1.metrics[keys.P1_TOKENS],
                                                               p1.metrics[keys.P1_ITERATIONS])
    if cfg.save_contexts and p1.val_contexts is not None:
        ckpt.save(life.run_dir / ckpt.VAL_CONTEXTS_FILE, "val_contexts", {"contexts": p1.val_contexts})
    ckpt.save(life.run_dir / ckpt.PHASE1_FILE, PHASE1, {
        "config": to_container(cfg), "model": model.state_dict(), "metrics": ckpt.primitive(p1.metrics),
        "tokenizer_hash": ckpt.tokenizer_hash(data.tokenizer), "vocab_size": data.vocab_size})
    m = p1.metrics
    log.info("phase 1: %d iterations (%s); held-out from c = 0: converged gain %.3f (probe gain %.3f), "
             "convergence %.3f after %d sweeps, memory length %d%s, effective rank %.1f/%d",
             m[keys.P1_ITERATIONS], m[keys.P1_STOP_REASON], m.get(keys.P1_VAL_CONVERGED_GAIN, math.nan),
             m.get(keys.P1_VAL_PROBE_GAIN, math.nan), m[keys.P1_VAL_CONVERGENCE_RATE], p1_cfg.val_iterations,
             m[keys.P1_VAL_MEMORY_LENGTH], " (capped)" if m[keys.P1_VAL_MEMORY_LENGTH_CAPPED] else "",
             m[keys.P1_VAL_EFFECTIVE_RANK], model.context_dim)
    return m


def phase1_from_run(cfg: DictConfig, model, data) -> dict:
    """training.phase1.from_run: another run's Phase-1 weights (checked against this model and tokenizer)."""
    source = ckpt.load_phase1(cfg.training.phase1.from_run, to_container(cfg.model), data.tokenizer)
    model.load_state_dict({k: v for k, v in source["model"].items() if not k.startswith("head.")}, strict=False)
    metrics = {**source["metrics"], keys.P1_FROM_RUN: str(ckpt.phase1_checkpoint_path(cfg.training.phase1.from_run))}
    log.info("phase 1: skipped, weights from %s", metrics[keys.P1_FROM_RUN])
    return metrics


def repetition_stage(cfg: DictConfig, model, data, device: torch.device, tracker: RunTracker) -> dict:
    """training.repetition: the phrase-cycle stages of data=repetition (none otherwise)."""
    if not cfg.training.repetition.enabled:
        return {}
    stages = getattr(data, "stages", None)
    if not stages:
        raise ConfigError(f"training.repetition.enabled=true needs phrase stages: use data=repetition "
                          f"(got data={cfg.data.name})")
    with out_of_memory_guard(cfg, "repetition training"):
        rep = train_repetition(model, stages, typed(cfg.training.repetition, RepetitionConfig),
                               cfg.training.dist_reg_weight,
                               instantiate(cfg.training.diversity).to(device), device, on_step=tracker.log,
                               progress=cfg.progress, val_stages=getattr(data, "val_stages", None),
                               test_stages=getattr(data, "test_stages", None))
    log.info("repetition: %s", ", ".join(f"p={s.phrase_length} cycle_distance "
                                        f"{rep.metrics[keys.rep_stage(s.phrase_length, 'cycle_distance')]:.3f}"
                                        for s in stages))
    return rep.metrics


def phase2_stage(cfg: DictConfig, model, data, device: torch.device, tracker: RunTracker,
                 life: RunLifecycle) -> dict:
    """Phase 2 (token prediction), then its plots and the recall-task metrics where the data has them."""
    p1_cfg = cfg.training.phase1
    # fixed-mode Phase-2 contexts are cached next to the Phase-1 weights they come from
    contexts_dir = (ckpt.phase1_checkpoint_path(p1_cfg.from_run).parent if p1_cfg.from_run
                    else life.run_dir / "checkpoints")

    def contexts_cache(inputs: torch.Tensor, compute) -> torch.Tensor:
        weights = [v for k, v in model.state_dict().items() if not k.startswith("head.")]
        return ckpt.cached_contexts(contexts_dir, ckpt.contexts_key(inputs, weights, cfg.training.precision), compute)

    with autocast(device, cfg.training.precision), out_of_memory_guard(cfg, "phase 2"):
        p2 = train_phase2(model, data, typed(cfg.training.phase2, Phase2Config), device, cfg.seed, on_epoch=tracker.log,
                          progress=cfg.progress, checkpoint=life.checkpointer(PHASE2),
                          state=life.loop_state(PHASE2), contexts_cache=contexts_cache)
    metrics = dict(p2.metrics)
    metrics[keys.P2_TRAIN_FLOPS] = costs.phase2_train_flops(model, cfg.training.phase2, metrics[keys.P2_TOKENS_SEEN],
                                                             data.train_ids.numel(), isinstance(model, ContextModel))
    save_position_plot(metrics, life.run_dir / "loss_by_position.png")
    if data.recall is not None:
        metrics.update(recall_metrics(model, data.recall, cfg.training.phase2.batch_size * 4, device))
    log.info("phase 2: val ppl %.2f (uniform %d), val acc %.3f; test ppl %.2f", metrics[keys.P2_VAL_PPL],
             data.vocab_size, metrics[keys.P2_VAL_ACC], metrics.get(keys.P2_TEST_PPL, math.nan))
    return metrics


@hydra.main(config_path="../conf", config_name="config", execution_whitelist=TRUSTED_TARGETS)
def main(cfg: DictConfig) -> float | list[float] | Pruned:
    # Run folders are claimed and resume= is validated before this, by newllm.runtime.rundirs.RunFolders.
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


def cli() -> None:
    """`python -m newllm.run`: the overrides Hydra would fail on with a traceback are refused in one line first."""
    try:
        check_group_overrides(sys.argv[1:], CONF)
    except NewllmError as err:
        exit_one_line(err)
    main()


if __name__ == "__main__":
    cli()
