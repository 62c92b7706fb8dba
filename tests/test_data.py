"""The data layer in-process: sources, splits, masks, budgets, caches and bad input (one-line errors)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from newllm.config import DataConfig, DataSource, TokenizerConfig
from newllm.data import DIALOGUE, DOCUMENT_SOURCES, SOURCES, load_data
from newllm.data.corpora import chatterbot_conversations
from newllm.data.repetition import WORD_TOKEN
from newllm.data.splits import split_indices
from newllm.data.streams import read_split, render_chatml, spans_to_mask, write_split
from newllm.data.tokenizer import IM_END, train_bpe
from newllm.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
ULTRACHAT_SAMPLE = FIXTURES / "ultrachat_sample.jsonl"


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), kw)


def tok_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(TokenizerConfig), {"vocab_size": 320, **kw})


def write_wiki(path: Path, paragraphs: int) -> Path:
    """A WikiText-style file from chatterbot utterances: headings, paragraphs, blank lines holding a space."""
    sentences = [" ".join(t["content"].split()) for c in chatterbot_conversations() for t in c]
    lines = []
    for i in range(paragraphs):
        if i % 10 == 0:
            lines += [f" = Section {i // 10} = ", " "]
        lines += [" " + " ".join(sentences[6 * i : 6 * i + 6]), " "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- chatterbot, splits, masks
def test_chatterbot_split_is_disjoint_seeded_and_streams_decode_to_the_documents(tmp_path):
    d = data_cfg(num_conversations=120, split_seed=3)
    data = load_data(d, tok_cfg(), tmp_path)
    texts = [render_chatml(c)[0] for c in chatterbot_conversations(120)]
    train_idx, val_idx, test_idx = split_indices(len(texts), 0.1, 0.1, seed=3)
    assert len(val_idx) == len(test_idx) == 12 and not set(train_idx) & set(val_idx)
    assert not (set(train_idx) | set(val_idx)) & set(test_idx)
    dec = lambda ids: data.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert dec(data.train_ids) == "".join(texts[i] for i in train_idx)
    assert dec(data.val_ids) == "".join(texts[i] for i in val_idx)
    assert dec(data.test_ids) == "".join(texts[i] for i in test_idx)
    info = data.info
    assert (info["data/train_documents"], info["data/val_documents"], info["data/test_documents"]) == (96, 12, 12)
    assert info["data/train_tokens"] == len(data.train_ids) and info["data/val_protocol"] == "by_conversation"
    assert info["data/test_tokens"] == len(data.test_ids) and info["data/split_seed"] == 3
    assert 0 < info["data/train_loss_tokens"] < info["data/train_tokens"]
    other = load_data(data_cfg(num_conversations=120, split_seed=4), tok_cfg(), tmp_path)
    assert not torch.equal(other.val_ids[:50], data.val_ids[:50])  # another seed holds out others


def test_assistant_mask_covers_exactly_the_assistant_turns(tmp_path):
    conversations = chatterbot_conversations(40)
    rendered = [render_chatml(c) for c in conversations]
    tok = train_bpe([t for t, _ in rendered], 320, 2)
    write_split(tmp_path, "x", tok, [t for t, _ in rendered], [s for _, s in rendered], range(40), None)
    n = int(np.load(tmp_path / "x.lengths.npy").sum())
    ids, mask, lengths = read_split(tmp_path, "x", tok.get_vocab_size(), n, with_mask=True)
    expected = "".join(t["content"] + IM_END for c in conversations for t in c if t["role"] == "assistant")
    assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == expected
    assert lengths.tolist() == [len(tok.encode(t, add_special_tokens=False).ids) for t, _ in rendered]
    unmasked = tok.decode(ids[~mask].tolist(), skip_special_tokens=False)
    assert "assistant\n" in unmasked and conversations[0][0]["content"] in unmasked


def test_spans_to_mask_matches_a_direct_definition():
    import numpy as np

    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, 200), 40))
        offsets = np.array(list(zip([0, *cuts[:-1]], cuts, strict=True)))
        bounds = sorted(rng.sample(range(0, 200), 6))
        spans = np.array([bounds[i : i + 2] for i in range(0, 6, 2)])
        got = spans_to_mask(offsets, spans)
        want = [any(s <= a and b <= e for s, e in spans) and b > a for a, b in offsets]
        assert got.tolist() == want


def test_loss_on_all_and_budgets(tmp_path):
    base = load_data(data_cfg(num_conversations=150), tok_cfg(), tmp_path)
    one_tokenizer = tok_cfg(max_train_bytes=10**9)  # BPE on the whole training split, as `base`
    capped = load_data(data_cfg(num_conversations=150, max_train_tokens=1000, max_val_tokens=300, loss_on="all"),
                       one_tokenizer, tmp_path)
    assert torch.equal(capped.train_ids, base.train_ids[:1000]) and torch.equal(capped.val_ids, base.val_ids[:300])
    assert bool(capped.train_mask.all()) and bool(capped.val_mask.all())
    assert capped.info["data/train_loss_tokens"] == 1000 and capped.info["data/val_loss_tokens"] == 300


def test_caps_apply_before_bpe_training_and_tokenization(tmp_path, monkeypatch):
    import newllm.data.prepare as prepare
    import newllm.data.streams as streams

    bpe_bytes, encoded = [], []
    real_bpe, real_encode = prepare.train_bpe, streams._encode
    monkeypatch.setattr(prepare, "train_bpe", lambda texts, *a: real_bpe(
        (bpe_bytes.append(len(t.encode())) or t for t in texts), *a))
    monkeypatch.setattr(streams, "_encode", lambda tok, texts, *a: encoded.append(len(texts)) or real_encode(
        tok, texts, *a))
    monkeypatch.setattr(streams, "BATCH_DOCUMENTS", 8)
    data = load_data(data_cfg(num_conversations=600, max_train_tokens=1000, max_val_tokens=200,
                              max_test_tokens=200), tok_cfg(), tmp_path)
    longest = max(len(render_chatml(c)[0].encode()) for c in chatterbot_conversations(600))
    assert 16 * 1000 <= sum(bpe_bytes) < 16 * 1000 + longest  # BPE_BYTES_PER_CAPPED_TOKEN per capped token
    assert len(data.train_ids) == 1000 and len(data.val_ids) == len(data.test_ids) == 200
    # tokenization stopped at each cap: a batch of 8 documents past the ones kept, at most
    used = sum(data.info[f"data/{k}_documents"] for k in ("train", "val", "test"))
    assert used <= sum(encoded) < used + 3 * 8 and sum(encoded) < 400


def test_subset_of_train_is_the_tail_of_the_budgeted_training_stream(tmp_path):
    data = load_data(data_cfg(num_conversations=150, max_train_tokens=2000, val_protocol="subset_of_train"),
                     tok_cfg(), tmp_path)
    assert len(data.train_ids) == 2000 and torch.equal(data.val_ids, data.train_ids[1600:])
    assert torch.equal(data.val_mask, data.train_mask[1600:])
    assert data.info["data/val_protocol"] == "subset_of_train"
    # the documents actually used: 150 - 15 held out for test, capped at 2,000 tokens (the last one cut)
    assert data.info["data/train_documents"] == len(data.train_doc_lengths) < 135
    assert int(data.train_doc_lengths.sum()) == 2000 and data.info["data/test_documents"] == 15
    # test stays disjoint held-out conversations under this protocol too
    dec = lambda ids: data.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert not set(dec(data.test_ids).split("<|endoftext|>")[:-1]) & set(dec(data.train_ids).split("<|endoftext|>"))


# ----------------------------------------------------------------------------- caches
def entry_of(cache: Path) -> Path:
    entries = [p for p in (cache / "prepared").iterdir()]
    assert len(entries) == 1 and entries[0].is_dir(), entries  # one entry, no temporary folder left behind
    return entries[0]


def test_second_load_is_served_from_the_prepared_cache_and_damaged_entries_are_rebuilt(tmp_path):
    d = data_cfg(num_conversations=60)
    first = load_data(d, tok_cfg(), tmp_path)
    second = load_data(d, tok_cfg(), tmp_path)
    assert not first.info["data/tokens_cache_hit"] and not first.info["data/tokenizer_cache_hit"]
    assert second.info["data/tokens_cache_hit"] and second.info["data/tokenizer_cache_hit"]
    assert torch.equal(first.train_ids, second.train_ids) and torch.equal(first.val_mask, second.val_mask)
    assert second.info["data/fingerprint"] == first.info["data/fingerprint"]
    assert first.train_ids.dtype == torch.int16  # vocab 320: two bytes a token, memory-mapped

    entry = entry_of(tmp_path)
    # copies: the damage below rewrites files in place, which the first load still maps (newllm never
    # rewrites an entry in place: a rebuilt one is a new folder renamed over the removed one)
    train_ids, val_ids = first.train_ids.clone(), first.val_ids.clone()
    for damage in ("truncated ids", "tokenizer", "info"):
        if damage == "truncated ids":
            (entry / "train.ids").write_bytes((entry / "train.ids").read_bytes()[:100])
        elif damage == "tokenizer":
            (entry / "tokenizer.json").write_text('{"version": "1.0", "trunc', encoding="utf-8")
        else:
            (entry / "info.json").write_text("{", encoding="utf-8")
        again = load_data(d, tok_cfg(), tmp_path)
        assert not again.info["data/tokens_cache_hit"] and not again.info["data/tokenizer_cache_hit"], damage
        assert torch.equal(train_ids, again.train_ids) and torch.equal(val_ids, again.val_ids)
        assert load_data(d, tok_cfg(), tmp_path).info["data/tokens_cache_hit"]


@pytest.mark.parametrize("damage", ["id_too_large", "negative_id", "lengths_do_not_add_up", "empty_document",
                                    "short_mask"])
def test_cache_entries_that_read_but_hold_bad_streams_are_rebuilt(tmp_path, damage):
    d = data_cfg(num_conversations=60)
    first = load_data(d, tok_cfg(), tmp_path)
    train_ids, train_mask = first.train_ids.clone(), first.train_mask.clone()  # damage rewrites mapped files
    entry = entry_of(tmp_path)
    ids = np.fromfile(entry / "train.ids", dtype=np.int16)
    lengths = np.load(entry / "train.lengths.npy")
    if damage == "id_too_large":
        ids[3] = first.vocab_size  # one past the last embedding row: an IndexError in a later epoch
    elif damage == "negative_id":
        ids[3] = -1
    elif damage == "lengths_do_not_add_up":
        lengths[0] += 1
    elif damage == "empty_document":  # same total, so only a per-document check sees it
        lengths[1], lengths[0] = lengths[1] + lengths[0], 0
    else:
        (entry / "train.mask").write_bytes((entry / "train.mask").read_bytes()[:-1])
    ids.tofile(entry / "train.ids")
    np.save(entry / "train.lengths.npy", lengths)

    again = load_data(d, tok_cfg(), tmp_path)
    assert not again.info["data/tokens_cache_hit"]
    assert torch.equal(again.train_ids, train_ids) and torch.equal(again.train_mask, train_mask)
    assert load_data(d, tok_cfg(), tmp_path).info["data/tokens_cache_hit"]  # rebuilt entry is good


def test_a_failing_tokenization_leaves_no_cache_entry(tmp_path, monkeypatch):
    import newllm.data.streams as streams

    calls = []

    def fail_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args)

    real = streams._encode
    monkeypatch.setattr(streams, "_encode", fail_on_second_batch)
    monkeypatch.setattr(streams, "BATCH_DOCUMENTS", 16)
    with pytest.raises(RuntimeError, match="disk full"):
        load_data(data_cfg(num_conversations=200), tok_cfg(), tmp_path)
    assert list((tmp_path / "prepared").iterdir()) == []


def test_the_cache_key_holds_every_setting_that_changes_the_streams(tmp_path):
    base = load_data(data_cfg(num_conversations=150), tok_cfg(), tmp_path)
    for change in ({"dedup": False}, {"split_seed": 1}, {"max_train_tokens": 3000}, {"val_fraction": 0.2}):
        other = load_data(data_cfg(num_conversations=150, **change), tok_cfg(), tmp_path)
        assert not other.info["data/tokens_cache_hit"], change
    assert not load_data(data_cfg(num_conversations=150), tok_cfg(vocab_size=300), tmp_path).info[
        "data/tokens_cache_hit"]
    same = load_data(data_cfg(num_conversations=150, loss_on="all"), tok_cfg(), tmp_path)  # the mask, after
    assert same.info["data/tokens_cache_hit"] and torch.equal(same.train_ids, base.train_ids)


# ----------------------------------------------------------------------------- ultrachat
def test_ultrachat_from_a_local_jsonl_and_parquet_file(tmp_path):
    rows = [json.loads(line) for line in ULTRACHAT_SAMPLE.read_text(encoding="utf-8").splitlines()]
    parquet = tmp_path / "sample.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    d = data_cfg(name="ultrachat", path=str(ULTRACHAT_SAMPLE), val_fraction=0.25)
    data = load_data(d, tok_cfg(), tmp_path)
    assert (data.info["data/documents"], data.info["data/val_documents"]) == (12, 3)
    text = data.tokenizer.decode(torch.cat([data.train_ids, data.val_ids]).tolist(), skip_special_tokens=False)
    assert "<|im_start|>system\nYou are a concise tutor.<|im_end|>" in text and "東京" in text
    masked = data.tokenizer.decode(data.train_ids[data.train_mask].tolist(), skip_special_tokens=False)
    assert "What is" not in masked and masked.endswith(IM_END)
    from_parquet = load_data(data_cfg(name="ultrachat", path=str(parquet), val_fraction=0.25), tok_cfg(), tmp_path)
    assert torch.equal(from_parquet.train_ids, data.train_ids)
    few = load_data(data_cfg(name="ultrachat", path=str(parquet), num_conversations=8), tok_cfg(), tmp_path)
    assert few.info["data/documents"] == 8


def test_ultrachat_offline_fails_at_once_with_one_clear_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(data_cfg(name="ultrachat"), tok_cfg(), tmp_path)
    msg = one_line_error(e)
    assert "HuggingFaceH4/ultrachat_200k" in msg and "data=chatterbot" in msg and "data.path=" in msg


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
         "unknown role 'robot': expected one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": 3}]}, "string 'content'"),
        ({"chat": [{"role": "user", "content": "hi"}]}, "has no 'messages' column (columns: chat)"),
        ('{"messages": [{"role": "user", "content": "caf\xe9"}]}', "bad.jsonl has bytes that are not UTF-8 (at byte "),
        ("not json", "bad.jsonl as json (ArrowInvalid: JSON parse error"),
    ],
)
def test_bad_messages_files_name_the_problem(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    if isinstance(line, str):  # raw bytes: latin-1 keeps \xe9 a single non-UTF-8 byte
        path.write_bytes(line.encode("latin-1") + b"\n")
    else:
        good = json.loads(ULTRACHAT_SAMPLE.read_text(encoding="utf-8").splitlines()[0])
        rows = [good, line] if "messages" in line else [line]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(data_cfg(name="ultrachat", path=str(path)), tok_cfg(), tmp_path)
    assert expected in one_line_error(e)


def test_failed_dataset_builds_leave_nothing_in_the_datasets_cache(tmp_path):
    """A build that fails leaves no 0-byte .lock files or folders of its own; another build's files stay."""
    cache = tmp_path / "cache"
    load_data(data_cfg(name="ultrachat", path=str(ULTRACHAT_SAMPLE), val_fraction=0.25), tok_cfg(), cache)
    files = lambda: {p: p.stat().st_mtime_ns if p.is_file() else "dir" for p in (cache / "datasets").rglob("*")}
    built = files()
    assert any(p.suffix == ".lock" for p in built)  # a good build keeps its locks (datasets' own cache)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("not json\n", encoding="utf-8")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    for d in (data_cfg(name="ultrachat", path=str(bad_json)), data_cfg(name="text", files=[str(latin)], loss_on="all")):
        with pytest.raises(DataError):
            load_data(d, tok_cfg(), cache)
        left = files()
        shared = {p for p in left.keys() - built.keys() if p.parent == cache / "datasets" and p.is_dir()}
        assert {p: left[p] for p in left.keys() - shared} == built  # at most the builder's (shared) empty folder
        assert all(not any(p.iterdir()) for p in shared)


