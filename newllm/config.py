"""Structured configs (typed schemas for every conf/ group) and value checks, in one place.

Every YAML option in conf/ extends one of these dataclasses through its defaults list, so a
misspelt key or a wrong type fails at compose time with Hydra's own message. Ranges that a type
cannot express are checked by `validate`, which names the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from newllm import keys
from newllm.errors import ConfigError

# Hydra 1.4 asks which `_target_`s config may name; ours live in the newllm package.
TRUSTED_TARGETS = ("newllm.*",)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate restricted to newllm's own classes."""
    return hydra.utils.instantiate(node, _execution_whitelist_=TRUSTED_TARGETS, **kwargs)


# ----------------------------------------------------------------------------- numeric ranges
# Every numeric field of every schema declares the values it allows (`ranged`), and `validate` checks them
# all in one walk over the composed config: a key added with `ranged` is checked without a new line of code,
# and tests/test_config_ranges.py fails for a numeric field that declares no range.
RANGE = "newllm.range"
INT64_MAX = 2**63 - 1  # what a tensor size, a step count or a token cap can hold at most
SEED_MAX = 2**32 - 1  # what every RNG newllm seeds accepts (Python, torch, and numpy's legacy seeding)


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric key: lo..hi (each end closed or open), and what null means when a
    null is allowed (None: it is not)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    null: str | None = None
    note: str = ""  # what a boundary value means, e.g. "0: once per epoch"

    @classmethod
    def parse(cls, interval: str, null: str | None = None, note: str = "") -> Range:
        """'[1, inf)', '(0, 1]', '[0, 2**32 - 1]' -> Range."""
        m = re.fullmatch(r"\s*([\[(])\s*([^,]+),\s*([^\])]+)\s*([\])])\s*", interval)
        if not m:
            raise ValueError(f"not an interval: {interval!r}")
        ends = [-math.inf if e.strip() == "-inf" else math.inf if e.strip() == "inf"
                else {"INT64_MAX": INT64_MAX, "SEED_MAX": SEED_MAX}.get(e.strip()) or float(e) for e in m.group(2, 3)]
        lo, hi = (int(e) if isinstance(e, float) and e.is_integer() else e for e in ends)
        return cls(lo, hi, m.group(1) == "(", m.group(4) == ")", null, note)

    def for_type(self, integer: bool) -> Range:
        """An integer key also fits in int64, whatever its declared upper end."""
        return dataclasses.replace(self, hi=INT64_MAX, hi_open=False) if integer and self.hi > INT64_MAX else self

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null is not None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        if self.hi == math.inf or (integer and self.hi == INT64_MAX):
            if self.lo == 0 and self.lo_open or integer and self.lo == 1 and not self.lo_open:
                text = f"a positive {'integer' if integer else 'number'}"
            else:
                text = f"{kind} {'>' if self.lo_open else '>='} {self.lo}"
        else:
            text = f"{kind} in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        text += f" ({self.note})" if self.note else ""
        return f"null ({self.null}) or {text}" if self.null is not None else text


def ranged(default: Any = MISSING, interval: str = "", *, null: str | None = None, note: str = "",
           default_factory: Any = MISSING) -> Any:
    """A numeric dataclass field with the interval of values it allows (for a list: of each item), e.g.
    `lr: float = ranged(1e-3, "(0, inf)")`; `null` says what null means where null is allowed."""
    meta = {RANGE: Range.parse(interval, null, note)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)



# ----------------------------------------------------------------------------- choices
# A choice field is an Enum: Hydra refuses any other value at compose time, naming the key, the value
# and the options. StrEnum members equal their strings (`cfg.init == "chunked"`) and print as them.
class Architecture(StrEnum):
    sequential = "sequential"  # one f, its layers applied in turn to the whole context
    layerwise = "layerwise"  # layer l reads layer l-1's new context (a stack of recurrences)


class DataSource(StrEnum):
    chatterbot = "chatterbot"
    ultrachat = "ultrachat"
    text = "text"
    repetition = "repetition"
    recall = "recall"
    hf = "hf"


class SplitBy(StrEnum):
    auto = "auto"
    paragraph = "paragraph"
    line = "line"
    file = "file"


class ValProtocol(StrEnum):
    by_conversation = "by_conversation"
    subset_of_train = "subset_of_train"


class LossOn(StrEnum):
    assistant = "assistant"
    all = "all"


class RecallTask(StrEnum):
    mqar = "mqar"
    copy = "copy"
    selective_copy = "selective_copy"


class Phase1Mode(StrEnum):
    stream = "stream"
    per_token = "per_token"


class Pass0(StrEnum):
    sequential = "sequential"
    zeros = "zeros"
    chunked = "chunked"
    burn_in = "burn_in"


class Phase2Context(StrEnum):
    propagate = "propagate"
    fixed = "fixed"


