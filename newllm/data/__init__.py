"""Data: every source produces the same thing -- token streams, loss masks and a tokenizer.

    source (chatterbot | ultrachat | text)  -> documents (ChatML text + assistant spans, or plain text)
    -> seeded split by document             -> tokenizer (BPE trained on the training split, cached)
    -> token ids + assistant masks (tokenized once, cached by `datasets`) -> budgets -> TokenData
    repetition: generated phrases (newllm.data.repetition) -> stages + the same streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from newllm.data import repetition
from newllm.data.corpora import TEXT_UNITS, chatterbot_conversations, text_documents, ultrachat_conversations
from newllm.data.repetition import RepetitionStage
from newllm.data.streams import Spans, encode_cached, render_chatml
from newllm.data.tokenizer import check_vocab_size, load_or_train, load_pretrained
from newllm.errors import DataError

DIALOGUE = ("chatterbot", "ultrachat")
SOURCES = (*DIALOGUE, "text", "repetition")
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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def check_options(d: DictConfig, tok: DictConfig) -> None:
    """Combinations that would silently do something else than asked (before any work)."""
    if d.name not in SOURCES:
        raise DataError(f"data.name={d.name!r} is not allowed: expected one of {', '.join(SOURCES)}")
    if not tok.pretrained:
        check_vocab_size(tok.vocab_size)
    if d.name not in DIALOGUE and d.loss_on == "assistant":
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


def _documents(d: DictConfig, cache_dir: Path) -> tuple[list[str], list[Spans]]:
    if d.name == "text":
        sep = TEXT_UNITS[d.split_by]
        docs = [t + sep for t in text_documents(list(d.files), d.split_by, d.num_conversations, cache_dir)]
        return docs, [[] for _ in docs]
    if d.name == "chatterbot":
        conversations = chatterbot_conversations(d.num_conversations)
    else:
        conversations = ultrachat_conversations(d.path, d.num_conversations, cache_dir)
    rendered = [render_chatml(c) for c in conversations]
    return [t for t, _ in rendered], [s for _, s in rendered]


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint (train, val) document indices, each in corpus order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise DataError(f"{n} documents are too few to hold out data.val_fraction={val_fraction} for validation "
                        "and keep some for training: use more data (data.num_conversations) or a smaller fraction")
    return sorted(order[n_val:]), sorted(order[:n_val])


def _tokenizer(tok: DictConfig, train_texts: list[str], cache_dir: Path) -> tuple[Tokenizer, dict]:
    if tok.pretrained:
        return load_pretrained(tok.pretrained), {"data/tokenizer": tok.pretrained}
    tokenizer, path, hit = load_or_train(train_texts, tok.vocab_size, tok.min_frequency, cache_dir)
    return tokenizer, {"data/tokenizer": str(path), "data/tokenizer_cache_hit": hit}


def _check_sizes(d: DictConfig, train_ids: torch.Tensor, val_ids: torch.Tensor, val_mask: torch.Tensor,
                 min_tokens: int) -> None:
    window = f"fewer than one window of {min_tokens} tokens (training.phase2.seq_len + 1)"
    if len(train_ids) < min_tokens:
        raise DataError(f"data={d.name}: the training stream has {len(train_ids)} tokens, {window}: use more data "
                        "(data.num_conversations, data.max_train_tokens) or a shorter training.phase2.seq_len")
    if len(val_ids) < min_tokens:
        raise DataError(f"data={d.name}: the validation stream has {len(val_ids)} tokens "
                        f"(data.val_protocol={d.val_protocol}, data.val_fraction={d.val_fraction}, "
                        f"data.max_val_tokens={d.max_val_tokens}), {window}: hold out more data")
    if not bool(val_mask.any()):
        raise DataError(f"data={d.name}: the validation stream has no tokens to predict (no assistant turns "
                        "with data.loss_on=assistant): hold out more data or use data.loss_on=all")


def _finish(d: DictConfig, tokenizer: Tokenizer, train: tuple[torch.Tensor, torch.Tensor],
            val: tuple[torch.Tensor, torch.Tensor], min_tokens: int, info: dict,
            stages: tuple[list[RepetitionStage], list[RepetitionStage]] | tuple[None, None] = (None, None)
            ) -> TokenData:
    """Budgets, loss masks, size checks and the counts every option reports."""
    (train_ids, train_mask), (val_ids, val_mask) = train, val
    train_ids, train_mask = train_ids[: d.max_train_tokens], train_mask[: d.max_train_tokens]
    if d.val_protocol == "subset_of_train":  # the original protocol: the tail of what is trained on
        cut = int(len(train_ids) * (1 - SUBSET_OF_TRAIN_FRACTION))
        val_ids, val_mask = train_ids[cut:].clone(), train_mask[cut:].clone()
    val_ids, val_mask = val_ids[: d.max_val_tokens], val_mask[: d.max_val_tokens]
    if d.loss_on == "all":
        train_mask, val_mask = torch.ones_like(train_mask), torch.ones_like(val_mask)
    _check_sizes(d, train_ids, val_ids, val_mask, min_tokens)
    info = {
        "data/name": d.name,
        "data/train_tokens": len(train_ids),
        "data/val_tokens": len(val_ids),
        "data/train_loss_tokens": int(train_mask.sum()),
        "data/val_loss_tokens": int(val_mask.sum()),
        "data/val_protocol": d.val_protocol,
        "data/vocab_size": tokenizer.get_vocab_size(),
        **info,
    }
    return TokenData(train_ids, train_mask, val_ids, val_mask, tokenizer, info, *stages)


def _load_repetition(d: DictConfig, tok: DictConfig, cache_dir: Path, seed: int, min_tokens: int) -> TokenData:
    # The phrase vocabulary: a tokenizer trained on the embedded dialogue corpus (or a hub one).
    tokenizer, tok_info = _tokenizer(tok, [render_chatml(c)[0] for c in chatterbot_conversations()], cache_dir)
    n_val = max(1, round(d.phrases_per_stage * d.val_fraction))
    train, val = repetition.make_stages(tokenizer, list(d.phrase_lengths), d.repetitions, d.phrases_per_stage,
                                        n_val, seed)
    train_ids, val_ids = repetition.stream(train), repetition.stream(val)  # max_*_tokens cap these, not stages
    info = {"data/phrase_lengths": ",".join(map(str, d.phrase_lengths)), "data/repetitions": d.repetitions,
            "data/train_phrases_per_stage": d.phrases_per_stage, "data/val_phrases_per_stage": n_val, **tok_info}
    ones = torch.ones_like
    return _finish(d, tokenizer, (train_ids, ones(train_ids, dtype=torch.bool)),
                   (val_ids, ones(val_ids, dtype=torch.bool)), min_tokens, info, stages=(train, val))


def load_data(data_cfg: DictConfig, tok_cfg: DictConfig, cache_dir: str | Path, seed: int,
              min_tokens: int = 2) -> TokenData:
    """Token streams for one run. min_tokens: the shortest usable stream (one training window)."""
    d, cache_dir = data_cfg, Path(cache_dir)
    check_options(d, tok_cfg)
    if d.name == "repetition":  # data.num_conversations does not apply (phrases_per_stage does)
        return _load_repetition(d, tok_cfg, cache_dir, seed, min_tokens)
    texts, spans = _documents(d, cache_dir)
    if d.val_protocol == "by_conversation":
        train_idx, val_idx = _split(len(texts), d.val_fraction, seed)
    else:
        train_idx, val_idx = list(range(len(texts))), []
    tokenizer, tok_info = _tokenizer(tok_cfg, [texts[i] for i in train_idx], cache_dir)
    *train, train_hit = encode_cached(tokenizer, [texts[i] for i in train_idx], [spans[i] for i in train_idx],
                                      cache_dir)
    *val, val_hit = encode_cached(tokenizer, [texts[i] for i in val_idx], [spans[i] for i in val_idx], cache_dir)
    info = {"data/documents": len(texts), "data/train_documents": len(train_idx),
            "data/val_documents": len(val_idx), **tok_info, "data/tokens_cache_hit": train_hit and val_hit}
    return _finish(d, tokenizer, tuple(train), tuple(val), min_tokens, info)
