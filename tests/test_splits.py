"""What a run is measured on: the held-out test split, data.split_seed apart from seed, the Phase-1
document sample and plain text by lines (issues 11 and 17)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from newllm.config import validate
from newllm.data import load_data, phase1_sample
from newllm.data.corpora import chatterbot_conversations, chatterbot_topics
from newllm.data.dedup import normalise
from newllm.data.streams import render_chatml
from newllm.data.tokenizer import END_OF_TEXT
from newllm.errors import ConfigError, DataError
from tests.conftest import REPO, read_metrics
from tests.test_data import data_cfg, one_line_error, tok_cfg


def documents(data, ids: torch.Tensor) -> list[str]:
    """The ChatML conversations of a stream (each ends with <|endoftext|>); a cut last one is kept as is."""
    text = data.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    pieces = [p + END_OF_TEXT for p in text.split(END_OF_TEXT)]
    pieces[-1] = pieces[-1].removesuffix(END_OF_TEXT)
    return [p for p in pieces if p]


# ----------------------------------------------------------------------------- the test split
def test_test_split_holds_out_its_own_documents(tmp_path):
    data = load_data(data_cfg(num_conversations=200, split_seed=5), tok_cfg(), tmp_path)
    train, val, test = (documents(data, ids) for ids in (data.train_ids, data.val_ids, data.test_ids))
    assert (len(train), len(val), len(test)) == (160, 20, 20)
    corpus = Counter(render_chatml(c)[0] for c in chatterbot_conversations(200))
    assert Counter(train) + Counter(val) + Counter(test) == corpus  # every conversation in exactly one split
    info = data.info
    assert (info["data/test_documents"], info["data/test_tokens"]) == (20, len(data.test_ids))
    assert 0 < info["data/test_loss_tokens"] == int(data.test_mask.sum()) < len(data.test_ids)
    # The assistant mask of the test stream is the one dialogue needs: no user turn is learned.
    masked = data.tokenizer.decode(data.test_ids[data.test_mask].tolist(), skip_special_tokens=False)
    assert "<|im_start|>user" not in masked
    # Adding a test split leaves validation as it was; test_fraction=0 means no test split at all.
    none = load_data(data_cfg(num_conversations=200, split_seed=5, test_fraction=0), tok_cfg(), tmp_path)
    assert none.test_ids is None and "data/test_tokens" not in none.info
    assert documents(none, none.val_ids) == val and len(documents(none, none.train_ids)) == 180


def test_repetition_holds_out_test_phrases_per_stage(tmp_path):
    d = data_cfg(name="repetition", loss_on="all", phrase_lengths=[1, 3], repetitions=4, phrases_per_stage=8,
                 val_fraction=0.25, test_fraction=0.5)
    data = load_data(d, tok_cfg(), tmp_path)
    phrases = {name: {tuple(r[: s.phrase_length].tolist()) for s in stages for r in s.ids}
               for name, stages in (("train", data.stages), ("val", data.val_stages), ("test", data.test_stages))}
    assert [len(phrases[k]) for k in ("train", "val", "test")] == [16, 4, 8]
    assert not phrases["test"] & (phrases["train"] | phrases["val"])
    assert torch.equal(data.test_ids, torch.cat([s.ids.reshape(-1) for s in data.test_stages]))
    assert data.info["data/test_phrases_per_stage"] == 4 and data.info["data/test_documents"] == 8


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"max_test_tokens": 20}, "the test stream has 20 tokens (data.test_fraction=0.1, data.max_test_tokens=20), "
         "fewer than one window of 33 tokens (training.phase2.seq_len + 1): hold out more data, or "
         "data.test_fraction=0 for no test split"),
        ({"num_conversations": 6, "val_fraction": 0.5, "test_fraction": 0.5},
         "6 documents are too few to hold out data.val_fraction=0.5 for validation and data.test_fraction=0.5 "
         "for test"),
    ],
)
def test_a_test_split_too_small_is_one_line(tmp_path, kw, expected):
    with pytest.raises(DataError) as e:
        load_data(data_cfg(**{"num_conversations": 100, **kw}), tok_cfg(), tmp_path, min_tokens=33)
    assert expected in one_line_error(e)


def test_split_values_are_checked_before_any_work():
    import newllm.run  # noqa: F401 -- registers the structured configs

    cases = {"data.test_fraction=1.5": "data.test_fraction=1.5 is not allowed: expected a number in [0, 1)",
             "data.test_fraction=0.95": "data.test_fraction=0.95 is not allowed: expected a number in "
                                        "[0, 1 - data.val_fraction=0.1)"}
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        for override, expected in cases.items():
            with pytest.raises(ConfigError, match=re.escape(expected)):
                validate(compose("config", [override]))


# ----------------------------------------------------------------------------- data.split_seed
def test_split_seed_chooses_the_split(tmp_path):
    a = load_data(data_cfg(num_conversations=150, split_seed=1), tok_cfg(), tmp_path)
    again = load_data(data_cfg(num_conversations=150, split_seed=1), tok_cfg(), tmp_path)
    b = load_data(data_cfg(num_conversations=150, split_seed=2), tok_cfg(), tmp_path)
    assert a.info["data/fingerprint"] == again.info["data/fingerprint"] != b.info["data/fingerprint"]
    assert torch.equal(a.test_ids, again.test_ids) and set(documents(a, a.test_ids)) != set(documents(b, b.test_ids))


@pytest.mark.slow
def test_seeds_share_one_split_and_differ_in_weights(tiny_run):
    """A seed grid varies initialisation and batch order on one split (data.split_seed, default fixed)."""
    quick = ["training.phase1.max_iterations=2", "training.phase2.max_steps_per_epoch=3", "save_contexts=false"]
    runs = [tiny_run(f"seed{s}", f"seed={s}", *quick)[0] for s in (1, 2)]
    m1, m2 = (read_metrics(r) for r in runs)
    same = lambda m: {k: v for k, v in m.items() if k.startswith(("data/", "phase1/documents", "phase1/tokens"))
                      and "cache_hit" not in k}
    assert same(m1) == same(m2) and m1["data/split_seed"] == 0 and (m1["seed"], m2["seed"]) == (1, 2)
    assert (runs[0] / "tokenizer.json").read_bytes() == (runs[1] / "tokenizer.json").read_bytes()
    w1, w2 = (torch.load(r / "checkpoint.pt", weights_only=True)["model"] for r in runs)
    assert not torch.equal(w1["embedding.weight"], w2["embedding.weight"])  # a different init
    assert m1["phase2/val_loss"] != m2["phase2/val_loss"]


# ----------------------------------------------------------------------------- Phase-1 sample
def test_phase1_sample_reads_whole_documents_across_the_corpus(tmp_path):
    """chatterbot is stored topic by topic; the first 8,192 tokens of the corpus cover 3 of its 21 files."""
    data = load_data(data_cfg(), tok_cfg(vocab_size=4096), tmp_path)  # the default run's data
    ids, n_docs = phase1_sample(data, 8192, seed=0)
    assert len(ids) == 8192
    sampled = documents(data, ids)
    assert len(sampled) == n_docs and n_docs > 150
    training = Counter(documents(data, data.train_ids))
    assert all(training[doc] for doc in sampled[:-1])  # whole training documents (only the last one is cut)
    topic_of = dict(zip((render_chatml(c)[0] for c in chatterbot_conversations()), chatterbot_topics(), strict=True))
    topics = Counter(topic_of[doc] for doc in sampled[:-1])
    assert len(topics) >= 17, topics  # of 21 (measured: 18-19 for split seeds 0-3)
    # ... in proportion to the training split (total variation distance of the topic shares; measured 0.05-0.09)
    train_topics = Counter(topic_of[doc] for doc in training.elements())
    share = lambda c, k: c[k] / sum(c.values())
    assert 0.5 * sum(abs(share(topics, k) - share(train_topics, k)) for k in train_topics) < 0.15
    first = Counter(topic_of[render_chatml(c)[0]] for c in chatterbot_conversations(250))
    assert len(first) <= 4  # what reading the corpus from its start gave (ai, botprofile, computers, ...)
    again, _ = phase1_sample(data, 8192, seed=0)
    other, _ = phase1_sample(data, 8192, seed=1)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    everything, n_all = phase1_sample(data, 10**9, seed=0)  # a budget above the stream: every document once
    assert n_all == sum(training.values()) and Counter(documents(data, everything)) == training


def run_and_reload(tiny_run, name: str, *overrides: str):
    """A real tiny CLI run, its metrics, and its data loaded again in-process from its own config."""
    run_dir, _ = tiny_run(name, "training.phase1.max_iterations=2", "save_contexts=false", *overrides)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    data = load_data(cfg.data, cfg.tokenizer, cfg.paths.cache_dir)
    return run_dir, read_metrics(run_dir), cfg, data


@pytest.mark.slow
def test_phase1_reports_the_documents_it_read(tiny_run):
    _, m, _, data = run_and_reload(tiny_run, "p1", "training.phase2.enabled=false", "save_checkpoint=false")
    sample, n_docs = phase1_sample(data, 1024, seed=0)
    assert m["phase1/tokens"] == len(sample) == 1024 and m["phase1/documents"] == n_docs > 1


# ----------------------------------------------------------------------------- plain text by lines
def one_sentence_per_line(path: Path, lines: int) -> Path:
    sentences = [" ".join(t["content"].split()) for c in chatterbot_conversations() for t in c]
    path.write_text("\n".join(sentences[:lines]) + "\n", encoding="utf-8")
    return path


def test_text_without_blank_lines_is_split_by_lines(tmp_path):
    path = one_sentence_per_line(tmp_path / "lines.txt", 3000)
    d = data_cfg(name="text", files=[str(path)], loss_on="all")
    data = load_data(d, tok_cfg(), tmp_path)
    assert data.info["data/split_by"] == "line"
    distinct = len({normalise(line) for line in path.read_text(encoding="utf-8").splitlines()})  # chatterbot repeats
    assert (data.info["data/documents"], data.info["data/val_documents"], data.info["data/test_documents"]) == (
        distinct, round(distinct / 10), round(distinct / 10))
    assert data.info["data/duplicates_removed"] == 3000 - distinct > 0
    with pytest.raises(DataError, match="1 documents are too few"):  # what paragraphs give for this file
        load_data(OmegaConf.merge(d, {"split_by": "paragraph"}), tok_cfg(), tmp_path)


# ----------------------------------------------------------------------------- Phase 2 on test
@pytest.mark.slow
def test_the_kept_weights_are_evaluated_once_on_test(tiny_run):
    from newllm import analysis
    from newllm.training.evaluation import evaluate
    from newllm.training.phase2 import make_windows

    run_dir, m, cfg, data = run_and_reload(tiny_run, "p2", "training.phase2.epochs=3",
                                           "training.phase2.max_steps_per_epoch=4")
    assert data.info["data/fingerprint"] == m["data/fingerprint"]
    # 10 % of the 222 distinct conversations among chatterbot's first 300, deduplicated by default
    assert m["data/test_tokens"] == len(data.test_ids) and m["data/test_documents"] == 22
    assert cfg.data.dedup is True and (m["data/dedup"], m["data/duplicates_removed"]) == (True, 78)
    report = [f"data/contamination/{k}_documents" for k in ("val", "test")]  # near-duplicates only: 1 of 22 test
    assert [m[k] for k in report] == [data.info[k] for k in report] == [0.0, 1 / 22]
    model, _ = analysis.load_model(run_dir)  # the weights the run kept
    p2 = cfg.training.phase2
    test = evaluate(model, make_windows(data.test_ids, data.test_mask, p2.seq_len, "test"), 64)
    assert m["phase2/test_loss"] == pytest.approx(test["loss"], rel=1e-5)
    assert m["phase2/test_ppl"] == pytest.approx(torch.tensor(test["loss"]).exp().item(), rel=1e-5)
    assert m["phase2/test_acc"] == pytest.approx(test["acc"]) and m["phase2/test_tokens"] == test["tokens"] > 0
    # ... and they are the best validation epoch's: validation selected them, test did not
    cap = p2.max_val_tokens + 1
    val = evaluate(model, make_windows(data.val_ids[:cap], data.val_mask[:cap], p2.seq_len, "validation"), 64)
    assert m["phase2/val_loss"] == pytest.approx(val["loss"], rel=1e-5)
    history = analysis.load_history(run_dir).dropna(subset=["phase2/val_loss"])
    assert m["phase2/val_loss"] == pytest.approx(history["phase2/val_loss"].min())
    assert "phase2/test_loss" not in history  # read once, at the end