class WindowSolver(StrEnum):
    sequential = "sequential"
    jacobi = "jacobi"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


# ----------------------------------------------------------------------------- model
@dataclass
class GatedUpdaterConfig:
    _target_: str = "newllm.models.updaters.GatedUpdater"
    _partial_: bool = True


@dataclass
class ResidualUpdaterConfig:
    _target_: str = "newllm.models.updaters.ResidualUpdater"
    _partial_: bool = True
    # c <- (1-m)(c+dc) + m*LN(c+dc); m=1 is plain LayerNorm, m=0 lets norms grow freely.
    layernorm_mix: float = ranged(1.0, "[0, 1]")


@dataclass
class EmbeddingConfig:
    # A hub model name (e.g. gpt2) or a local directory in the hub layout: its token embedding
    # matrix is copied row by row for the tokens its tokenizer shares with ours (newllm.models.pretrained).
    pretrained: str | None = None
    freeze: bool = False  # keep the embedding fixed in both phases


@dataclass
class ContextModelConfig:
    _target_: str = "newllm.models.context_lm.ContextLM"
    architecture: Architecture = Architecture.layerwise
    layers: int = ranged(2, "[1, inf)")
    context_dim: int = ranged(128, "[1, inf)")
    embed_dim: int = ranged(96, "[1, inf)")
    # null: derived (residual updater needs context_dim + embed_dim; gated uses context_dim).
    hidden_dim: int | None = ranged(None, "[1, inf)", null="derived")
    # std of f's weights (embedding and head: 0.02). At 0.02 f is ~identity: a trivial fixed point.
    init_std: float = ranged(0.1, "(0, inf)")
    dropout: float = ranged(0.0, "[0, 1)")
    # A core-parameter budget (everything but embedding and head): when set, context_dim (and an
    # explicit hidden_dim, in proportion) is solved to meet it within 2 % (newllm.models.sizing).
    core_params: int | None = ranged(None, "[1, inf)", null="no budget")
    # A state budget: model/state_floats (floats carried per sequence at the evaluation window) within 2 % of it,
    # by solving context_dim instead (newllm.models.sizing.solve_state_floats); not with core_params.
    state_floats: int | None = ranged(None, "[1, inf)", null="no state budget")
    updater: Any = MISSING
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)


@dataclass
class GRUConfig:
    _target_: str = "newllm.models.baselines.GRULM"
    layers: int = ranged(2, "[1, inf)")
    context_dim: int = ranged(128, "[1, inf)")  # GRU hidden size
    embed_dim: int = ranged(96, "[1, inf)")
    hidden_dim: int | None = ranged(None, "[1, inf)", null="unused")  # kept so sweeps over the same keys compose
    init_std: float = ranged(0.02, "(0, inf)")
    dropout: float = ranged(0.0, "[0, 1)")
    # A core-parameter budget (everything but embedding and head): when set, context_dim (and an
    # explicit hidden_dim, in proportion) is solved to meet it within 2 % (newllm.models.sizing).
    core_params: int | None = ranged(None, "[1, inf)", null="no budget")
    # A state budget: model/state_floats (floats carried per sequence at the evaluation window) within 2 % of it,
    # by solving context_dim instead (newllm.models.sizing.solve_state_floats); not with core_params.
    state_floats: int | None = ranged(None, "[1, inf)", null="no state budget")


@dataclass
class TransformerConfig:
    _target_: str = "newllm.models.baselines.TransformerLM"
    layers: int = ranged(2, "[1, inf)")
    context_dim: int = ranged(128, "[1, inf)")  # d_model
    embed_dim: int = ranged(96, "[1, inf)")  # token embedding, projected to d_model
    hidden_dim: int | None = ranged(None, "[1, inf)", null="4 * context_dim")  # feed-forward width
    init_std: float = ranged(0.02, "(0, inf)")
    dropout: float = ranged(0.0, "[0, 1)")
    heads: int = ranged(4, "[1, inf)")
    max_len: int = ranged(4096, "[1, inf)")
    # Positions each token attends to in each layer, itself included (null: every earlier one), so a token
    # sees layers x (w - 1) back. 1: no access to the past at all, data=recall's negative control.
    attention_window: int | None = ranged(None, "[1, inf)", null="the whole causal prefix")
    # A core-parameter budget (everything but embedding and head): when set, context_dim (and an
    # explicit hidden_dim, in proportion) is solved to meet it within 2 % (newllm.models.sizing).
    core_params: int | None = ranged(None, "[1, inf)", null="no budget")
    # A state budget: model/state_floats (floats carried per sequence at the evaluation window) within 2 % of it,
    # by solving context_dim instead (newllm.models.sizing.solve_state_floats); not with core_params.
    state_floats: int | None = ranged(None, "[1, inf)", null="no state budget")


