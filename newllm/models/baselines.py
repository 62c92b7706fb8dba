"""Baselines trained and evaluated through the same Phase-2 code as the context models.

Each exposes `contexts_window(ids) -> (B, T, C)` and `head`, like ContextLM, so perplexity is
measured identically; they are sized by the same knobs (layers, context_dim, embed_dim).
"""

from __future__ import annotations

import torch
from torch import nn

from newllm.errors import ConfigError, GenerationError
from newllm.models.sampling import sample_token
from newllm.models.weights import init_normal_


class GRULM(nn.Module):
    """Embedding + LN -> nn.GRU(E -> C, `layers` deep) -> Linear(C -> V)."""

    def __init__(self, vocab_size: int, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float) -> None:
        super().__init__()
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.rnn = nn.GRU(embed_dim, context_dim, num_layers=layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(context_dim, vocab_size)
        init_normal_(self.embedding, init_std)
        init_normal_(self.head, init_std)

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed_norm(self.embedding(ids)))
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.contexts_window(ids))


class TransformerLM(nn.Module):
    """A small pre-LN causal decoder: d_model = context_dim, learned positions, FFN hidden_dim."""

    def __init__(self, vocab_size: int, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float, heads: int = 4,
                 max_len: int = 4096) -> None:
        super().__init__()
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.max_len, self.hidden_dim = max_len, hidden_dim or 4 * context_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.proj = nn.Linear(embed_dim, context_dim) if embed_dim != context_dim else nn.Identity()
        self.pos = nn.Embedding(max_len, context_dim)
        layer = nn.TransformerEncoderLayer(context_dim, heads, self.hidden_dim, dropout,
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(context_dim)
        self.head = nn.Linear(context_dim, vocab_size)
        init_normal_(self, init_std)

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.max_len:
            raise ConfigError(f"sequence length {t} exceeds model.max_len={self.max_len}")
        h = self.proj(self.embedding(ids)) + self.pos(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.norm(self.decoder(h, mask=mask, is_causal=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.contexts_window(ids))

    # ------------------------------------------------------------------ incremental decoding (KV cache)
    def new_cache(self, batch: int, capacity: int) -> list[torch.Tensor]:
        """One preallocated (2, B, heads, capacity, d) key/value buffer per layer: memory grows with length."""
        first = self.decoder.layers[0].self_attn
        d = self.context_dim // first.num_heads
        w = self.head.weight
        return [w.new_zeros(2, batch, first.num_heads, capacity, d) for _ in self.decoder.layers]

    def step(self, ids: torch.Tensor, t: int, cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, V) for tokens `ids` (B,) at position t, attending to cached positions 0..t."""
        h = self.proj(self.embedding(ids)) + self.pos.weight[t]
        for layer, kv in zip(self.decoder.layers, cache, strict=True):
            attn = layer.self_attn
            q, k, v = nn.functional.linear(layer.norm1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
            b, nh = h.shape[0], attn.num_heads
            kv[0, :, :, t], kv[1, :, :, t] = k.view(b, nh, -1), v.view(b, nh, -1)
            a = nn.functional.scaled_dot_product_attention(q.view(b, nh, 1, -1), kv[0, :, :, : t + 1],
                                                           kv[1, :, :, : t + 1])
            h = h + attn.out_proj(a.reshape(b, -1))
            h = h + layer.linear2(layer.activation(layer.linear1(layer.norm2(h))))
        return self.head(self.norm(h))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n tokens after a 1-D prompt with a KV cache (the standard O(length) memory decoder)."""
        total = prompt.numel() + n
        if prompt.numel() == 0 or total > self.max_len:
            raise GenerationError(f"generate: need 1 <= prompt + n = {total} <= model.max_len={self.max_len}")
        cache = self.new_cache(1, total)
        for t, tok in enumerate(prompt.tolist()):
            logits = self.step(torch.tensor([tok], device=self.head.weight.device), t, cache)
        out = []
        for t in range(prompt.numel(), total):
            tok = sample_token(logits[0], max(temperature, 1e-6), 0, generator)
            out.append(tok)
            if t + 1 < total:
                logits = self.step(torch.tensor([tok], device=logits.device), t, cache)
        return torch.tensor(out, dtype=torch.long)
