"""Baselines at a matched parameter count: pick the GRU / transformer width whose core parameters
(everything but embeddings and output head) best match a context model's.

    python -m newllm.models.sizing model=layerwise --baseline model=gru
    python -m newllm.models.sizing model=sequential model.layers=4 --baseline model=transformer model.layers=1

prints the reference's core parameter count and the `model.context_dim=...` override for the
baseline; pass that override to `python -m newllm.run model=gru ...`. Every run also reports
model/params, model/params_core, model/params_embedding and model/params_head in metrics.json.
Core (not total) is matched because embedding and head scale with the vocabulary, not with the
sequence model being compared; use `--match params` to match totals instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, open_dict

from newllm.config import register_configs
from newllm.models import build_model, count_parameters

CONF = Path(__file__).resolve().parents[2] / "conf"


def params_of(model_cfg: DictConfig, vocab_size: int, key: str = "params_core") -> int:
    return count_parameters(build_model(model_cfg, vocab_size))[key]


def match_width(baseline_cfg: DictConfig, target: int, vocab_size: int, key: str = "params_core",
                max_width: int = 4096) -> tuple[int, int]:
    """(context_dim, its parameter count) of the baseline closest to `target`.

    Parameter counts grow monotonically with width, so a bisection finds the neighbours of the
    target; the transformer's widths step by model.heads (d_model must divide into heads).
    """
    multiple = baseline_cfg.get("heads", 1) or 1
    candidates = list(range(multiple, max_width + 1, multiple))

    def count(width: int) -> int:
        cfg = baseline_cfg.copy()
        with open_dict(cfg):
            cfg.context_dim = width
        return params_of(cfg, vocab_size, key)

    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # first width whose count reaches the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(candidates[mid]) < target else (lo, mid)
    best = min({candidates[max(lo - 1, 0)], candidates[lo]}, key=lambda w: abs(count(w) - target))
    return best, count(best)


def compose_model(overrides: list[str]) -> tuple[DictConfig, int]:
    """(model config, nominal tokenizer.vocab_size) composed from conf/ with these overrides."""
    if "config_schema.yaml" not in ConfigStore.instance().repo:  # register once per process
        register_configs()
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides)
    return cfg.model, cfg.tokenizer.vocab_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", nargs="+", help="overrides of the context model, e.g. model=layerwise")
    parser.add_argument("--baseline", nargs="+", required=True, help="overrides of the baseline, e.g. model=gru")
    parser.add_argument("--match", choices=("params_core", "params"), default="params_core")
    args = parser.parse_args(argv)
    ref_cfg, vocab = compose_model(args.reference)
    base_cfg, _ = compose_model(args.baseline)
    target = params_of(ref_cfg, vocab, args.match)
    width, got = match_width(base_cfg, target, vocab, args.match)
    print(f"reference {' '.join(args.reference)}: {args.match}={target}")
    print(f"baseline  {' '.join(args.baseline)} model.context_dim={width}: {args.match}={got} "
          f"({100 * (got - target) / target:+.1f} %)")
    print(f"override: model.context_dim={width}")


if __name__ == "__main__":
    main()