class HFFamily(StrEnum):
    """The transformers model families newllm wraps (newllm.models.hf_baselines.FAMILIES)."""

    llama = "llama"
    mamba = "mamba"
    mamba2 = "mamba2"
    rwkv = "rwkv"
    recurrent_gemma = "recurrent_gemma"
    xlstm = "xlstm"


@dataclass
class HFModelConfig:
    """A transformers backbone trained from scratch (conf/model/{llama,mamba,mamba2,rwkv,recurrent_gemma,xlstm})."""

    _target_: str = "newllm.models.hf_baselines.HFLM"
    family: HFFamily = MISSING
    layers: int = ranged(2, "[1, inf)")
    context_dim: int = ranged(128, "[1, inf)")  # hidden_size (and lru_width, embedding_dim)
    embed_dim: int = ranged(96, "[1, inf)")  # unused (tokens are embedded at context_dim): kept so sweeps compose
    # FFN width: llama, rwkv, recurrent_gemma (null: 8/3 C, 4 C, 3 C); unused by mamba, mamba2, xlstm
    hidden_dim: int | None = ranged(None, "[1, inf)", null="the family's default")
    heads: int = ranged(4, "[1, inf)")  # attention heads (llama, recurrent_gemma), mLSTM heads, Mamba2 SSM heads
    state_size: int = ranged(16, "[1, inf)")  # SSM state per channel (mamba, mamba2)
    expand: int = ranged(2, "[1, inf)")  # inner width / context_dim (mamba, mamba2)
    conv_kernel: int = ranged(4, "[1, inf)")  # short causal conv (mamba, mamba2, recurrent_gemma)
    max_len: int = ranged(4096, "[1, inf)")  # llama's max_position_embeddings, rwkv's context_length
    attention_window: int = ranged(2048, "[1, inf)")  # recurrent_gemma's local attention
    # Further keys of the library's config class, passed as they are (e.g. {n_groups: 2} for mamba2).
    options: dict[str, Any] = field(default_factory=dict)
    core_params: int | None = ranged(None, "[1, inf)", null="no budget")
    # A state budget: model/state_floats (floats carried per sequence at the evaluation window) within 2 % of it,
    # by solving context_dim instead (newllm.models.sizing.solve_state_floats); not with core_params.
    state_floats: int | None = ranged(None, "[1, inf)", null="no state budget")


# ----------------------------------------------------------------------------- data
@dataclass
class TokenizerConfig:
    vocab_size: int = ranged(4096, "[1, inf)")
    min_frequency: int = ranged(2, "[0, inf)")
    # A hub tokenizer name (needs network); null trains a byte-level BPE locally.
    pretrained: str | None = None
    # BPE training reads at most this many bytes of training documents (in split order); null: 16 bytes per
    # data.max_train_tokens when that cap is set, else the whole training split (newllm.data.prepare).
    # A data-scaling study sets it, so that every budget shares one tokenizer.
    max_train_bytes: int | None = ranged(None, "[1, inf)", null="derived from data.max_train_tokens, else all")


