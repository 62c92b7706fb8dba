"""Data: every source produces the same thing -- token streams, loss masks and a tokenizer.

    source (chatterbot | ultrachat | text | hf)  -> documents (ChatML text + assistant spans, or plain text;
        text files are indexed, not loaded: newllm.data.textfiles)
    -> prepared once and cached (newllm.data.prepare): duplicates removed (data.dedup, newllm.data.dedup)
       -> seeded split by document (data.split_seed) -> BPE trained on training documents (bounded by the
       caps) -> token streams written up to their caps (data.max_*_tokens), memory-mapped in the smallest id
       dtype (newllm.data.streams) -> contamination report (held-out documents sharing a 13-word n-gram
       with train)
    -> budgets, loss masks, counts -> TokenData (its streams are views of the memory maps: nothing copies
       a whole stream; Phase 1 and Phase 2 make int64 ids one piece or batch at a time)
    repetition / recall: generated data (newllm.data.repetition, newllm.data.recall) -> the same streams.

Every data choice (which documents are held out, their order, the Phase-1 sample) is drawn from
data.split_seed, never from the run's `seed`: a seed grid varies initialisation and batch order on
one fixed split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from newllm import keys
from newllm.data import recall, repetition
from newllm.data.corpora import TEXT_UNITS, chatterbot_conversations, check_text_files, ultrachat_conversations
from newllm.data.hf import hf_documents
from newllm.data.prepare import Documents, file_identity, prepare_documents
from newllm.data.repetition import RepetitionStage
from newllm.data.splits import Split, fingerprint, held_out_count
from newllm.data.streams import render_chatml
from newllm.data.textfiles import index_text_files
from newllm.data.tokenizer import check_vocab_size, load_or_train, load_pretrained
from newllm.errors import DataError

DIALOGUE = ("chatterbot", "ultrachat")
SUBSET_OF_TRAIN_FRACTION = 0.2  # val_protocol=subset_of_train: validation = this tail of the training stream


def _tokenizer(tok: DictConfig, train_texts: list[str], cache_dir: Path) -> tuple[Tokenizer, dict]:
    """data=repetition's tokenizer: a hub one, or a BPE of the embedded dialogues (cached by content)."""
    if tok.pretrained:
        return load_pretrained(tok.pretrained), {keys.DATA_TOKENIZER: tok.pretrained}
    tokenizer, path, hit = load_or_train(train_texts, tok.vocab_size, tok.min_frequency, cache_dir)
    return tokenizer, {keys.DATA_TOKENIZER: str(path), keys.DATA_TOKENIZER_CACHE_HIT: hit}


@dataclass
class TokenData:
    train_ids: torch.Tensor  # (N,) int64 (generated data) or the stored dtype (int16/int32, memory-mapped)
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


def _text_documents(d: DictConfig, cache_dir: Path) -> Documents:
    files = index_text_files(check_text_files(list(d.files)), d.split_by, d.num_conversations, TEXT_UNITS)
    return Documents(files, None, {keys.DATA_SPLIT_BY: files.unit})


def _chatml(conversations: list) -> Documents:
    rendered = [render_chatml(c) for c in conversations]
    return Documents([t for t, _ in rendered], [s for _, s in rendered])


def _chatterbot_documents(d: DictConfig, cache_dir: Path) -> Documents:
    return _chatml(chatterbot_conversations(d.num_conversations))


def _ultrachat_documents(d: DictConfig, cache_dir: Path) -> Documents:
    return _chatml(ultrachat_conversations(d.path, d.num_conversations, cache_dir))


def _hf_documents(d: DictConfig, cache_dir: Path) -> Documents:
    texts, given, info = hf_documents(d.dataset, d.config, d.text_column, d.num_conversations)
    return Documents(texts, None, info, given)


# The document sources (data.name): each reads its documents; splitting and tokenising are shared.
DOCUMENT_SOURCES: dict[str, Callable[[DictConfig, Path], Documents]] = {
    "chatterbot": _chatterbot_documents, "ultrachat": _ultrachat_documents, "text": _text_documents,
    "hf": _hf_documents,
}


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


def _finish(d: DictConfig, tokenizer: Tokenizer, splits: dict[str, Split], min_tokens: int, info: dict,
            stages: dict[str, list[RepetitionStage]] | None = None) -> TokenData:
    """Budgets, loss masks, size checks and the counts every option reports."""
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
        splits = {k: Split(s.ids, torch.ones(1, dtype=torch.bool).expand(len(s.ids)), s.lengths, s.targets)
                  for k, s in splits.items()}
    _check_sizes(d, splits, min_tokens)
    counts = {}  # count_nonzero, not sum: a bool sum makes an int64 copy of the whole mask (8 B a token)
    for name, s in splits.items():
        counts.update({keys.data_split(name, "tokens"): len(s.ids), keys.data_split(name, "documents"): len(s.lengths),
                       keys.data_split(name, "loss_tokens"): int(s.mask.count_nonzero())})
    info = {keys.DATA_NAME: str(d.name), **counts, keys.DATA_VAL_PROTOCOL: str(d.val_protocol),
            keys.DATA_TEST_FRACTION: d.test_fraction, keys.DATA_SPLIT_SEED: d.split_seed,
            keys.DATA_FINGERPRINT: fingerprint(splits), keys.DATA_VOCAB_SIZE: tokenizer.get_vocab_size(),
            **info}
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
    """A document source, prepared once (newllm.data.prepare: dedup, split, tokenizer, token streams with
    their caps, contamination) and read back from its memory-mapped cache entry."""
    identity = None  # text files are known by path, size and time, so a cached rerun reads none of them
    if d.name == "text":
        identity = file_identity(check_text_files(list(d.files)), str(d.split_by), d.num_conversations)
    splits, tokenizer, info = prepare_documents(d, tok_cfg, cache_dir, identity,
                                                lambda: DOCUMENT_SOURCES[d.name](d, cache_dir))
    return _finish(d, tokenizer, splits, min_tokens, info)


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
    return torch.cat(pieces)[:max_tokens].long(), n_docs
