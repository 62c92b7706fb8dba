"""Metric functions on hand-made inputs with hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from newllm import metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_effective_rank_identity_is_full_and_rank_one_is_one():
    c = 16
    assert metrics.effective_rank(torch.eye(c)) == pytest.approx(c, rel=1e-6)
    assert metrics.effective_rank(5.0 * torch.eye(c)) == pytest.approx(c, rel=1e-6)  # scale-free
    u, v = torch.randn(200, 1), torch.randn(1, c)
    assert metrics.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-4)


def test_effective_rank_of_known_spectrum():
    # singular values (3, 1): p = (0.75, 0.25), erank = exp(H(p))
    m = torch.diag(torch.tensor([3.0, 1.0]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics.effective_rank(m) == pytest.approx(math.exp(h), rel=1e-6)


def test_effective_rank_uncentred_vs_centred_and_fixed_sample():
    # all rows equal: uncentred rank 1, centred rank 0 (no spread at all)
    rows = torch.ones(50, 8)
    assert metrics.effective_rank(rows) == pytest.approx(1.0, abs=1e-6)
    assert metrics.effective_rank(rows, centered=True) == 0.0
    big = torch.randn(1000, 8)
    assert metrics.sample_rows(big, 100).shape == (100, 8)
    assert torch.equal(metrics.sample_rows(big, 100), metrics.sample_rows(big, 100))  # fixed seed


def test_participation_ratio_by_hand():
    # centred=False: eigenvalues (s^2) = (4, 1): PR = 25 / 17
    m = torch.diag(torch.tensor([2.0, 1.0]))
    assert metrics.participation_ratio(m, centered=False) == pytest.approx(25 / 17, rel=1e-6)
    assert metrics.participation_ratio(torch.eye(10), centered=False) == pytest.approx(10.0, rel=1e-6)


def test_convergence_rate_and_residual_by_hand():
    old = torch.zeros(4, 2)
    new = torch.tensor([[0.0, 0.0], [0.1, 0.1], [1.0, 0.0], [3.0, 4.0]])
    # per-token MSE: 0, 0.01, 0.5, 12.5
    assert metrics.per_token_mse(new, old).tolist() == pytest.approx([0.0, 0.01, 0.5, 12.5])
    assert metrics.convergence_rate(new, old, threshold=0.02) == 0.5
    assert metrics.convergence_rate(new, old, threshold=0.005) == 0.25
    # L2 norms 0, sqrt(0.02), 1, 5
    assert metrics.mean_residual(new, old) == pytest.approx((math.sqrt(0.02) + 1 + 5) / 4)


def test_identity_mapping_score():
    assert metrics.identity_mapping_score(lambda c, x: c, 8, 4) == pytest.approx(1.0)
    assert metrics.identity_mapping_score(lambda c, x: -2 * c, 8, 4) == pytest.approx(-1.0)
    assert abs(metrics.identity_mapping_score(lambda c, x: torch.randn_like(c), 64, 4, n=2048)) < 0.05


def test_collapse_stats_by_hand():
    collapsed = torch.ones(10, 3)
    s = metrics.collapse_stats(collapsed)
    assert s["mean_norm"] == pytest.approx(math.sqrt(3))
    assert s["spread"] == pytest.approx(0.0) and s["pairwise_distance"] == pytest.approx(0.0)
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]] * 5)
    ids = torch.tensor([0, 1] * 5)
    s = metrics.collapse_stats(two, ids)
    assert s["spread"] == pytest.approx(1.0)
    assert s["pairwise_distance"] == pytest.approx(2.0)  # only pairs of different tokens count


def test_perplexity_and_accuracy_by_hand():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e4) == math.inf
    logits = torch.tensor([[[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]])
    targets = torch.tensor([[0, 0, 0]])
    mask = torch.tensor([[True, True, False]])
    ce, correct, n = metrics.masked_token_sums(logits, targets, mask).tolist()
    expected = math.log(2.0) + math.log(1 + math.exp(-5.0))
    assert ce == pytest.approx(expected, rel=1e-5)
    assert n == 2
    assert correct == 2  # argmax of a tie is index 0 (the target), and 5 > 0; the masked wrong one is skipped
    # the training loss is the mean of the same per-token CE (one masked cross-entropy for training and eval)
    assert float(metrics.masked_cross_entropy(logits, targets, mask)) == pytest.approx(expected / 2, rel=1e-5)


def test_masked_cross_entropy_of_an_empty_mask_is_zero_with_a_gradient_path():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    nothing = torch.zeros(1, 3, dtype=torch.bool)
    loss = metrics.masked_cross_entropy(logits, torch.zeros(1, 3, dtype=torch.long), nothing)
    loss.backward()
    assert float(loss) == 0.0 and logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_effective_rank_of_a_collapsed_matrix_is_one_not_nan():
    """Every context the same point (a collapsed f): float32 singular values underflowed to NaN."""
    g = torch.Generator().manual_seed(0)
    collapsed = torch.nn.functional.layer_norm(torch.randn(128, generator=g).repeat(4096, 1), (128,))
    assert metrics.effective_rank(collapsed) == pytest.approx(1.0, abs=1e-3)
    assert metrics.effective_rank(torch.zeros(16, 4)) == 0.0
