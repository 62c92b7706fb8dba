"""Structured configs (typed schemas for every conf/ group) and value checks, in one place.

Every YAML option in conf/ extends one of these dataclasses through its defaults list, so a
misspelt key or a wrong type fails at compose time with Hydra's own message. Ranges that a type
cannot express are checked by `validate`, which names the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from newllm import keys
from newllm.errors import ConfigError

# Hydra 1.4 asks which `_target_`s config may name; ours live in the newllm package.
TRUSTED_TARGETS = ("newllm.*",)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate restricted to newllm's own classes."""
    return hydra.utils.instantiate(node, _execution_whitelist_=TRUSTED_TARGETS, **kwargs)


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
    layernorm_mix: float = 1.0


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
    layers: int = 2
    context_dim: int = 128
    embed_dim: int = 96
    # null: derived (residual updater needs context_dim + embed_dim; gated uses context_dim).
    hidden_dim: int | None = None
    # std of f's weights (embedding and head: 0.02). At 0.02 f is ~identity: a trivial fixed point.
    init_std: float = 0.1
    dropout: float = 0.0
    # A core-parameter budget (everything but embedding and head): when set, context_dim (and an
    # explicit hidden_dim, in proportion) is solved to meet it within 2 % (newllm.models.sizing).
    core_params: int | None = None
    updater: Any = MISSING
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)


@dataclass
class GRUConfig:
    _target_: str = "newllm.models.baselines.GRULM"
    layers: int = 2
    context_dim: int = 128  # GRU hidden size
    embed_dim: int = 96
    hidden_dim: int | None = None  # unused; kept so sweeps over the same keys compose
    init_std: float = 0.02
    dropout: float = 0.0
    # A core-parameter budget (everything but embedding and head): when set, context_dim (and an
    # explicit hidden_dim, in proportion) is solved to meet it within 2 % (newllm.models.sizing).
    core_params: int | None = None


@dataclass
class TransformerConfig:
    _target_: str = "newllm.models.baselines.TransformerLM"
    layers: int = 2
    context_dim: int = 128  # d_model
    embed_dim: int = 96  # token embedding, projected to d_model
    hidden_dim: int | None = None  # feed-forward width; null = 4 * context_dim
    init_std: float = 0.02
    dropout: float = 0.0
    heads: int = 4
    max_len: int = 4096
    # Positions each token attends to in each layer, itself included (null: every earlier one), so a token
    # sees layers x (w - 1) back. 1: no access to the past at all, data=recall's negative control.
    attention_window: int | None = None
    # A core-parameter budget (everything but embedding and head): when set, context_dim (and an
    # explicit hidden_dim, in proportion) is solved to meet it within 2 % (newllm.models.sizing).
    core_params: int | None = None


# ----------------------------------------------------------------------------- data
@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    # A hub tokenizer name (needs network); null trains a byte-level BPE locally.
    pretrained: str | None = None


