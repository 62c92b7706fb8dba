"""The context-vector language model: c_t = f(c_{t-1}, x_t), next token read from c_t.

f is a stack of blocks; each block is an FNN over [c; x] followed by one context update:
  sequential: ONE block whose FNN is `layers` deep (deep composition, no damping in between);
  layerwise:  `layers` blocks with a 1-layer FNN each (own gates, own LN; only c flows on, every
              block sees the same token embedding unless the updater rewrites it).
f acts position-wise, so `update` applies it to one position or to a whole stream at once --
which is what lets Phase 1 sweep every position in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from newllm.models.updaters import relu_fnn


class Block(nn.Module):
    def __init__(self, context_dim: int, embed_dim: int, hidden_dim: int, depth: int,
                 updater: Callable[..., nn.Module], dropout: float) -> None:
        super().__init__()
        self.fnn = relu_fnn(context_dim + embed_dim, hidden_dim, depth, dropout)
        self.updater = updater(context_dim=context_dim, embed_dim=embed_dim, hidden_dim=hidden_dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fnn(torch.cat([c, x], dim=-1))
        return self.updater(c, x, h)


class ContextLM(nn.Module):
    is_context_model = True

    def __init__(self, vocab_size: int, architecture: str, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float,
                 updater: Callable[..., nn.Module], embedding: Mapping | None = None) -> None:
        super().__init__()
        if architecture not in ("sequential", "layerwise"):
            raise ValueError(f"model.architecture={architecture!r} is not allowed: expected sequential or layerwise")
        updater_cls = getattr(updater, "func", updater)  # hydra gives a functools.partial
        self.architecture = architecture
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.hidden_dim = updater_cls.hidden_dim(context_dim, embed_dim, hidden_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        depths = [layers] if architecture == "sequential" else [1] * layers
        self.blocks = nn.ModuleList(
            Block(context_dim, embed_dim, self.hidden_dim, depth, updater, dropout) for depth in depths
        )
        self.head = nn.Linear(context_dim, vocab_size)
        self._init_weights(init_std)
        # model.embedding.freeze: a (pretrained) embedding neither phase trains; the matrix itself is
        # copied in by newllm.models.pretrained after the tokenizer is known.
        self.freeze_embedding = bool(embedding and embedding.get("freeze"))
        self.embedding.weight.requires_grad_(not self.freeze_embedding)

    def _init_weights(self, block_std: float) -> None:
        """f's weights ~ N(0, init_std); embedding and head ~ N(0, 0.02) (GPT-2's init).

        f's std matters: at 0.02 the gates sit at 0.5 and the update is tiny, so f(c, x) ~ LN(c):
        a near-identity map whose fixed point is trivial (identity_score ~0.99). The original
        research used N(0, 0.1) for its fixed-point layers for this reason.
        """
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, block_std if name.startswith("blocks.") else 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ the update f
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.embedding(ids))

    def update(self, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """f(c, x) for any leading shape: context (..., C), embedded tokens (..., E) -> (..., C)."""
        if context.shape[-1] != self.context_dim or tokens.shape[-1] != self.embed_dim:
            raise ValueError(
                f"update(context, tokens) got context dim {context.shape[-1]} and token dim "
                f"{tokens.shape[-1]}; expected context_dim={self.context_dim}, embed_dim={self.embed_dim} "
                "(arguments swapped?)"
            )
        c, x = context, tokens
        for block in self.blocks:
            c, x = block(c, x)
        return c

    def initial_context(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.zeros(batch, self.context_dim, device=device or self.head.weight.device)

    # ------------------------------------------------------------------ sequences
    def contexts_window(self, ids: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor:
        """Run f left to right over (B, T) ids from c0 (default 0): contexts (B, T, C).

        The loop over T is inherent to the recurrence; each step is batched over B windows.
        """
        x = self.embed(ids)
        c = self.initial_context(ids.shape[0]) if c0 is None else c0
        out = []
        for t in range(ids.shape[1]):
            c = self.update(c, x[:, t])
            out.append(c)
        return torch.stack(out, dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V); position t predicts token t+1."""
        return self.head(self.contexts_window(ids))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n tokens after a 1-D prompt. State is one C-vector: O(1) memory per step."""
        if prompt.numel() == 0:
            raise ValueError("generate(prompt, n): the prompt must hold at least one token")
        c = self.initial_context(1)
        for tok in prompt.tolist():
            c = self.update(c, self.embed(torch.tensor([tok], device=c.device)))
        out = []
        for _ in range(n):
            logits = self.head(c)[0] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            tok = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out.append(int(tok))
            c = self.update(c, self.embed(tok))
        return torch.tensor(out, dtype=torch.long)

    def updater_parameters(self) -> list[nn.Parameter]:
        """Everything except the output head: what Phase 1 trains and freeze_updater freezes."""
        return [p for n, p in self.named_parameters()
                if not n.startswith("head.") and not (self.freeze_embedding and n.startswith("embedding."))]