@dataclass
class DataConfig:
    name: DataSource = DataSource.chatterbot
    path: str | None = None  # data=ultrachat: a local JSON/JSONL/Parquet file with a `messages` column
    files: list[str] = field(default_factory=list)  # data=text: plain-text files
    # data=hf (newllm.data.hf): a Hugging Face dataset by hub id (streamed) or a datasets.save_to_disk folder,
    # its config name, and the column holding the text (one document per row)
    dataset: str | None = None
    config: str | None = None
    text_column: str = "text"
    # data=text: documents are paragraphs (blank lines) | line | file; auto: paragraphs when the text
    # has blank lines, else lines. The unit used is data/split_by in metrics.json.
    split_by: SplitBy = SplitBy.auto
    # cap on conversations/documents read (null = all)
    num_conversations: int | None = ranged(None, "[1, inf)", null="all")
    # Drop documents whose normalised text (casefold, whitespace collapsed; a dialogue's whole
    # conversation) repeats an earlier one, before the split (newllm.data.dedup). Recorded as data/dedup,
    # data/duplicates_removed; document sources only (repetition and recall are generated).
    dedup: bool = True
    # caps (at most); the counts used land in metrics as data/*
    max_train_tokens: int | None = ranged(None, "[1, inf)", null="no cap")
    max_val_tokens: int | None = ranged(None, "[1, inf)", null="no cap")
    max_test_tokens: int | None = ranged(None, "[1, inf)", null="no cap")
    # share of documents held out (repetition: extra held-out phrases per stage)
    val_fraction: float = ranged(0.1, "(0, 1)")
    # share of documents held out for test (0: none): disjoint from train and validation, read once
    # after Phase 2 by the kept (best-validation) weights; nothing selects or prunes on it.
    test_fraction: float = ranged(0.1, "[0, 1)")
    # Seeds every data choice (the document split, its order, the Phase-1 sample, repetition phrases),
    # separately from `seed` (init, batch order): runs of a seed grid share one split.
    split_seed: int = ranged(0, "[0, SEED_MAX]")
    # by_conversation: disjoint held-out conversations/documents/phrases (default). subset_of_train:
    # the original research protocol (validation = last 20 % of the training stream), labelled in metrics.
    val_protocol: ValProtocol = ValProtocol.by_conversation
    loss_on: LossOn = LossOn.assistant  # which tokens Phase 2 predicts
    # data=repetition: phrases of p distinct tokens, each repeated `repetitions` times, one stage per p
    phrase_lengths: list[int] = ranged(interval="[1, inf)", default_factory=lambda: [1, 2, 3])
    repetitions: int = ranged(20, "[2, inf)", note="a phrase must recur to have a cycle")
    phrases_per_stage: int = ranged(8, "[1, inf)")
    # data=recall (newllm.data.recall): token ids generated directly; sequences of seq_len tokens
    task: RecallTask = RecallTask.mqar
    vocab_size: int = ranged(128, "[1, inf)")  # mqar: > seq_len, as Zoology's multiquery_ar asserts
    num_pairs: int = ranged(4, "[1, inf)")  # mqar: at most seq_len // 4
    # mqar: query slot i (1, 2, ... after the pairs) is drawn with weight i^(power_a - 1), as Zoology's
    # multiquery_ar: 0.01 (its default) puts queries near the pairs, 1 spreads them uniformly.
    power_a: float = ranged(0.01, "(0, inf)")
    # = training.phase2.seq_len (one sequence per window; conf/data/recall.yaml makes the window follow it)
    seq_len: int = ranged(64, "[2, inf)")
    num_train: int = ranged(2000, "[1, inf)")
    num_val: int = ranged(200, "[1, inf)")
    num_test: int = ranged(200, "[1, inf)")


# ----------------------------------------------------------------------------- training
@dataclass
class DiversityConfig:
    _target_: str = "newllm.training.diversity.FrobeniusDeviation"


@dataclass
class DimUsageConfig(DiversityConfig):
    _target_: str = "newllm.training.diversity.DimUsage"


@dataclass
class EMAVarianceConfig(DiversityConfig):
    _target_: str = "newllm.training.diversity.EMAVariance"
    momentum: float = ranged(0.99, "[0, 1)")


@dataclass
class VICRegConfig(DiversityConfig):
    _target_: str = "newllm.training.diversity.VICReg"
    std_target: float = ranged(1.0, "[0, inf)")
    covariance_weight: float = ranged(1.0, "[0, inf)")


@dataclass
class NoDiversityConfig(DiversityConfig):
    _target_: str = "newllm.training.diversity.NoDiversity"


@dataclass
class Phase1Config:
    enabled: bool = True
    mode: Phase1Mode = Phase1Mode.stream  # stream: Jacobi fixed point of the whole stream
    untrained: bool = False  # measure only: no optimizer step, min_iterations sweeps
    max_tokens: int = ranged(8192, "[1, inf)")  # training tokens Phase 1 reads (the stream it iterates over)
    num_streams: int = ranged(1, "[1, inf)")  # the stream is cut into this many parallel streams
    max_iterations: int = ranged(40, "[1, inf)")
    min_iterations: int = ranged(5, "[0, inf)")
    convergence_threshold: float = ranged(0.01, "(0, inf)")  # per-token MSE(C_t, P_t) below this => converged
    # stop once this fraction of held-out tokens converged from c = 0
    convergence_target: float = ranged(0.95, "[0, 1]")
    # ...and the held-out probe gains this much top-1 accuracy over the bigram (phase1.held_out_converged):
    # a memoryless or collapsed f converges in one sweep but gains exactly 0
    min_probe_gain: float = ranged(0.01, "[0, 1]")
    lr: float = ranged(1e-3, "(0, inf)")
    grad_clip: float = ranged(1.0, "(0, inf)")
    context_noise: float = ranged(0.0, "[0, inf)")  # std of Gaussian noise on the input contexts during training
    chunk_size: int = ranged(16384, "[1, inf)")  # positions per forward/backward chunk (gradients accumulated)
    init: Pass0 = Pass0.sequential  # how pass 0 builds the first contexts (newllm.training.solvers.PASS0)
    init_chunks: int = ranged(16, "[1, inf)")  # init=chunked|burn_in: slices of the stream run through pass 0 at once
    init_burn_in: int = ranged(64, "[0, inf)")  # init=burn_in: tokens each slice starts early from c = 0 (>= N: exact)
    # Held-out measurement (newllm.training.phase1.evaluate_phase1): sweeps from c = 0, no optimizer.
    # phase1/val_convergence_rate is the converged fraction after val_iterations sweeps, and the objective
    # phase1/val_converged_gain counts the probe's gain only at those converged positions: 32 sweeps is its
    # memory horizon. On the default run (seed 42, deduplicated data) 32 sweeps separate trained 0.978 from
    # untrained 0.416 (docs/results.md, "Phase 1: trained vs untrained"); 10 sweeps gave 0.005-0.014 to
    # trained, untrained, lr ~ 0 and w = 0 alike (on the data before deduplication).
    val_iterations: int = ranged(32, "[1, inf)")
    # measure validation every N iterations; stop once it reaches convergence_target
    val_every: int = ranged(20, "[1, inf)")
    # most sweeps phase1/val_memory_length counts (then *_memory_length_capped = 1)
    memory_cap: int = ranged(128, "[1, inf)")
    # Held-out tokens are cut into this many streams, each read from c = 0: the reference pass (the
    # sequential recurrence, latency-bound) then takes N / val_streams steps. Part of the measurement's
    # definition (which positions start a stream), so keep it fixed when comparing runs; measured on the
    # default run: 1 / 8 / 16 streams gave 0.8745 / 0.8749 / 0.8784, memory length 40 / 40 / 39.
    val_streams: int = ranged(8, "[1, inf)")
    erank_samples: int = ranged(4096, "[1, inf)")  # rows sampled for the effective-rank SVD (fixed across runs)
    erank_every: int = ranged(5, "[1, inf)")  # effective rank in the history every N iterations (and the last)
    # resume checkpoint every N iterations
    checkpoint_every: int = ranged(10, "[0, inf)", note="0: only at the phase boundary")
    # A run dir (or its checkpoints/phase1.pt): skip Phase 1, start Phase 2 from that run's Phase-1 weights.
    from_run: str | None = None


