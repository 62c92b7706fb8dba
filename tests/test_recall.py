import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from newllm.config import RecallTask, register_configs, validate
from newllm.data.recall import FIRST, NOISE, TASKS, chance_accuracy, make_splits, mqar_ids
from newllm.errors import DataError
from newllm.training.evaluation import accuracy_by_distance, evaluate, recall_windows
from tests.conftest import REPO, read_metrics


def _rows(ids: torch.Tensor) -> set[tuple[int, ...]]:
    return set(map(tuple, ids.tolist()))


def _tolerance(p: float, n: int, sds: float = 4.0) -> float:
    """sds binomial standard deviations of an accuracy p measured on n answers."""
    return sds * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("task", [t.value for t in RecallTask])
def test_every_task_choice_generates_answers_within_the_sequence(task):
    assert set(TASKS) == {t.value for t in RecallTask}  # data.task is checked once, by its Enum
    train, _, _ = make_splits(task, (40, 5, 5), 24, 40, 4, seed=1)
    assert train.ids.shape[1] == 24 and bool(train.mask.any(1).all())  # every sequence has answers
    pos = torch.arange(24).expand_as(train.ids)
    assert bool((train.distance[train.mask] > 0).all() and (train.distance <= pos).all())
    assert bool((train.distance[~train.mask] == 0).all())
    assert torch.equal(train.ids[~train.mask], train.targets[~train.mask])  # targets differ only at answers


