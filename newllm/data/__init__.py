"""Data: every source produces the same thing -- token streams, loss masks and a tokenizer.

    source (chatterbot | ultrachat | text | hf)  -> documents (ChatML text + assistant spans, or plain text)
    -> duplicates removed (data.dedup, newllm.data.dedup: normalised text, first occurrence kept)
    -> seeded split by document (data.split_seed) into train / validation / test
    -> tokenizer (BPE trained on the training split, cached)
    -> token ids + assistant masks (tokenized once, cached by `datasets`) -> budgets
    -> contamination report (held-out documents sharing a 13-token n-gram with train) -> TokenData
    repetition: generated phrases (newllm.data.repetition) -> stages + the same streams.

Every data choice (which documents are held out, their order, the Phase-1 sample) is drawn from
data.split_seed, never from the run's `seed`: a seed grid varies initialisation and batch order on
one fixed split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from newllm import keys
from newllm.data import recall, repetition
from newllm.data.corpora import TEXT_UNITS, chatterbot_conversations, text_documents, ultrachat_conversations
from newllm.data.dedup import NGRAM, contamination, first_occurrences
from newllm.data.hf import hf_documents
from newllm.data.repetition import RepetitionStage
from newllm.data.streams import Spans, encode_cached, render_chatml
from newllm.data.tokenizer import check_vocab_size, load_or_train, load_pretrained
from newllm.errors import DataError

DIALOGUE = ("chatterbot", "ultrachat")
SUBSET_OF_TRAIN_FRACTION = 0.2  # val_protocol=subset_of_train: validation = this tail of the training stream


@dataclass
class TokenData:
    train_ids: torch.Tensor  # (N,) long
    train_mask: torch.Tensor  # (N,) bool: tokens Phase 2 learns to predict
    val_ids: torch.Tensor
    val_mask: torch.Tensor
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)  # counts, protocol, cache hits -> metrics.json
    stages: list[RepetitionStage] | None = None  # data=repetition: the training phrases, one stage per p
    val_stages: list[RepetitionStage] | None = None  # data=repetition: the held-out phrases (val stream)
    # The test split: held-out documents that neither select weights nor prune; read once at the end.
    test_ids: torch.Tensor | None = None
    test_mask: torch.Tensor | None = None
    test_stages: list[RepetitionStage] | None = None  # data=repetition: held-out test phrases
    train_doc_lengths: torch.Tensor | None = None  # (D,) tokens per training document, in stream order
    val_doc_lengths: torch.Tensor | None = None  # the same for validation and test: loss by position within
    test_doc_lengths: torch.Tensor | None = None  # documents (newllm.training.instruments)
    recall: dict[str, recall.RecallSplit] | None = None  # data=recall: val/test sequences with answer distances
    # Per split, the target stream where it differs from the ids (aligned with them: targets[i] is scored
    # at position i - 1); None or a missing split: the ids themselves. data=recall's mqar answers exist
    # only here (the input holds filler there).
    targets: dict[str, torch.Tensor] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


@dataclass
class Split:
    """One split's documents, concatenated: ids (N,), loss mask (N,), tokens per document (D,), for
    a document source each document's index in the source's (deduplicated) list (D,), and the targets
    (N,) where they differ from the ids (TokenData.targets)."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    docs: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    @classmethod
    def of_rows(cls, stages: list[RepetitionStage]) -> Split:
        """data=repetition: every phrase row (a phrase repeated n times) is one document."""
        ids = repetition.stream(stages)
        lengths = torch.cat([torch.full((s.ids.shape[0],), s.ids.shape[1], dtype=torch.long) for s in stages])
        return cls(ids, torch.ones_like(ids, dtype=torch.bool), lengths)

    def tokens(self, start: int = 0, stop: int | None = None) -> Split:
        """Tokens [start, stop); documents cut by either end keep their remaining part."""
        stop = len(self.ids) if stop is None else min(stop, len(self.ids))
        ends = self.lengths.cumsum(0)
        kept = (torch.minimum(ends, torch.tensor(stop)) - torch.clamp(ends - self.lengths, min=start)).clamp(min=0)
        return Split(self.ids[start:stop], self.mask[start:stop], kept[kept > 0],
                     None if self.docs is None else self.docs[kept > 0],
                     None if self.targets is None else self.targets[start:stop])


