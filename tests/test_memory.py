"""Memory: a model that cannot fit is refused up front; an allocation that fails later is one line."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from newllm.config import Config, ContextModelConfig, GatedUpdaterConfig
from newllm.errors import ResourceError
from newllm.models import build_model, count_parameters
from newllm.runtime.memory import check_model_fits, device_memory, out_of_memory_guard


def config(**model) -> OmegaConf:
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(OmegaConf.structured(ContextModelConfig),
                                {"updater": OmegaConf.structured(GatedUpdaterConfig), **model})
    return cfg


def test_meta_build_counts_the_parameters_a_real_build_has():
    cfg = config(context_dim=48, embed_dim=16, layers=3)
    check_model_fits(cfg, torch.device("cpu"))  # fits: no error
    real = count_parameters(build_model(cfg.model, cfg.tokenizer.vocab_size))["params"]
    with torch.device("meta"):
        meta = sum(p.numel() for p in build_model(cfg.model, cfg.tokenizer.vocab_size).parameters())
    assert meta == real


def test_a_model_larger_than_the_machine_is_refused_naming_its_keys():
    # C = 100,000 -> about 8e10 parameters, 1.3 TB to train: more than any machine these tests run on
    assert device_memory(torch.device("cpu")) < 1.28e12
    with pytest.raises(ResourceError) as err:
        check_model_fits(config(context_dim=100_000), torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.context_dim=100000, model.embed_dim=96")
    assert "make a model of 80," in msg and "use a smaller model.context_dim" in msg


def test_an_allocation_that_fails_in_a_phase_is_one_line_naming_size_and_keys():
    cfg = config()
    with pytest.raises(ResourceError) as err, out_of_memory_guard(cfg, "phase 1"):
        torch.empty(10**13)  # 40 TB of float32: a real allocation failure, not a simulated one
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("out of memory in phase 1: 40,000.0 GB could not be allocated")
    assert "model.context_dim=128" in msg and "training.phase1.max_tokens=8192" in msg
    with pytest.raises(ValueError, match="not memory"), out_of_memory_guard(cfg, "phase 2"):
        raise ValueError("not memory")  # anything else passes through unchanged