def test_mqar_is_zoology_multiquery_ar():
    """Keys and values drawn without replacement, every key queried exactly once after the pairs with filler
    between the queries, the value only as a target (never in the input after its pair), distances correct."""
    t, vocab, pairs = 32, 40, 6
    train, _, _ = make_splits("mqar", (300, 10, 10), t, vocab, pairs, seed=3)
    n_keys, _ = mqar_ids(vocab)
    for ids, tgt, m, d in zip(train.ids.tolist(), train.targets.tolist(), train.mask.tolist(),
                              train.distance.tolist(), strict=True):
        keys, values = ids[0 : 2 * pairs : 2], ids[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs  # without replacement
        assert all(FIRST <= k < FIRST + n_keys <= v < vocab for k, v in zip(keys, values, strict=True))
        answers = [i for i, on in enumerate(m) if on]
        queried = [ids[i - 1] for i in answers]
        assert sorted(queried) == sorted(keys)  # every key queried exactly once
        region = ids[2 * pairs :]
        assert all(tok == NOISE for i, tok in enumerate(region, 2 * pairs) if i + 1 not in answers)  # filler
        assert not set(values) & set(region)  # no answer anywhere in the input after the pairs
        for i in answers:
            assert ids[i] == NOISE and tgt[i] == dict(zip(keys, values, strict=True))[ids[i - 1]]
            assert (i - 1 - 2 * pairs) % 2 == 0  # queries sit on the slots after the pairs
            # distance: from the query back to its key in the pair = from the answer back to the stored value
            assert ids[i - 1 - d[i]] == ids[i - 1] and ids[i - d[i]] == tgt[i] and i - d[i] < 2 * pairs


def test_mqar_query_slots_follow_the_power_law():
    """The first key's slot is the first draw: P(slot i) = i^(a-1) / sum_j j^(a-1) over the (T - 2P) // 2 slots."""
    t, pairs, n = 32, 4, 8000
    slots = (t - 2 * pairs) // 2
    for a in (0.01, 1.0):
        train, _, _ = make_splits("mqar", (n, 1, 1), t, 64, pairs, seed=0, power_a=a)
        key0_query = (train.ids[:, 2 * pairs :] == train.ids[:, :1]).float().argmax(1)  # key 0's query offset
        freq = torch.bincount(key0_query // 2, minlength=slots).double() / len(train.ids)
        w = torch.arange(1, slots + 1, dtype=torch.float64) ** (a - 1)
        p = w / w.sum()
        assert float((freq - p).abs().max()) < 4 * math.sqrt(0.25 / len(train.ids)), (a, freq, p)


@pytest.mark.parametrize(("t", "vocab", "pairs", "power_a", "needle"), [
    (32, 32, 4, 0.01, "data.vocab_size=32 is not allowed with data.task=mqar and data.seq_len=32"),
    (32, 40, 9, 0.01, "data.num_pairs=9 is not allowed with data.seq_len=32"),
    (32, 40, 4, 0.0, "data.power_a=0.0 is not allowed"),
])
def test_mqar_refuses_what_zoology_asserts_in_one_line(t, vocab, pairs, power_a, needle):
    with pytest.raises(DataError, match=needle) as err:
        make_splits("mqar", (5, 5, 5), t, vocab, pairs, seed=0, power_a=power_a)
    assert "\n" not in str(err.value)


def test_copy_and_selective_copy_answers_repeat_the_data():
    for task, length in (("copy", 8), ("selective_copy", 4)):
        tr, _, _ = make_splits(task, (20, 5, 5), 17, 30, 1, seed=0)
        for row, m, d in zip(tr.ids.tolist(), tr.mask.tolist(), tr.distance.tolist(), strict=True):
            answers = [(i, t) for i, (t, on) in enumerate(zip(row, m, strict=True)) if on]
            assert len(answers) == length and row[8] == 1  # after the separator, once each
            assert all(row[i - d[i]] == t and t >= FIRST and i - d[i] < 8 for i, t in answers)
        if task == "copy":
            assert bool((tr.distance[tr.mask] == 9).all())  # x_j sits 8 + 1 (separator) before its copy


@pytest.mark.parametrize(("task", "t", "vocab", "pairs"), [
    ("mqar", 32, 40, 4), ("mqar", 64, 128, 16), ("copy", 17, 30, 1), ("selective_copy", 33, 20, 1)])
def test_chance_accuracy_is_what_guessers_without_recall_score(task, t, vocab, pairs):
    """no_past: the best prediction from the current token alone (any fixed data/value id); stored_value:
    a uniform pick among the tokens this sequence stored. Simulated on the generated data."""
    _, val, _ = make_splits(task, (10, 2000, 10), t, vocab, pairs, seed=5)
    chance = chance_accuracy(task, t, vocab, pairs)
    tgt = val.targets[val.mask].view(len(val.ids), -1)  # (N, answers per sequence)
    n = tgt.numel()
    fixed = FIRST + mqar_ids(vocab)[0] if task == "mqar" else FIRST  # one value (data) id, always
    assert abs(float((tgt == fixed).double().mean()) - chance["no_past"]) < _tolerance(chance["no_past"], n)
    source = (val.mask.nonzero()[:, 1] - val.distance[val.mask]).view_as(tgt)  # where each answer is stored
    stored = val.ids.gather(1, source)  # mqar: the P values; copy: the data tokens
    pick = stored.gather(1, torch.randint(0, stored.shape[1], tgt.shape, generator=torch.Generator().manual_seed(0)))
    p = chance["stored_value"]
    assert abs(float((pick == tgt).double().mean()) - p) < _tolerance(p, n)
    assert chance["no_past"] < p


def test_chance_levels_by_hand():
    assert chance_accuracy("mqar", 64, 128, 8) == {"no_past": 1 / 63, "stored_value": 1 / 8}  # values [65, 128)
    copy = chance_accuracy("copy", 17, 30, 1)  # 8 data tokens over 27 ids
    assert copy == {"no_past": 1 / 27, "stored_value": 1 / 8 + 7 / 8 / 27}


def test_generator_is_seeded_and_splits_are_disjoint():
    a = make_splits("mqar", (300, 60, 60), 16, 17, 2, seed=1)  # small vocab: duplicates do occur
    b = make_splits("mqar", (300, 60, 60), 16, 17, 2, seed=1)
    c = make_splits("mqar", (300, 60, 60), 16, 17, 2, seed=2)
    assert all(torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].ids, c[0].ids)
    train, val, test = (_rows(s.ids) for s in a)
    assert not (train & val) and not (train & test) and not (val & test)
    assert sum(len(s.ids) for s in a) == len(train) + len(val) + len(test)  # no duplicate within a split
    assert sum(len(s.ids) for s in a) < 420  # and some were dropped


class _Lookup(nn.Module):
    """Reads each mqar query from its input and answers the stored value (ok=True), or a fixed value id:
    an exact model of recall and one of no recall, to check the evaluation loop against."""

    def __init__(self, vocab: int, pairs: int, ok: bool) -> None:
        super().__init__()
        self.vocab, self.pairs, self.ok = vocab, pairs, ok
        self.head = nn.Identity()

    def contexts_window(self, ids: torch.Tensor) -> torch.Tensor:
        keys, values = ids[:, 0 : 2 * self.pairs : 2], ids[:, 1 : 2 * self.pairs : 2]
        match = (ids[:, :, None] == keys[:, None, :]).float()  # (B, T, P)
        answer = (match * values[:, None, :]).sum(-1).long() if self.ok else torch.full_like(ids, self.vocab - 1)
        return nn.functional.one_hot(answer, self.vocab).float()


def test_evaluate_scores_exact_recall_one_and_no_recall_at_chance():
    t, vocab, pairs = 32, 40, 4
    _, val, _ = make_splits("mqar", (10, 1000, 10), t, vocab, pairs, seed=0)
    windows, distance = recall_windows(val)
    exact = evaluate(_Lookup(vocab, pairs, True), windows, 128, distance)
    assert exact["acc"] == 1.0 and set(exact["acc_by_distance"].values()) == {1.0}
    assert sum(exact["answers_by_distance"].values()) == exact["tokens"] == 1000 * pairs
    blind = evaluate(_Lookup(vocab, pairs, False), windows, 128, distance)
    p = chance_accuracy("mqar", t, vocab, pairs)["no_past"]
    assert abs(blind["acc"] - p) < _tolerance(p, blind["tokens"])


def test_accuracy_by_distance_hand_made():
    hit = torch.tensor([True, False, True])
    dist = torch.tensor([2, 12, 12])
    by, counts = accuracy_by_distance(hit, dist)
    assert by == {"1-8": 1.0, "9-12": 0.5} and counts == {"1-8": 1, "9-12": 2}


@pytest.mark.parametrize(("overrides", "window"), [
    (["training=quick", "data=recall"], 64), (["data=recall", "training=quick", "data.seq_len=48"], 48),
    (["data=recall"], 64), (["+sweep=recall_capacity_quick"], 32), (["+sweep=recall_control"], 32)])
def test_the_window_follows_the_recall_sequence_length(overrides, window):
    """conf/data/recall.yaml sets training.phase2.seq_len to ${data.seq_len}, and the data group composes
    after the training group: training=quick's 32-token window does not override it, in any order."""
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides)
    assert cfg.data.seq_len == cfg.training.phase2.seq_len == window
    validate(cfg)  # the pairing check passes


