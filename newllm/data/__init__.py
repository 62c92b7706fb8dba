"""Data: every source produces the same thing -- token streams, loss masks and a tokenizer."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from newllm.data.corpora import chatterbot_conversations
from newllm.data.streams import encode_documents, render_chatml
from newllm.data.tokenizer import load_or_train
from newllm.errors import DataError


@dataclass
class TokenData:
    train_ids: torch.Tensor  # (N,) long
    train_mask: torch.Tensor  # (N,) bool: tokens Phase 2 learns to predict
    val_ids: torch.Tensor
    val_mask: torch.Tensor
    tokenizer: Tokenizer
    info: dict = field(default_factory=dict)  # counts, protocol, cache hits -> metrics.json

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def _split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction))
    if n_val >= len(items):
        raise DataError(f"{len(items)} documents are too few to hold out data.val_fraction={val_fraction}")
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [items[i] for i in train], [items[i] for i in val]


def load_data(data_cfg: DictConfig, tok_cfg: DictConfig, cache_dir: str | Path, seed: int) -> TokenData:
    if data_cfg.name != "chatterbot":
        raise DataError(f"data.name={data_cfg.name!r} is not available yet: expected chatterbot")
    conversations = chatterbot_conversations(data_cfg.num_conversations)
    rendered = [render_chatml(c) for c in conversations]

    if data_cfg.val_protocol == "by_conversation":
        train_docs, val_docs = _split(rendered, data_cfg.val_fraction, seed)
    else:
        train_docs, val_docs = rendered, []
    tokenizer, tok_path, tok_hit = load_or_train(
        [t for t, _ in train_docs], tok_cfg.vocab_size, tok_cfg.min_frequency, Path(cache_dir)
    )
    use_spans = data_cfg.loss_on == "assistant"
    train_ids, train_mask = encode_documents(tokenizer, [t for t, _ in train_docs],
                                             [s for _, s in train_docs] if use_spans else None)
    if data_cfg.val_protocol == "subset_of_train":
        # The original research protocol: validation = the last 20 % of the training stream.
        cut = int(len(train_ids) * 0.8)
        val_ids, val_mask = train_ids[cut:].clone(), train_mask[cut:].clone()
    else:
        val_ids, val_mask = encode_documents(tokenizer, [t for t, _ in val_docs],
                                             [s for _, s in val_docs] if use_spans else None)
    if data_cfg.max_train_tokens:
        train_ids, train_mask = train_ids[: data_cfg.max_train_tokens], train_mask[: data_cfg.max_train_tokens]
    if data_cfg.max_val_tokens:
        val_ids, val_mask = val_ids[: data_cfg.max_val_tokens], val_mask[: data_cfg.max_val_tokens]
    info = {
        "data/train_tokens": len(train_ids),
        "data/val_tokens": len(val_ids),
        "data/train_loss_tokens": int(train_mask.sum()),
        "data/val_loss_tokens": int(val_mask.sum()),
        "data/documents": len(rendered),
        "data/val_protocol": data_cfg.val_protocol,
        "data/vocab_size": tokenizer.get_vocab_size(),
        "data/tokenizer_path": str(tok_path),
        "data/tokenizer_cache_hit": tok_hit,
    }
    return TokenData(train_ids, train_mask, val_ids, val_mask, tokenizer, info)
