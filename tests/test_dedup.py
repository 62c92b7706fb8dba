"""Deduplication before the split and the 13-gram contamination report (issue 24, item 1)."""

from __future__ import annotations

import random

import pytest
import torch

from newllm.data import load_data
from newllm.data.dedup import NGRAM, contamination, first_occurrences, normalise
from newllm.data.splits import split_indices
from tests.test_data import data_cfg, tok_cfg


def words(*numbers: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{k}" for k in numbers)


def test_contamination_of_hand_built_documents_is_exact():
    train = [words(*range(20)), "Short one, here.", words(*range(200, 230))]
    val = [
        f"new. {words(*range(5, 18)).upper()}, end",  # 13 words of train's first document (case aside)
        words(900, *range(5, 17), 999, 17),  # only 12 in a row: clean
        "short -- ONE here",  # shorter than 13 words, the same words as a training document: contaminated
        "short one",  # shorter, only a prefix of one: clean
        words(*range(10, 20)) + " short one here",  # 13 in a row of train's *stream*, across two documents
        f"<|im_start|>user\n{words(*range(5, 11))}<|im_end|>\n<|im_start|>assistant\n{words(*range(11, 18))}",
    ]
    test = [words(*range(210, 223)), words(*range(13), prefix="x"), "<|endoftext|>"]  # empty: never contaminated
    got = contamination(train, {"val": val, "test": test})
    assert got == {"val": (3, 6), "test": (1, 3)}
    chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|endoftext|>"
    assert contamination(["Hi hello"], {"val": [chatml]})["val"] == (1, 1)  # markup is not words


def test_training_documents_are_read_in_bounded_pieces(monkeypatch):
    import newllm.data.dedup as dedup

    train = [words(k, k + 1) for k in range(50)] + [words(*range(100, 113))]
    held = {"val": [words(*range(100, 113)), words(3, 4), words(4, 3)]}
    whole = contamination(train, held)
    monkeypatch.setattr(dedup, "PIECE_DOCUMENTS", 7)
    assert contamination(iter(train), held) == whole == {"val": (2, 3)}


def test_contamination_agrees_with_a_direct_definition_on_random_documents():
    rng = random.Random(0)
    doc = lambda: [rng.randrange(2) for _ in range(rng.randrange(1, 40))]  # 2 words: many chance overlaps
    train_docs, held = [doc() for _ in range(300)], [doc() for _ in range(200)]

    def grams(d):
        return {tuple(d)} if len(d) < NGRAM else {tuple(d[i : i + NGRAM]) for i in range(len(d) - NGRAM + 1)}

    train_grams = set().union(*map(grams, train_docs))
    want = sum(bool(grams(d) & train_grams) for d in held)
    assert 20 < want < 180  # the check means something: some documents are, some are not
    as_text = lambda docs: [words(*d) for d in docs]
    assert contamination(as_text(train_docs), {"held": as_text(held)})["held"] == (want, 200)


def test_first_occurrences_compare_casefolded_text_with_whitespace_collapsed():
    texts = ["Hello  world", "hello world\n", "HELLO\tWORLD ", "Hello, world", "Straße", "STRASSE", "hello world!"]
    assert first_occurrences(texts) == [0, 3, 4, 6]
    assert normalise(" A \n\n b\tC ") == "a b c"


def unique_paragraph(rng: random.Random) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(20))


def test_text_duplicates_are_removed_before_the_split_and_counted(tmp_path):
    rng = random.Random(1)
    paragraphs = [unique_paragraph(rng) for _ in range(40)]
    twins = paragraphs[:10] + ["  " + p.upper().replace(" ", "   ") for p in paragraphs[10:15]]  # 10 exact
    path = tmp_path / "dup.txt"
    path.write_text("\n\n".join(paragraphs + twins) + "\n", encoding="utf-8")
    d = data_cfg(name="text", files=[str(path)], loss_on="all", val_fraction=0.2, test_fraction=0.2)
    deduped = load_data(d, tok_cfg(), tmp_path)
    info = deduped.info
    assert (info["data/documents"], info["data/duplicates_removed"], info["data/dedup"]) == (40, 15, True)
    assert info["data/contamination/val_documents"] == info["data/contamination/test_documents"] == 0.0

    kept = load_data(data_cfg(**{**d, "dedup": False}), tok_cfg(), tmp_path)
    assert (kept.info["data/documents"], kept.info["data/duplicates_removed"]) == (55, 0)
    train, val, test = split_indices(55, 0.2, 0.2, seed=0)
    twin = dict(zip(range(40, 55), range(15), strict=True)) | dict(zip(range(15), range(40, 55), strict=True))
    for name, held in (("val", val), ("test", test)):
        want = sum(twin.get(i, -1) in set(train) for i in held) / len(held)
        assert kept.info[f"data/contamination/{name}_documents"] == pytest.approx(want)
        assert want > 0


