"""Models at a matched parameter count: core parameters (everything but embeddings and output head).

A run with `model.core_params=<int>` solves its own width before any data is read
(`solve_core_params`): model.context_dim -- and, where it is set explicitly, model.hidden_dim in
proportion -- is chosen so the core parameter count lies within 2 % of the budget, for either
architecture, either updater and both baselines. Where the width alone steps too coarsely (the
transformer's d_model moves in multiples of model.heads; tiny widths), the FFN width
(model.hidden_dim) is trimmed to close the gap. metrics.json records the budget and what was chosen.

    python -m newllm.run -m model=sequential,layerwise,gru,transformer model.core_params=150000

The command line helper prints the core parameter count of a reference model and the width that
gives a baseline the same count:

    python -m newllm.models.sizing model=layerwise --baseline model=gru
    python -m newllm.models.sizing model=sequential model.layers=4 --baseline model=transformer model.layers=1

Core (not total) is matched because embedding and head scale with the vocabulary, not with the
sequence model being compared; use `--match params` to match totals instead.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from newllm.config import register_configs, validate
from newllm.errors import ConfigError, NewllmError, exit_one_line
from newllm.models import SIZING_KEYS, build_model, count_parameters

CONF = Path(__file__).resolve().parents[2] / "conf"
TOLERANCE = 0.02  # a budget is met when the core count is within 2 % of it
MAX_WIDTH = 4096


def params_of(model_cfg: DictConfig, vocab_size: int = 1, key: str = "params_core") -> int:
    """A parameter count of a model config, built on the meta device (no memory, no init cost).
    The core count does not depend on vocab_size."""
    with torch.device("meta"):
        return count_parameters(build_model(model_cfg, vocab_size))[key]


def _is_residual(model_cfg: DictConfig) -> bool:
    return str((model_cfg.get("updater") or {}).get("_target_", "")).endswith("ResidualUpdater")


def _hidden_is_free(model_cfg: DictConfig) -> bool:
    """The FFN width can be set on its own: the gated context LM, the transformer, and llama, rwkv and
    recurrent_gemma (GRU, mamba, mamba2, xlstm: none; residual updater: fixed at context_dim + embed_dim)."""
    if "family" in model_cfg:
        from newllm.models.hf_baselines import default_hidden  # only transformers models: it imports transformers

        return default_hidden(model_cfg.family, 1) is not None
    return "heads" in model_cfg or ("architecture" in model_cfg and not _is_residual(model_cfg))


def width_step_of(model_cfg: DictConfig) -> int:
    """context_dim moves in steps of this: a transformers family's shapes, the transformer's heads, else 1."""
    if "family" in model_cfg:
        from newllm.models.hf_baselines import width_step

        return width_step(model_cfg.family, model_cfg.heads, model_cfg.expand)
    return model_cfg.get("heads", 1) or 1


def with_width(model_cfg: DictConfig, width: int, hidden: int | None = None) -> DictConfig:
    """model_cfg at context_dim=width; an explicit hidden_dim scales with it (or is `hidden`)."""
    cfg = model_cfg.copy()
    with open_dict(cfg):
        if hidden is None and cfg.get("hidden_dim") is not None and not _is_residual(cfg):
            hidden = max(1, round(cfg.hidden_dim * width / cfg.context_dim))
        cfg.context_dim = width
        cfg.hidden_dim = None if _is_residual(cfg) else hidden
        for key in SIZING_KEYS:
            cfg[key] = None
    return cfg


def params_hidden(model_cfg: DictConfig) -> int:
    """The FFN width a config builds: explicit hidden_dim, else the model's own default."""
    if model_cfg.get("hidden_dim") is not None:
        return int(model_cfg.hidden_dim)
    if "family" in model_cfg:
        from newllm.models.hf_baselines import default_hidden

        return default_hidden(model_cfg.family, model_cfg.context_dim) or model_cfg.context_dim
    return 4 * model_cfg.context_dim if "heads" in model_cfg else model_cfg.context_dim


def _closest(count: Callable[[int], int], target: int, values: Sequence[int]) -> int:
    """The value whose (monotonically increasing) count is closest to target: bisection + neighbours."""
    lo, hi = 0, len(values) - 1
    while lo < hi:  # first value whose count reaches the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(values[mid]) < target else (lo, mid)
    return min({values[max(lo - 1, 0)], values[lo]}, key=lambda v: abs(count(v) - target))


def match_width(baseline_cfg: DictConfig, target: int, vocab_size: int, key: str = "params_core",
                max_width: int = MAX_WIDTH) -> tuple[int, int]:
    """(context_dim, its parameter count) of a model closest to `target`, the width alone varying;
    the transformer's widths step by model.heads (d_model must divide into heads)."""
    step = width_step_of(baseline_cfg)
    count = lambda w: params_of(with_width(baseline_cfg, w), vocab_size, key)
    width = _closest(count, target, range(step, max_width + 1, step))
    return width, count(width)


