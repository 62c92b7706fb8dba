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
from torch.nn import functional as F

from newllm.models.sampling import check_request, sample_tokens
from newllm.models.scripted import gated_layerwise_loop, gated_layerwise_sample, gated_layerwise_trainable
from newllm.models.updaters import relu_fnn
from newllm.models.weights import init_normal_


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
    def __init__(self, vocab_size: int, architecture: str, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None, init_std: float, dropout: float,
                 updater: Callable[..., nn.Module], embedding: Mapping | None = None) -> None:
        super().__init__()
        updater_cls = getattr(updater, "func", updater)  # hydra gives a functools.partial
        self.architecture = architecture
        self.vocab_size, self.context_dim, self.embed_dim = vocab_size, context_dim, embed_dim
        self.hidden_dim = updater_cls.hidden_dim(context_dim, embed_dim, hidden_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.embed_norm = nn.LayerNorm(embed_dim)
        # model.architecture is a newllm.config.Architecture: Hydra refuses any other name at compose time.
        depths = {"sequential": [layers], "layerwise": [1] * layers}[architecture]
        self.blocks = nn.ModuleList(
            Block(context_dim, embed_dim, self.hidden_dim, depth, updater, dropout) for depth in depths
        )
        self.head = nn.Linear(context_dim, vocab_size)
        # f's weights ~ N(0, init_std); embedding and head ~ N(0, 0.02) (GPT-2's init). f's std matters:
        # at 0.02 the gates sit at 0.5 and the update is tiny, so f(c, x) ~ LN(c): a near-identity map
        # whose fixed point is trivial (identity_score ~0.99). The original research used N(0, 0.1) for
        # its fixed-point layers for this reason.
        init_normal_(self, 0.02, {"blocks.": init_std})
        # model.embedding.freeze: a (pretrained) embedding neither phase trains; the matrix itself is
        # copied in by newllm.models.pretrained after the tokenizer is known.
        self.freeze_embedding = bool(embedding and embedding.get("freeze"))
        self.embedding.weight.requires_grad_(not self.freeze_embedding)

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
        """Run f left to right over (B, T) ids from c0 (default 0): contexts (B, T, C)."""
        return self.recurrence(self.embed(ids), c0)

    def recurrence(self, x: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor:
        """c_t = f(c_{t-1}, x_t) over embedded tokens (B, T, E) from c0 (default 0): contexts (B, T, C).

        Equal to stepping `update` token by token (tested to float tolerance), but everything that does
        not depend on the context leaves the time loop, as cuDNN does for RNN input projections: the
        x-part of each block's first Linear (plus its bias) is one (B*T, E) x (E, H) matmul before the
        loop, and each step only adds the context's matvec into it. Exact for every block whose token
        input is the embedding itself: all blocks with the gated updater, block 0 with the residual one
        (which rewrites x from the context, so later blocks see a context-dependent x).
        """
        hoisted, weights = self._hoisted_inputs(x), self._context_weights()
        c = x.new_zeros(x.shape[0], self.context_dim) if c0 is None else c0
        if self._scripted_family() and x.shape[1] > 0:
            params = self._scripted_params(weights)
            if not torch.is_grad_enabled():
                return gated_layerwise_loop(hoisted, c, *params)
            if not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling():
                return gated_layerwise_trainable(hoisted, c, *params)  # autocast: the eager step rounds as asked
        steps = []
        for t in range(x.shape[1]):
            c = self._step(c, x[:, t], [None if p is None else p[:, t] for p in hoisted], weights)
            steps.append(c)
        return torch.stack(steps, dim=1) if steps else x.new_zeros(*x.shape[:2], self.context_dim)

    def _scripted_family(self) -> bool:
        """The TorchScript loops cover the default family (layer-wise, gated) without dropout (eval mode
        or p = 0): they have no dropout masks to draw. Without autograd one loop; with it, a scripted
        forward and a scripted reverse loop (newllm/models/scripted.py)."""
        dropout = self.training and any(isinstance(m, nn.Dropout) for m in self.blocks.modules())
        return (not dropout and self.architecture == "layerwise"
                and all(not b.updater.rewrites_tokens for b in self.blocks))

    def _scriptable(self) -> bool:
        """The no-grad scripted loop applies (pass 0, validation, generation)."""
        return not torch.is_grad_enabled() and self._scripted_family()

    def _scripted_params(self, weights: list) -> tuple:
        """What gated_layerwise_loop takes after (hoisted, c): gathered once per pass, not per token."""
        norms = [b.updater.norm for b in self.blocks]
        return ([w for w, _ in weights], [g[0] for _, g in weights], [g[1] for _, g in weights],
                [n.weight for n in norms], [n.bias for n in norms], norms[0].eps)

    def _hoistable(self) -> list[bool]:
        """Block i's token input is the embedding iff no block before it rewrites x."""
        flags, clean = [], True
        for block in self.blocks:
            flags.append(clean)
            clean = clean and not block.updater.rewrites_tokens
        return flags

    def _hoisted_inputs(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Per block: x W_x^T + b for every position (B, T, H), or None where x depends on the context."""
        return [F.linear(x, block.fnn[0].weight[:, self.context_dim:], block.fnn[0].bias) if ok else None
                for block, ok in zip(self.blocks, self._hoistable(), strict=True)]

    def _context_weights(self) -> list[tuple]:
        """Per block, prepared once per pass rather than per token: the context part W_c^T (C, H) of the
        first Linear, contiguous, and the gated updater's three gates stacked into one matmul."""
        return [(block.fnn[0].weight[:, : self.context_dim].t().contiguous(),
                 None if block.updater.rewrites_tokens else block.updater.fused_weights())
                for block in self.blocks]

    def _step(self, c: torch.Tensor, x: torch.Tensor, hoisted: list[torch.Tensor | None],
              weights: list[tuple]) -> torch.Tensor:
        """One token of f given the hoisted x-projections (None: the block computes its own)."""
        for block, pre_x, (w_c, gates) in zip(self.blocks, hoisted, weights, strict=True):
            if pre_x is None:
                c, x = block(c, x)
                continue
            h = block.fnn[1:](torch.addmm(pre_x, c, w_c))
            if gates is None:
                c, x = block.updater(c, x, h)
            else:
                c = block.updater.fused_step(c, h, gates)
        return c

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V); position t predicts token t+1."""
        return self.head(self.contexts_window(ids))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n tokens after a 1-D prompt. State is one C-vector: O(1) memory per step."""
        check_request(prompt, top_k)
        # The prompt runs through the hoisted recurrence; each sampled token is embedded and projected on its
        # own (a vocabulary-sized table of projections would cost V x H per block, and more time to build than a
        # short generation takes).
        c = self.recurrence(self.embed(prompt.view(1, -1)))[:, -1]
        weights = self._context_weights()
        temperature, top_k = max(temperature, 1e-6), min(top_k or 0, self.vocab_size)
        if self._scriptable():  # the whole loop, sampling included, without the interpreter
            return gated_layerwise_sample(self._token_inputs(), c, self._scripted_params(weights), self.head,
                                          n, temperature, top_k, generator)

        def step(tok: int) -> torch.Tensor:
            nonlocal c
            x = self.embed(prompt.new_tensor([[tok]]))
            c = self._step(c, x[:, 0], [None if p is None else p[:, 0] for p in self._hoisted_inputs(x)], weights)
            return self.head(c)[0]

        return sample_tokens(self.head(c)[0], n, step, temperature, top_k, generator)

    def _token_inputs(self) -> tuple:
        """What gated_layerwise_sample embeds one token with: the embedding and its LayerNorm, and per block the
        x-part of the first Linear, transposed to (E, H) once per call, and its bias."""
        norm, firsts = self.embed_norm, [block.fnn[0] for block in self.blocks]
        return ([self.embedding.weight, norm.weight, norm.bias], norm.eps,
                [f.weight[:, self.context_dim :].t().contiguous() for f in firsts], [f.bias for f in firsts])

    def state_floats(self, length: int) -> int:
        """Floats carried from one token to the next: the context c_t, whatever the length."""
        return self.context_dim

    def updater_parameters(self) -> list[nn.Parameter]:
        """Everything except the output head: what Phase 1 trains and freeze_updater freezes."""
        return [p for n, p in self.named_parameters()
                if not n.startswith("head.") and not (self.freeze_embedding and n.startswith("embedding."))]