@dataclass
class Phase2Config:
    enabled: bool = True
    context: Phase2Context = Phase2Context.propagate  # recurrent (BPTT) | fixed (Phase-1 contexts)
    freeze_updater: bool = False
    seq_len: int = ranged(64, "[2, inf)")
    batch_size: int = ranged(32, "[1, inf)")
    epochs: int = ranged(50, "[1, inf)")  # a budget cap: runs normally stop on the validation plateau first
    max_steps: int | None = ranged(None, "[1, inf)", null="no cap")  # optimizer steps over all epochs
    max_steps_per_epoch: int | None = ranged(None, "[1, inf)", null="no cap")
    lr: float = ranged(3e-3, "(0, inf)")
    weight_decay: float = ranged(0.0, "[0, inf)")
    grad_clip: float = ranged(1.0, "(0, inf)")
    # optimizer steps between validation evaluations
    eval_every: int = ranged(0, "[0, inf)", note="0: once per epoch")
    # Stop after `patience` evaluations in a row without a val-loss gain > min_delta ("plateau").
    patience: int = ranged(5, "[1, inf)")
    min_delta: float = ranged(0.0, "[0, inf)")
    reconstruction_weight: float = ranged(0.0, "[0, inf)")  # lambda of the c_t -> [c_{t-1}; x_t] decoder loss
    max_val_tokens: int | None = ranged(None, "[1, inf)", null="no cap")
    # window length of val/test evaluation; loss by position
    eval_seq_len: int | None = ranged(None, "[2, inf)", null="= seq_len")
    # context=propagate: how each window's recurrence is evaluated in training. sequential: a loop
    # over positions (exact, full BPTT). jacobi: parallel sweeps until the max per-token change
    # <= jacobi_tol (at most jacobi_sweeps; null = seq_len, exact for any f), then
    # jacobi_grad_sweeps sweeps with gradient (a truncated BPTT of that depth).
    solver: WindowSolver = WindowSolver.sequential
    jacobi_sweeps: int | None = ranged(None, "[1, inf)", null="= seq_len")
    jacobi_tol: float = ranged(1e-6, "[0, inf)")
    jacobi_grad_sweeps: int = ranged(1, "[1, inf)")

    # resume checkpoint every N epochs
    checkpoint_every: int = ranged(1, "[0, inf)", note="0: none inside Phase 2")


@dataclass
class RepetitionConfig:
    """training=repetition (with data=repetition): staged cycle loss MSE(c_t, c_{t-p})."""

    enabled: bool = False
    # optimizer steps per phrase length p (all phrases of a stage per step)
    steps_per_stage: int = ranged(60, "[1, inf)")
    lr: float = ranged(1e-3, "(0, inf)")
    grad_clip: float = ranged(1.0, "(0, inf)")
    ce_weight: float = ranged(0.0, "[0, inf)")  # optional small next-token cross-entropy weight


