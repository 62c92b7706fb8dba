"""The field's sequence models from Hugging Face `transformers`, trained from scratch by newllm's Phase 2.

`model=llama` (Transformer++: RoPE, SwiGLU, RMSNorm), `model=mamba`, `model=mamba2`, `model=rwkv`,
`model=recurrent_gemma` (Griffin) and `model=xlstm` each build the library's backbone class (LlamaModel,
MambaModel, ...: token embedding, blocks, final norm) from a small config, initialised by the library
itself, and add a bias-free Linear head as the library's *ForCausalLM does (initialised by the backbone's
own `_init_weights`, tied to the token embedding where the family's config ties it). Nothing of the
sequence model is written here: FAMILIES only maps newllm's knobs (layers, context_dim = hidden_size,
hidden_dim = FFN width, heads, state_size, expand, conv_kernel) onto each library config, and counts the
state each family carries from one token to the next.

Left out on purpose: the logit soft cap of RecurrentGemmaForCausalLM and xLSTMForCausalLM (30.0) lives in
their LM classes, not in the backbone; newllm's head is a plain Linear for every model, as for the GRU.
RWKV's `rescale_every` (halving weights in place at inference, an fp16 overflow guard) is off: it changes
weights on every train/eval switch, and newllm copies the best weights at evaluation time.

Kernels: on CUDA the library calls mamba-ssm / causal-conv1d when they are importable (Mamba, Mamba2),
RWKV's wkv kernel when it could load it, and otherwise its reference PyTorch path (always on CPU).
`kernel` says which ran (model/kernel in metrics.json).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from newllm.errors import ConfigError


@dataclass(frozen=True)
class Knobs:
    """newllm's size knobs of one model (conf/model/<family>.yaml, schema HFModelConfig)."""

    vocab_size: int
    layers: int
    context_dim: int
    hidden_dim: int
    heads: int
    state_size: int
    expand: int
    conv_kernel: int
    max_len: int
    attention_window: int
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One library model family: its backbone class, its config from newllm's knobs, the width step its
    shapes need (context_dim a multiple of it), its default FFN width (None: not a free knob), and the
    floats its inference cache holds per sequence after `length` tokens."""

    backbone: str  # the transformers class name
    config: Callable[[Knobs], transformers.PretrainedConfig]
    width_step: Callable[[int, int], int]  # (heads, expand) -> step of context_dim
    state_floats: Callable[[transformers.PretrainedConfig, int], int]
    default_hidden: Callable[[int], int] | None = None
    kernel_packages: tuple[str, ...] = ()  # importable on CUDA -> the library runs their kernels


# newllm's tokenizer owns its special tokens: none of the library's defaults (Mamba's pad_token_id=0 would make
# token 0 an Embedding padding_idx, a zero row that never trains).
NO_SPECIAL_TOKENS = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


def _llama(k: Knobs) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        **NO_SPECIAL_TOKENS, vocab_size=k.vocab_size, hidden_size=k.context_dim, intermediate_size=k.hidden_dim,
        num_hidden_layers=k.layers, num_attention_heads=k.heads, num_key_value_heads=k.heads,
        head_dim=k.context_dim // k.heads, max_position_embeddings=k.max_len, **k.options)


def _mamba(k: Knobs) -> transformers.PretrainedConfig:
    return transformers.MambaConfig(
        **NO_SPECIAL_TOKENS, vocab_size=k.vocab_size, hidden_size=k.context_dim, num_hidden_layers=k.layers,
        state_size=k.state_size, expand=k.expand, conv_kernel=k.conv_kernel, **k.options)


def _mamba2(k: Knobs) -> transformers.PretrainedConfig:
    return transformers.Mamba2Config(
        **NO_SPECIAL_TOKENS, vocab_size=k.vocab_size, hidden_size=k.context_dim, num_hidden_layers=k.layers,
        state_size=k.state_size, expand=k.expand, conv_kernel=k.conv_kernel, num_heads=k.heads,
        head_dim=k.expand * k.context_dim // k.heads, **{"n_groups": 1, **k.options})


def _rwkv(k: Knobs) -> transformers.PretrainedConfig:
    return transformers.RwkvConfig(
        **NO_SPECIAL_TOKENS, vocab_size=k.vocab_size, hidden_size=k.context_dim, attention_hidden_size=k.context_dim,
        intermediate_size=k.hidden_dim, num_hidden_layers=k.layers, context_length=k.max_len,
        **{"rescale_every": 0, **k.options})


def _recurrent_gemma(k: Knobs) -> transformers.PretrainedConfig:
    return transformers.RecurrentGemmaConfig(
        **NO_SPECIAL_TOKENS, vocab_size=k.vocab_size, hidden_size=k.context_dim, lru_width=k.context_dim,
        intermediate_size=k.hidden_dim,
        num_hidden_layers=k.layers, num_attention_heads=k.heads, num_key_value_heads=k.heads,
        head_dim=k.context_dim // k.heads, conv1d_width=k.conv_kernel, attention_window_size=k.attention_window,
        **k.options)


def _xlstm_hidden(c: int) -> int:
    """xLSTM's FFN width at the library's defaults (ffn_proj_factor, ffn_round_up_to_multiple_of), its rounding."""
    from transformers.models.xlstm.configuration_xlstm import round_up_to_next_multiple_of

    defaults = transformers.xLSTMConfig
    return round_up_to_next_multiple_of(c * defaults.ffn_proj_factor, defaults.ffn_round_up_to_multiple_of)


def _xlstm(k: Knobs) -> transformers.PretrainedConfig:
    # mode stays the library's default, "inference": whole chunks by the chunkwise kernel, the rest of a window
    # by the recurrent one, any length, differentiable (native PyTorch kernels). "train" refuses a length that
    # is not a multiple of chunk_size, and "train_with_padding" fails in 5.25 (its backend returns no state
    # where the mLSTM layer unpacks one). The FFN width is model.hidden_dim exactly (the library rounds
    # C * ffn_proj_factor up to ffn_round_up_to_multiple_of; the default hidden_dim is that rounded width), so
    # a parameter budget can trim it like the other FFNs.
    return transformers.xLSTMConfig(
        **NO_SPECIAL_TOKENS, vocab_size=k.vocab_size, hidden_size=k.context_dim, embedding_dim=k.context_dim,
        num_hidden_layers=k.layers, num_blocks=k.layers, num_heads=k.heads,
        ffn_proj_factor=(k.hidden_dim + 0.5) / k.context_dim, ffn_round_up_to_multiple_of=1, **k.options)


# --------------------------------------------------------------------------- state carried per sequence
def _kv_floats(cfg: Any, kept: int) -> int:
    return 2 * kept * cfg.num_key_value_heads * cfg.head_dim


def _llama_state(cfg: Any, length: int) -> int:
    """The KV cache: keys and values of every layer and position."""
    return cfg.num_hidden_layers * _kv_floats(cfg, length)


def _mamba_state(cfg: Any, length: int) -> int:
    """MambaCache per layer: the SSM state (expand*C x state_size) and the conv state (expand*C x conv_kernel)."""
    return cfg.num_hidden_layers * cfg.intermediate_size * (cfg.state_size + cfg.conv_kernel)


def _mamba2_state(cfg: Any, length: int) -> int:
    """Per layer: the SSM state (heads x head_dim x state_size) and the conv state over x, B and C
    ((expand*C + 2 * n_groups * state_size) x conv_kernel)."""
    conv_dim = int(cfg.expand * cfg.hidden_size) + 2 * cfg.n_groups * cfg.state_size
    return cfg.num_hidden_layers * (cfg.num_heads * cfg.head_dim * cfg.state_size + conv_dim * cfg.conv_kernel)


def _rwkv_state(cfg: Any, length: int) -> int:
    """RWKV-4's five vectors per layer: the attention's shifted token, numerator, denominator and running
    max, and the feed-forward's shifted token."""
    return 5 * cfg.num_hidden_layers * cfg.hidden_size


