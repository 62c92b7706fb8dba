"""Correctness of the fast paths (never their speed: that is benchmarks/)."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from newllm.metrics import mean_residual
from newllm.models.baselines import TransformerLM
from newllm.training.accel import autocast, maybe_compile
from newllm.training.diversity import NoDiversity
from newllm.training.phase1 import train_phase1
from newllm.training.phase2 import train_contexts_window
from newllm.training.solvers import jacobi_sweep, jacobi_window, sequential_pass
from tests.helpers_science import context_lm, phase1_cfg, phase2_cfg

# A layer-wise gated model over 64 token ids with a large init_std, so the fast paths have work to do.
context_model = functools.partial(context_lm, vocab=64, context_dim=16, embed_dim=8, init_std=0.3)


def test_phase1_loop_is_plain_jacobi_iteration_with_chunks_and_buffer_swap(device):
    """untrained: each iteration must be exactly one periodic Jacobi sweep of the previous one."""
    model = context_model().to(device)
    ids = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(1)).to(device)
    cfg = phase1_cfg(max_tokens=50, max_iterations=4, min_iterations=4, untrained=True, chunk_size=7,
                     convergence_target=1.0, erank_samples=64, val_iterations=1)
    res = train_phase1(model, ids, ids, cfg, 0.0, NoDiversity(), device, progress=False)
    with torch.no_grad():
        x = model.embed(ids.unsqueeze(0))
        p = sequential_pass(model, x)
        expected = []
        for _ in range(4):
            new = jacobi_sweep(model.update, p, x)
            expected.append(mean_residual(new, p))
            p = new
    got = [row["phase1/residual"] for row in res.history]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert expected[0] > 1e-3  # the check would notice a stale buffer


def test_jacobi_window_equals_sequential_recurrence(device):
    model = context_model().to(device)
    x = model.embed(torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(2)).to(device))
    c0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        seq = sequential_pass(model, x, c0)
        exact, sweeps = jacobi_window(model.update, x, c0, max_sweeps=20, tol=0.0)  # T sweeps: exact for any f
    torch.testing.assert_close(exact, seq, atol=1e-5, rtol=1e-5)
    assert sweeps == 21  # 20 no-grad sweeps + 1 with grad


def test_jacobi_window_tolerance_stops_early_on_a_contraction():
    def update(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # Lipschitz 0.1 in c
        return 0.1 * torch.tanh(c) + x

    x = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(8))
    c0 = torch.zeros(2, 4)
    seq = sequential_pass(SimpleNamespace(update=update, context_dim=4), x, c0)
    approx, used = jacobi_window(update, x, c0, max_sweeps=30, tol=1e-12)
    assert used < 15
    torch.testing.assert_close(approx, seq, atol=1e-5, rtol=1e-5)
    truncated, _ = jacobi_window(update, x, c0, max_sweeps=1, tol=0.0, grad_sweeps=0)
    assert (truncated - seq).abs().max() > 1e-3  # one sweep is not the recurrence


def test_phase2_jacobi_solver_matches_sequential_and_trains(device):
    model = context_model().to(device)
    ids = torch.randint(0, 64, (4, 24), generator=torch.Generator().manual_seed(4)).to(device)
    cfg = phase2_cfg(solver="jacobi", jacobi_tol=0.0)
    jac = train_contexts_window(model, ids, cfg)
    seq = model.contexts_window(ids)
    torch.testing.assert_close(jac, seq, atol=1e-5, rtol=1e-5)
    jac.pow(2).sum().backward()  # the last sweep carries the graph into f
    assert all(p.grad is not None for p in model.blocks.parameters())


def _train_head(model: torch.nn.Module, ids: torch.Tensor, precision: str, steps: int = 8) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    with autocast(ids.device, precision):
        for _ in range(steps):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def test_bf16_autocast_learns_like_fp32(device):
    """A bf16 context spanning the loop must see the optimizer's updates (no stale weight cache)."""
    ids = torch.randint(0, 16, (8, 7), generator=torch.Generator().manual_seed(5)).to(device)
    fp32 = _train_head(context_model().to(device), ids, "fp32")
    bf16 = _train_head(context_model().to(device), ids, "bf16")
    assert fp32[-1] < fp32[0] - 0.5
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.05)


def test_compile_switch_keeps_outputs_and_state_dict(device):
    model = context_model(context_dim=8, embed_dim=8, layers=1).to(device)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        eager = model(ids)
        keys = set(model.state_dict())
        # aot_eager: dynamo capture + autograd tracing without C++ codegen (inductor compiles take ~1 min
        # on 2 busy cores; benchmarks/bench_phase1.py --compile exercises it).
        compiled = maybe_compile(copy.deepcopy(model), True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids), eager, atol=1e-5, rtol=1e-5)
    assert set(compiled.state_dict()) == keys  # checkpoints stay loadable by an eager model


@pytest.mark.parametrize("window", [None, 1, 3])
def test_transformer_kv_cache_steps_equal_full_forward(window, device):
    torch.manual_seed(7)
    model = TransformerLM(50, 2, 16, 8, None, 0.1, 0.0, heads=4, max_len=32, attention_window=window).eval().to(device)
    ids = torch.randint(0, 50, (2, 10)).to(device)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 10)
        steps = torch.stack([model.step(ids[:, t], t, cache) for t in range(10)], dim=1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
        assert model.generate(ids[0, :3], 5).shape == (5,)


def test_solver_and_precision_values_are_validated():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from newllm.config import WindowSolver, register_configs, validate
    from newllm.errors import ConfigError
    from newllm.training.phase2 import WINDOW_SOLVERS

    register_configs()
    assert set(WINDOW_SOLVERS) == {s.value for s in WindowSolver}  # every solver choice has an implementation
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(conf):
        for override, options in (("training.phase2.solver=newton", "[sequential, jacobi]"),
                                  ("training.precision=fp8", "[fp32, bf16]")):
            with pytest.raises(ConfigCompositionException) as e:  # choice fields are Enums: refused at compose
                compose("config", overrides=[override])
            assert f"Invalid value '{override.split('=')[1]}', expected one of {options}" in str(e.value.__cause__)
        cfg = compose("config", overrides=["training.phase2.jacobi_sweeps=0"])
    with pytest.raises(ConfigError, match="training.phase2.jacobi_sweeps=0"):
        validate(cfg)


def test_pass0_floor_counts_the_matrices_a_token_multiplies_by():
    """bench_phase1's read and matvec floors: per token, each block's context part of its first Linear (all of
    it where x is not hoisted) and the gates stacked; the hoisted x-part is read once per pass, not per token."""
    from benchmarks.bench_phase1 import pass0_matrices

    c, e = 16, 8
    gated = context_lm("layerwise", "gated", layers=2, vocab=64, context_dim=c, embed_dim=e)
    assert [tuple(w.shape) for w in pass0_matrices(gated)] == [(c, c), (c, 3 * c)] * 2  # H = C
    residual = context_lm("layerwise", "residual", layers=3, vocab=64, context_dim=c, embed_dim=e)
    h = c + e  # block 0 reads the embedding (hoisted); later blocks read a context-dependent x
    assert [tuple(w.shape) for w in pass0_matrices(residual)] == [(c, h), (c + e, h), (c + e, h)]
