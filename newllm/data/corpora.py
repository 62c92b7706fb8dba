"""Raw sources -> conversations (lists of {role, content}) or documents (plain strings).

A conversation is rendered to ChatML by `streams.render_chatml`; documents are used as they are.
"""

from __future__ import annotations

from importlib import resources

import yaml

from newllm.errors import DataError

Conversation = list[dict[str, str]]


def chatterbot_conversations(limit: int | None = None) -> list[Conversation]:
    """The English conversations shipped in chatterbot-corpus, speakers alternating user/assistant."""
    folder = resources.files("chatterbot_corpus") / "data" / "english"
    conversations: list[Conversation] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations", []):
            utterances = [str(u).strip() for u in turns if u is not None and str(u).strip()]
            if len(utterances) < 2:
                continue
            roles = ("user", "assistant")
            conversations.append([{"role": roles[i % 2], "content": u} for i, u in enumerate(utterances)])
    if not conversations:
        raise DataError(f"chatterbot-corpus has no English conversations under {folder}")
    return conversations[:limit] if limit else conversations