@dataclass
class DataConfig:
    name: DataSource = DataSource.chatterbot
    path: str | None = None  # data=ultrachat: a local JSON/JSONL/Parquet file with a `messages` column
    files: list[str] = field(default_factory=list)  # data=text: plain-text files
    # data=text: documents are paragraphs (blank lines) | line | file; auto: paragraphs when the text
    # has blank lines, else lines. The unit used is data/split_by in metrics.json.
    split_by: SplitBy = SplitBy.auto
    num_conversations: int | None = None  # cap on conversations/documents read (null = all)
    # Drop documents whose normalised text (casefold, whitespace collapsed; a dialogue's whole
    # conversation) repeats an earlier one, before the split (newllm.data.dedup). Recorded as data/dedup,
    # data/duplicates_removed; document sources only (repetition and recall are generated).
    dedup: bool = True
    max_train_tokens: int | None = None  # caps (at most); the counts used land in metrics as data/*
    max_val_tokens: int | None = None
    max_test_tokens: int | None = None
    val_fraction: float = 0.1  # share of documents held out (repetition: extra held-out phrases per stage)
    # share of documents held out for test (0: none): disjoint from train and validation, read once
    # after Phase 2 by the kept (best-validation) weights; nothing selects or prunes on it.
    test_fraction: float = 0.1
    # Seeds every data choice (the document split, its order, the Phase-1 sample, repetition phrases),
    # separately from `seed` (init, batch order): runs of a seed grid share one split.
    split_seed: int = 0
    # by_conversation: disjoint held-out conversations/documents/phrases (default). subset_of_train:
    # the original research protocol (validation = last 20 % of the training stream), labelled in metrics.
    val_protocol: ValProtocol = ValProtocol.by_conversation
    loss_on: LossOn = LossOn.assistant  # which tokens Phase 2 predicts
    # data=repetition: phrases of p distinct tokens, each repeated `repetitions` times, one stage per p
    phrase_lengths: list[int] = field(default_factory=lambda: [1, 2, 3])
    repetitions: int = 20
    phrases_per_stage: int = 8
    # data=recall (newllm.data.recall): token ids generated directly; sequences of seq_len tokens
    task: RecallTask = RecallTask.mqar
    vocab_size: int = 128  # mqar: > seq_len, as Zoology's multiquery_ar asserts
    num_pairs: int = 4  # mqar: at most seq_len // 4
    # mqar: query slot i (1, 2, ... after the pairs) is drawn with weight i^(power_a - 1), as Zoology's
    # multiquery_ar: 0.01 (its default) puts queries near the pairs, 1 spreads them uniformly.
    power_a: float = 0.01
    # = training.phase2.seq_len (one sequence per window; conf/data/recall.yaml makes the window follow it)
    seq_len: int = 64
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200


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
    momentum: float = 0.99


@dataclass
class VICRegConfig(DiversityConfig):
    _target_: str = "newllm.training.diversity.VICReg"
    std_target: float = 1.0
    covariance_weight: float = 1.0


@dataclass
class NoDiversityConfig(DiversityConfig):
    _target_: str = "newllm.training.diversity.NoDiversity"


@dataclass
class Phase1Config:
    enabled: bool = True
    mode: Phase1Mode = Phase1Mode.stream  # stream: Jacobi fixed point of the whole stream
    untrained: bool = False  # measure only: no optimizer step, min_iterations sweeps
    max_tokens: int = 8192  # training tokens Phase 1 reads (the stream it iterates over)
    num_streams: int = 1  # the stream is cut into this many parallel streams
    max_iterations: int = 40
    min_iterations: int = 5
    convergence_threshold: float = 0.01  # per-token MSE(C_t, P_t) below this => converged
    convergence_target: float = 0.95  # stop once this fraction of held-out tokens converged from c = 0
    lr: float = 1e-3
    grad_clip: float = 1.0
    context_noise: float = 0.0  # std of Gaussian noise on the input contexts during training
    chunk_size: int = 16384  # positions per forward/backward chunk (gradients accumulated)
    init: Pass0 = Pass0.sequential  # how pass 0 builds the first contexts (newllm.training.solvers.PASS0)
    init_chunks: int = 16  # init=chunked|burn_in: slices of the stream run through pass 0 at once
    init_burn_in: int = 64  # init=burn_in: tokens each slice starts early from c = 0 (>= N: exact)
    # Held-out measurement (newllm.training.phase1.evaluate_phase1): sweeps from c = 0, no optimizer.
    # phase1/val_convergence_rate is the converged fraction after val_iterations sweeps. 32: on the
    # default run (seed 42) it separates trained 0.875 / untrained 0.570 / lr 1e-7 0.567 / w=0 0.717 /
    # w=0.9 0.944, where 10 sweeps gave 0.005-0.014 to all of them but w=0.9 (0.35).
    val_iterations: int = 32
    val_every: int = 20  # measure validation every N iterations; stop once it reaches convergence_target
    memory_cap: int = 128  # most sweeps phase1/val_memory_length counts (then *_memory_length_capped = 1)
    # Held-out tokens are cut into this many streams, each read from c = 0: the reference pass (the
    # sequential recurrence, latency-bound) then takes N / val_streams steps. Part of the measurement's
    # definition (which positions start a stream), so keep it fixed when comparing runs; measured on the
    # default run: 1 / 8 / 16 streams gave 0.8745 / 0.8749 / 0.8784, memory length 40 / 40 / 39.
    val_streams: int = 8
    erank_samples: int = 4096  # rows sampled for the effective-rank SVD (fixed across runs)
    erank_every: int = 5  # effective rank in the history every N iterations (and the last)
    checkpoint_every: int = 10  # resume checkpoint every N iterations (0: only at the phase boundary)
    # A run dir (or its checkpoints/phase1.pt): skip Phase 1, start Phase 2 from that run's Phase-1 weights.
    from_run: str | None = None