# ----------------------------------------------------------------------------- text
def test_text_paragraphs_lines_and_files(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(" = Title = \n \n First paragraph,\n two lines.\n \n\n Second one.\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("Another file.\n", encoding="utf-8")
    tok = tok_cfg()
    kw = dict(name="text", files=[str(a), str(b)], loss_on="all", val_protocol="subset_of_train", test_fraction=0)
    by_par = load_data(data_cfg(**kw), tok, tmp_path)
    decode = lambda data: data.tokenizer.decode(data.train_ids.tolist(), skip_special_tokens=False)
    assert by_par.info["data/documents"] == 4 and by_par.info["data/split_by"] == "paragraph"  # auto: blank lines
    order = split_indices(4, 0.1, 0.0, seed=0, hold_out_val=False)[0]
    paragraphs = ["= Title =", "First paragraph,\n two lines.", "Second one.", "Another file."]
    assert decode(by_par) == "".join(paragraphs[i] + "\n\n" for i in order)
    by_file = load_data(data_cfg(**kw, split_by="file"), tok, tmp_path)
    assert by_file.info["data/documents"] == 2 and decode(by_file).count("<|endoftext|>") == 2
    by_line = load_data(data_cfg(**kw, split_by="line"), tok, tmp_path)
    assert by_line.info["data/documents"] == 5 and bool(by_line.train_mask.all())


def test_text_held_out_paragraphs(tmp_path):
    path = write_wiki(tmp_path / "wiki.txt", 40)
    data = load_data(data_cfg(name="text", files=[str(path)], loss_on="all"), tok_cfg(), tmp_path)
    assert (data.info["data/documents"], data.info["data/val_documents"]) == (44, 4)
    assert data.info["data/train_loss_tokens"] == data.info["data/train_tokens"] > 1000
    assert not list(entry_of(tmp_path).glob("*.mask"))  # text: every token predicted, no mask stored


def test_a_cached_text_rerun_reads_no_text_and_a_changed_file_is_read_again(tmp_path, monkeypatch):
    import newllm.data.textfiles as textfiles

    path = write_wiki(tmp_path / "wiki.txt", 40)
    d = data_cfg(name="text", files=[str(path)], loss_on="all")
    first = load_data(d, tok_cfg(), tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("the text was read")

    with monkeypatch.context() as m:
        m.setattr(textfiles, "_open", no_reading)
        again = load_data(d, tok_cfg(), tmp_path)
    assert again.info["data/tokens_cache_hit"] and torch.equal(again.train_ids, first.train_ids)
    path.write_text(path.read_text(encoding="utf-8") + "\n\n One more paragraph here.\n", encoding="utf-8")
    changed = load_data(d, tok_cfg(), tmp_path)
    assert not changed.info["data/tokens_cache_hit"] and changed.info["data/documents"] == 45


def _bad_text_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n  \n", encoding="utf-8")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Good text first.\n\nCaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    good = write_wiki(tmp_path / "good.txt", 4)
    return [
        ([str(tmp_path / "missing.txt")], "missing.txt' does not exist"),
        ([str(empty)], "empty.txt' is empty"),
        ([str(good), str(blank)], "blank.txt' holds only whitespace"),
        ([str(good), str(latin)], "latin1.txt has bytes that are not UTF-8 (at byte 21"),
        ([], "data=text needs data.files=[path, ...]"),
    ]


def test_bad_text_files_fail_with_one_line_naming_the_file(tmp_path):
    for files, expected in _bad_text_inputs(tmp_path):
        with pytest.raises(DataError) as e:
            load_data(data_cfg(name="text", files=files, loss_on="all"), tok_cfg(), tmp_path / "cache")
        assert expected in one_line_error(e), (files, str(e.value))
    assert not list((tmp_path / "cache" / "prepared").glob("*"))  # failed before tokenizing: nothing cached


# ----------------------------------------------------------------------------- sizes, options, tokenizer
@pytest.mark.parametrize(
    ("kw", "min_tokens", "expected"),
    [
        ({"num_conversations": 3}, 500, "the training stream has"),
        ({"num_conversations": 100, "max_train_tokens": 20}, 33, "the training stream has 20 tokens, fewer than one "
         "window of 33 tokens (training.phase2.seq_len + 1)"),
        ({"num_conversations": 100, "max_val_tokens": 20}, 33, "the validation stream has 20 tokens"),
        ({"num_conversations": 5, "val_fraction": 0.95}, 2, "5 documents are too few to hold out data.val_fraction"),
    ],
)
def test_too_little_data_for_a_window_or_for_validation(tmp_path, kw, min_tokens, expected):
    with pytest.raises(DataError) as e:
        load_data(data_cfg(**kw), tok_cfg(), tmp_path, min_tokens=min_tokens)
    assert expected in one_line_error(e)


@pytest.mark.parametrize(
    ("kw", "tok", "expected"),
    [
        ({"name": "repetition", "loss_on": "all", "val_protocol": "subset_of_train"}, {},
         "data.val_protocol=subset_of_train does not apply to data=repetition"),
        ({"name": "text", "files": ["x.txt"]}, {}, "data.loss_on=assistant needs dialogue data"),
        ({"path": "chats.jsonl"}, {}, "data.path='chats.jsonl' is read by data=ultrachat only"),
        ({"files": ["x.txt"]}, {}, "data.files is read by data=text only"),
        ({}, {"vocab_size": 200}, "tokenizer.vocab_size=200 is too small: a byte-level BPE needs more than 4 "
         "special tokens + 256 byte symbols = 260"),
        ({}, {"pretrained": "gpt2"}, "tokenizer.pretrained='gpt2' cannot be loaded: the Hugging Face Hub is "
         "unreachable"),
        ({"name": "ultrachat", "path": "chats.csv"}, {}, "data.path='chats.csv' does not exist"),
    ],
)
def test_conflicting_options_and_tokenizer_errors(tmp_path, kw, tok, expected):
    with pytest.raises(DataError) as e:
        load_data(data_cfg(**kw), tok_cfg(**tok), tmp_path)
    assert expected in one_line_error(e)


def test_every_data_source_choice_has_a_loader_and_nothing_else_does():
    # data.name is checked once, by its Enum at compose time; the loader table must list the same names.
    assert set(SOURCES) == {s.value for s in DataSource}
    assert set(DOCUMENT_SOURCES) == set(DIALOGUE) | {"text", "hf"}  # the sources split by document


# ----------------------------------------------------------------------------- repetition
def test_repetition_stages_cycles_and_held_out_phrases(tmp_path):
    d = data_cfg(name="repetition", loss_on="all", phrase_lengths=[1, 2, 4], repetitions=5, phrases_per_stage=6,
                 val_fraction=0.5, split_seed=1)
    data = load_data(d, tok_cfg(), tmp_path)
    assert [s.phrase_length for s in data.stages] == [1, 2, 4]
    train_phrases, val_phrases = set(), set()
    for stage in data.stages:
        p, ids = stage.phrase_length, stage.ids
        assert ids.dtype == torch.long and ids.shape == (6, 5 * p)
        assert torch.equal(ids[:, p:], ids[:, :-p])  # period p ...
        assert all(len(set(row[:p].tolist())) == p for row in ids)  # ... and no shorter one
        train_phrases |= {tuple(r[:p].tolist()) for r in ids}
        assert all(WORD_TOKEN.match(data.tokenizer.id_to_token(int(i))) for i in ids.unique())
    assert torch.equal(data.train_ids, torch.cat([s.ids.reshape(-1) for s in data.stages]))
    assert len(data.val_ids) == 5 * 3 * (1 + 2 + 4)  # round(6 * 0.5) = 3 held-out phrases per stage
    assert torch.equal(data.val_ids, torch.cat([s.ids.reshape(-1) for s in data.val_stages]))
    for stage in data.val_stages:
        assert stage.ids.shape == (3, 5 * stage.phrase_length)
        val_phrases |= {tuple(r[: stage.phrase_length].tolist()) for r in stage.ids}
    assert len(train_phrases) == 18 and len(val_phrases) == 9 and not train_phrases & val_phrases
    again = load_data(d, tok_cfg(), tmp_path)
    other = load_data(OmegaConf.merge(d, {"split_seed": 2}), tok_cfg(), tmp_path)
    assert torch.equal(again.train_ids, data.train_ids) and not torch.equal(other.train_ids, data.train_ids)
    assert data.info["data/phrase_lengths"] == "1,2,4" and data.info["data/val_phrases_per_stage"] == 3


def test_repetition_asking_for_more_phrases_than_the_vocabulary_holds(tmp_path):
    d = data_cfg(name="repetition", loss_on="all", phrase_lengths=[1], phrases_per_stage=5000)
    with pytest.raises(DataError) as e:
        load_data(d, tok_cfg(), tmp_path)
    assert "cannot draw 6000 distinct phrases (training + held-out) of 1 distinct tokens from 16" in one_line_error(e)


def test_pretrained_tokenizer_from_the_local_hub_cache_gains_our_special_tokens(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hub_tok = Tokenizer(models.BPE())
    hub_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hub_tok.decoder = decoders.ByteLevel()
    texts = [render_chatml(c)[0] for c in chatterbot_conversations(100)]
    hub_tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hub_tok.enable_truncation(8)  # a hub file may truncate: whole documents must still come through
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    hub_tok.save(str(snapshot / "tokenizer.json"))
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    data = load_data(data_cfg(num_conversations=100, val_protocol="subset_of_train", test_fraction=0),
                     tok_cfg(pretrained="acme/tiny"), tmp_path)
    assert data.info["data/tokenizer"] == "acme/tiny" and "data/tokenizer_cache_hit" not in data.info
    assert data.vocab_size == hub_tok.get_vocab_size() + 4  # <|pad|>, <|endoftext|>, <|im_start|>, <|im_end|>
    decoded = data.tokenizer.decode(data.train_ids.tolist(), skip_special_tokens=False)
    assert decoded == "".join(texts[i] for i in split_indices(100, 0.1, 0.0, seed=0, hold_out_val=False)[0])


@pytest.mark.parametrize(("vocab", "stored", "read_as"), [(320, np.int16, torch.int16), (32768, np.int16, torch.int16),
                                                          (40000, np.uint16, torch.int32),
                                                          (70000, np.int32, torch.int32)])
def test_streams_are_stored_in_the_smallest_dtype_that_holds_the_vocabulary(tmp_path, vocab, stored, read_as):
    from newllm.data.streams import id_dtype

    assert id_dtype(vocab) == stored
    ids = np.array([0, vocab - 1, 7, vocab // 2], dtype=stored)
    ids.tofile(tmp_path / "s.ids")
    np.save(tmp_path / "s.lengths.npy", np.array([3, 1], dtype=np.int64))
    got, mask, lengths = read_split(tmp_path, "s", vocab, 4, with_mask=False)
    assert got.dtype == read_as and got.tolist() == [0, vocab - 1, 7, vocab // 2] and lengths.tolist() == [3, 1]
    assert mask.tolist() == [True] * 4 and mask.stride() == (0,)  # all predicted: no bytes behind it
    assert (tmp_path / "s.ids").stat().st_size == 4 * np.dtype(stored).itemsize