def solve_core_params(model_cfg: DictConfig, budget: int, tolerance: float = TOLERANCE,
                      max_width: int = MAX_WIDTH) -> DictConfig:
    """model_cfg with context_dim (and hidden_dim) chosen so its core parameters are within
    `tolerance` of `budget`; a ConfigError (one line) when no width reaches it."""
    width, got = match_width(model_cfg, budget, 1, max_width=max_width)
    solved = with_width(model_cfg, width)
    if abs(got - budget) > tolerance * budget and _hidden_is_free(model_cfg):
        # The width steps too coarsely here: try it and its neighbours with the FFN width trimmed
        # (much finer steps), keeping the one whose FFN width departs least from its usual ratio.
        step = width_step_of(model_cfg)
        tries = []
        for w in sorted({max(step, width - step), width, min(max_width, width + step)}):
            nominal = params_hidden(with_width(model_cfg, w))
            count = lambda h, w=w: params_of(with_width(model_cfg, w, h))
            h = _closest(count, budget, range(1, 8 * nominal + 1))
            off = abs(count(h) - budget) > tolerance * budget
            tries.append(((off, abs(math.log(h / nominal))), with_width(model_cfg, w, h)))
        solved = min(tries, key=lambda t: t[0])[1]
        got = params_of(solved)
    if abs(got - budget) > tolerance * budget:
        step = width_step_of(model_cfg)
        smallest, largest = params_of(with_width(model_cfg, step)), params_of(with_width(model_cfg, max_width))
        raise ConfigError(f"model.core_params={budget} is not allowed for this model: the closest width, "
                          f"model.context_dim={solved.context_dim}, has {got} core parameters (more than "
                          f"{tolerance:.0%} off); expected a budget this model reaches within {tolerance:.0%}, "
                          f"about {smallest} to {largest} (model.layers={model_cfg.layers})")
    return solved


def state_of(model_cfg: DictConfig, length: int) -> int:
    """model/state_floats of a model config at an evaluation window of `length` tokens (built on meta)."""
    with torch.device("meta"):
        return int(build_model(model_cfg, 1).state_floats(length))


def solve_state_floats(model_cfg: DictConfig, budget: int, length: int, tolerance: float = TOLERANCE,
                       max_width: int = MAX_WIDTH) -> DictConfig:
    """model_cfg with the context_dim whose state (model/state_floats at `length` tokens) is closest to `budget`;
    a ConfigError (one line) when no width brings it within `tolerance` (the state steps too coarsely, or the
    budget lies outside what the widths reach)."""
    step = width_step_of(model_cfg)
    count = lambda w: state_of(with_width(model_cfg, w), length)
    width = _closest(count, budget, range(step, max_width + 1, step))
    got = count(width)
    if abs(got - budget) > tolerance * budget:
        raise ConfigError(f"model.state_floats={budget} is not allowed for this model: the closest width, "
                          f"model.context_dim={width}, carries {got} floats at {length} tokens (more than "
                          f"{tolerance:.0%} off; widths step by {step}, from {count(step)} to {count(max_width)} "
                          f"floats); expected a state this model reaches within {tolerance:.0%}")
    return with_width(model_cfg, width)


def compose_model(overrides: list[str]) -> tuple[DictConfig, int]:
    """(model config, nominal tokenizer.vocab_size) composed from conf/ with these overrides."""
    if "config_schema.yaml" not in ConfigStore.instance().repo:  # register once per process
        register_configs()
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides)
    validate(cfg)  # the checks a run makes (e.g. model.context_dim > 0), before anything is built
    return cfg.model, cfg.tokenizer.vocab_size


def _compose_error(err: HydraException) -> ConfigError:
    """Hydra's compose error as one line: its message without the config search path, and the cause that names
    the allowed values (e.g. "Invalid value 'magic', expected one of [sequential, layerwise]")."""
    message = str(err).split("Config search path:")[0]
    cause = err.__cause__
    if cause is not None:
        message += ": " + str(cause).strip().splitlines()[0]
    return ConfigError(" ".join(message.split()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", nargs="+", help="overrides of the context model, e.g. model=layerwise")
    parser.add_argument("--baseline", nargs="+", required=True, help="overrides of the baseline, e.g. model=gru")
    parser.add_argument("--match", choices=("params_core", "params"), default="params_core")
    args = parser.parse_args(argv)
    try:
        ref_cfg, vocab = compose_model(args.reference)
        base_cfg, _ = compose_model(args.baseline)
    except HydraException as err:  # an unknown option or key, a value outside its Enum
        exit_one_line(_compose_error(err))
    except NewllmError as err:
        exit_one_line(err)
    target = params_of(ref_cfg, vocab, args.match)
    width, got = match_width(base_cfg, target, vocab, args.match)
    print(f"reference {' '.join(args.reference)}: {args.match}={target}")
    print(f"baseline  {' '.join(args.baseline)} model.context_dim={width}: {args.match}={got} "
          f"({100 * (got - target) / target:+.1f} %)")
    print(f"override: model.context_dim={width}" + (f"  (or model.core_params={target})"
                                                    if args.match == "params_core" else ""))


if __name__ == "__main__":
    main()
