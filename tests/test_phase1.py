"""Phase 1 (CVFP): Jacobi vs sequential, carry-over, the loss by hand, steps, convergence, per_token."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from newllm import metrics
from newllm.config import Pass0
from newllm.errors import TrainingError
from newllm.models.context_lm import ContextLM
from newllm.models.updaters import GatedUpdater
from newllm.training.diversity import DimUsage, EMAVariance, FrobeniusDeviation, NoDiversity, VICReg
from newllm.training.phase1 import initial_contexts, sweep, sweep_loss, train_phase1
from newllm.training.solvers import PASS0, chunked_pass, jacobi_window, sequential_pass, shifted_inputs
from tests.helpers_science import context_lm, phase1_cfg

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


def pair_stream(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """u v u v ... in blocks of 8 tokens, a new random pair (u, v) per block: the next token is the one two back."""
    pairs = torch.randint(0, vocab, (n // 8 + 1, 2), generator=gen)
    return pairs.repeat_interleave(4, dim=0).reshape(-1)[:n]


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def moved(before: list[torch.Tensor], model: nn.Module) -> float:
    return max(float((a - b.detach()).abs().max()) for a, b in zip(before, model.parameters(), strict=True))


def test_jacobi_sweeps_match_sequential_pass_on_a_contraction():
    torch.manual_seed(0)
    f = Contraction()
    x = torch.randn(2, 300, 8)
    first = torch.zeros(2, 12)
    ref = sequential_pass(f, x)
    with torch.no_grad():
        out, sweeps = jacobi_window(f.update, x, first, max_sweeps=300, tol=1e-14, grad_sweeps=0)
    assert float((out - ref).abs().max()) < 1e-5
    assert sweeps < 60  # a contraction gets there far sooner than N = 300 sweeps


def test_jacobi_is_exact_after_n_sweeps_for_any_f():
    m = context_lm("sequential", init_std=0.5).double()  # deep, not damped: no contraction needed
    with torch.no_grad():
        x = m.embed(torch.randint(0, 40, (1, 12)))
        ref = sequential_pass(m, x)
        start = torch.zeros(1, 24, dtype=torch.float64)
        out, sweeps = jacobi_window(m.update, x, start, max_sweeps=12, tol=0.0, grad_sweeps=0)
        half, _ = jacobi_window(m.update, x, start, max_sweeps=6, tol=0.0, grad_sweeps=0)
    assert sweeps == 12 and float((out - ref).abs().max()) < 1e-10  # float64: batched and per-step round alike
    assert float((half - ref).abs().max()) > 1e-6  # ...and it really needed the sweeps (not a contraction)


def test_shifted_inputs_into_a_buffer_equal_the_allocating_form():
    p, first = torch.randn(2, 5, 3), torch.randn(2, 3)
    for start in (None, first):
        buffer = torch.full_like(p, float("nan"))
        assert shifted_inputs(p, start, out=buffer) is buffer
        assert torch.equal(buffer, shifted_inputs(p, start))


def test_shifted_inputs_carry_the_last_context_over():
    p = torch.arange(6.0).reshape(1, 3, 2)
    assert shifted_inputs(p).tolist() == [[[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]]


def test_first_sweep_by_hand_carry_over_and_same_mse_for_loss_and_convergence(device):
    """Untrained: iteration 1 equals the hand computation with position 0 reading P_N (not 0)."""
    m = context_lm("layerwise").eval().to(device)
    ids = torch.randint(0, 40, (200,)).to(device)
    cfg = phase1_cfg(untrained=True, max_iterations=1, min_iterations=0, convergence_threshold=1e-3,
                     val_iterations=1, erank_samples=64)
    with torch.no_grad():
        x = m.embed(ids[None])
        p0 = sequential_pass(m, x)
        new = m.update(shifted_inputs(p0), x)
    r = train_phase1(m, ids, ids, cfg, 0.0, NoDiversity(), device, progress=False)
    row = r.history[0]
    mse = float((new - p0).pow(2).mean())
    assert mse > 0  # context carried over: position 0 changed (a reset to c = 0 would give exactly 0)
    assert float((new[0, 1:] - p0[0, 1:]).abs().max()) < 1e-6  # the rest already was the fixed point
    assert row["phase1/cvfp_loss"] == pytest.approx(mse, rel=1e-4)  # plain MSE: no F.normalize
    assert row["phase1/train_step_stability"] == pytest.approx(metrics.convergence_rate(new, p0, 1e-3))
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


def dropout_lm(dropout: float, seed: int) -> ContextLM:
    torch.manual_seed(seed)
    return ContextLM(40, "layerwise", 2, 24, 16, None, 0.1, dropout, partial(GatedUpdater))


REGULARISERS = {"none": NoDiversity, "frobenius": FrobeniusDeviation, "dim_usage": DimUsage,
                "ema_variance": lambda: EMAVariance(momentum=0.5), "vicreg": VICReg}


def sweep_gradients(chunk: int, reg, ids: torch.Tensor, w: float = 0.5, dropout: float = 0.0, seed: int = 3):
    """One training sweep through phase1.sweep from the sequential pass: (mse, div, grads, output), on ids' device."""
    m = (dropout_lm(dropout, seed) if dropout else context_lm("layerwise", seed=seed)).to(ids.device)
    reg = reg.to(ids.device)
    with torch.no_grad():
        p = sequential_pass(m, m.embed(ids[None]))
    out = torch.empty_like(p)
    torch.manual_seed(11)
    mse, div, _ = sweep(m, ids[None], shifted_inputs(p), p, out, w, reg, chunk, train=True)
    return float(mse), float(div), [q.grad.clone() for q in m.updater_parameters()], out