def check_options(d: DictConfig, tok: DictConfig) -> None:
    """Combinations that would silently do something else than asked (before any work)."""
    if not tok.pretrained:
        check_vocab_size(tok.vocab_size)
    if d.name not in (*DIALOGUE, "recall") and d.loss_on == "assistant":  # recall: the answer mask
        raise DataError(f"data.loss_on=assistant needs dialogue data (data=chatterbot or ultrachat): "
                        f"data={d.name} has no assistant turns; use data.loss_on=all")
    if d.name == "repetition" and d.val_protocol == "subset_of_train":
        raise DataError("data.val_protocol=subset_of_train does not apply to data=repetition: its stream is "
                        "ordered by stage, so its last 20 % holds only the longest phrases, and held-out phrases "
                        "cost nothing to generate; use data.val_protocol=by_conversation (held-out phrases)")
    if d.path and d.name != "ultrachat":
        hint = "use data.files=[...]" if d.name == "text" else "drop data.path"
        raise DataError(f"data.path={d.path!r} is read by data=ultrachat only, not data={d.name}: {hint}")
    if d.files and d.name != "text":
        raise DataError(f"data.files is read by data=text only, not data={d.name}: drop data.files")
    for key in ("dataset", "config"):
        if d[key] and d.name != "hf":
            raise DataError(f"data.{key}={d[key]!r} is read by data=hf only, not data={d.name}: drop data.{key}")


@dataclass
class Documents:
    """What a document source reads: texts, assistant spans per text, source info for metrics, and the
    split each text comes from ('train' / 'val' / 'test') when the source has its own (data=hf), else None."""

    texts: list[str]
    spans: list[Spans]
    info: dict = field(default_factory=dict)
    given: list[str] | None = None

    def subset(self, kept: list[int]) -> Documents:
        pick = lambda xs: [xs[i] for i in kept]
        return Documents(pick(self.texts), pick(self.spans), self.info, pick(self.given) if self.given else None)


def _text_documents(d: DictConfig, cache_dir: Path) -> Documents:
    pieces, unit = text_documents(list(d.files), d.split_by, d.num_conversations, cache_dir)
    docs = [t + TEXT_UNITS[unit] for t in pieces]
    return Documents(docs, [[] for _ in docs], {keys.DATA_SPLIT_BY: str(unit)})


def _chatml(conversations: list) -> Documents:
    rendered = [render_chatml(c) for c in conversations]
    return Documents([t for t, _ in rendered], [s for _, s in rendered])


def _chatterbot_documents(d: DictConfig, cache_dir: Path) -> Documents:
    return _chatml(chatterbot_conversations(d.num_conversations))


def _ultrachat_documents(d: DictConfig, cache_dir: Path) -> Documents:
    return _chatml(ultrachat_conversations(d.path, d.num_conversations, cache_dir))


def _hf_documents(d: DictConfig, cache_dir: Path) -> Documents:
    texts, given, info = hf_documents(d.dataset, d.config, d.text_column, d.num_conversations)
    return Documents(texts, [[] for _ in texts], info, given)


# The document sources (data.name): each reads its documents; splitting and tokenising are shared.
DOCUMENT_SOURCES: dict[str, Callable[[DictConfig, Path], Documents]] = {
    "chatterbot": _chatterbot_documents, "ultrachat": _ultrachat_documents, "text": _text_documents,
    "hf": _hf_documents,
}


def held_out_count(n: int, fraction: float) -> int:
    """Documents (or phrases) a fraction holds out of n: at least one unless the fraction is 0."""
    return max(1, round(n * fraction)) if fraction > 0 else 0


