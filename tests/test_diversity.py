"""Every diversity regulariser has a gradient path, and a step moves it the intended way."""

from __future__ import annotations

import pytest
import torch

from newllm.training.diversity import DimUsage, EMAVariance, FrobeniusDeviation, NoDiversity, VICReg
from newllm.training.phase1 import train_phase1
from tests.helpers_science import context_lm, one_thread, phase1_cfg  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def spread(c: torch.Tensor) -> float:
    m = c.detach().reshape(-1, c.shape[-1])
    return float((m - m.mean(0)).norm(dim=-1).mean())


def descend(reg, c0: torch.Tensor, steps: int = 20, lr: float = 0.05) -> tuple[list[float], torch.Tensor]:
    c = c0.clone().requires_grad_(True)
    opt = torch.optim.Adam([c], lr=lr)  # scale-free: the terms differ in gradient scale
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = reg(c)
        loss.backward()
        assert c.grad is not None and float(c.grad.abs().sum()) > 0, "no gradient path"
        opt.step()
        losses.append(float(loss.detach()))
    return losses, c.detach()


def near_collapsed(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.ones(1, 64, 8) + 0.05 * torch.randn(1, 64, 8, generator=g)


@pytest.mark.parametrize("reg", [FrobeniusDeviation(), EMAVariance(momentum=0.9), VICReg(std_target=1.0)],
                         ids=["frobenius", "ema_variance", "vicreg"])
def test_spread_regularisers_push_contexts_apart(reg):
    c0 = near_collapsed()
    losses, c = descend(reg, c0)
    assert losses[-1] < losses[0]
    assert spread(c) > 1.5 * spread(c0)


def test_frobenius_value_by_hand():
    c = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert float(FrobeniusDeviation()(c)) == pytest.approx(-(10.0**0.5) / 8**0.5)  # ||.||_F / sqrt(N * C)
    # the same spread on a 10x longer stream gives the same value (the original's / N did not)
    assert float(FrobeniusDeviation()(c.repeat(10, 1))) == pytest.approx(float(FrobeniusDeviation()(c)))


def test_dim_usage_rewards_rarely_used_dimensions():
    # dimension 0 is heavily used, dimension 1 barely: the gradient grows dimension 1 more
    c0 = torch.tensor([[[3.0, 0.1]] * 16])
    c = c0.clone().requires_grad_(True)
    DimUsage()(c).backward()
    g = -c.grad[0, 1:]  # descent direction at positions that have earlier usage
    assert (g[:, 1] > g[:, 0]).all() and (g > 0).all()
    losses, _ = descend(DimUsage(), c0, steps=5)
    assert losses[-1] < losses[0]


def test_vicreg_covariance_term_decorrelates():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 1, generator=g)
    correlated = torch.cat([z, z + 0.1 * torch.randn(256, 1, generator=g)], dim=1) * 2.0  # std > 1
    def corr(c):
        return float(torch.corrcoef(c.reshape(-1, 2).T)[0, 1])
    _, c = descend(VICReg(std_target=1.0, covariance_weight=1.0), correlated[None], steps=40, lr=0.1)
    assert corr(c) < corr(correlated) - 0.1


def test_none_is_zero_with_a_harmless_graph():
    c = torch.randn(1, 8, 4, requires_grad=True)
    loss = NoDiversity()(c)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(c.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("reg", [FrobeniusDeviation(), DimUsage(), EMAVariance(), VICReg()],
                         ids=["frobenius", "dim_usage", "ema_variance", "vicreg"])
def test_phase1_steps_with_w1_lower_the_regulariser_through_f(reg):
    """w = 1: Phase 1 optimises only L_div; gradients must reach f's weights and lower it."""
    m = context_lm("layerwise", init_std=0.1)
    ids = torch.randint(0, 40, (128,))
    cfg = phase1_cfg(max_iterations=6, min_iterations=6, lr=3e-3, val_iterations=1, erank_samples=64)
    r = train_phase1(m, ids, ids, cfg, 1.0, reg, torch.device("cpu"), progress=False)
    div = [row["phase1/diversity_loss"] for row in r.history]
    assert div[-1] < div[0], div
    assert r.history[0]["phase1/grad_norm"] > 0