@dataclass
class TrainingConfig:
    dist_reg_weight: float = ranged(0.5, "[0, 1]")  # w in (1-w)*MSE + w*L_div
    diversity: Any = MISSING
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    precision: Precision = Precision.fp32  # bf16: autocast (a no-op where unsupported)
    compile: bool = False


# ----------------------------------------------------------------------------- loggers
@dataclass
class LoggerConfig:
    _target_: str = "newllm.runtime.tracking.CSVLogger"


# ----------------------------------------------------------------------------- root
@dataclass
class PathsConfig:
    output_root: str = "outputs"
    cache_dir: str = "${paths.output_root}/cache"  # tokenizers, token streams, datasets: beside the runs


@dataclass
class Config:
    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logger: Any = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = ranged(42, "[0, SEED_MAX]")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # What the task returns to a sweeper, in this order (keys of metrics.json).
    objectives: list[str] = field(
        default_factory=lambda: [keys.P1_VAL_CONVERGED_GAIN, keys.P2_VAL_PPL]
    )
    save_checkpoint: bool = True
    save_contexts: bool = True  # Phase-1 validation contexts (for spectra in notebooks)
    progress: bool = True  # loop progress: a bar on a terminal, else a few log lines (newllm/training/progress.py)
    # resume=<run dir>: continue that interrupted run there, from its last checkpoint, with its own config.
    resume: str | None = None


def check_group_overrides(args: list[str], conf_dir: Path) -> None:
    """Every command-line override of a config group names options (`model=layerwise`, `model=a,b`).

    Hydra reads `model=5` as the integer 5 and fails inside its composer with a traceback; this runs first
    (newllm.run's command line) and says it in one line. A group is a folder of conf/, a group in Hydra's
    ConfigStore, or any key with a '/' (config keys use dots)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 -- a grammar error: Hydra's own message says it
        return
    store = ConfigStore.instance()
    for override in parsed:
        group = override.key_or_group
        options = sorted({p.stem for p in (conf_dir / group).glob("*.yaml")} |
                         {name.removesuffix(".yaml") for name in _store_options(store, group)})
        if override.is_delete() or not ("/" in group or (conf_dir / group).is_dir() or options):
            continue
        value = override.value()
        values = value.list if isinstance(value, ChoiceSweep) else value if isinstance(value, list) else [value]
        if override.is_sweep_override() and not isinstance(value, ChoiceSweep) or not all(
                isinstance(v, str) for v in values):
            shown = override.input_line.split("=", 1)[-1] if override.input_line else value
            raise ConfigError(f"{group}={shown} is not allowed: {group} is a config group; expected the name of one "
                              f"of its options" + (f" ({', '.join(options)})" if options else ""))


def _store_options(store: ConfigStore, group: str) -> list[str]:
    try:
        return store.list(group)
    except OSError:  # not a group of the ConfigStore
        return []


def _storage_folder(url: str | None) -> str:
    from newllm.sweep.storage import folder_name  # sqlalchemy: imported only when a preset's sweep folder is resolved

    return folder_name(url)


def register_configs() -> None:
    # hydra.run.dir / output_subdir of a resume=<run dir> invocation: the interrupted run's own dir,
    # with this invocation's Hydra files under .hydra/resume (the original .hydra/ stays as it was).
    if not OmegaConf.has_resolver("newllm.run_dir"):
        OmegaConf.register_resolver("newllm.run_dir", lambda resume, default: resume or default)
        OmegaConf.register_resolver("newllm.hydra_subdir", lambda resume: ".hydra/resume" if resume else ".hydra")
    if not OmegaConf.has_resolver("newllm.storage_dir"):
        # The Optuna presets' sweep folders: one per (study, storage), so one study name in two storages
        # never shares job folders (e.g. outputs/sweeps/optuna_ppl/optuna-1f2e3d4c).
        OmegaConf.register_resolver("newllm.storage_dir", _storage_folder)
    # Schemas are top-level configs, not options of their groups: Hydra lists every config of a group
    # as a selectable option ("model=context_model_schema" would compose a model without an updater).
    # Each YAML option extends its schema with `- /<name>_schema@_here_`.
    schemas = {
        "config_schema": Config,
        "context_model_schema": ContextModelConfig,
        "gru_schema": GRUConfig,
        "transformer_schema": TransformerConfig,
        "hf_schema": HFModelConfig,
        "gated_schema": GatedUpdaterConfig,
        "residual_schema": ResidualUpdaterConfig,
        "frobenius_schema": DiversityConfig,
        "dim_usage_schema": DimUsageConfig,
        "ema_variance_schema": EMAVarianceConfig,
        "vicreg_schema": VICRegConfig,
        "none_schema": NoDiversityConfig,
        "logger_schema": LoggerConfig,
    }
    cs = ConfigStore.instance()
    for name, node in schemas.items():  # replace=True: registering twice (tests, notebooks) is harmless
        cs.store(name=name, node=node, replace=True)


# ----------------------------------------------------------------------------- value checks
def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _non_finite(node: Any, prefix: str = "") -> tuple[str, float] | None:
    """The first float in a config tree that is NaN or +-inf, as (dotted key, value)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, float) and not math.isfinite(value):
            return f"{prefix}{key}", value
        found = _non_finite(value, f"{prefix}{key}.")
        if found:
            return found
    return None


