"""Byte-level BPE trained locally with `tokenizers`, cached by corpus content and settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from newllm.data.hub import hub_reachable
from newllm.errors import DataError, first_line
from newllm.runtime.fileio import save_text

IM_START, IM_END, END_OF_TEXT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, END_OF_TEXT, IM_START, IM_END]


def cache_key(texts: list[str], **settings: object) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise DataError(
            f"tokenizer.vocab_size={vocab_size} is too small: a byte-level BPE needs more than "
            f"{len(SPECIAL_TOKENS)} special tokens + 256 byte symbols = {len(SPECIAL_TOKENS) + 256}"
        )


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_or_train(
    texts: list[str], vocab_size: int, min_frequency: int, cache_dir: Path
) -> tuple[Tokenizer, Path, bool]:
    """(tokenizer, its JSON path, cache hit?). A corrupt cache file is rebuilt, never used."""
    key = cache_key(texts, vocab_size=vocab_size, min_frequency=min_frequency, kind="bytelevel-bpe",
                    special=SPECIAL_TOKENS)
    path = cache_dir / "tokenizers" / f"bpe-{key}.json"
    if path.exists():
        try:
            tok = Tokenizer.from_file(str(path))
            if all(tok.token_to_id(s) is not None for s in SPECIAL_TOKENS):
                return tok, path, True
        except Exception:  # noqa: BLE001 -- any parse failure means a corrupt entry: rebuild it
            pass
        path.unlink(missing_ok=True)
    tok = train_bpe(texts, vocab_size, min_frequency)
    save_text(path, tok.to_str())
    return tok, path, False


def load_pretrained(name: str) -> Tokenizer:
    """A hub tokenizer (tokenizer.json) plus our ChatML/pad special tokens where it lacks them.

    Online: Tokenizer.from_pretrained (cached by huggingface_hub). Offline: huggingface_hub's cache
    or one clear error, at once instead of after the hub client's retries.
    """
    try:
        if Path(name).is_dir():  # a local model directory in the hub layout
            tok = Tokenizer.from_file(str(Path(name) / "tokenizer.json"))
        elif hub_reachable():
            tok = Tokenizer.from_pretrained(name)
        else:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(name, "tokenizer.json")
            if not isinstance(path, str):
                raise DataError(f"tokenizer.pretrained={name!r} cannot be loaded: the Hugging Face Hub is "
                                "unreachable and it is not in the local hub cache; use tokenizer.pretrained=null "
                                "to train a byte-level BPE locally")
            tok = Tokenizer.from_file(path)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 -- hub/network/parse errors of all kinds: one line
        raise DataError(f"tokenizer.pretrained={name!r} could not be loaded ({first_line(err)}); "
                        "use tokenizer.pretrained=null to train a byte-level BPE locally") from err
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.no_truncation()  # some hub files truncate to the model's max length: we encode whole documents
    tok.no_padding()
    return tok