@pytest.mark.slow
def test_training_quick_data_recall_runs(tiny_run):
    run_dir, _ = tiny_run("quick", "data=recall")  # TINY holds training=quick
    m = read_metrics(run_dir)
    assert m["data/seq_len"] == m["phase2/eval_seq_len"] == 64 and m["data/val_loss_tokens"] == 200 * 4


@pytest.mark.slow
def test_recall_run_end_to_end(tiny_run):
    run_dir, _ = tiny_run("recall", "data=recall", "data.seq_len=32", "data.num_pairs=4", "data.num_train=200",
                          "data.num_val=50", "data.num_test=50", "model=gru", "training.phase1.enabled=false")
    m = read_metrics(run_dir)
    assert m["data/vocab_size"] == 128 and m["data/test_sequences"] == 50  # the default vocabulary
    assert m["data/val_loss_tokens"] == 50 * 4  # every key queried once
    assert 0.0 <= m["recall/val_accuracy"] <= 1.0
    assert sum(m["recall/test_answers_by_distance"].values()) == 50 * 4
    assert abs(m["recall/val_accuracy"] - m["phase2/val_acc"]) < 1e-9  # same answers, same kept weights
    assert m["recall/chance_accuracy_no_past"] == 1 / 63 and m["recall/chance_accuracy_stored_value"] == 1 / 4


@pytest.mark.slow
def test_recall_seq_len_mismatch_is_one_line_error(tiny_run):
    _, proc = tiny_run("bad", "data=recall", "data.seq_len=48", "training.phase2.seq_len=32", "model=gru",
                       check=False)
    assert proc.returncode == 2 and "training.phase2.seq_len=32" in proc.stderr and "data.seq_len=48" in proc.stderr