def _split(n: int, val_fraction: float, test_fraction: float, seed: int, hold_out_val: bool = True
           ) -> tuple[list[int], list[int], list[int]]:
    """Seeded disjoint (train, val, test) document indices.

    Each split lists its documents in a seeded random order, so a token cap (data.max_*_tokens) keeps
    a random sample of documents rather than the first topics of a corpus stored topic by topic.
    hold_out_val=False (val_protocol=subset_of_train): validation is cut from the training stream later.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = held_out_count(n, val_fraction) if hold_out_val else 0
    n_test = held_out_count(n, test_fraction)
    if n_val + n_test >= n:
        raise DataError(f"{n} documents are too few to hold out data.val_fraction={val_fraction} for validation "
                        f"and data.test_fraction={test_fraction} for test and keep some for training: use more "
                        "data (data.num_conversations) or smaller fractions")
    return order[n_val + n_test:], order[:n_val], order[n_val : n_val + n_test]


def _assign(n: int, given: list[str] | None, d: DictConfig) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) indices of n documents: newllm's seeded split, or the source's own splits (given),
    where a held-out split the source lacks is cut from its training documents the same way."""
    by_conversation = d.val_protocol == "by_conversation"
    if given is None:
        return _split(n, d.val_fraction, d.test_fraction, d.split_seed, hold_out_val=by_conversation)
    own = {k: [i for i, g in enumerate(given) if g == k] for k in ("train", "val", "test")}
    need_val, need_test = by_conversation and not own["val"], d.test_fraction > 0 and not own["test"]
    train = own["train"]
    cut = _split(len(train), d.val_fraction if need_val else 0, d.test_fraction if need_test else 0, d.split_seed,
                 hold_out_val=need_val)
    held = []
    for ours, keep, part in (("val", by_conversation, cut[1]), ("test", d.test_fraction > 0, cut[2])):
        docs = own[ours] if keep else []
        random.Random(d.split_seed).shuffle(docs)  # a seeded order, as _split gives: caps keep a random sample
        held.append(docs + [train[i] for i in part])
    return [train[i] for i in cut[0]], held[0], held[1]


def _tokenizer(tok: DictConfig, train_texts: list[str], cache_dir: Path) -> tuple[Tokenizer, dict]:
    if tok.pretrained:
        return load_pretrained(tok.pretrained), {keys.DATA_TOKENIZER: tok.pretrained}
    tokenizer, path, hit = load_or_train(train_texts, tok.vocab_size, tok.min_frequency, cache_dir)
    return tokenizer, {keys.DATA_TOKENIZER: str(path), keys.DATA_TOKENIZER_CACHE_HIT: hit}


def _check_sizes(d: DictConfig, splits: dict[str, Split], min_tokens: int) -> None:
    window = f"fewer than one window of {min_tokens} tokens (training.phase2.seq_len + 1)"
    train, val, test = splits["train"], splits["val"], splits.get("test")
    if len(train.ids) < min_tokens:
        raise DataError(f"data={d.name}: the training stream has {len(train.ids)} tokens, {window}: use more data "
                        "(data.num_conversations, data.max_train_tokens) or a shorter training.phase2.seq_len")
    if len(val.ids) < min_tokens:
        raise DataError(f"data={d.name}: the validation stream has {len(val.ids)} tokens "
                        f"(data.val_protocol={d.val_protocol}, data.val_fraction={d.val_fraction}, "
                        f"data.max_val_tokens={d.max_val_tokens}), {window}: hold out more data")
    if test is not None and len(test.ids) < min_tokens:
        raise DataError(f"data={d.name}: the test stream has {len(test.ids)} tokens "
                        f"(data.test_fraction={d.test_fraction}, data.max_test_tokens={d.max_test_tokens}), "
                        f"{window}: hold out more data, or data.test_fraction=0 for no test split")
    for name, s in (("validation", val), ("test", test)):
        if s is not None and not bool(s.mask.any()):
            raise DataError(f"data={d.name}: the {name} stream has no tokens to predict (no assistant turns "
                            "with data.loss_on=assistant): hold out more data or use data.loss_on=all")


def fingerprint(splits: dict[str, Split]) -> str:
    """A short hash of every split's token ids and loss mask: equal fingerprints, identical data."""
    h = hashlib.sha256()
    for name in sorted(splits):
        s = splits[name]
        h.update(name.encode() + s.ids.numpy().tobytes() + s.mask.numpy().tobytes())
        if s.targets is not None:
            h.update(s.targets.numpy().tobytes())
    return h.hexdigest()[:16]


def contamination_info(texts: list[str], splits: dict[str, Split]) -> dict:
    """data/contamination/<split>_documents: the share of each held-out split's documents that share a
    13-word n-gram with a training document (newllm.data.dedup holds the definition)."""
    of = lambda s: (texts[i] for i in s.docs.tolist())
    counts = contamination(of(splits["train"]), {k: list(of(s)) for k, s in splits.items() if k != "train"})
    return {keys.DATA_CONTAMINATION_NGRAM: NGRAM,
            **{keys.data_contamination(k): hit / max(total, 1) for k, (hit, total) in counts.items()}}


