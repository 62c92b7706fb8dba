"""sample_token: the one sampler of every generate loop. Its draws must follow softmax(logits / T) restricted
to the top k, never draw a token of probability 0, and repeat for the same generator seed."""

from __future__ import annotations

import math

import torch

from newllm.models.sampling import sample_token


def draws(logits: torch.Tensor, n: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor([sample_token(logits, temperature, top_k, gen) for _ in range(n)])


def test_frequencies_follow_the_softmax_at_the_temperature():
    """20,000 draws from 5 logits at T = 0.7: every frequency within 4.5 standard errors of its probability."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n, p = 20_000, torch.softmax(logits / 0.7, -1)
    freq = torch.bincount(draws(logits, n, temperature=0.7), minlength=5).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() < 4.5 * se).all(), (freq, p)


def test_top_k_draws_only_the_k_largest_renormalised():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.5, 0.0, 2.9])
    got = draws(logits, 6000, top_k=3)
    assert set(got.tolist()) == {1, 3, 5}
    p = torch.softmax(logits[[1, 3, 5]], -1).double()
    freq = torch.stack([(got == i).double().mean() for i in (1, 3, 5)])
    assert ((freq - p).abs() < 4.5 * (p * (1 - p) / 6000).sqrt()).all()


def test_tokens_of_probability_zero_are_never_drawn_and_tiny_ones_can_be():
    """-inf logits (zero probability) anywhere, the last position included, are never drawn; a token of
    probability ~1e-9 keeps its own step in the float64 CDF (in float32 it would vanish next to 1)."""
    inf = float("-inf")
    logits = torch.tensor([inf, 0.0, inf, 1.0, inf])
    assert set(draws(logits, 3000).tolist()) <= {1, 3}
    tiny = torch.tensor([0.0, math.log(1e-9)])
    cdf = torch.softmax(tiny.double(), -1).cumsum(0)
    assert cdf[1] > cdf[0]
    assert torch.softmax(tiny, -1).cumsum(0)[1] == torch.softmax(tiny, -1).cumsum(0)[0]  # float32 loses it


def test_same_seed_same_draws_and_tiny_temperature_is_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert draws(logits, 30, seed=4).tolist() == draws(logits, 30, seed=4).tolist()
    assert draws(logits, 30, seed=4).tolist() != draws(logits, 30, seed=5).tolist()
    assert set(draws(logits, 50, temperature=1e-6).tolist()) == {int(logits.argmax())}