def _recurrent_gemma_state(cfg: Any, length: int) -> int:
    """Recurrent blocks: the RG-LRU state (lru_width) and the conv state (lru_width x (conv1d_width - 1));
    local-attention blocks: keys and values of the last min(length, attention_window_size) positions."""
    types = [cfg.block_types[i % len(cfg.block_types)] for i in range(cfg.num_hidden_layers)]
    recurrent = cfg.lru_width * cfg.conv1d_width  # 1 + (conv1d_width - 1) vectors of lru_width
    attention = _kv_floats(cfg, min(length, cfg.attention_window_size))
    return sum(recurrent if t == "recurrent" else attention for t in types)


def _xlstm_state(cfg: Any, length: int) -> int:
    """mLSTM per block and head: the matrix memory (qk_head_dim x v_head_dim), the normaliser (qk_head_dim)
    and the max-stabiliser (1)."""
    qk = int(cfg.hidden_size * cfg.qk_dim_factor) // cfg.num_heads
    v = int(cfg.hidden_size * cfg.v_dim_factor) // cfg.num_heads
    return cfg.num_hidden_layers * cfg.num_heads * (qk * v + qk + 1)


FAMILIES: dict[str, Family] = {
    # LLaMA's SwiGLU width: 2/3 of 4 C, so the three FFN matrices cost what GPT's two of width 4 C do
    # RoPE rotates pairs: an even head_dim
    "llama": Family("LlamaModel", _llama, lambda h, e: 2 * h, _llama_state, lambda c: round(8 * c / 3)),
    "mamba": Family("MambaModel", _mamba, lambda h, e: 1, _mamba_state,
                    kernel_packages=("mamba_ssm", "causal_conv1d")),
    # head_dim = expand * C / heads
    "mamba2": Family("Mamba2Model", _mamba2, lambda h, e: h // math.gcd(h, e), _mamba2_state,
                     kernel_packages=("mamba_ssm", "causal_conv1d")),
    "rwkv": Family("RwkvModel", _rwkv, lambda h, e: 1, _rwkv_state, lambda c: 4 * c),
    # rotary on half of each head: head_dim a multiple of 4; FFN 3 C as the released 2B model (7680 / 2560)
    "recurrent_gemma": Family("RecurrentGemmaModel", _recurrent_gemma, lambda h, e: 4 * h, _recurrent_gemma_state,
                              lambda c: 3 * c),
    # queries and keys at half the width (qk_dim_factor 0.5), split into heads
    "xlstm": Family("xLSTMModel", _xlstm, lambda h, e: 2 * h, _xlstm_state, _xlstm_hidden),
}