@pytest.mark.parametrize("name", list(REGULARISERS))
def test_chunk_size_changes_neither_loss_nor_gradient_nor_weights(name, device):
    """chunk_size is a memory knob: each regulariser (and the MSE) is computed on the whole sweep.
    Before, the diversity term was per chunk (Frobenius -0.332 at chunk 96 vs -0.238 at chunk 20)."""
    ids = torch.randint(0, 40, (96,), generator=torch.Generator().manual_seed(5)).to(device)
    (mse1, div1, g1, out1), (mse2, div2, g2, out2) = (sweep_gradients(c, REGULARISERS[name](), ids) for c in (96, 20))
    assert (mse1, div1) == pytest.approx((mse2, div2), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in g1) > 0
    trained = []
    for chunk in (96, 20, 7):  # 7: uneven chunks. float64: Adam's first steps are ~lr * sign(grad), which
        m = context_lm("layerwise", seed=3).double().to(device)  # float32 rounding flips for near-zero gradients
        cfg = phase1_cfg(max_iterations=2, min_iterations=2, chunk_size=chunk, val_iterations=1, erank_samples=64)
        r = train_phase1(m, ids, ids, cfg, 0.5, REGULARISERS[name]().to(device), device, progress=False)
        trained.append((weights(m), [v for row in r.history for v in (row["phase1/cvfp_loss"],
                                                                        row["phase1/diversity_loss"])]))
    (w1, l1), *others = trained
    for w2, l2 in others:
        assert l1 == pytest.approx(l2, rel=1e-9, abs=1e-12)
        assert max(float((a - b).abs().max()) for a, b in zip(w1, w2, strict=True)) < 1e-9