def test_default_data_holds_out_no_document_seen_in_training(tmp_path):
    data = load_data(data_cfg(), tok_cfg(), tmp_path)  # every chatterbot conversation
    assert (data.info["data/documents"], data.info["data/duplicates_removed"]) == (899, 2026 - 899)

    def docs(ids: torch.Tensor) -> set[str]:
        text = data.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        return {normalise(p) for p in text.split("<|endoftext|>") if p.strip()}

    train, val, test = docs(data.train_ids), docs(data.val_ids), docs(data.test_ids)
    assert len(train) == data.info["data/train_documents"] and len(val) == data.info["data/val_documents"] == 90
    assert not train & val and not train & test and not val & test
    # nor a 13-word n-gram (chatterbot's near-duplicates differ in more than case and whitespace)
    assert data.info["data/contamination/val_documents"] == data.info["data/contamination/test_documents"] == 0.0


def test_without_dedup_the_default_data_is_mostly_contaminated_and_cached_apart(tmp_path):
    deduped = load_data(data_cfg(), tok_cfg(), tmp_path)
    raw = load_data(data_cfg(dedup=False), tok_cfg(), tmp_path)
    assert not raw.info["data/tokens_cache_hit"] and not raw.info["data/tokenizer_cache_hit"]  # its own entries
    assert raw.info["data/fingerprint"] != deduped.info["data/fingerprint"]
    assert raw.info["data/contamination/val_documents"] > 0.5 and raw.info["data/contamination/test_documents"] > 0.5
    again = load_data(data_cfg(), tok_cfg(), tmp_path)
    assert again.info["data/tokens_cache_hit"] and again.info["data/fingerprint"] == deduped.info["data/fingerprint"]



def test_vectorised_dedup_keys_agree_with_normalise_on_tricky_text():
    from newllm.data.dedup import dedup_keys

    rng = random.Random(0)
    pieces = ["a", "B", "ß", "SS", " ", "\t", "\n", "\u3000", "\xa0", "é", "É", "x", "\x1c", ".", "<|im_end|>"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(20000)]
    keys = dedup_keys(texts).tolist()
    by_key, by_text = {}, {}
    for text, key in zip(texts, keys, strict=True):  # equal keys exactly when the normalised texts are equal
        assert by_key.setdefault(key, normalise(text)) == normalise(text)
        assert by_text.setdefault(normalise(text), key) == key
    assert 1000 < len(by_key) < 20000


def test_words_are_runs_of_word_bytes_and_never_cross_documents():
    from newllm.data.dedup import word_stream

    hashes, lengths = word_stream(["Café au-lait, don’t", "stop", "", "<|im_start|>user\nHi<|im_end|>"])
    assert lengths.tolist() == [4, 1, 0, 1]  # café | au | lait | don’t ; stop ; (none) ; hi
    again, _ = word_stream(["CAFÉ", "café"])
    assert again[0] == again[1] == hashes[0]
    first_doc_end, second = word_stream(["a stop", "stop"])[0][1:]
    assert first_doc_end == second


@pytest.mark.parametrize("texts", [["Ab", "", "ÉSS\x00x", "q"], ["Straße", "", "İX", "q"], ["AB", "c"], [], ["x"]])
def test_texts_are_casefolded_to_utf8_bytes_with_their_starts(texts):
    from newllm.data.dedup import _utf8

    b, start = _utf8(texts)
    ends = [*start[1:].tolist(), len(b)][: len(texts)]
    assert [bytes(b[s:e]) for s, e in zip(start.tolist(), ends, strict=True)] == [
        t.casefold().encode() for t in texts]
