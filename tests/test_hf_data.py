"""data=hf: a Hugging Face dataset by hub id or from a datasets.save_to_disk folder (issue 27, part 3)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import datasets
import pytest

from newllm.data import load_data
from newllm.data.tokenizer import END_OF_TEXT
from newllm.errors import DataError
from tests.conftest import read_metrics
from tests.test_data import data_cfg, one_line_error, tok_cfg
from tests.test_dedup import unique_paragraph


def hf_cfg(folder: Path, **kw):
    return data_cfg(name="hf", dataset=str(folder), loss_on="all", **kw)


def save_splits(folder: Path, **splits: list[str]) -> Path:
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v, "id": list(range(len(v)))})
                          for k, v in splits.items()}).save_to_disk(str(folder))
    return folder


def paragraphs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [unique_paragraph(rng) for _ in range(n)]


def documents(data, ids) -> set[str]:
    text = data.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    return {p + END_OF_TEXT for p in text.split(END_OF_TEXT)[:-1]}


def test_a_saved_dataset_keeps_its_splits_and_held_out_repeats_of_train_are_dropped(tmp_path):
    train, val, test = paragraphs(30, 0), paragraphs(6, 1), paragraphs(5, 2)
    folder = save_splits(tmp_path / "ds", train=[*train, "   ", ""], validation=[*val, train[3].upper(), train[7]],
                         test=[*test, "  " + val[0]])
    data = load_data(hf_cfg(folder), tok_cfg(), tmp_path)
    info = data.info
    assert info["data/hf_splits"] == "train=train,val=validation,test=test" and info["data/name"] == "hf"
    assert (info["data/documents"], info["data/duplicates_removed"]) == (41, 3)  # blank rows are no documents
    assert (info["data/train_documents"], info["data/val_documents"], info["data/test_documents"]) == (30, 6, 5)
    assert documents(data, data.val_ids) == {t + END_OF_TEXT for t in val}
    assert documents(data, data.test_ids) == {t + END_OF_TEXT for t in test}
    assert info["data/contamination/val_documents"] == info["data/contamination/test_documents"] == 0.0

    raw = load_data(hf_cfg(folder, dedup=False), tok_cfg(), tmp_path)
    assert (raw.info["data/val_documents"], raw.info["data/test_documents"]) == (8, 6)
    assert raw.info["data/contamination/val_documents"] == 2 / 8  # the two repeats of train rows
    assert raw.info["data/contamination/test_documents"] == 0.0  # it repeats a validation row, not a train one


def test_one_split_is_split_by_newllm_and_a_missing_test_split_is_cut_from_train(tmp_path):
    rows = paragraphs(50, 3)
    datasets.Dataset.from_dict({"body": rows}).save_to_disk(str(tmp_path / "one"))
    one = load_data(hf_cfg(tmp_path / "one", text_column="body"), tok_cfg(), tmp_path)
    assert one.info["data/hf_splits"] == "own=train"
    assert (one.info["data/train_documents"], one.info["data/val_documents"], one.info["data/test_documents"]) == (
        40, 5, 5)
    capped = load_data(hf_cfg(tmp_path / "one", text_column="body", num_conversations=20), tok_cfg(), tmp_path)
    assert capped.info["data/documents"] == 20

    folder = save_splits(tmp_path / "two", train=rows[:40], validation=rows[40:])
    two = load_data(hf_cfg(folder, test_fraction=0.25), tok_cfg(), tmp_path)
    assert (two.info["data/train_documents"], two.info["data/val_documents"], two.info["data/test_documents"]) == (
        30, 10, 10)  # validation as given; test: 25 % of the 40 training rows
    assert documents(two, two.val_ids) == {t + END_OF_TEXT for t in rows[40:]}
    assert not documents(two, two.test_ids) & documents(two, two.train_ids)


def test_bad_hf_input_is_one_line_and_offline_hub_fails_at_once(tmp_path):
    good = save_splits(tmp_path / "ds", train=paragraphs(20, 4))
    not_saved = tmp_path / "plain"
    not_saved.mkdir()
    (not_saved / "x.txt").write_text("hello", encoding="utf-8")
    cases = [
        (hf_cfg(good, text_column="body"), "data.text_column='body' is not a column of"),
        (hf_cfg(not_saved), "is not a folder written by datasets.save_to_disk"),
        (hf_cfg(save_splits(tmp_path / "odd", a=["x y"], b=["y z"])), "has splits a, b: none is named train"),
        (data_cfg(name="hf", loss_on="all"), "data=hf needs data.dataset="),
        (data_cfg(dataset=str(good)), "data.dataset='" + str(good) + "' is read by data=hf only, not data=chatterbot"),
    ]
    for cfg, expected in cases:
        with pytest.raises(DataError) as e:
            load_data(cfg, tok_cfg(), tmp_path)
        assert expected in one_line_error(e)
    start = time.monotonic()
    with pytest.raises(DataError) as e:  # HF_HUB_OFFLINE=1 (conftest) and not in the local cache
        load_data(data_cfg(name="hf", dataset="someone/not-cached-here", loss_on="all"), tok_cfg(), tmp_path)
    assert "not in the local Hugging Face datasets cache and the Hub is unreachable" in one_line_error(e)
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_hf_run_from_a_saved_folder_through_the_cli(tiny_run, tmp_path):
    rows = paragraphs(120, 5)
    folder = save_splits(tmp_path / "ds", train=rows[:100], validation=rows[100:110], test=[*rows[110:], rows[0]])
    run_dir, _ = tiny_run("hf", "data=hf", f"data.dataset={folder}", "training.phase1.max_iterations=2")
    m = read_metrics(run_dir)
    assert (m["data/name"], m["data/hf_splits"]) == ("hf", "train=train,val=validation,test=test")
    assert (m["data/val_documents"], m["data/test_documents"], m["data/duplicates_removed"]) == (10, 10, 1)
    assert m["data/contamination/test_documents"] == 0.0 and m["phase2/test_ppl"] < m["phase2/uniform_ppl"]