def _leaf_types(hint: Any) -> set[Any]:
    """int | None -> {int, NoneType}; list[int] -> {int}."""
    args = typing.get_args(hint)
    return set().union(*(_leaf_types(a) for a in args)) if args else {hint}


@functools.cache
def schema_ranges(schema: type) -> dict[str, tuple[Range, bool]]:
    """field name -> (its Range, whether it holds integers), for every ranged field of a schema."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        if RANGE in f.metadata:
            integer = int in _leaf_types(hints[f.name])
            out[f.name] = (f.metadata[RANGE].for_type(integer), integer)
    return out


def _check_range(key: str, value: Any, rng: Range, integer: bool) -> None:
    if isinstance(value, ListConfig):
        items = list(value)
        _check(all(rng.allows(v) for v in items), key, items, f"a list whose items are each {rng.describe(integer)}")
    else:
        _check(not isinstance(value, float) or math.isfinite(value), key, value, "a finite number")
        _check(rng.allows(value), key, value, rng.describe(integer))


def check_schema_node(node: DictConfig, prefix: str = "") -> None:
    """One walk over every schema-typed node: each key is one of its schema's fields, and each numeric field
    holds a value its declared Range allows. Hydra's `+key=value` appends a key even to a typed node, so a
    misspelt `+training.phase1.max_iteration=9` would otherwise pass silently (or fail deep inside a
    constructor)."""
    schema = OmegaConf.get_type(node)
    typed = dataclasses.is_dataclass(schema) and schema.__module__ == __name__  # not a plugin's (Hydra, Optuna)
    known = {f.name for f in dataclasses.fields(schema)} if typed else None
    ranges = schema_ranges(schema) if typed else {}
    for key, value in node.items_ex(resolve=False):  # as written: no interpolation resolved
        if known is not None and key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            shown = OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig) else value
            raise ConfigError(f"{prefix}{key}={shown!r} is not allowed: {schema.__name__} has no key {key!r}"
                              f"{hint}; expected one of {sorted(known)}")
        if key in ranges:
            _check_range(f"{prefix}{key}", node[key], *ranges[key])  # node[key]: interpolations resolved
        if isinstance(value, DictConfig) and node[key] is not None:  # a typed node set to null has no keys
            check_schema_node(value, f"{prefix}{key}.")


def _check_objectives(objectives: Any) -> None:
    """Each objective is a key a run reports as a number (newllm.keys.is_objective): a misspelt one logged nan
    after the whole run, and a sweep recorded every trial as failed."""
    names = list(objectives)
    _check(len(names) > 0 and all(isinstance(n, str) for n in names), "objectives", names,
           "a non-empty list of metric keys")
    for name in names:
        if not keys.is_objective(name):
            near = difflib.get_close_matches(name, keys.OBJECTIVES, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"objectives={names} is not allowed: {name!r} is not a metric a run reports as a "
                              f"number; {hint}expected one of newllm.keys.OBJECTIVES, e.g. "
                              f"{', '.join(keys.OBJECTIVES[:3])}")


def check_directions(objectives: list[str], directions: list[str]) -> None:
    """An Optuna sweep optimises each objective in its own direction: one direction per objective."""
    if len(objectives) != len(directions):
        raise ConfigError(f"objectives={objectives} has {len(objectives)} name(s) for hydra.sweeper.direction="
                          f"{directions}: give one direction per objective")


def validate(cfg: DictConfig) -> None:
    """Check the values of a composed config before any work. Raises ConfigError naming the key.

    Single keys: the Range each numeric schema field declares (`ranged`), and every float finite. Below:
    what a range cannot say (combinations of keys, group options, objectives)."""
    check_schema_node(cfg)
    # Every float key at once, inside schemas or not: a rate, weight or threshold of inf/nan passes `> 0`
    # checks and fails only after minutes of work (or silently trains on NaN).
    bad = _non_finite(to_container(cfg))
    if bad:
        _check(False, *bad, "a finite number")
    # Group options are config nodes; `training.diversity=vicreg` (a dot, not a slash) sets a string.
    for key, group in (("training.diversity", "training/diversity"), ("model.updater", "model/updater")):
        node = OmegaConf.select(cfg, key)
        if node is not None and not isinstance(node, DictConfig):
            _check(False, key, node, f"a config option: select one with {group}=<name> (a slash, not a dot)")
    _check_model(cfg.model)
    _check_data(cfg)
    _check_phase1(cfg.training.phase1)
    _check_pairing(cfg)
    _check(cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda"),
           "device", cfg.device, "auto, cpu, cuda or cuda:N")
    _check_objectives(cfg.objectives)


def _check_model(m: DictConfig) -> None:
    if "architecture" in m:
        _check_context_model(m)
    _check(m.get("core_params") is None or m.get("state_floats") is None, "model.state_floats", m.get("state_floats"),
           f"null with model.core_params={m.get('core_params')} (a model is sized by parameters or by state, not both)")
    sized = m.get("core_params") is not None or m.get("state_floats") is not None
    if "family" in m and not sized:  # a budget solves context_dim as a multiple of the family's step
        from newllm.models.hf_baselines import width_step

        step = width_step(m.family, m.heads, m.expand)
        _check(m.context_dim % step == 0, "model.context_dim", m.context_dim,
               f"a multiple of {step} for model={m.family} (model.heads={m.heads}, model.expand={m.expand})")
    elif "heads" in m and not sized:
        _check(m.context_dim % m.heads == 0, "model.heads", m.heads, "a divisor of model.context_dim")


def _check_context_model(m: DictConfig) -> None:
    if str(m.updater.get("_target_", "")).endswith("ResidualUpdater") and m.hidden_dim is not None:
        width = m.context_dim + m.embed_dim  # the increment has one entry per context and token dimension
        _check(m.hidden_dim == width, "model.hidden_dim", m.hidden_dim,
               f"model.context_dim + model.embed_dim = {width} with model/updater=residual (or null)")


def _check_data(cfg: DictConfig) -> None:
    d = cfg.data
    _check(d.val_fraction + d.test_fraction < 1.0, "data.test_fraction", d.test_fraction,
           f"a number in [0, 1 - data.val_fraction={d.val_fraction}) (some data must stay for training)")
    _check(len(d.phrase_lengths) > 0, "data.phrase_lengths", list(d.phrase_lengths),
           "a non-empty list of positive integers")
    if d.name == "recall":
        p2 = cfg.training.phase2
        for key in ("seq_len", "eval_seq_len"):  # a window must be exactly one sequence
            if p2[key] is not None:
                _check(p2[key] == d.seq_len, f"training.phase2.{key}", p2[key],
                       f"data.seq_len={d.seq_len} with data=recall")


def _check_phase1(p1: DictConfig) -> None:
    _check(p1.min_iterations <= p1.max_iterations, "training.phase1.min_iterations",
           p1.min_iterations, f"an integer in [0, max_iterations={p1.max_iterations}]")


def _check_pairing(cfg: DictConfig) -> None:
    """What only a context model can do."""
    t, p2 = cfg.training, cfg.training.phase2
    is_context_model = "architecture" in cfg.model
    _check(is_context_model or t.phase1.from_run is None, "training.phase1.from_run", t.phase1.from_run,
           "null for baseline models (they have no Phase 1)")
    _check(is_context_model or p2.context == "propagate", "training.phase2.context", p2.context,
           "propagate for baseline models (fixed contexts need a context model)")


def retyped(stored: DictConfig) -> DictConfig:
    """A config read back from a run folder (resume checkpoint, .hydra/config.yaml) with the schema's types
    again: choices as Enums, the loops' sections as their dataclasses. Keys outside the schema (a sweep
    preset's own) are kept as they were."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, False)
    return OmegaConf.merge(schema, stored)


