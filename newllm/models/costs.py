"""What a model costs: multiply-adds per token, the training FLOPs of each phase, and the state it carries.

The count is the usual one (Kaplan et al. 2020; nanoGPT's estimate_mfu): a forward pass costs one
multiply-add per matrix weight per token -- every weight of a Linear, of nn.GRU's gates and of the
attention projections is used once per token -- plus, for attention, d_model multiply-adds per layer for
each of q.k and a.v per attended position; a causal window of T positions attends to (T + 1) / 2 of them
on average. Embedding look-ups, norms, gates' elementwise products, softmax and the loss are left out.
A FLOP is half a multiply-add and backward costs twice forward, so training a part on a token costs
6 x its multiply-adds, running it forward only 2 x.

Phase 1 (context LMs): f (every core weight) is swept over the Phase-1 stream: pass 0 once forward, then
every iteration forward and backward. Its held-out measurement sweeps are evaluation and not counted.
Phase 2: f and head trained on every token seen (phase2/tokens_seen); with freeze_updater f runs forward
only; with context=fixed f runs forward once over the training windows (the contexts it serves).
context=propagate with solver=jacobi runs f once per sweep: counted as one sweep, a lower bound.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from newllm.models.baselines import TransformerLM

FLOPS_PER_MAC = 2
TRAIN_PASSES = 3  # forward + backward (twice the forward's work)


def forward_macs(model: nn.Module, length: int) -> dict[str, int]:
    """Multiply-adds of one forward pass per token: the core (everything but embedding tables and head) and the
    head; `length` is the window a transformer attends over (recurrent models do not depend on it)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = {id(p) for p in model.head.parameters()}
    core = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in tables | head)
    if isinstance(model, TransformerLM):
        core += 2 * model.layers * model.context_dim * (length + 1) // 2  # q.k and a.v, causal average
    elif hasattr(model, "attention_macs"):  # a transformers model with attention layers (llama, Griffin)
        core += model.attention_macs(length)
    return {"core": int(core), "head": int(model.head.weight.numel())}


def phase1_train_flops(model: nn.Module, tokens: int, iterations: int) -> int:
    """Phase 1 over `tokens` positions: pass 0 (one forward sweep) and `iterations` trained sweeps of f."""
    core = forward_macs(model, 1)["core"]
    return FLOPS_PER_MAC * core * tokens * (1 + TRAIN_PASSES * iterations)


def phase2_train_flops(model: nn.Module, cfg: DictConfig, tokens_seen: int, train_tokens: int,
                       context_model: bool) -> int:
    """Phase 2: head trained on every token seen; f (the core) trained alongside, run forward only when frozen,
    or run once over the `train_tokens` of the training windows when the contexts are fixed."""
    macs = forward_macs(model, cfg.seq_len)
    head = FLOPS_PER_MAC * TRAIN_PASSES * macs["head"] * tokens_seen
    if context_model and cfg.context == "fixed":
        return head + FLOPS_PER_MAC * macs["core"] * train_tokens
    passes = 1 if context_model and cfg.freeze_updater else TRAIN_PASSES
    return head + FLOPS_PER_MAC * passes * macs["core"] * tokens_seen


def state_floats(model: nn.Module, length: int) -> int:
    """Floats a model carries from one token to the next after reading `length` tokens -- its memory per
    generated sequence: the context vector (C) for a context LM, one hidden vector per layer (L x C) for the
    GRU, the KV cache (2 x L x length x C) for the transformer."""
    return int(model.state_floats(length))
