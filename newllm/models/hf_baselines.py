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
RWKV's wkv kernel when it could load it, and otherwise its reference PyTorch path (always on CPU); for Mamba
that path scans with mamba.py's parallel scan (`use_mambapy`, "mambapy"), the library's own fallback.
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

from newllm.errors import ConfigError, GenerationError
from newllm.models.sampling import check_request, sample_tokens


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
    # use_mambapy: where mamba-ssm's fused scan does not run (CPU; CUDA without it), the library scans with
    # mamba.py's parallel (Blelloch) scan instead of its per-token loop, whose backward writes a full-size zero
    # gradient per position (benchmarks/README.md): 4x faster on CPU here, the same outputs within float
    # tolerance. The library reads it only when the `mambapy` package imports; a pinned dependency of newllm.
    return transformers.MambaConfig(
        **NO_SPECIAL_TOKENS, vocab_size=k.vocab_size, hidden_size=k.context_dim, num_hidden_layers=k.layers,
        state_size=k.state_size, expand=k.expand, conv_kernel=k.conv_kernel, **{"use_mambapy": True, **k.options})


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
    local-attention blocks: keys and values of the last min(length, attention_window_size - 1) positions (the
    library's sliding-window cache keeps those between tokens; the next token's own key makes the window)."""
    types = _griffin_blocks(cfg)
    recurrent = cfg.lru_width * cfg.conv1d_width  # 1 + (conv1d_width - 1) vectors of lru_width
    attention = _kv_floats(cfg, min(length, cfg.attention_window_size - 1))
    return sum(recurrent if t == "recurrent" else attention for t in types)


def _griffin_blocks(cfg: Any) -> list[str]:
    """RecurrentGemma's temporal block per layer ("recurrent" or "attention"): block_types repeated."""
    return [cfg.block_types[i % len(cfg.block_types)] for i in range(cfg.num_hidden_layers)]


def _xlstm_state(cfg: Any, length: int) -> int:
    """mLSTM per block and head: the matrix memory (qk_head_dim x v_head_dim), the normaliser (qk_head_dim)
    and the max-stabiliser (1)."""
    qk, v = _xlstm_head_dims(cfg)
    return cfg.num_hidden_layers * cfg.num_heads * (qk * v + qk + 1)


