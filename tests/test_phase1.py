"""Phase 1 (CVFP): Jacobi vs sequential, carry-over, the loss by hand, steps, convergence, per_token."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from newllm import metrics
from newllm.errors import TrainingError
from newllm.training.diversity import FrobeniusDeviation, NoDiversity
from newllm.training.phase1 import train_phase1
from newllm.training.solvers import jacobi_solve, sequential_pass, shifted_inputs
from tests.helpers_science import context_lm, one_thread, phase1_cfg  # noqa: F401

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


class Contraction(nn.Module):
    """f(c, x) = tanh(c W + x U) with ||W||_2 = 0.5: Lipschitz 0.5 in c."""

    def __init__(self, context_dim: int = 12, embed_dim: int = 8) -> None:
        super().__init__()
        self.context_dim = context_dim
        w = torch.randn(context_dim, context_dim)
        self.w = 0.5 * w / torch.linalg.matrix_norm(w, ord=2)
        self.u = torch.randn(embed_dim, context_dim)

    def update(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(c @ self.w + x @ self.u)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def moved(before: list[torch.Tensor], model: nn.Module) -> float:
    return max(float((a - b.detach()).abs().max()) for a, b in zip(before, model.parameters(), strict=True))


def test_jacobi_sweeps_match_sequential_pass_on_a_contraction():
    torch.manual_seed(0)
    f = Contraction()
    x = torch.randn(2, 300, 8)
    first = torch.zeros(2, 12)
    ref = sequential_pass(f.update, x)
    out, residuals = jacobi_solve(f.update, x, torch.zeros(2, 300, 12), sweeps=300, first=first, tol=1e-14)
    assert float((out - ref).abs().max()) < 1e-5
    assert len(residuals) < 60  # a contraction gets there far sooner than N = 300 sweeps


def test_jacobi_is_exact_after_n_sweeps_for_any_f():
    m = context_lm("sequential", init_std=0.5).double()  # deep, not damped: no contraction needed
    with torch.no_grad():
        x = m.embed(torch.randint(0, 40, (1, 12)))
        ref = sequential_pass(m.update, x)
        start = torch.zeros(1, 12, 24, dtype=torch.float64)
        out, residuals = jacobi_solve(m.update, x, start, sweeps=12, first=start[:, 0])
    assert float((out - ref).abs().max()) < 1e-10  # float64: batched and per-step matmuls round alike
    assert residuals[5] > 1e-6  # ...and it really needed the sweeps (not a contraction)


def test_shifted_inputs_carry_the_last_context_over():
    p = torch.arange(6.0).reshape(1, 3, 2)
    assert shifted_inputs(p).tolist() == [[[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]]


def test_first_sweep_by_hand_carry_over_and_same_mse_for_loss_and_convergence():
    """Untrained: iteration 1 equals the hand computation with position 0 reading P_N (not 0)."""
    m = context_lm("layerwise").eval()
    ids = torch.randint(0, 40, (200,))
    cfg = phase1_cfg(untrained=True, max_iterations=1, min_iterations=0, convergence_threshold=1e-3,
                     val_iterations=1, erank_samples=64)
    with torch.no_grad():
        x = m.embed(ids[None])
        p0 = sequential_pass(m.update, x)
        new = m.update(shifted_inputs(p0), x)
    r = train_phase1(m, ids, ids, cfg, 0.0, NoDiversity(), CPU, progress=False)
    row = r.history[0]
    mse = float((new - p0).pow(2).mean())
    assert mse > 0  # context carried over: position 0 changed (a reset to c = 0 would give exactly 0)
    assert float((new[0, 1:] - p0[0, 1:]).abs().max()) < 1e-6  # the rest already was the fixed point
    assert row["phase1/cvfp_loss"] == pytest.approx(mse, rel=1e-4)  # plain MSE: no F.normalize
    assert row["phase1/convergence_rate"] == pytest.approx(metrics.convergence_rate(new, p0, 1e-3))
    assert row["phase1/residual"] == pytest.approx(metrics.mean_residual(new, p0), rel=1e-4)


def test_target_is_the_previous_sweep_so_loss_is_positive_off_the_fixed_point():
    m = context_lm("layerwise")
    ids = torch.randint(0, 40, (100,))
    cfg = phase1_cfg(init="zeros", max_iterations=1, min_iterations=0, val_iterations=1, erank_samples=64)
    before = copy.deepcopy(m).eval()
    r = train_phase1(m, ids, ids, cfg, 0.0, NoDiversity(), CPU, progress=False)
    with torch.no_grad():
        c = before.update(torch.zeros(1, 100, 24), before.embed(ids[None]))
    # loss = MSE(f(0, x), 0) = mean c^2 (~1 for LayerNorm outputs); an overwritten target gives 0
    assert r.history[0]["phase1/cvfp_loss"] == pytest.approx(float(c.pow(2).mean()), rel=1e-4)
    assert r.history[0]["phase1/cvfp_loss"] > 0.5


def test_optimizer_steps_even_when_total_loss_is_negative():
    m = context_lm("layerwise")
    before = weights(m)
    cfg = phase1_cfg(max_iterations=2, min_iterations=2, val_iterations=1, erank_samples=64)
    r = train_phase1(m, torch.randint(0, 40, (128,)), torch.randint(0, 40, (64,)), cfg, 0.9,
                     FrobeniusDeviation(), CPU, progress=False)
    assert all(row["phase1/loss"] < 0 for row in r.history)
    assert moved(before, m) > 1e-4
    assert r.history[0]["phase1/grad_norm"] > 0


def test_untrained_only_measures():
    m = context_lm("sequential")
    before = weights(m)
    cfg = phase1_cfg(untrained=True, max_iterations=3, min_iterations=3, val_iterations=2, erank_samples=64)
    r = train_phase1(m, torch.randint(0, 40, (128,)), torch.randint(0, 40, (64,)), cfg, 0.5,
                     FrobeniusDeviation(), CPU, progress=False)
    assert moved(before, m) == 0.0
    assert len(r.history) == 3 and r.history[-1]["phase1/grad_norm"] == 0.0


def test_chunked_sweep_accumulates_the_same_gradient():
    ids = torch.randint(0, 40, (96,))
    results = []
    for chunk in (96, 20):
        m = context_lm("layerwise", seed=3)
        cfg = phase1_cfg(max_iterations=1, min_iterations=1, chunk_size=chunk, val_iterations=1, erank_samples=64)
        r = train_phase1(m, ids, ids, cfg, 0.0, NoDiversity(), CPU, progress=False)
        results.append((weights(m), r.history[0]["phase1/cvfp_loss"]))
    (w1, l1), (w2, l2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(w1, w2, strict=True)) < 1e-6


def test_gated_layerwise_reaches_the_convergence_target_and_moves_weights():
    torch.manual_seed(1)
    m = context_lm("layerwise", context_dim=16, embed_dim=12, init_std=0.1, seed=1)
    before = weights(m)
    ids = torch.randint(0, 40, (256,))
    cfg = phase1_cfg(max_iterations=60, min_iterations=5, lr=3e-3, convergence_threshold=1e-3,
                     val_iterations=20, erank_samples=256)
    r = train_phase1(m, ids, torch.randint(0, 40, (128,)), cfg, 0.0, NoDiversity(), CPU, progress=False)
    assert r.metrics["phase1/convergence_rate"] >= 0.95
    assert r.metrics["phase1/iterations"] < 60  # stopped early at the target
    assert moved(before, m) > 1e-3
    losses = [row["phase1/cvfp_loss"] for row in r.history]
    assert losses[-1] < max(losses)


@pytest.mark.parametrize("untrained", [False, True])
def test_per_token_mode_trains_or_only_measures(untrained):
    m = context_lm("layerwise")
    before = weights(m)
    ids = torch.randint(0, 40, (300,))
    cfg = phase1_cfg(mode="per_token", untrained=untrained, max_iterations=8, min_iterations=8,
                     val_iterations=8, erank_samples=64)
    r = train_phase1(m, ids, ids, cfg, 0.0, NoDiversity(), CPU, progress=False)
    assert r.metrics["phase1/tokens"] == len(torch.unique(ids))  # each distinct token once
    # iteration 1 from c = 0: the per-token loss MSE(f(0, x), 0) > 0
    assert r.history[0]["phase1/cvfp_loss"] > 0.5
    if untrained:
        assert moved(before, m) == 0.0
    else:
        assert moved(before, m) > 1e-3


def test_validation_stream_too_short_fails_loudly():
    m = context_lm()
    with pytest.raises(TrainingError, match="cannot form"):
        train_phase1(m, torch.randint(0, 40, (64,)), torch.randint(0, 40, (1,)),
                     phase1_cfg(max_iterations=1, min_iterations=0), 0.0, NoDiversity(), CPU, progress=False)


def test_architecture_by_training_multirun_cli(tmp_path, monkeypatch):
    """'sequential vs layer-wise x trained vs untrained' is one multirun (per-token fixed point)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: extra threads only contend
    import csv

    from omegaconf import OmegaConf

    from tests.conftest import TINY, read_metrics, run_cli

    out = tmp_path / "out"
    run_cli(["-m", *TINY, "model=sequential,layerwise", "training.phase1.untrained=true,false",
             "training.phase1.mode=per_token", "training.phase2.enabled=false", f"paths.output_root={out}",
             f"hydra.sweep.dir={out}/sweep"], cwd=tmp_path)
    seen = set()
    for job in sorted((out / "sweep").glob("[0-9]*")):
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        arch, untrained = cfg.model.architecture, cfg.training.phase1.untrained
        m = read_metrics(job)
        with open(job / "history.csv") as f:
            grads = [float(r["phase1/grad_norm"]) for r in csv.DictReader(f) if r["phase"] == "1"]
        assert len(grads) == m["phase1/iterations"]
        assert all(g == 0 for g in grads) if untrained else all(g > 0 for g in grads)
        assert 0 <= m["phase1/identity_score"] <= 1 and m["phase1/val_tokens"] > 0
        seen.add((arch, untrained))
    assert len(seen) == 4
