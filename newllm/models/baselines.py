"""Baselines trained and evaluated through the same Phase-2 code as the context models.

Each exposes `contexts_window(ids) -> (B, T, C)` and `head`, like ContextLM, so perplexity is
measured identically; they are sized by the same knobs (layers, context_dim; embed_dim where the
reference has a separate embedding width). Each follows its reference implementation:

- GRULM: torch's nn.GRU with its own initialisation, U(-1/sqrt(C), 1/sqrt(C)) for every weight and
  bias, untouched here. Token embedding and head are N(0, init_std) (torch's word_language_model example
  draws them from U(-0.1, 0.1) and feeds the embedding unnormalised); the embedding goes through the same
  LayerNorm the context LM's does, so the GRU's input has unit RMS whatever the embedding's init scale.
- TransformerLM: nanoGPT's GPT (karpathy/nanoGPT model.py, itself GPT-2): token and learned position
  embeddings of width d_model summed, dropout, pre-LN blocks (GELU MLP of width hidden_dim), a final
  LayerNorm, a bias-free head tied to the token embedding; every Linear and Embedding N(0, init_std),
  the residual projections (attention out_proj, MLP linear2) N(0, init_std / sqrt(2 * layers)); AdamW
  with betas (0.9, 0.95), weight decay on the >= 2-D tensors only (nanoGPT's configure_optimizers and
  train.py; newllm.training.phase2 asks the model for this through OptimizerRecipe).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from newllm.errors import ConfigError, GenerationError
from newllm.models.sampling import check_request, sample_tokens
from newllm.models.weights import init_normal_


class GRULM(nn.Module):
    """Embedding + LN -> nn.GRU(E -> C, `layers` deep) -> Linear(C -> V)."""

    def __init__(self, vocab_size: int, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float) -> None:
        super().__init__()
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.layers = layers
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        self.rnn = nn.GRU(embed_dim, context_dim, num_layers=layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(context_dim, vocab_size)
        init_normal_(self.embedding, init_std)  # the GRU keeps nn.GRU's own init (reset_parameters)
        init_normal_(self.head, init_std)

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed_norm(self.embedding(ids)))
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.contexts_window(ids))

    def state_floats(self, length: int) -> int:
        """Floats carried from one token to the next: one hidden vector per layer, whatever the length."""
        return self.layers * self.context_dim

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n tokens after a 1-D prompt, carrying nn.GRU's hidden state (layers x C: O(1) memory)."""
        check_request(prompt, top_k)
        device = self.head.weight.device
        out, h = self.rnn(self.embed_norm(self.embedding(prompt.to(device)[None])))

        def step(tok: int) -> torch.Tensor:
            nonlocal h
            out, h = self.rnn(self.embed_norm(self.embedding(torch.tensor([[tok]], device=device))), h)
            return self.head(out[0, -1])

        return sample_tokens(self.head(out[0, -1]), n, step, temperature, top_k, generator)


