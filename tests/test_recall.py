import pytest
import torch
from torch.nn import functional as F

from newllm.config import RecallTask
from newllm.data.recall import FIRST, TASKS, make_splits
from newllm.training.evaluation import answer_accuracy
from tests.conftest import read_metrics


def _rows(ids: torch.Tensor) -> set[tuple[int, ...]]:
    return set(map(tuple, ids.tolist()))


@pytest.mark.parametrize("task", [t.value for t in RecallTask])
def test_every_task_choice_generates_answers_within_the_sequence(task):
    assert set(TASKS) == {t.value for t in RecallTask}  # data.task is checked once, by its Enum
    train, _, _ = make_splits(task, (40, 5, 5), 24, 40, 4, seed=1)
    assert train.ids.shape[1] == 24 and bool(train.mask.any(1).all())  # every sequence has answers
    pos = torch.arange(24).expand_as(train.ids)
    assert bool((train.distance[train.mask] > 0).all() and (train.distance <= pos).all())


def test_mqar_layout_answers_and_distances():
    train, _, _ = make_splits("mqar", (50, 10, 10), 16, 40, 4, seed=3)
    ids, mask, dist = train.ids, train.mask, train.distance
    assert mask.sum(1).tolist() == [4] * len(ids)  # (16 - 2*4) // 2 = 4 queries, one answer each
    for row, m, d in zip(ids.tolist(), mask.tolist(), dist.tolist(), strict=True):
        pairs = dict(zip(row[0:8:2], row[1:8:2], strict=True))
        assert len(pairs) == 4  # distinct keys
        for pos in (i for i, on in enumerate(m) if on):
            key, answer = row[pos - 1], row[pos]
            assert pairs[key] == answer  # the answer is the value stored with the queried key
            assert row[pos - d[pos]] == answer and row[pos - d[pos] - 1] == key  # distance points at it


def test_mqar_query_gap_pushes_the_evidence_back_by_the_gap():
    """data.query_gap_min/max: noise tokens between pairs and queries, so the distance knob moves answers."""
    base, _, _ = make_splits("mqar", (200, 10, 10), 32, 40, 4, seed=3)
    gapped, _, _ = make_splits("mqar", (200, 10, 10), 32, 40, 4, seed=3, gap=(6, 10))
    assert gapped.mask.sum(1).tolist() == [(32 - 8 - 10) // 2] * len(gapped.ids)  # queries fit the largest gap
    for row, m, d in zip(gapped.ids.tolist(), gapped.mask.tolist(), gapped.distance.tolist(), strict=True):
        first_query = next(i for i, on in enumerate(m) if on) - 1
        assert 8 + 6 <= first_query <= 8 + 10 and set(row[8:first_query]) == {2}  # the gap is noise
        pairs = dict(zip(row[0:8:2], row[1:8:2], strict=True))
        for pos in (i for i, on in enumerate(m) if on):
            assert pairs[row[pos - 1]] == row[pos] and row[pos - d[pos]] == row[pos]
    # the first answer's evidence lies >= 6 further back than without a gap
    first = lambda s: s.distance[s.mask].view(len(s.ids), -1)[:, 0].float().mean()  # noqa: E731
    assert 6 <= float(first(gapped) - first(base)) <= 10
    assert len({r.index(next(t for t in r[8:] if t != 2), 8) for r in gapped.ids.tolist()}) > 1  # gaps vary


def test_copy_and_selective_copy_answers_repeat_the_data():
    for task in ("copy", "selective_copy"):
        tr, _, _ = make_splits(task, (20, 5, 5), 17, 30, 1, seed=0)
        for row, m, d in zip(tr.ids.tolist(), tr.mask.tolist(), tr.distance.tolist(), strict=True):
            answers = [(i, t) for i, (t, on) in enumerate(zip(row, m, strict=True)) if on]
            assert answers and all(row[i - d[i]] == t and t >= FIRST for i, t in answers)


def test_generator_is_seeded_and_splits_are_disjoint():
    a = make_splits("mqar", (300, 60, 60), 16, 12, 3, seed=1)  # small vocab: duplicates do occur
    b = make_splits("mqar", (300, 60, 60), 16, 12, 3, seed=1)
    c = make_splits("mqar", (300, 60, 60), 16, 12, 3, seed=2)
    assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].ids, c[0].ids)
    train, val, test = (_rows(s.ids) for s in a)
    assert not (train & val) and not (train & test) and not (val & test)
    assert sum(len(s.ids) for s in a) == len(train) + len(val) + len(test)  # no duplicate within a split


def test_oracle_gets_accuracy_one_and_random_about_one_over_values():
    _, val, _ = make_splits("mqar", (10, 400, 10), 32, 64, 8, seed=0)
    targets, mask, dist = val.ids[:, 1:], val.mask[:, 1:], val.distance[:, 1:]
    oracle = F.one_hot(targets, 64).float()  # "copies perfectly": the right value at every answer
    acc, by, counts = answer_accuracy(oracle, targets, mask, dist)
    assert acc == 1.0 and set(by.values()) == {1.0}
    assert sum(counts.values()) == int(mask.sum())
    random = torch.randn(*targets.shape, 64, generator=torch.Generator().manual_seed(0))
    acc, _, _ = answer_accuracy(random, targets, mask, dist)
    assert abs(acc - 1 / 64) < 0.01  # 3200 answers: sd of the estimate ~0.002


def test_accuracy_by_distance_hand_made():
    targets = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[True, True, True, False]])
    dist = torch.tensor([[2, 12, 12, 0]])
    logits = F.one_hot(torch.tensor([[5, 0, 7, 0]]), 10).float()  # right at 0 and 2, wrong at 1
    acc, by, counts = answer_accuracy(logits, targets, mask, dist)
    assert acc == 2 / 3 and by == {"1-8": 1.0, "9-12": 0.5} and counts == {"1-8": 1, "9-12": 2}


@pytest.mark.slow
def test_recall_run_end_to_end(tiny_run):
    run_dir, _ = tiny_run("recall", "data=recall", "data.seq_len=32", "data.num_pairs=4", "data.num_train=200",
                          "data.num_val=50", "data.num_test=50", "model=gru", "training.phase1.enabled=false")
    m = read_metrics(run_dir)
    assert m["data/vocab_size"] == 64 and m["data/test_sequences"] == 50
    assert m["data/val_loss_tokens"] == 50 * 12  # (32 - 8) // 2 answers per sequence
    assert 0.0 <= m["recall/val_accuracy"] <= 1.0
    assert sum(m["recall/test_answers_by_distance"].values()) == 50 * 12
    assert abs(m["recall/val_accuracy"] - m["phase2/val_acc"]) < 1e-9  # same answers, same kept weights


@pytest.mark.slow
def test_recall_seq_len_mismatch_is_one_line_error(tiny_run):
    _, proc = tiny_run("bad", "data=recall", "data.seq_len=48", "model=gru", check=False)
    assert proc.returncode == 2 and "training.phase2.seq_len=32" in proc.stderr and "data.seq_len=48" in proc.stderr
