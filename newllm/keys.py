"""Every key a run writes to metrics.json, history.csv and the trackers: one definition each.

Static keys are constants; a family (one key per split, per statistic) is a function that builds its
members. Code reads and writes keys through these names only, so a renamed key is one edit, and
`is_known` is the contract that tests hold every metrics.json, history row and the docs to: a key that
is not defined here is a bug (tests/test_keys.py).

Groups: data/ (the data a run saw), model/ (sizes), phase1/ (CVFP training and the held-out fixed-point
measures), phase2/ (next-token training and evaluation), recall/ (data=recall answer accuracy),
repetition/ (staged phrase repetition), time/ (wall clock). What each measure means:
docs/measurement.md.
"""

from __future__ import annotations

import re

SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")

# ----------------------------------------------------------------------------- stages and history rows
# The training stages: the metric-key prefixes, the run's checkpoint stages and the values of history.csv's
# `phase` column (one type, so a reader filters with ==, never on 1 vs "1"); `step` numbers rows within one.
PHASE1, PHASE2, REPETITION = "phase1", "phase2", "repetition"
HISTORY_PHASE, HISTORY_STEP = "phase", "step"

# ----------------------------------------------------------------------------- the run
SEED = "seed"
DEVICE = "device"
WALL_S = "time/wall_s"  # the whole run, across resumes
WALL_S_THIS_PROCESS = "time/wall_s_this_process"

# ----------------------------------------------------------------------------- data
DATA_NAME = "data/name"
DATA_DOCUMENTS = "data/documents"
DATA_FINGERPRINT = "data/fingerprint"
DATA_VOCAB_SIZE = "data/vocab_size"
DATA_TOKENIZER = "data/tokenizer"
DATA_TOKENIZER_CACHE_HIT = "data/tokenizer_cache_hit"
DATA_TOKENS_CACHE_HIT = "data/tokens_cache_hit"
DATA_SPLIT_SEED = "data/split_seed"
DATA_SPLIT_BY = "data/split_by"
DATA_TEST_FRACTION = "data/test_fraction"
DATA_VAL_PROTOCOL = "data/val_protocol"
DATA_TRAIN_TOKENS = "data/train_tokens"
DATA_DEDUP = "data/dedup"  # whether repeated documents were dropped before the split (data.dedup)
DATA_DUPLICATES_REMOVED = "data/duplicates_removed"
DATA_CONTAMINATION_NGRAM = "data/contamination/ngram"  # n of the n-gram overlap test (13, as GPT-3)
DATA_HF_DATASET = "data/hf_dataset"  # data=hf: the hub id or save_to_disk folder,
DATA_HF_CONFIG = "data/hf_config"  # its config name,
DATA_HF_SPLITS = "data/hf_splits"  # and which of its splits became train/val/test (own=<name>: newllm split it)


def data_contamination(split: str) -> str:
    """data/contamination/{split}_documents: share of the held-out split's documents that share an n-gram
    with the training split (newllm/data/dedup.py)."""
    return f"data/contamination/{split}_documents"


def data_split(split: str, what: str) -> str:
    """data/{split}_{what}: what in documents, tokens, loss_tokens, sequences, phrases_per_stage."""
    return f"data/{split}_{what}"


# data=repetition and data=recall describe their generated data
DATA_PHRASE_LENGTHS = "data/phrase_lengths"
DATA_REPETITIONS = "data/repetitions"
DATA_TASK = "data/task"
DATA_NUM_PAIRS = "data/num_pairs"
DATA_POWER_A = "data/power_a"  # mqar: the power law of the query slots (data.power_a)
DATA_SEQ_LEN = "data/seq_len"

# ----------------------------------------------------------------------------- model
MODEL_PARAMS = "model/params"
MODEL_PARAMS_CORE = "model/params_core"  # everything but embedding and head
MODEL_PARAMS_EMBEDDING = "model/params_embedding"
MODEL_PARAMS_HEAD = "model/params_head"
MODEL_CONTEXT_DIM = "model/context_dim"
MODEL_HIDDEN_DIM = "model/hidden_dim"
MODEL_CORE_PARAMS_BUDGET = "model/core_params_budget"
MODEL_PRETRAINED_ROWS = "model/pretrained_rows"
MODEL_PRETRAINED_COVERAGE = "model/pretrained_coverage"
# floats carried from one token to the next at the evaluation window (models.costs.state_floats): C for a
# context LM, L x C for the GRU, the KV cache 2 x L x T x C for the transformer and llama, the SSM and conv
# states for Mamba/Mamba2, the recurrent states for RWKV, Griffin and xLSTM (models.hf_baselines)
MODEL_STATE_FLOATS = "model/state_floats"
MODEL_STATE_FLOATS_BUDGET = "model/state_floats_budget"  # model.state_floats: the state size a run was sized to
# which implementation ran a transformers model (models.hf_baselines.HFLM.kernel): "reference" (the library's
# PyTorch path, always on CPU), the fast kernels' packages on CUDA (e.g. "mamba_ssm+causal_conv1d"), llama's
# attention implementation (e.g. "sdpa")
MODEL_KERNEL = "model/kernel"