def width_step(family: str, heads: int, expand: int) -> int:
    """model.context_dim must be a multiple of this for the family's shapes to divide evenly."""
    return FAMILIES[family].width_step(heads, expand)


def default_hidden(family: str, context_dim: int) -> int | None:
    """The FFN width at model.hidden_dim=null, or None where the family has no free FFN width."""
    fn = FAMILIES[family].default_hidden
    return None if fn is None else fn(context_dim)


class HFLM(nn.Module):
    """A transformers backbone (`self.backbone`) + a Linear head: contexts_window(ids) is its last hidden
    state (B, T, context_dim), the features the head reads, as for every newllm model."""

    def __init__(self, vocab_size: int, family: str, layers: int, context_dim: int, embed_dim: int,
                 hidden_dim: int | None = None, heads: int = 4, state_size: int = 16, expand: int = 2,
                 conv_kernel: int = 4, max_len: int = 4096, attention_window: int = 2048,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        fam = FAMILIES[family]
        step = fam.width_step(heads, expand)
        if context_dim % step:
            raise ConfigError(f"model.context_dim={context_dim} is not allowed for model={family}: expected a "
                              f"multiple of {step} (model.heads={heads}, model.expand={expand})")
        hidden = hidden_dim or default_hidden(family, context_dim) or 0
        knobs = Knobs(vocab_size, layers, context_dim, hidden, heads, state_size, expand, conv_kernel, max_len,
                      attention_window, dict(options or {}))
        self.family, self.vocab_size, self.context_dim, self.layers = family, vocab_size, context_dim, layers
        self.embed_dim = context_dim  # tokens are embedded at the model width; model.embed_dim is unused
        self.hidden_dim = hidden or None
        self.max_len = max_len if family == "llama" else None  # RoPE positions past it are untested
        config = fam.config(knobs)
        self.backbone = getattr(transformers, fam.backbone)(config)
        self.head = nn.Linear(context_dim, vocab_size, bias=False)
        self.backbone._init_weights(self.head)  # what *ForCausalLM.post_init does to its lm_head
        if config.tie_word_embeddings:
            self.head.weight = self.backbone.get_input_embeddings().weight

    @property
    def config(self) -> transformers.PretrainedConfig:
        return self.backbone.config

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=ids, use_cache=False).last_hidden_state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.contexts_window(ids))

    def state_floats(self, length: int) -> int:
        """Floats of the library's inference cache per sequence after `length` tokens (FAMILIES)."""
        return int(FAMILIES[self.family].state_floats(self.config, length))

    def attention_macs(self, length: int) -> int:
        """Multiply-adds per token of q.k and a.v over a causal window of `length` (local windows capped)."""
        if self.family == "llama":
            return 2 * self.layers * self.context_dim * (length + 1) // 2
        if self.family == "recurrent_gemma":
            types = [self.config.block_types[i % len(self.config.block_types)] for i in range(self.layers)]
            kept = min(length, self.config.attention_window_size)
            return 2 * types.count("attention") * self.context_dim * (kept + 1) // 2
        return 0

    def kernel(self, device: torch.device) -> str:
        """Which implementation runs: the fast kernels' packages (joined by +) when importable on CUDA, the
        attention implementation for llama, else the library's reference PyTorch path."""
        if self.family == "llama":
            return str(self.config._attn_implementation)
        if self.family == "rwkv":
            from transformers.models.rwkv import modeling_rwkv

            return "wkv-cuda" if device.type == "cuda" and modeling_rwkv.rwkv_cuda_kernel is not None else "reference"
        found = [p for p in FAMILIES[self.family].kernel_packages if importlib.util.find_spec(p) is not None]
        return "+".join(found) if device.type == "cuda" and found else "reference"
