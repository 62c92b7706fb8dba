"""The baselines as their references build and train them (issue 24 item 4), and what each model costs:
parameters, multiply-adds, training FLOPs and carried state, against hand counts of one tiny config each."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from newllm.models import costs, count_parameters
from newllm.models.baselines import GRULM, TransformerLM
from newllm.training.phase2 import make_optimizer
from tests.helpers_science import context_lm

PHASE2 = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.065, "seq_len": 5, "context": "propagate",
                           "freeze_updater": False})


def tiny_transformer() -> TransformerLM:
    return TransformerLM(vocab_size=10, layers=1, context_dim=8, embed_dim=3, hidden_dim=16, init_std=0.02,
                         dropout=0.0, heads=2, max_len=6)


def tiny_gru() -> GRULM:
    return GRULM(vocab_size=10, layers=2, context_dim=4, embed_dim=3, hidden_dim=None, init_std=0.02, dropout=0.0)


def tiny_context_lm():
    return context_lm("layerwise", "gated", layers=1, vocab=10, context_dim=4, embed_dim=3)


def test_transformer_counts_by_hand():
    # tokens 10x8 + positions 6x8 = 128; block: in_proj 3*8*8 + 24, out_proj 64 + 8, linear1 8*16 + 16,
    # linear2 16*8 + 8, two LayerNorms 2 * 16 = 600; final LayerNorm 16; head tied (bias-free): 0
    m = tiny_transformer()
    assert count_parameters(m) == {"params": 744, "params_embedding": 128, "params_head": 0, "params_core": 616}
    # matmul weights 192 + 64 + 128 + 128 = 512, attention 2 * 1 layer * 8 * (5 + 1) / 2 = 48; head 8 x 10
    assert costs.forward_macs(m, 5) == {"core": 560, "head": 80}
    assert costs.state_floats(m, 5) == 2 * 1 * 5 * 8  # the KV cache: keys and values, every layer and position


def test_gru_counts_by_hand():
    # embedding 10x3; LayerNorm 6; GRU layer 0: 12x3 + 12x4 + 2 x 12 = 108, layer 1: 12x4 + 12x4 + 24 = 120;
    # head 4x10 + 10
    m = tiny_gru()
    assert count_parameters(m) == {"params": 314, "params_embedding": 30, "params_head": 50, "params_core": 234}
    assert costs.forward_macs(m, 5) == {"core": 36 + 48 + 48 + 48, "head": 40}
    assert costs.state_floats(m, 5) == costs.state_floats(m, 500) == 2 * 4  # L x C, whatever the length


def test_context_lm_counts_by_hand():
    # embedding 10x3; embedding LN 6; block: Linear(7 -> 4) 28 + 4, three gates 3 x (16 + 4), LN 8; head 50
    m = tiny_context_lm()
    assert count_parameters(m) == {"params": 186, "params_embedding": 30, "params_head": 50, "params_core": 106}
    assert costs.forward_macs(m, 5) == {"core": 28 + 48, "head": 40}
    assert costs.state_floats(m, 5) == costs.state_floats(m, 500) == 4  # the context vector
    # pass 0 forward + 3 iterations forward and backward over 100 positions, 2 FLOPs a multiply-add
    assert costs.phase1_train_flops(m, tokens=100, iterations=3) == 2 * 76 * 100 * (1 + 3 * 3)


def test_phase2_flops_by_hand():
    gru = tiny_gru()
    assert costs.phase2_train_flops(gru, PHASE2, 1000, 500, context_model=False) == 6 * (180 + 40) * 1000
    lm = tiny_context_lm()
    fixed = OmegaConf.merge(PHASE2, {"context": "fixed"})
    assert costs.phase2_train_flops(lm, fixed, 1000, 500, context_model=True) == 6 * 40 * 1000 + 2 * 76 * 500
    frozen = OmegaConf.merge(PHASE2, {"freeze_updater": True})
    assert costs.phase2_train_flops(lm, frozen, 1000, 500, context_model=True) == 6 * 40 * 1000 + 2 * 76 * 1000
    # the transformer's attention term is counted at the training window (seq_len 5)
    assert costs.phase2_train_flops(tiny_transformer(), PHASE2, 1000, 500, False) == 6 * (560 + 80) * 1000


def test_transformer_init_matches_nanogpt():
    """N(0, 0.02) for every matmul weight and embedding, N(0, 0.02 / sqrt(2 L)) for the residual projections,
    zero biases, unit LayerNorms, head tied to the token embedding (karpathy/nanoGPT model.py)."""
    torch.manual_seed(0)
    layers = 4
    m = TransformerLM(vocab_size=2000, layers=layers, context_dim=128, embed_dim=96, hidden_dim=None,
                      init_std=0.02, dropout=0.0, heads=4, max_len=512)
    assert m.head.weight is m.embedding.weight and m.head.bias is None
    residual = 0.02 / math.sqrt(2 * layers)
    for name, p in m.named_parameters():
        if name.endswith(("out_proj.weight", "linear2.weight")):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif p.dim() >= 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
        elif "norm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert torch.equal(p, torch.zeros_like(p)), name  # every bias
    assert all(isinstance(b.activation, type(nn.functional.gelu)) or b.activation is nn.functional.gelu
               for b in m.decoder.layers)
    assert all(b.norm_first for b in m.decoder.layers)


def test_transformer_token_signal_is_as_large_as_the_positions():
    """The handicap issue 24 found: tokens projected from embed_dim without a norm reached the residual stream
    at RMS 0.004 against 0.020 for positions. GPT-2 embeds at d_model: both N(0, 0.02)."""
    torch.manual_seed(0)
    m = TransformerLM(4096, 2, 76, 96, None, 0.02, 0.0)
    ids = torch.randint(0, 4096, (8, 64))
    tokens = m.embedding(ids).pow(2).mean().sqrt().item()
    positions = m.pos.weight[:64].pow(2).mean().sqrt().item()
    assert tokens == pytest.approx(0.02, rel=0.1) and positions == pytest.approx(0.02, rel=0.1)


def test_gru_keeps_torch_init():
    """nn.GRU's reset_parameters: every weight and bias U(-1/sqrt(C), 1/sqrt(C)); nothing here overrides it."""
    torch.manual_seed(0)
    m = GRULM(vocab_size=100, layers=2, context_dim=256, embed_dim=64, hidden_dim=None, init_std=0.02, dropout=0.0)
    bound = 1 / math.sqrt(256)
    for name, p in m.rnn.named_parameters():
        assert p.abs().max().item() <= bound, name
        assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name  # a uniform's std
    x = m.embed_norm(m.embedding(torch.arange(100)))
    # the GRU's input: unit RMS (LayerNorm's eps 1e-5 against a variance of 0.02^2 takes off ~1 %)
    assert x.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=0.02)


def test_transformer_optimizer_is_nanogpts():
    m = tiny_transformer()
    opt = make_optimizer(m, list(m.parameters()), PHASE2)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.065 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2} and {p.dim() for p in no_decay["params"]} == {1}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == count_parameters(m)["params"]


@pytest.mark.parametrize("make", [tiny_gru, tiny_context_lm])
def test_other_models_keep_adamw_defaults(make):
    m = make()
    (group,) = make_optimizer(m, list(m.parameters()), PHASE2).param_groups
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.065


def test_transformer_kv_cache_decoding_matches_the_window():
    """step() (GELU, tied head, no projection) gives the logits contexts_window gives, position by position."""
    torch.manual_seed(0)
    m = TransformerLM(30, 2, 16, 8, None, 0.02, 0.0, heads=2, max_len=12).eval()
    for p in m.parameters():  # away from init, so every path matters
        nn.init.normal_(p, 0.0, 0.3)
    ids = torch.randint(0, 30, (1, 9))
    with torch.no_grad():
        full = m(ids)[0]
        cache = m.new_cache(1, 9)
        steps = torch.stack([m.step(ids[:, t], t, cache)[0] for t in range(9)])
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