def model_key(name: str) -> str:
    """model/{name}: a size the model reports (models.count_parameters' entries are MODEL_PARAMS*)."""
    return f"model/{name}"


# ----------------------------------------------------------------------------- Phase 1: training rows
P1_CVFP_LOSS = "phase1/cvfp_loss"
P1_DIVERSITY_LOSS = "phase1/diversity_loss"
P1_LOSS = "phase1/loss"
P1_TRAIN_STEP_STABILITY = "phase1/train_step_stability"
P1_RESIDUAL = "phase1/residual"
P1_GRAD_NORM = "phase1/grad_norm"
P1_TIME_S = "phase1/time_s"
# Phase 1: the final summary
P1_ITERATIONS = "phase1/iterations"
P1_STOP_REASON = "phase1/stop_reason"
P1_EFFECTIVE_RANK = "phase1/effective_rank"
P1_EFFECTIVE_RANK_RATIO = "phase1/effective_rank_ratio"
P1_EFFECTIVE_RANK_SAMPLES = "phase1/effective_rank_samples"
P1_PARTICIPATION_RATIO = "phase1/participation_ratio"
P1_IDENTITY_SCORE = "phase1/identity_score"
P1_TOKENS = "phase1/tokens"
P1_DOCUMENTS = "phase1/documents"
P1_TRAIN_TIME_S = "phase1/train_time_s"
P1_TOKEN_ITERATIONS_PER_S = "phase1/token_iterations_per_s"
P1_HELD_OUT_TIME_S = "phase1/held_out_time_s"
P1_FROM_RUN = "phase1/from_run"
P1_TRAIN_FLOPS = "phase1/train_flops"  # estimated training compute (models.costs.phase1_train_flops)

# The next-token probe of the held-out contexts (training/phase1.probe_metrics; stream mode only)
P1_PROBE_MEASURES = ("probe_accuracy", "bigram_accuracy", "probe_gain", "converged_gain")
# Phase 1 on held-out streams from a cold start (training/phase1.evaluate_phase1), one family per split
P1_HELD_OUT_MEASURES = ("convergence_rate", "fixed_point_distance", "effective_rank", "effective_rank_ratio",
                        "memory_length", "memory_length_capped", "tokens", "mean_norm", "spread", "pairwise_distance",
                        *P1_PROBE_MEASURES)


def p1_held_out(split: str, measure: str) -> str:
    """phase1/{split}_{measure}, split in val/test, measure in P1_HELD_OUT_MEASURES."""
    return f"phase1/{split}_{measure}"


P1_VAL_CONVERGENCE_RATE = p1_held_out("val", "convergence_rate")
P1_VAL_CONVERGED_GAIN = p1_held_out("val", "converged_gain")  # the Phase-1 objective (docs/measurement.md)
P1_VAL_PROBE_GAIN = p1_held_out("val", "probe_gain")
P1_VAL_MEMORY_LENGTH = p1_held_out("val", "memory_length")
P1_VAL_MEMORY_LENGTH_CAPPED = p1_held_out("val", "memory_length_capped")
P1_VAL_EFFECTIVE_RANK = p1_held_out("val", "effective_rank")

# ----------------------------------------------------------------------------- Phase 2
# *_by_position: per position bucket within documents (newllm/training/instruments.py)
P2_EVAL_MEASURES = ("loss", "ppl", "acc", "tokens", "loss_by_position", "tokens_by_position",
                    "documents_by_position")


def p2_split(split: str, measure: str) -> str:
    """phase2/{split}_{measure}: train rows (loss, ppl, acc) and val/test evaluations (P2_EVAL_MEASURES)."""
    return f"phase2/{split}_{measure}"


def p2_last_epoch_train(measure: str) -> str:
    return f"phase2/last_epoch_train_{measure}"


P2_TRAIN_LOSS = p2_split("train", "loss")
P2_TRAIN_PPL = p2_split("train", "ppl")
P2_TRAIN_ACC = p2_split("train", "acc")
P2_VAL_LOSS = p2_split("val", "loss")
P2_VAL_PPL = p2_split("val", "ppl")
P2_VAL_ACC = p2_split("val", "acc")
P2_TEST_LOSS = p2_split("test", "loss")
P2_TEST_PPL = p2_split("test", "ppl")
P2_TEST_ACC = p2_split("test", "acc")
P2_TIME_S = "phase2/time_s"
P2_EVAL_SEQ_LEN = "phase2/eval_seq_len"
P2_BEST_EPOCH = "phase2/best_epoch"
P2_BEST_STEP = "phase2/best_step"
P2_BEST_EVALUATION = "phase2/best_evaluation"
P2_TIME_TO_BEST_S = "phase2/time_to_best_s"
P2_STOP_REASON = "phase2/stop_reason"
P2_EPOCHS = "phase2/epochs"
P2_STEPS = "phase2/steps"
P2_EVALUATIONS = "phase2/evaluations"
P2_UNIFORM_PPL = "phase2/uniform_ppl"
P2_TRAIN_TIME_S = "phase2/train_time_s"
P2_TOKENS_PER_S = "phase2/tokens_per_s"
P2_TOKENS_SEEN = "phase2/tokens_seen"
P2_TRAIN_FLOPS = "phase2/train_flops"  # estimated training compute (models.costs.phase2_train_flops)