@dataclass
class Phase2Config:
    enabled: bool = True
    context: Phase2Context = Phase2Context.propagate  # recurrent (BPTT) | fixed (Phase-1 contexts)
    freeze_updater: bool = False
    seq_len: int = 64
    batch_size: int = 32
    epochs: int = 50  # a budget cap: runs normally stop on the validation plateau first
    max_steps: int | None = None  # a cap on optimizer steps over all epochs (null: none)
    max_steps_per_epoch: int | None = None
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # optimizer steps between validation evaluations (0: once per epoch)
    # Stop after `patience` evaluations in a row without a val-loss gain > min_delta ("plateau").
    patience: int = 5
    min_delta: float = 0.0
    reconstruction_weight: float = 0.0  # lambda of the c_t -> [c_{t-1}; x_t] decoder loss
    max_val_tokens: int | None = None
    eval_seq_len: int | None = None  # window length of val/test evaluation (null = seq_len); loss by position
    # context=propagate: how each window's recurrence is evaluated in training. sequential: a loop
    # over positions (exact, full BPTT). jacobi: parallel sweeps until the max per-token change
    # <= jacobi_tol (at most jacobi_sweeps; null = seq_len, exact for any f), then
    # jacobi_grad_sweeps sweeps with gradient (a truncated BPTT of that depth).
    solver: WindowSolver = WindowSolver.sequential
    jacobi_sweeps: int | None = None
    jacobi_tol: float = 1e-6
    jacobi_grad_sweeps: int = 1

    checkpoint_every: int = 1  # resume checkpoint every N epochs (0: none inside Phase 2)


@dataclass
class RepetitionConfig:
    """training=repetition (with data=repetition): staged cycle loss MSE(c_t, c_{t-p})."""

    enabled: bool = False
    steps_per_stage: int = 60  # optimizer steps per phrase length p (all phrases of a stage per step)
    lr: float = 1e-3
    grad_clip: float = 1.0
    ce_weight: float = 0.0  # optional small next-token cross-entropy weight


@dataclass
class TrainingConfig:
    dist_reg_weight: float = 0.5  # w in (1-w)*MSE + w*L_div
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
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # What the task returns to a sweeper, in this order (keys of metrics.json).
    objectives: list[str] = field(
        default_factory=lambda: [keys.P1_VAL_CONVERGENCE_RATE, keys.P2_VAL_PPL]
    )
    save_checkpoint: bool = True
    save_contexts: bool = True  # Phase-1 validation contexts (for spectra in notebooks)
    progress: bool = True  # loop progress: a bar on a terminal, else a few log lines (newllm/training/progress.py)
    # resume=<run dir>: continue that interrupted run there, from its last checkpoint, with its own config.
    resume: str | None = None


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


def _positive_int(key: str, value: Any) -> None:
    _check(isinstance(value, int) and value > 0, key, value, "a positive integer")


