"""Baselines trained and evaluated through the same Phase-2 code as the context models.

Each exposes `contexts_window(ids) -> (B, T, C)` and `head`, like ContextLM, so perplexity is
measured identically; they are sized by the same knobs (layers, context_dim, embed_dim).
"""

from __future__ import annotations

import torch
from torch import nn


def _init_normal(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class GRULM(nn.Module):
    """Embedding + LN -> nn.GRU(E -> C, `layers` deep) -> Linear(C -> V)."""

    is_context_model = False

    def __init__(self, vocab_size: int, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float) -> None:
        super().__init__()
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.rnn = nn.GRU(embed_dim, context_dim, num_layers=layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(context_dim, vocab_size)
        _init_normal(self.embedding, init_std)
        _init_normal(self.head, init_std)

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed_norm(self.embedding(ids)))
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.contexts_window(ids))


class TransformerLM(nn.Module):
    """A small pre-LN causal decoder: d_model = context_dim, learned positions, FFN hidden_dim."""

    is_context_model = False

    def __init__(self, vocab_size: int, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float, heads: int = 4,
                 max_len: int = 4096) -> None:
        super().__init__()
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.proj = nn.Linear(embed_dim, context_dim) if embed_dim != context_dim else nn.Identity()
        self.pos = nn.Embedding(max_len, context_dim)
        layer = nn.TransformerEncoderLayer(context_dim, heads, hidden_dim or 4 * context_dim, dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(context_dim)
        self.head = nn.Linear(context_dim, vocab_size)
        _init_normal(self, init_std)

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds model.max_len={self.max_len}")
        h = self.proj(self.embedding(ids)) + self.pos(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.norm(self.decoder(h, mask=mask, is_causal=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.contexts_window(ids))