# ----------------------------------------------------------------------------- recall (data=recall)
RECALL_MEASURES = ("accuracy", "accuracy_by_distance", "answers_by_distance")


def recall_split(split: str, measure: str) -> str:
    """recall/{split}_{measure}, split in val/test, measure in RECALL_MEASURES."""
    return f"recall/{split}_{measure}"


# Accuracy without recall, from the task's parameters (newllm.data.recall.chance_accuracy):
RECALL_CHANCE_NO_PAST = "recall/chance_accuracy_no_past"  # the best from the current token alone: 1 / value ids
RECALL_CHANCE_STORED_VALUE = "recall/chance_accuracy_stored_value"  # a uniform pick among stored values: 1 / P


# ----------------------------------------------------------------------------- repetition (data=repetition)
REP_STAGE = "repetition/stage"
REP_LOSS = "repetition/loss"
REP_TIME_S = "repetition/time_s"
REP_STEPS = "repetition/steps"
REP_TRAIN_TIME_S = "repetition/train_time_s"


def rep_part(name: str) -> str:
    """repetition/{name}: a training row's loss parts."""
    return f"repetition/{name}"


def rep_stage(phrase_length: int, measure: str | None = None, where: str | None = None) -> str:
    """repetition/[{where}/]p{phrase_length}[/{measure}]: where in val/end/test (None: the stage's own key)."""
    base = "repetition/" + (f"{where}/" if where else "") + f"p{phrase_length}"
    return f"{base}/{measure}" if measure else base


# ----------------------------------------------------------------------------- the contract
_STATIC = {v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and "/" in v} | {SEED, DEVICE}
_SPLIT = "|".join(SPLITS)
_PATTERNS = [re.compile(p) for p in (
    rf"data/({_SPLIT})_(documents|tokens|loss_tokens|sequences|phrases_per_stage)",
    rf"data/contamination/({'|'.join(HELD_OUT)})_documents",
    rf"phase1/({'|'.join(HELD_OUT)})_({'|'.join(P1_HELD_OUT_MEASURES)})",
    r"phase2/(train|last_epoch_train)_(loss|ppl|acc)",
    rf"phase2/({'|'.join(HELD_OUT)})_({'|'.join(P2_EVAL_MEASURES)})",
    rf"recall/({'|'.join(HELD_OUT)})_({'|'.join(RECALL_MEASURES)})",
    r"repetition/\w+",  # a training row's loss parts (repetition_loss names them)
    r"repetition/((val|end|test)/)?p\d+(/\w+)?",  # per stage: repetition.measure's statistics
)]


def is_known(key: str) -> bool:
    """Whether `key` is one this module defines (a constant or a member of a family)."""
    return key in _STATIC or any(p.fullmatch(key) for p in _PATTERNS)


# ----------------------------------------------------------------------------- objectives
# What a sweep may optimise (`objectives`, checked by newllm.config.validate before any work): numbers a
# finished run reports about validation data, its training, or its cost. The test split is left out on
# purpose (nothing selects on it), and so are labels, counts of the data and per-position lists.
OBJECTIVES = (
    P2_VAL_PPL, P2_VAL_LOSS, P1_VAL_CONVERGENCE_RATE, P2_VAL_ACC,
    *(p1_held_out("val", m) for m in P1_HELD_OUT_MEASURES if m not in ("memory_length_capped", "tokens")),
    P1_EFFECTIVE_RANK, P1_EFFECTIVE_RANK_RATIO, P1_PARTICIPATION_RATIO, P1_RESIDUAL, P1_TRAIN_STEP_STABILITY,
    P1_IDENTITY_SCORE, P1_ITERATIONS, P2_TRAIN_LOSS, P2_TRAIN_PPL, P2_TRAIN_ACC, P2_BEST_STEP, P2_TIME_TO_BEST_S,
    recall_split("val", "accuracy"),
    MODEL_PARAMS, MODEL_PARAMS_CORE, WALL_S, P1_TOKEN_ITERATIONS_PER_S, P2_TOKENS_PER_S,
)
_OBJECTIVE_FAMILIES = [re.compile(r"repetition/((val|end)/)?p\d+/\w+")]  # rep_stage(p, measure, where)


def is_objective(key: str) -> bool:
    """Whether `key` may be one of `objectives`: in OBJECTIVES, or a per-stage repetition statistic."""
    return key in OBJECTIVES or any(p.fullmatch(key) for p in _OBJECTIVE_FAMILIES)