def test_chunked_sweep_replays_dropout_masks_for_its_gradient(device):
    """With dropout, the gradient of a chunked sweep is that of the loss at the contexts it returns:
    the re-run chunks must see the masks of the no-grad forward (on CUDA: the CUDA generator's), not fresh ones."""
    ids = torch.randint(0, 40, (60,), generator=torch.Generator().manual_seed(6)).to(device)
    mse, div, grads, out = sweep_gradients(20, FrobeniusDeviation(), ids, dropout=0.3)
    m = dropout_lm(0.3, seed=3).to(device)
    with torch.no_grad():
        p = sequential_pass(m, m.embed(ids[None]))
    c_in = shifted_inputs(p)
    torch.manual_seed(11)  # the same masks, drawn chunk by chunk in the same order, but with the graph kept
    c = torch.cat([m.update(c_in[:, a:a + 20], m.embed(ids[None, a:a + 20])) for a in range(0, 60, 20)], dim=1)
    loss, ref_mse, _, _ = sweep_loss(c, p, 0.5, FrobeniusDeviation())
    loss.backward()
    torch.testing.assert_close(out, c.detach())
    assert mse == pytest.approx(float(ref_mse.detach()))
    for a, b in zip(grads, [q.grad for q in m.updater_parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_gated_layerwise_reaches_the_convergence_target_by_forgetting_and_does_not_stop_on_it(device):
    """Trained from zeros with w = 0, f learns to contract: within 10 iterations every held-out position
    converges from c = 0 (the old stop rule fired there, 'val_converged'). It got there by forgetting: on a
    stream whose next token is the one two back (u v u v ..., a new pair every 8 tokens) its contexts tell
    the probe nothing the current token does not (gain 0), so the rule of issue 24 lets Phase 1 go on."""
    torch.manual_seed(1)
    m = context_lm("layerwise", context_dim=16, embed_dim=12, init_std=0.1, seed=1).to(device)
    before = weights(m)
    gen = torch.Generator().manual_seed(0)
    ids, val = pair_stream(256, 40, gen), pair_stream(128, 40, gen)
    cfg = phase1_cfg(max_iterations=30, min_iterations=5, lr=3e-3, convergence_threshold=1e-3, init="zeros",
                     val_iterations=20, val_every=5, val_streams=1, erank_samples=256)
    r = train_phase1(m, ids, val, cfg, 0.0, NoDiversity(), device, progress=False)
    checks = [row for row in r.history if "phase1/val_convergence_rate" in row]
    assert [row["phase1/val_convergence_rate"] >= 0.95 for row in checks][1:] == [True] * (len(checks) - 1)
    assert max(row["phase1/val_probe_gain"] for row in checks[1:]) < cfg.min_probe_gain
    assert r.metrics["phase1/stop_reason"] == "max_iterations" and r.metrics["phase1/iterations"] == 30
    assert moved(before, m) > 1e-3
    losses = [row["phase1/cvfp_loss"] for row in r.history]
    assert losses[-1] < max(losses)


@pytest.mark.parametrize("untrained", [False, True])
def test_per_token_mode_trains_or_only_measures(untrained, device):
    m = context_lm("layerwise").to(device)
    before = weights(m)
    ids = torch.randint(0, 40, (300,))
    cfg = phase1_cfg(mode="per_token", untrained=untrained, max_iterations=8, min_iterations=8,
                     val_iterations=8, erank_samples=64)
    r = train_phase1(m, ids, ids, cfg, 0.0, NoDiversity(), device, progress=False)
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


@pytest.mark.slow
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
            grads = [float(r["phase1/grad_norm"]) for r in csv.DictReader(f) if r["phase"] == "phase1"]
        assert len(grads) == m["phase1/iterations"]
        assert all(g == 0 for g in grads) if untrained else all(g > 0 for g in grads)
        assert 0 <= m["phase1/identity_score"] <= 1 and m["phase1/val_tokens"] > 0
        seen.add((arch, untrained))
    assert len(seen) == 4


def test_pass0_is_computed_in_eval_mode_whatever_mode_training_left():
    """Pass 0 is a measurement of f: with dropout > 0 it used to run with dropout on (the model in train mode)."""
    m = dropout_lm(0.5, seed=4).train()
    ids = torch.randint(0, 40, (1, 50), generator=torch.Generator().manual_seed(7))
    cfg = phase1_cfg()
    with torch.no_grad():
        x = m.embed(ids)
        p0 = initial_contexts(m, x, cfg)
        p0_chunked = initial_contexts(m, x, phase1_cfg(init="chunked", init_chunks=5))
        assert m.training  # the caller's mode is restored
        m.eval()
        expected, expected_chunked = sequential_pass(m, x), chunked_pass(m, x, 5)
    torch.testing.assert_close(p0, expected)
    torch.testing.assert_close(p0_chunked, expected_chunked)


@pytest.mark.parametrize("init", [p.value for p in Pass0])
def test_every_pass0_choice_has_a_solver_and_all_reach_the_same_fixed_point(init):
    # training.phase1.init is an Enum; PASS0 must cover it. Pass 0 is only the first guess: sweeping
    # any of them long enough lands on the sequential recurrence (a contracting f, 40 positions).
    assert set(PASS0) == {p.value for p in Pass0}
    m = dropout_lm(0.0, seed=4).eval()
    ids = torch.randint(0, 40, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x = m.embed(ids)
        p = initial_contexts(m, x, phase1_cfg(init=init, init_chunks=4, init_burn_in=3))
        for _ in range(x.shape[1]):  # N open-chain sweeps from any start are exact
            p = m.update(shifted_inputs(p, torch.zeros_like(p[:, 0])), x)
        torch.testing.assert_close(p, sequential_pass(m, x), atol=1e-5, rtol=1e-5)


def test_held_out_measurements_ignore_dropout():
    """evaluate_phase1 inside training (train mode, dropout on) gives what an eval-mode f gives."""
    ids = torch.randint(0, 40, (128,), generator=torch.Generator().manual_seed(8))
    m = dropout_lm(0.5, seed=4)
    cfg = phase1_cfg(max_iterations=3, min_iterations=3, val_every=1, val_iterations=4, erank_samples=64, lr=1e-9)
    r = train_phase1(m, ids, ids, cfg, 0.0, NoDiversity(), CPU, progress=False)
    assert r.metrics["phase1/val_convergence_rate"] == pytest.approx(r.history[-1]["phase1/val_convergence_rate"])
    rates = [row["phase1/val_fixed_point_distance"] for row in r.history]
    assert rates == pytest.approx([rates[0]] * 3, rel=1e-4)  # lr ~ 0: f unchanged, so the same held-out figure


# ------------------------------------------------------------ held-out objective, test stream, memory length, burn-in
def phase1_run(tmp_path, name: str, *overrides: str) -> dict:
    """A real run (data, model, Phase 1, metrics) in-process, TINY settings, Phase 2 off."""
    from hydra import compose, initialize_config_dir

    from newllm.config import register_configs
    from newllm.run import run
    from tests.conftest import REPO, TINY

    register_configs()
    with initialize_config_dir(str(REPO / "conf")):
        cfg = compose("config", [*TINY, f"paths.output_root={tmp_path / 'outputs'}", "training.phase2.enabled=false",
                                 "save_checkpoint=false", "save_contexts=false", *overrides])
    metrics_, _ = run(cfg, tmp_path / name)
    return metrics_


@pytest.mark.slow
def test_held_out_objective_orders_trained_above_doing_nothing(tmp_path):
    """The same init (seed 42) on the same data: untrained, lr ~ 0 and trained. Trained from zeros with w = 0,
    f learns to contract; untrained and lr ~ 0 leave f as it was, so they score the init's f, far from 1."""
    zeros = ["training.phase1.init=zeros", "training.dist_reg_weight=0"]
    trained = phase1_run(tmp_path, "trained", *zeros)
    untrained = phase1_run(tmp_path, "untrained", *zeros, "training.phase1.untrained=true")
    frozen = phase1_run(tmp_path, "lr0", *zeros, "training.phase1.lr=1e-9")
    key = "phase1/val_convergence_rate"
    assert untrained[key] == pytest.approx(frozen[key], abs=1e-3) and untrained[key] < 0.5
    assert trained[key] > untrained[key] + 0.1
    assert trained["phase1/val_memory_length"] < untrained["phase1/val_memory_length"]
    assert untrained["phase1/val_memory_length_capped"] == 1 == frozen["phase1/val_memory_length_capped"]


@pytest.mark.slow
def test_doing_nothing_neither_scores_one_nor_stops_converged(tmp_path):
    """From the sequential pass, an lr ~ 0 run's training rate is ~1 by construction (it stopped 'converged'
    at min_iterations); renamed, it stays in the metrics, and neither the objective nor the stop follows it."""
    frozen = phase1_run(tmp_path, "lr0", "training.phase1.lr=1e-9")
    untrained = phase1_run(tmp_path, "untrained", "training.phase1.untrained=true")
    for m in (frozen, untrained):
        assert m["phase1/train_step_stability"] > 0.99
        assert m["phase1/val_convergence_rate"] < 0.9
    assert frozen["phase1/stop_reason"] == "max_iterations" and frozen["phase1/iterations"] == 6  # training=quick
    assert untrained["phase1/stop_reason"] == "untrained" and untrained["phase1/iterations"] == 2  # min_iterations


def collapsed_lm() -> ContextLM:
    """f(c, x) independent of x (every weight but the LayerNorms and the update bias zero): one attractor."""
    m = context_lm("layerwise", seed=5)
    with torch.no_grad():
        for name, param in m.named_parameters():
            if name.startswith("blocks.") and "norm" not in name:
                param.zero_()
        for block in m.blocks:
            block.updater.update.bias.normal_(0.0, 1.0)
    return m.eval()


def test_a_collapsed_f_converges_at_once_and_is_pruned_by_the_cvfp_rules():
    """What a collapsed run scores: the held-out objective's maximum, within a few sweeps. Only its rank tells,
    so the optuna_cvfp preset's collapse rule (training and held-out rank) must stop it."""
    from omegaconf import OmegaConf

    from newllm.config import EarlyStopConfig
    from newllm.sweep.hooks import early_stop_reason
    from newllm.training.phase1 import evaluate_phase1, held_out_ids
    from tests.conftest import REPO

    ids = torch.randint(0, 40, (512,), generator=torch.Generator().manual_seed(9))
    cfg = phase1_cfg(erank_samples=512)
    m = evaluate_phase1(collapsed_lm(), held_out_ids(ids, cfg), cfg)
    assert m["phase1/val_convergence_rate"] == 1.0 and m["phase1/val_memory_length"] <= 4
    assert m["phase1/val_effective_rank"] < 1.5 and m["phase1/val_pairwise_distance"] < 0.2  # one point (norms ~5)
    rules = OmegaConf.load(REPO / "sweeps" / "optuna_cvfp.yaml").hydra.sweeper.early_stop
    row = {"phase": "phase1", "step": 10, "phase1/loss": 0.0,
           "phase1/val_effective_rank": m["phase1/val_effective_rank"]}
    reason = early_stop_reason(row, EarlyStopConfig(**OmegaConf.to_container(rules)), 24, lambda: 0.0)
    assert reason.startswith("effective_rank_collapse: held-out effective rank 1.")


def test_a_test_stream_is_measured_once_under_its_own_prefix():
    """evaluate_phase1 serves any held-out stream: validation selects (phase1/val_*), test reports (phase1/test_*)."""
    from newllm.training.phase1 import evaluate_phase1, held_out_ids

    g = torch.Generator().manual_seed(10)
    train, val, test = (torch.randint(0, 40, (n,), generator=g) for n in (128, 96, 160))
    m = context_lm("layerwise")
    cfg = phase1_cfg(max_iterations=2, min_iterations=2, val_iterations=4, memory_cap=8, erank_samples=64)
    r = train_phase1(m, train, val, cfg, 0.5, FrobeniusDeviation(), CPU, progress=False, test_ids=test)
    expected = evaluate_phase1(m, held_out_ids(test, cfg), cfg, split="test")
    assert {k: v for k, v in r.metrics.items() if k.startswith("phase1/test_")} == pytest.approx(expected)
    assert r.metrics["phase1/test_tokens"] == 160 and r.metrics["phase1/val_tokens"] == 96
    assert not any(k.startswith("phase1/test_") for row in r.history for k in row)  # never used to select
    with pytest.raises(TrainingError, match="the test stream .* too short"):
        train_phase1(context_lm(), train, val, cfg, 0.5, FrobeniusDeviation(), CPU, progress=False,
                     test_ids=test[:24])


def test_memory_length_is_a_flagged_lower_bound_on_streams_shorter_than_the_cap():
    """k sweeps from zeros are exact at the first k positions: on streams of L tokens every f 'converges'
    by L sweeps, so a memory length there says nothing beyond L - 1."""
    from newllm.training.phase1 import evaluate_phase1, held_out_ids

    ids = torch.randint(0, 40, (96,), generator=torch.Generator().manual_seed(12))
    m = context_lm("sequential", init_std=0.5).eval()  # deep, undamped: long memory
    cfg = phase1_cfg(val_iterations=2, val_streams=8, memory_cap=128, erank_samples=64)  # streams of 12
    out = evaluate_phase1(m, held_out_ids(ids, cfg), cfg)
    assert (out["phase1/val_memory_length"], out["phase1/val_memory_length_capped"]) == (11, 1)


def test_burn_in_init_with_full_burn_in_trains_exactly_like_the_sequential_init():
    """init=burn_in is pass 0 only: with burn_in >= N it is the sequential pass, so the whole run agrees."""
    ids, val = torch.randint(0, 40, (120,), generator=torch.Generator().manual_seed(2)), torch.randint(0, 40, (64,))
    results = []
    for init in ("sequential", "burn_in"):
        m = context_lm("layerwise", context_dim=16, embed_dim=12, init_std=0.1, seed=1)
        cfg = phase1_cfg(max_iterations=3, min_iterations=3, init=init, init_chunks=4, init_burn_in=120,
                         val_iterations=4, val_every=3, val_streams=1, erank_samples=64)
        results.append(train_phase1(m, ids, val, cfg, 0.5, FrobeniusDeviation(), CPU, progress=False))
    assert results[0].history[-1]["phase1/cvfp_loss"] == pytest.approx(results[1].history[-1]["phase1/cvfp_loss"],
                                                                          rel=1e-4)
    for key in ("phase1/residual", "phase1/train_step_stability", "phase1/val_convergence_rate"):
        assert results[1].metrics[key] == pytest.approx(results[0].metrics[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_bad_burn_in_is_a_one_line_config_error(tiny_run):
    run_dir, proc = tiny_run("bad", "training.phase1.init=burn_in", "training.phase1.init_burn_in=-3", check=False)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "training.phase1.init_burn_in=-3" in line and "expected an integer >= 0" in line
    assert not (run_dir / "tokenizer.json").exists()  # refused before the data was read