def to_container(cfg: DictConfig) -> dict:
    """Plain data (choices as their strings): what metrics, trackers and checkpoints store."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]



@dataclass
class EarlyStopConfig:
    """hydra.sweeper.early_stop of newllm_optuna: rules checked on every logged row, in single- and
    multi-objective studies alike (newllm.sweep.hooks.early_stop_reason).

    A rule that fires stops the trial, which is recorded PRUNED with the rule in `pruned_reason`.
    """

    nan_loss: bool = True  # a non-finite *loss value in a history row
    # Phase-1 effective rank / context_dim below this (0 = off): contexts collapsed onto few directions.
    min_effective_rank_ratio: float = ranged(0.0, "[0, 1]")
    # identity_mapping_score(f) above this: the update learned c_t ~ c_{t-1}, ignoring x_t.
    max_identity_score: float | None = ranged(None, "[-1, 1]", null="off")  # a mean cosine
    grace_iterations: int = ranged(2, "[0, inf)")  # Phase-1 iterations before the rank/identity rules apply

def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'layers': 2, 'sizes': [1, 2]}} -> {'model.layers': 2, 'model.sizes': [1, 2]}.

    Nested dicts become dotted keys; every other value (lists included) is a leaf, kept as is.
    An empty nested dict leaves no key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
