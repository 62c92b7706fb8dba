"""Conversations/documents -> token id streams and per-token loss masks.

The assistant mask comes from exact character spans of the assistant turns, mapped through the
tokenizer's offsets -- never by matching decoded text.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from newllm.data.corpora import Conversation
from newllm.data.tokenizer import END_OF_TEXT, IM_END, IM_START
from newllm.errors import DataError

ROLES = ("system", "user", "assistant")


def render_chatml(conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the [start, end) character spans to learn (assistant content + <|im_end|>)."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for turn in conversation:
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} in a conversation: expected one of {', '.join(ROLES)}")
        head = f"{IM_START}{role}\n"
        body = f"{content}{IM_END}"
        if role == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts) + END_OF_TEXT, spans


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """True for tokens lying inside any span (offsets and spans sorted, [start, end))."""
    mask, k = [], 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(k < len(spans) and spans[k][0] <= start and end <= spans[k][1] and end > start)
    return mask


def encode_documents(tokenizer: Tokenizer, texts: list[str], spans: list[list[tuple[int, int]]] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate encoded documents: ids (N,) long, mask (N,) bool (all True without spans)."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, enc in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
        ids.extend(enc.ids)
        mask.extend(spans_to_mask(enc.offsets, spans[i]) if spans is not None else [True] * len(enc.ids))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
