"""Models: context updaters, the context LM (sequential / layer-wise) and baselines."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf
from torch import nn

from newllm.config import instantiate
from newllm.models.interface import ContextModel, ContextUpdate, OptimizerRecipe

# model.<key>s that ask newllm.models.sizing for a width instead of passing one to the constructor
SIZING_KEYS = ("core_params", "state_floats")

__all__ = ["SIZING_KEYS", "ContextModel", "ContextUpdate", "OptimizerRecipe", "build_model", "count_parameters",
           "evaluating"]


def build_model(model_cfg: DictConfig, vocab_size: int) -> nn.Module:
    """Instantiate conf/model/<name>.yaml for a tokenizer of `vocab_size` tokens.

    model.core_params and model.state_floats are sizing requests (newllm.models.sizing has already turned them
    into widths), not constructor arguments."""
    cfg = OmegaConf.masked_copy(model_cfg, [k for k in model_cfg if k not in SIZING_KEYS])
    return instantiate(cfg, vocab_size=vocab_size)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, embedding tables (tokens, and positions for the transformer), head, and the rest
    ("core": the sequence model itself -- what baselines are matched on). A head tied to the token
    embedding (the transformer, as GPT-2) is counted once, under embedding: its params_head is 0."""
    total = sum(p.numel() for p in model.parameters())  # a shared tensor once
    tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)}
    embedding = sum(tables.values())
    head = sum(p.numel() for p in model.head.parameters() if id(p) not in tables)
    return {"params": total, "params_embedding": embedding, "params_head": head,
            "params_core": total - embedding - head}


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off) for a no-grad measurement inside training; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
