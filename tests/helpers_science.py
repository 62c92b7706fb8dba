"""Tiny in-process models and configs shared by the science tests (seconds on 2 CPU cores).

Plain functions, not fixtures: tests call them with their own sizes. Fixtures live in conftest.py."""

from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf

from newllm.config import Phase1Config, Phase2Config
from newllm.models.context_lm import ContextLM
from newllm.models.updaters import GatedUpdater, ResidualUpdater


def context_lm(architecture: str = "layerwise", updater: str = "gated", vocab: int = 40, layers: int = 2,
               context_dim: int = 24, embed_dim: int = 16, init_std: float = 0.1, seed: int = 0) -> ContextLM:
    torch.manual_seed(seed)
    upd = partial(GatedUpdater) if updater == "gated" else partial(ResidualUpdater, layernorm_mix=1.0)
    return ContextLM(vocab, architecture, layers, context_dim, embed_dim, None, init_std, 0.0, upd)


def phase1_cfg(**overrides) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(Phase1Config), overrides)


def phase2_cfg(**overrides) -> DictConfig:
    return OmegaConf.merge(OmegaConf.structured(Phase2Config), overrides)