def _finish(d: DictConfig, tokenizer: Tokenizer, splits: dict[str, Split], min_tokens: int, info: dict,
            stages: dict[str, list[RepetitionStage]] | None = None, texts: list[str] | None = None) -> TokenData:
    """Budgets, loss masks, size checks and the counts every option reports; the contamination report
    of a document source (`texts`: its documents, which Split.docs index)."""
    splits = dict(splits)
    splits["train"] = splits["train"].tokens(0, d.max_train_tokens)
    if d.val_protocol == "subset_of_train":  # the original protocol: the tail of what is trained on
        splits["val"] = splits["train"].tokens(int(len(splits["train"].ids) * (1 - SUBSET_OF_TRAIN_FRACTION)))
    splits["val"] = splits["val"].tokens(0, d.max_val_tokens)
    if d.test_fraction > 0:
        splits["test"] = splits["test"].tokens(0, d.max_test_tokens)
    else:
        splits.pop("test", None)
    if d.loss_on == "all":
        splits = {k: Split(s.ids, torch.ones_like(s.mask), s.lengths, s.docs, s.targets)
                  for k, s in splits.items()}
    _check_sizes(d, splits, min_tokens)
    counts = {}
    for name, s in splits.items():
        counts.update({keys.data_split(name, "tokens"): len(s.ids), keys.data_split(name, "documents"): len(s.lengths),
                       keys.data_split(name, "loss_tokens"): int(s.mask.sum())})
    info = {keys.DATA_NAME: str(d.name), **counts, keys.DATA_VAL_PROTOCOL: str(d.val_protocol),
            keys.DATA_TEST_FRACTION: d.test_fraction, keys.DATA_SPLIT_SEED: d.split_seed,
            keys.DATA_FINGERPRINT: fingerprint(splits), keys.DATA_VOCAB_SIZE: tokenizer.get_vocab_size(),
            **(contamination_info(texts, splits) if texts is not None else {}), **info}
    stages = stages or {}
    train, val, test = splits["train"], splits["val"], splits.get("test")
    return TokenData(train.ids, train.mask, val.ids, val.mask, tokenizer, info, stages.get("train"),
                     stages.get("val"), test.ids if test else None, test.mask if test else None,
                     stages.get("test"), train.lengths, val_doc_lengths=val.lengths,
                     test_doc_lengths=test.lengths if test else None,
                     targets={k: s.targets for k, s in splits.items() if s.targets is not None} or None)


def _load_repetition(d: DictConfig, tok: DictConfig, cache_dir: Path, min_tokens: int) -> TokenData:
    # The phrase vocabulary: a tokenizer trained on the embedded dialogue corpus (or a hub one).
    tokenizer, tok_info = _tokenizer(tok, [render_chatml(c)[0] for c in chatterbot_conversations()], cache_dir)
    n_val, n_test = held_out_count(d.phrases_per_stage, d.val_fraction), held_out_count(d.phrases_per_stage,
                                                                                         d.test_fraction)
    train, val, test = repetition.make_stages(tokenizer, list(d.phrase_lengths), d.repetitions,
                                              d.phrases_per_stage, n_val, n_test, d.split_seed)
    info = {keys.DATA_PHRASE_LENGTHS: ",".join(map(str, d.phrase_lengths)), keys.DATA_REPETITIONS: d.repetitions,
            keys.data_split("train", "phrases_per_stage"): d.phrases_per_stage,
            keys.data_split("val", "phrases_per_stage"): n_val,
            keys.data_split("test", "phrases_per_stage"): n_test, **tok_info}
    splits = {"train": Split.of_rows(train), "val": Split.of_rows(val)}  # max_*_tokens cap these, not stages
    if n_test:
        splits["test"] = Split.of_rows(test)
    return _finish(d, tokenizer, splits, min_tokens, info,
                   stages={"train": train, "val": val, "test": test if n_test else None})


def _recall_stream(s: recall.RecallSplit) -> Split:
    """Sequences back to back, plus one trailing pad (never a target) so the last one fills a window too."""
    lengths = torch.full((s.ids.shape[0],), s.ids.shape[1], dtype=torch.long)
    lengths[-1] += 1
    pad, no = torch.tensor([recall.PAD]), torch.tensor([False])
    return Split(torch.cat([s.ids.reshape(-1), pad]), torch.cat([s.mask.reshape(-1), no]), lengths,
                 targets=torch.cat([s.targets.reshape(-1), pad]))


