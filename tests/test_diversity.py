"""Every diversity regulariser has a gradient path, and a step moves it the intended way."""

from __future__ import annotations

import pytest
import torch

from newllm.training.diversity import DimUsage, EMAVariance, FrobeniusDeviation, NoDiversity, VICReg
from newllm.training.phase1 import train_phase1
from tests.helpers_science import context_lm, phase1_cfg

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
    # rows (2, 0), (0, 0), (1, 2), (1, -2): mean row (1, 0), squared deviations 10, mean square 14 / 8
    c = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, -2.0]])
    rms_deviation, rms = (10.0 / 8) ** 0.5, (14.0 / 8) ** 0.5  # ||C - mean||_F / sqrt(N * C), sqrt(mean C^2)
    assert float(FrobeniusDeviation()(c)) == pytest.approx(-rms_deviation / rms)
    # the same spread on a 10x longer stream gives the same value (the research code's division by N did not)
    assert float(FrobeniusDeviation()(c.repeat(10, 1))) == pytest.approx(float(FrobeniusDeviation()(c)))


def test_dim_usage_rewards_rarely_used_dimensions():
    # dimension 0 is heavily used, dimension 1 barely: the descent direction grows dimension 1
    # (and, the contexts' scale being fixed, shrinks dimension 0 a little)
    c0 = torch.tensor([[[3.0, 0.1]] * 16])
    c = c0.clone().requires_grad_(True)
    DimUsage()(c).backward()
    g = -c.grad[0, 1:]  # descent direction at positions that have earlier usage
    assert (g[:, 1] > g[:, 0]).all() and (g[:, 1] > 0).all()
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


# ----------------------------------------------------------------------------- scale invariance and documented ranges
ALL = [FrobeniusDeviation(), DimUsage(), EMAVariance(momentum=0.9), VICReg()]
ALL_IDS = ["frobenius", "dim_usage", "ema_variance", "vicreg"]


@pytest.mark.parametrize("reg", ALL, ids=ALL_IDS)
def test_regularisers_cannot_be_met_by_rescaling_the_contexts(reg):
    """A LayerNorm gain that grows (1.25-1.63 at w = 0.9 on the default run) must not lower L_div."""
    c = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0)) + 0.3
    values = []
    for scale in (1.0, 1.6, 10.0):
        reg.reset()
        values.append(float(reg(scale * c)))
    assert values == pytest.approx([values[0]] * 3, rel=1e-5, abs=1e-6)
    # ...and no gradient along the scale direction: d L(s C) / d s = <dL/dC, C> = 0
    reg.reset()
    leaf = c.clone().requires_grad_(True)
    reg(leaf).backward()
    assert abs(float((leaf.grad * c).sum())) < 1e-5 * float(leaf.grad.norm() * c.norm()) + 1e-7


def test_frobenius_stays_in_its_documented_range_with_a_grown_layernorm_gain():
    g = torch.Generator().manual_seed(1)
    ln = torch.nn.functional.layer_norm(torch.randn(512, 16, generator=g), (16,))
    for gain in (1.0, 1.63, 4.0):
        value = float(FrobeniusDeviation()(gain * ln))
        assert -1.0 <= value <= 0.0
    assert float(FrobeniusDeviation()(torch.ones(64, 16))) == pytest.approx(0.0, abs=1e-6)  # one point
    # zero-mean, unit-RMS contexts spread as far as they can: the bound -1 is reached
    signs = torch.tensor([[1.0], [-1.0]]).repeat(32, 16)
    assert float(FrobeniusDeviation()(signs)) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize(("reg", "low", "high"), [(FrobeniusDeviation(), -1.0, 0.0), (DimUsage(), -1.0, 0.0),
                                                  (EMAVariance(momentum=0.9), -2.0, 0.0)],
                         ids=["frobenius", "dim_usage", "ema_variance"])
def test_regularisers_lie_in_their_documented_range(reg, low, high):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):  # successive sweeps whose mean moves: the EMA lags behind it
        c = 5.0 * torch.randn(1, 128, 8, generator=g) + 20.0 * torch.randn(8, generator=g)
        assert low <= float(reg(c)) <= high


# ----------------------------------------------------------------------------- EMA: running statistics across sweeps
def test_ema_variance_running_mean_is_an_ema_across_calls():
    reg = EMAVariance(momentum=0.75)
    a, b = torch.randn(1, 32, 4), torch.randn(1, 32, 4) + 2.0
    reg(a)
    reg(b)
    unit = lambda c: c / c.pow(2).mean().sqrt()  # noqa: E731 -- statistics of unit-RMS contexts
    expected = 0.75 * unit(a).reshape(-1, 4).mean(0) + 0.25 * unit(b).reshape(-1, 4).mean(0)
    torch.testing.assert_close(reg.running_mean, expected)


def test_ema_variance_momentum_changes_phase1_training():
    """momentum 0.99 and 0.0 gave bit-identical weights: the running mean was reset every sweep."""
    ids = torch.randint(0, 40, (128,), generator=torch.Generator().manual_seed(0))
    trained = []
    for momentum in (0.99, 0.0):
        m = context_lm("layerwise", init_std=0.1)
        cfg = phase1_cfg(max_iterations=4, min_iterations=4, lr=3e-3, val_iterations=1, erank_samples=64)
        train_phase1(m, ids, ids, cfg, 1.0, EMAVariance(momentum=momentum), torch.device("cpu"), progress=False)
        trained.append([p.detach().clone() for p in m.parameters()])
    assert max(float((a - b).abs().max()) for a, b in zip(*trained, strict=True)) > 1e-4


def test_ema_variance_running_mean_is_part_of_the_phase1_resume_state():
    """Interrupted at iteration 4 and resumed from its checkpoint, a run ends with the same weights as one
    that never stopped; resumed without the running mean, it does not (the state matters)."""
    import copy

    ids = torch.randint(0, 40, (128,), generator=torch.Generator().manual_seed(1))
    cfg = phase1_cfg(max_iterations=6, min_iterations=6, lr=3e-3, val_iterations=1, erank_samples=64,
                     checkpoint_every=4)
    cpu = torch.device("cpu")
    saved = {}

    def keep(loop, model):
        saved.update(loop=copy.deepcopy(loop), model=copy.deepcopy(model.state_dict()))

    m = context_lm("layerwise")
    train_phase1(m, ids, ids, cfg, 1.0, EMAVariance(momentum=0.9), cpu, progress=False,
                 checkpoint=lambda loop: keep(loop, m))
    assert saved["loop"]["iteration"] == 4 and saved["loop"]["diversity"]["attributes"]["running_mean"] is not None
    finals = []
    for forget_running_mean in (False, True):
        resumed = context_lm("layerwise")
        resumed.load_state_dict(saved["model"])
        state = copy.deepcopy(saved["loop"])
        if forget_running_mean:
            state["diversity"]["attributes"]["running_mean"] = None
        train_phase1(resumed, ids, ids, cfg, 1.0, EMAVariance(momentum=0.9), cpu, progress=False, state=state)
        finals.append([p.detach().clone() for p in resumed.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(finals[0], [p.detach() for p in m.parameters()], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(finals[1], finals[0], strict=True))