def _unit_interval(key: str, value: Any, *, open_right: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0
    ok = ok and (value < 1.0 if open_right else value <= 1.0)
    _check(ok, key, value, "a number in [0, 1)" if open_right else "a number in [0, 1]")


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


def _check_known_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key of a schema-typed node is one of its schema's fields. Hydra's `+key=value` appends a key even
    to a typed node, so a misspelt `+training.phase1.max_iteration=9` would otherwise pass silently (or fail
    deep inside a constructor)."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key, value in node.items_ex(resolve=False):  # as written: no interpolation resolved
        if known is not None and key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            shown = OmegaConf.to_container(value, resolve=False) if isinstance(value, DictConfig) else value
            raise ConfigError(f"{prefix}{key}={shown!r} is not allowed: {schema.__name__} has no key {key!r}"
                              f"{hint}; expected one of {sorted(known)}")
        if isinstance(value, DictConfig):
            _check_known_keys(value, f"{prefix}{key}.")


def _check_recall(cfg: DictConfig) -> None:
    d, p2 = cfg.data, cfg.training.phase2
    for key in ("vocab_size", "num_pairs", "seq_len", "num_train", "num_val", "num_test"):
        _positive_int(f"data.{key}", d[key])
    _check(d.power_a > 0, "data.power_a", d.power_a, "a number > 0 (1: queries uniform over the slots)")
    for key in ("seq_len", "eval_seq_len"):  # a window must be exactly one sequence
        if p2[key] is not None:
            _check(p2[key] == d.seq_len, f"training.phase2.{key}", p2[key],
                   f"data.seq_len={d.seq_len} with data=recall")


def validate(cfg: DictConfig) -> None:
    """Check value ranges the types cannot express. Raises ConfigError naming the key."""
    # Every float key at once: a rate, weight or threshold of inf/nan passes `> 0` checks and fails
    # only after minutes of work (or silently trains on NaN).
    _check_known_keys(cfg)
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
    _check_phase1(cfg.training)
    _check_phase2(cfg.training.phase2)
    _check_pairing(cfg)
    _check(cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda"),
           "device", cfg.device, "auto, cpu, cuda or cuda:N")
    _check(len(cfg.objectives) > 0, "objectives", list(cfg.objectives), "a non-empty list of metric keys")


def _check_model(m: DictConfig) -> None:
    for key in ("layers", "context_dim", "embed_dim"):
        _positive_int(f"model.{key}", m[key])
    if m.get("hidden_dim") is not None:
        _positive_int("model.hidden_dim", m.hidden_dim)
    _check(m.init_std > 0, "model.init_std", m.init_std, "a positive number")
    _unit_interval("model.dropout", m.dropout, open_right=True)
    if "architecture" in m:
        _check_context_model(m)
    if m.get("core_params") is not None:
        _positive_int("model.core_params", m.core_params)
    if m.get("attention_window") is not None:
        _positive_int("model.attention_window", m.attention_window)
    if "heads" in m:
        _positive_int("model.heads", m.heads)
        if m.get("core_params") is None:  # a budget solves context_dim as a multiple of heads
            _check(m.context_dim % m.heads == 0, "model.heads", m.heads, "a divisor of model.context_dim")


def _check_context_model(m: DictConfig) -> None:
    if "layernorm_mix" in m.updater:
        _unit_interval("model.updater.layernorm_mix", m.updater.layernorm_mix)
    if str(m.updater.get("_target_", "")).endswith("ResidualUpdater") and m.hidden_dim is not None:
        width = m.context_dim + m.embed_dim  # the increment has one entry per context and token dimension
        _check(m.hidden_dim == width, "model.hidden_dim", m.hidden_dim,
               f"model.context_dim + model.embed_dim = {width} with model/updater=residual (or null)")


def _check_data(cfg: DictConfig) -> None:
    d = cfg.data
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a number in (0, 1)")
    _unit_interval("data.test_fraction", d.test_fraction, open_right=True)
    _check(d.val_fraction + d.test_fraction < 1.0, "data.test_fraction", d.test_fraction,
           f"a number in [0, 1 - data.val_fraction={d.val_fraction}) (some data must stay for training)")
    _check(isinstance(d.split_seed, int), "data.split_seed", d.split_seed, "an integer")
    for key in ("num_conversations", "max_train_tokens", "max_val_tokens", "max_test_tokens"):
        if d[key] is not None:
            _positive_int(f"data.{key}", d[key])
    _check(len(d.phrase_lengths) > 0 and all(isinstance(p, int) and p > 0 for p in d.phrase_lengths),
           "data.phrase_lengths", list(d.phrase_lengths), "a non-empty list of positive integers")
    _check(isinstance(d.repetitions, int) and d.repetitions >= 2, "data.repetitions", d.repetitions,
           "an integer >= 2 (a phrase must recur to have a cycle)")
    _positive_int("data.phrases_per_stage", d.phrases_per_stage)
    if d.name == "recall":
        _check_recall(cfg)
    _positive_int("tokenizer.vocab_size", cfg.tokenizer.vocab_size)


def _check_phase1(t: DictConfig) -> None:
    _unit_interval("training.dist_reg_weight", t.dist_reg_weight)
    p1 = t.phase1
    for key in ("max_tokens", "num_streams", "max_iterations", "chunk_size", "init_chunks",
                "erank_samples", "erank_every", "val_iterations", "val_every", "memory_cap", "val_streams"):
        _positive_int(f"training.phase1.{key}", p1[key])
    _check(isinstance(p1.init_burn_in, int) and p1.init_burn_in >= 0, "training.phase1.init_burn_in",
           p1.init_burn_in, "a non-negative integer")
    _check(0 <= p1.min_iterations <= p1.max_iterations, "training.phase1.min_iterations",
           p1.min_iterations, f"an integer in [0, max_iterations={p1.max_iterations}]")
    _check(p1.convergence_threshold > 0, "training.phase1.convergence_threshold",
           p1.convergence_threshold, "a positive number")
    _unit_interval("training.phase1.convergence_target", p1.convergence_target)
    _check(p1.lr > 0, "training.phase1.lr", p1.lr, "a positive number")
    _check(p1.context_noise >= 0, "training.phase1.context_noise", p1.context_noise, "a number >= 0")
    for key, node in (("training.phase1.checkpoint_every", p1), ("training.phase2.checkpoint_every", t.phase2)):
        every = node.checkpoint_every
        _check(isinstance(every, int) and every >= 0, key, every, "an integer >= 0 (0: only at phase boundaries)")


def _check_phase2(p2: DictConfig) -> None:
    for key in ("seq_len", "batch_size", "epochs"):
        _positive_int(f"training.phase2.{key}", p2[key])
    _positive_int("training.phase2.patience", p2.patience)
    _check(isinstance(p2.eval_every, int) and p2.eval_every >= 0, "training.phase2.eval_every", p2.eval_every,
           "an integer >= 0 (0: once per epoch)")
    _check(p2.min_delta >= 0, "training.phase2.min_delta", p2.min_delta, "a number >= 0")
    if p2.max_steps is not None:
        _positive_int("training.phase2.max_steps", p2.max_steps)
    _check(p2.seq_len >= 2, "training.phase2.seq_len", p2.seq_len, "an integer >= 2")
    if p2.eval_seq_len is not None:
        _check(isinstance(p2.eval_seq_len, int) and p2.eval_seq_len >= 2, "training.phase2.eval_seq_len",
               p2.eval_seq_len, "null (= seq_len) or an integer >= 2")
    _check(p2.lr > 0, "training.phase2.lr", p2.lr, "a positive number")


def _check_pairing(cfg: DictConfig) -> None:
    """Repetition and solver options, and what only a context model can do."""
    t, p2 = cfg.training, cfg.training.phase2
    rep = t.repetition
    _positive_int("training.repetition.steps_per_stage", rep.steps_per_stage)
    _check(rep.lr > 0, "training.repetition.lr", rep.lr, "a positive number")
    _check(rep.ce_weight >= 0, "training.repetition.ce_weight", rep.ce_weight, "a number >= 0")
    if p2.jacobi_sweeps is not None:
        _positive_int("training.phase2.jacobi_sweeps", p2.jacobi_sweeps)
    _positive_int("training.phase2.jacobi_grad_sweeps", p2.jacobi_grad_sweeps)
    _check(p2.jacobi_tol >= 0, "training.phase2.jacobi_tol", p2.jacobi_tol, "a number >= 0")
    _check(p2.reconstruction_weight >= 0, "training.phase2.reconstruction_weight",
           p2.reconstruction_weight, "a number >= 0")
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
    min_effective_rank_ratio: float = 0.0
    # identity_mapping_score(f) above this (null = off): the update learned c_t ~ c_{t-1}, ignoring x_t.
    max_identity_score: float | None = None
    grace_iterations: int = 2  # Phase-1 iterations before the rank/identity rules apply

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