def _xlstm_head_dims(cfg: Any) -> tuple[int, int]:
    """(qk, v) widths per head of the mLSTM layers as they are built (int(hidden_size x factor) / num_heads:
    unrounded, unlike the config's qk_head_dim / v_head_dim)."""
    return (int(cfg.hidden_size * cfg.qk_dim_factor) // cfg.num_heads,
            int(cfg.hidden_size * cfg.v_dim_factor) // cfg.num_heads)


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


@dataclass
class Decoding:
    """What generation carries from one token to the next: the library's cache object (DynamicCache,
    xLSTMCache; RWKV: the list of five state tensors RwkvModel returns, None before its first call) and how
    many tokens it has seen. RecurrentGemma's recurrent blocks keep their RG-LRU and conv states on the blocks
    themselves (`conv1d_state`, `rg_lru.recurrent_states`); HFLM.state_tensors counts them with the cache."""

    cache: Any
    seen: int = 0


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
            kept = min(length, self.config.attention_window_size)
            return 2 * _griffin_blocks(self.config).count("attention") * self.context_dim * (kept + 1) // 2
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
        if device.type == "cuda" and found:
            return "+".join(found)
        if getattr(self.config, "use_mambapy", False) and importlib.util.find_spec("mambapy") is not None:
            return "mambapy"  # the library's parallel-scan fallback (_mamba)
        return "reference"

    # ------------------------------------------------------------------ generation with the library's cache
    def new_decoding(self, batch: int = 1) -> Decoding:
        """An empty cache of the library's own kind for `batch` sequences."""
        cfg, w = self.config, self.head.weight
        if self.family == "rwkv":
            return Decoding(None)  # RwkvModel allocates its state on the first call with use_cache
        if self.family == "xlstm":
            return Decoding(self._xlstm_cache(batch, w.device, w.dtype))
        if self.family == "recurrent_gemma":  # zeros the states its recurrent blocks hold (the library's own)
            self.backbone._setup_cache(cfg, batch, w.device, w.dtype)
        # Llama: a KV layer per block (grows by a position per token); Mamba, Mamba2: LinearAttentionLayer (SSM +
        # conv state); RecurrentGemma: LinearAttentionLayer placeholders + a sliding-window KV layer per local
        # attention block (the last attention_window - 1 positions)
        return Decoding(transformers.DynamicCache(config=cfg))

    def _xlstm_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        """The library's xLSTMCache. transformers 5.25 sizes its matrix memory by the config's qk_head_dim /
        v_head_dim, which round qk_dim / v_dim up to multiples of 64, while the mLSTM layers are built at the
        unrounded widths: where the two differ (context_dim x 0.5 not a multiple of 64 at the default factors)
        stepping the cache fails with "matC_old has wrong shape". There the same cache object gets its zeros at
        the layers' shapes; nothing else of it changes."""
        from transformers.models.xlstm.modeling_xlstm import xLSTMCache  # here: importing it costs seconds

        cfg = self.config
        cache = xLSTMCache(cfg, batch, dtype=dtype, device=device)
        qk, v = _xlstm_head_dims(cfg)
        if (cfg.qk_head_dim, cfg.v_head_dim) != (qk, v):
            h = cfg.num_heads
            cache.rnn_state = {layer: (torch.zeros(batch, h, qk, v, dtype=dtype, device=device),
                                       torch.zeros(batch, h, qk, dtype=dtype, device=device),
                                       torch.zeros(batch, h, 1, dtype=dtype, device=device))
                               for layer in cache.rnn_state}
        return cache

    def step(self, ids: torch.Tensor, dec: Decoding) -> torch.Tensor:
        """Logits (B, V) after tokens `ids` (B, T) that follow the dec.seen tokens its cache holds (updated)."""
        kw: dict[str, Any] = {"use_cache": True, "state" if self.family == "rwkv" else "cache": dec.cache}
        if self.family == "recurrent_gemma":
            # 5.25 derives positions from cache.get_seq_length(), which its first layer (a recurrent block's
            # placeholder) answers with 0: every step would reset the RG-LRU and restart RoPE at position 0
            t = ids.shape[1]
            kw["position_ids"] = torch.arange(dec.seen, dec.seen + t, device=ids.device).expand(ids.shape[0], t)
            if "attention" not in _griffin_blocks(self.config):
                # no local-attention block (layers < 3): the mask would be unused, and building it from a cache
                # of recurrent placeholders fails in 5.25 ("get_mask_sizes can only be called on Attention
                # layers"); a prepared mask, as the library's own generate may pass, skips building it
                kw["attention_mask"] = {"sliding_attention": None}
        out = self.backbone(input_ids=ids, **kw)
        if self.family == "rwkv":
            dec.cache = out.state  # the others update their cache object in place
        dec.seen += ids.shape[1]
        return self.head(out.last_hidden_state[:, -1])

    def state_tensors(self, dec: Decoding) -> list[torch.Tensor]:
        """Every floating-point tensor generation carries to the next token: the cache, and RecurrentGemma's
        block-held recurrent states."""
        held = []
        if self.family == "recurrent_gemma":
            blocks = [layer.temporal_block for layer in self.backbone.layers]
            held = [(b.conv1d_state, b.rg_lru.recurrent_states) for b in blocks if hasattr(b, "rg_lru")]
        return float_tensors([dec.cache, held])

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample n tokens after a 1-D prompt, carrying the library's cache (the recurrent families' state is
        constant in length; Llama's KV cache and RecurrentGemma's window up to attention_window grow)."""
        check_request(prompt, top_k)
        if self.max_len is not None and prompt.numel() + n > self.max_len:
            raise GenerationError(f"generate: need prompt + n = {prompt.numel() + n} <= model.max_len={self.max_len}")
        dec, device = self.new_decoding(), self.head.weight.device
        logits = self.step(prompt.view(1, -1).to(device), dec)
        return sample_tokens(logits[0], n, lambda tok: self.step(torch.tensor([[tok]], device=device), dec)[0],
                             temperature, top_k, generator)


def float_tensors(x: Any, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Every floating-point tensor inside a (nested) library cache object, once each."""
    seen = set() if seen is None else seen
    if id(x) in seen:
        return []
    seen.add(id(x))
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (list, tuple)):
        items = list(x)
    elif isinstance(x, dict):
        items = list(x.values())
    elif hasattr(x, "__dict__") and not isinstance(x, (nn.Module, transformers.PretrainedConfig)):
        items = list(vars(x).values())
    else:
        return []
    return [t for e in items for t in float_tensors(e, seen)]
