"""Drawing one token from a model's logits: what every generate loop (context model, baselines) samples with.

Inverse CDF: one uniform draw, a float64 cumulative sum of the probabilities, a binary search. Exact in
distribution, like torch.multinomial, whose CPU kernel draws one exponential per vocabulary entry (~100 us at
V = 4096 on one core: as long as the head's matvec, and half of a generated token's cost). Plain tensor ops,
so the TorchScript sampling loop (newllm/models/scripted.py) calls the same function as the eager loops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from newllm.errors import GenerationError


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None,
                 draw_device: torch.device | None = None) -> int:
    """A token id drawn from softmax(logits / temperature) over the top_k largest logits (top_k 0: all of them).

    logits (V,); temperature > 0 (callers clamp it); float64 keeps tokens of probability ~1e-12 drawable.
    The uniform is drawn on `draw_device` (default: logits'), which must be the generator's: a CPU generator
    may drive a CUDA model (`draw_device(generator, ...)`), and a seed then draws the same on every device."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits.double(), -1).cumsum(0)
    where = logits.device if draw_device is None else draw_device
    u = torch.rand(1, dtype=torch.float64, generator=generator, device=where).to(logits.device) * cdf[-1]
    # right=True: the first index whose cdf exceeds u, so a token of probability 0 (a flat step) is never drawn;
    # the clamp covers u rounding up to cdf[-1] itself.
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=logits.numel() - 1))


def sample_tokens(logits: torch.Tensor, n: int, step: Callable[[int], torch.Tensor], temperature: float,
                  top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """The eager decode loop every generate shares: n tokens, the first drawn from `logits` (V,) after the prompt,
    each next one from step(token just drawn), which advances the model's state and returns its logits (V,);
    the last token is not stepped. temperature is clamped above 0, top_k to the vocabulary (None or 0: all)."""
    temperature, top_k = max(temperature, 1e-6), min(top_k or 0, logits.numel())
    out, draw = torch.empty(n, dtype=torch.long), draw_device(generator, logits.device)
    for i in range(n):
        out[i] = sample_token(logits, temperature, top_k, generator, draw)
        if i + 1 < n:
            logits = step(int(out[i]))
    return out


def draw_device(generator: torch.Generator | None, default: torch.device) -> torch.device:
    """Where sample_token must draw with `generator`: its own device (TorchScript cannot ask it, so the eager
    callers do, once per generate call)."""
    return default if generator is None else generator.device


def check_request(prompt: torch.Tensor, top_k: int | None) -> None:
    """The one-line refusals every generate(prompt, n, ..., top_k) shares: an empty prompt, a top_k below 1."""
    if prompt.numel() == 0:
        raise GenerationError("generate(prompt, n): the prompt must hold at least one token")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"generate: top_k={top_k} is not allowed: expected an integer >= 1, "
                              "or None (no top-k)")
