"""Repetition training: cycle metrics by hand, staged training lowers the cycle loss."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from newllm.config import RepetitionConfig
from newllm.errors import TrainingError
from newllm.training.diversity import FrobeniusDeviation
from newllm.training.repetition import cycle_stats, train_repetition
from tests.helpers_science import context_lm

try:  # the data layer's class (newllm/data/repetition.py); same two fields
    from newllm.data.repetition import RepetitionStage
except ImportError:  # pragma: no cover - branch without the data layer's module
    @dataclass
    class RepetitionStage:  # type: ignore[no-redef]
        phrase_length: int
        ids: torch.Tensor

pytestmark = pytest.mark.usefixtures("one_thread")


def stages(lengths=(1, 2), phrases: int = 4, repetitions: int = 8, vocab: int = 40) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for p in lengths:
        phrase = torch.stack([torch.randperm(vocab, generator=g)[:p] for _ in range(phrases)])
        out.append(RepetitionStage(p, phrase.repeat(1, repetitions)))
    return out


def test_cycle_stats_by_hand():
    # period-2 trajectory a, b, a, b: cycle distance 0, every step moves by ||a - b|| = 5
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])
    c = torch.stack([a, b, a, b, a])[None]
    s = cycle_stats(c, 2)
    assert float(s["conv_loss"]) == 0.0 and float(s["cycle_distance"]) == 0.0
    assert float(s["change_rate"]) == pytest.approx(5.0)
    s1 = cycle_stats(c, 1)  # the same trajectory is far from period 1
    assert float(s1["cycle_distance"]) == pytest.approx(5.0)
    assert float(s1["conv_loss"]) == pytest.approx(25.0 / 2)
    with pytest.raises(TrainingError, match="raise data.repetitions"):
        cycle_stats(c, 5)


def test_staged_training_lowers_the_cycle_loss_per_stage():
    m = context_lm("layerwise", init_std=0.1)
    cfg = OmegaConf.structured(RepetitionConfig(enabled=True, steps_per_stage=25, lr=3e-3))
    held_out = stages(phrases=2, vocab=40)[1:]  # p = 2 only
    r = train_repetition(m, stages(), cfg, 0.1, FrobeniusDeviation(), torch.device("cpu"), progress=False,
                         val_stages=held_out)
    assert "repetition/val/p2/cycle_distance" in r.metrics and "repetition/val/p1/cycle_distance" not in r.metrics
    for p in (1, 2):
        before, after = r.metrics[f"repetition/p{p}/conv_loss_initial"], r.metrics[f"repetition/p{p}/conv_loss"]
        assert after < 0.5 * before, (p, before, after)
        assert r.metrics[f"repetition/p{p}/change_rate"] > 0.1  # still reads the tokens: not one collapsed point
        assert f"repetition/end/p{p}/cycle_distance" in r.metrics
    assert [row["repetition/stage"] for row in r.history] == [1] * 25 + [2] * 25
    assert r.metrics["repetition/steps"] == 50


def test_next_token_weight_trains_the_head():
    m = context_lm("layerwise")
    head = m.head.weight.detach().clone()
    cfg = OmegaConf.structured(RepetitionConfig(enabled=True, steps_per_stage=3, ce_weight=0.1))
    r = train_repetition(m, stages((2,)), cfg, 0.0, FrobeniusDeviation(), torch.device("cpu"), progress=False)
    assert "repetition/ce" in r.history[0] and not torch.equal(head, m.head.weight)


@pytest.mark.slow
def test_repetition_without_stages_fails_in_the_cli(tiny_run, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _, proc = tiny_run("rep", "training=repetition", check=False)
    assert proc.returncode == 2
    assert "needs phrase stages: use data=repetition" in proc.stderr
