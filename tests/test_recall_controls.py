"""data=recall's controls, small enough for the suite (negative: seconds; positive: ~40 s of CPU), through
the real data and Phase-2 code: a transformer with no access to the past (attention_window=1) stays at
the chance level the task's parameters give; with full attention it learns the key -> value lookup. The
documented versions of both are sweeps/recall_control.yaml (docs/results.md, "Recall (MQAR) controls")."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from newllm.config import DataConfig, TokenizerConfig
from newllm.data import load_data
from newllm.models.baselines import TransformerLM
from newllm.training.evaluation import recall_metrics
from newllm.training.phase2 import train_phase2
from tests.helpers_science import phase2_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
T, VOCAB, PAIRS, TEST = 16, 24, 2, 1000  # 11 value ids [13, 24): chance 1/11; 2,000 test answers


def _control(tmp_path, window: int | None, steps: int) -> dict:
    d = OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "name": "recall", "seq_len": T, "vocab_size": VOCAB, "num_pairs": PAIRS, "num_train": 4000,
        "num_val": 200, "num_test": TEST})
    data = load_data(d, OmegaConf.structured(TokenizerConfig), tmp_path)
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, 2, 64, 64, None, 0.02, 0.0, heads=4, max_len=T, attention_window=window)
    cfg = phase2_cfg(seq_len=T, batch_size=64, epochs=100, max_steps=steps, eval_every=steps, lr=1e-3)
    train_phase2(model, data, cfg, torch.device("cpu"), seed=0, progress=False)
    return {**data.info, **recall_metrics(model, data.recall, 256, torch.device("cpu"))}


def test_no_past_control_stays_at_chance(tmp_path):
    m = _control(tmp_path, 1, 150)  # enough to learn that answers are value ids (~5 s)
    chance, n = m["recall/chance_accuracy_no_past"], TEST * PAIRS
    assert chance == 1 / 11 and m["recall/chance_accuracy_stored_value"] == 1 / PAIRS
    # at chance within 4 binomial standard deviations of its answers (the answers of one sequence are
    # distinct values, so negatively correlated: the binomial bound is the looser one)
    assert abs(m["recall/test_accuracy"] - chance) < 4 * math.sqrt(chance * (1 - chance) / n)


@pytest.mark.slow  # in-process, but ~40 s of CPU: the lookup is learnt in a jump after ~900 steps at 1/P
def test_attention_control_learns_recall(tmp_path):
    m = _control(tmp_path, None, 1500)
    assert m["recall/test_accuracy"] > 0.9  # far above picking one of the 2 stored values (0.5)