class TransformerLM(nn.Module):
    """nanoGPT's GPT with torch's pre-LN encoder layers under a causal mask: d_model = context_dim,
    FFN hidden_dim (null: 4 * d_model), `heads` attention heads, learned positions up to max_len.

    `embed_dim` is accepted and unused: GPT-2 embeds tokens at d_model and ties them to the head (so a
    sweep over model.embed_dim composes for every model); self.embed_dim is the width actually used.

    attention_window w (null: the whole causal prefix) lets position t attend to t - w + 1 ... t only,
    in every layer (so it sees layers x (w - 1) tokens back): w = 1 sees no earlier token at all
    (data=recall's negative control: the same network with no access to the past)."""

    adam_betas = (0.9, 0.95)  # nanoGPT train.py (beta1, beta2)

    def __init__(self, vocab_size: int, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float, heads: int = 4,
                 max_len: int = 4096, attention_window: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, context_dim
        self.max_len, self.hidden_dim, self.layers = max_len, hidden_dim or 4 * context_dim, layers
        self.attention_window = attention_window
        self.embedding = nn.Embedding(vocab_size, context_dim)
        self.pos = nn.Embedding(max_len, context_dim)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(context_dim, heads, self.hidden_dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(context_dim)
        self.head = nn.Linear(context_dim, vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # weight tying, as nanoGPT (and GPT-2) do
        init_normal_(self, init_std)
        residual_std = init_std / math.sqrt(2 * layers)  # GPT-2: residual projections scaled by depth
        for block in self.decoder.layers:
            nn.init.normal_(block.self_attn.in_proj_weight, 0.0, init_std)  # a Parameter, not a Linear
            nn.init.normal_(block.self_attn.out_proj.weight, 0.0, residual_std)
            nn.init.normal_(block.linear2.weight, 0.0, residual_std)

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.max_len:
            raise ConfigError(f"sequence length {t} exceeds model.max_len={self.max_len}")
        h = self.drop(self.embedding(ids) + self.pos(torch.arange(t, device=ids.device)))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        if self.attention_window is not None:  # also hide keys w or more positions back: a band, not causal
            mask = mask.masked_fill(torch.ones_like(mask, dtype=torch.bool).tril(-self.attention_window),
                                    float("-inf"))
        return self.norm(self.decoder(h, mask=mask, is_causal=self.attention_window is None))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.contexts_window(ids))

    def param_groups(self, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
        """nanoGPT's configure_optimizers: every >= 2-D tensor (matmul weights, embeddings) decays;
        biases and LayerNorm gains do not."""
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    def state_floats(self, length: int) -> int:
        """Floats carried to the next token after `length` tokens: the KV cache, 2 x layers x length x d_model
        (with an attention window w, only the last w - 1 positions are read again)."""
        kept = length if self.attention_window is None else min(length, self.attention_window - 1)
        return 2 * self.layers * kept * self.context_dim

    # ------------------------------------------------------------------ incremental decoding (KV cache)
    def new_cache(self, batch: int, capacity: int) -> list[torch.Tensor]:
        """One preallocated (2, B, heads, capacity, d) key/value buffer per layer: memory grows with length."""
        first = self.decoder.layers[0].self_attn
        d = self.context_dim // first.num_heads
        w = self.head.weight
        return [w.new_zeros(2, batch, first.num_heads, capacity, d) for _ in self.decoder.layers]

    def step(self, ids: torch.Tensor, t: int, cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, V) for tokens `ids` (B,) at position t, attending to cached positions 0..t."""
        h = self.embedding(ids) + self.pos.weight[t]
        for layer, kv in zip(self.decoder.layers, cache, strict=True):
            attn = layer.self_attn
            q, k, v = nn.functional.linear(layer.norm1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
            b, nh = h.shape[0], attn.num_heads
            kv[0, :, :, t], kv[1, :, :, t] = k.view(b, nh, -1), v.view(b, nh, -1)
            seen = slice(0 if self.attention_window is None else max(0, t + 1 - self.attention_window), t + 1)
            a = nn.functional.scaled_dot_product_attention(q.view(b, nh, 1, -1), kv[0, :, :, seen],
                                                           kv[1, :, :, seen])
            h = h + attn.out_proj(a.reshape(b, -1))
            h = h + layer.linear2(layer.activation(layer.linear1(layer.norm2(h))))
        return self.head(self.norm(h))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n tokens after a 1-D prompt with a KV cache (the standard O(length) memory decoder)."""
        check_request(prompt, top_k)
        total = prompt.numel() + n
        if total > self.max_len:
            raise GenerationError(f"generate: need 1 <= prompt + n = {total} <= model.max_len={self.max_len}")
        cache, device = self.new_cache(1, total), self.head.weight.device
        for t, tok in enumerate(prompt.tolist()):
            logits = self.step(torch.tensor([tok], device=device), t, cache)
        position = iter(range(prompt.numel(), total))  # where each drawn token goes in the cache
        return sample_tokens(logits[0], n, lambda tok: self.step(torch.tensor([tok], device=device), next(position),
                                                                 cache)[0], temperature, top_k, generator)