def _load_recall(d: DictConfig, tok: DictConfig, cache_dir: Path, min_tokens: int) -> TokenData:
    """Generated ids (no tokenizer training): every sequence one document, loss only on answers."""
    splits = recall.make_splits(d.task, (d.num_train, d.num_val, d.num_test), d.seq_len, d.vocab_size,
                                d.num_pairs, d.split_seed, d.power_a)
    as_split = {name: _recall_stream(s) for name, s in zip(("train", "val", "test"), splits, strict=True)}
    mqar = d.task == "mqar"
    chance = recall.chance_accuracy(d.task, d.seq_len, d.vocab_size, d.num_pairs)
    info = {keys.DATA_TASK: str(d.task), keys.DATA_NUM_PAIRS: d.num_pairs if mqar else 0,
            **({keys.DATA_POWER_A: d.power_a} if mqar else {}), keys.DATA_SEQ_LEN: d.seq_len,
            **{keys.data_split(k, "sequences"): s.ids.shape[0] for k, s in zip(("train", "val", "test"), splits,
                                                                               strict=True)},
            keys.RECALL_CHANCE_NO_PAST: chance["no_past"], keys.RECALL_CHANCE_STORED_VALUE: chance["stored_value"]}
    data = _finish(d, recall.id_tokenizer(d.vocab_size), as_split, min_tokens, info)
    data.recall = {"val": splits[1], "test": splits[2]}
    return data


def load_data(data_cfg: DictConfig, tok_cfg: DictConfig, cache_dir: str | Path, min_tokens: int = 2) -> TokenData:
    """Token streams for one run. min_tokens: the shortest usable stream (one training window)."""
    check_options(data_cfg, tok_cfg)
    return SOURCES[data_cfg.name](data_cfg, tok_cfg, Path(cache_dir), min_tokens)


def _load_documents(d: DictConfig, tok_cfg: DictConfig, cache_dir: Path, min_tokens: int) -> TokenData:
    """A document source: seeded split by document, tokenizer trained on train, ids cached per split."""
    docs = DOCUMENT_SOURCES[d.name](d, cache_dir)
    read = len(docs.texts)
    if d.dedup:  # before the split, so no document can be both trained on and held out
        docs = docs.subset(first_occurrences(docs.texts))
    texts, spans = docs.texts, docs.spans
    indices = dict(zip(("train", "val", "test"), _assign(len(texts), docs.given, d), strict=True))
    tokenizer, tok_info = _tokenizer(tok_cfg, [texts[i] for i in indices["train"]], cache_dir)
    splits, hits = {}, []
    for name, idx in indices.items():
        *encoded, hit = encode_cached(tokenizer, [texts[i] for i in idx], [spans[i] for i in idx], cache_dir)
        splits[name], hits = Split(*encoded, torch.tensor(idx, dtype=torch.long)), [*hits, hit]
    info = {keys.DATA_DOCUMENTS: len(texts), keys.DATA_DEDUP: bool(d.dedup),
            keys.DATA_DUPLICATES_REMOVED: read - len(texts), **docs.info, **tok_info,
            keys.DATA_TOKENS_CACHE_HIT: all(hits)}
    return _finish(d, tokenizer, splits, min_tokens, info, texts=texts)


# data.name -> loader (newllm.config.DataSource lists the same names; Hydra refuses any other at compose).
# repetition ignores data.num_conversations (phrases_per_stage sets its size); recall trains no tokenizer.
SOURCES: dict[str, Callable[[DictConfig, DictConfig, Path, int], TokenData]] = {
    **dict.fromkeys(DOCUMENT_SOURCES, _load_documents), "repetition": _load_repetition, "recall": _load_recall,
}


def phase1_sample(data: TokenData, max_tokens: int, seed: int) -> tuple[torch.Tensor, int]:
    """(ids, documents) Phase 1 reads: whole training documents in a seeded random order, up to max_tokens.

    The last document is cut to fill the budget exactly, so phase1/tokens stays comparable across
    runs. A corpus stored topic by topic (chatterbot) is then sampled across topics, not read from
    its first files.
    """
    lengths = data.train_doc_lengths
    if lengths is None:  # a hand-made TokenData without document boundaries: one document
        lengths = torch.tensor([len(data.train_ids)])
    starts = lengths.cumsum(0) - lengths
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    taken = lengths[order].cumsum(0)
    n_docs = min(len(order), int((taken < max_tokens).sum()) + 1)  # the last one may be cut
    pieces = [data.train_ids[starts[i] : starts[i] + lengths[i]] for i in order[:n_docs].tolist()]
    return torch.cat(pieces)[:max_tokens], n_docs
