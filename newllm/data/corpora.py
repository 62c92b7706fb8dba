"""Raw sources -> conversations (lists of {role, content}) or documents (plain strings).

A conversation is rendered to ChatML by `streams.render_chatml`; documents are used as they are.
JSON / Parquet files are read with `datasets` builders, cached under <cache_dir>/datasets; plain text
files by newllm.data.textfiles.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import datasets
import yaml

from newllm.data.hub import hub_reachable
from newllm.data.tokenizer import END_OF_TEXT
from newllm.errors import DataError, first_line

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
ULTRACHAT = "HuggingFaceH4/ultrachat_200k"
ULTRACHAT_SPLIT = "train_sft"
MESSAGE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# data=text: how a file is cut into documents (the unit held out for validation) and the
# separator that joins them back into a stream -- the one that cut them.
TEXT_UNITS = {"paragraph": "\n\n", "line": "\n", "file": END_OF_TEXT}

datasets.disable_progress_bars()


def _chatterbot_files() -> list[tuple[str, list[Conversation]]]:
    """(topic file name, its conversations) for every English file, in file-name order."""
    folder = resources.files("chatterbot_corpus") / "data" / "english"
    files = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yml"):
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        conversations = []
        for turns in doc.get("conversations", []):
            utterances = [str(u).strip() for u in turns if u is not None and str(u).strip()]
            if len(utterances) < 2:
                continue
            roles = ("user", "assistant")
            conversations.append([{"role": roles[i % 2], "content": u} for i, u in enumerate(utterances)])
        files.append((path.name.removesuffix(".yml"), conversations))
    if not any(c for _, c in files):
        raise DataError(f"chatterbot-corpus has no English conversations under {folder}")
    return files


def chatterbot_conversations(limit: int | None = None) -> list[Conversation]:
    """The English conversations shipped in chatterbot-corpus, speakers alternating user/assistant.
    Stored topic by topic (ai, botprofile, computers, ...), in file-name order."""
    conversations = [c for _, convs in _chatterbot_files() for c in convs]
    return conversations[:limit] if limit else conversations


def chatterbot_topics() -> list[str]:
    """The topic (file name) of each conversation chatterbot_conversations() returns, in the same order."""
    return [topic for topic, convs in _chatterbot_files() for _ in convs]


def check_conversation(messages: object, where: str) -> Conversation:
    """A list of {role, content} with known roles and string content, or a DataError naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {messages!r:.80}")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: every message needs a 'role' and a string 'content', got {turn!r:.80}")
        if turn.get("role") not in ROLES:
            raise DataError(f"{where}: unknown role {turn.get('role')!r}: expected one of {', '.join(ROLES)}")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def check_file(path: str, key: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}={path!r} does not exist (or is not a file)")
    if p.stat().st_size == 0:
        raise DataError(f"{key}={path!r} is empty")
    return p


def _find_bad_utf8(paths: list[Path]) -> str:
    """Which file holds non-UTF-8 bytes, and where (read only once a build has failed)."""
    for p in paths:
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            return f"{p} has bytes that are not UTF-8 (at byte {err.start}: {err.object[err.start:err.start + 4]!r})"
    return ""


def _remove_leftovers(cache: Path, before: set[Path], build_id: str) -> None:
    """What a failed build added to the datasets cache: its 0-byte lock files and the folders it left empty.

    Only paths named by this build's config id (`default-<hash of the data files>`) are touched, so a
    build of other files running at the same time keeps its own. (datasets never deletes lock files;
    those of a build that succeeded guard its cache entry and stay.)
    """
    new = [p for p in set(cache.rglob("*")) - before if build_id in str(p.relative_to(cache))]
    for path in sorted(new, key=lambda p: len(p.parts), reverse=True):  # children before their folders
        if path.suffix == ".lock" and path.is_file() and path.stat().st_size == 0:
            path.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def load_local(builder: str, paths: list[Path], key: str, cache_dir: Path, **kwargs) -> datasets.Dataset:
    """load_dataset(builder, data_files=paths) with one-line errors; a corrupt cached build is rebuilt once.

    A build that fails for good leaves nothing behind in the cache."""
    cache = cache_dir / "datasets"
    before = set(cache.rglob("*"))
    try:
        return _load_local(builder, paths, key, cache, **kwargs)
    except DataError:
        build = datasets.load_dataset_builder(builder, data_files=[str(p) for p in paths], cache_dir=str(cache),
                                              **kwargs)
        _remove_leftovers(cache, before, build.config_id)
        raise


def _load_local(builder: str, paths: list[Path], key: str, cache: Path, **kwargs) -> datasets.Dataset:
    for mode in ("reuse_dataset_if_exists", "force_redownload"):
        try:
            return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                         cache_dir=str(cache), download_mode=mode, **kwargs)
        except datasets.exceptions.DatasetGenerationError as err:  # the files themselves are bad
            bad = _find_bad_utf8(paths)
            raise DataError(f"{key}: {bad}" if bad else f"{key}: cannot read {', '.join(map(str, paths))} "
                            f"as {builder} ({first_line(err.__cause__ or err)})") from err
        except Exception as err:  # noqa: BLE001 -- anything else may be a damaged cache: rebuild once
            last = err
    raise DataError(f"{key}: cannot read {', '.join(map(str, paths))} as {builder} ({first_line(last)})") from last


def ultrachat_conversations(path: str | None, limit: int | None, cache_dir: Path) -> list[Conversation]:
    """UltraChat-schema conversations: the hub dataset (streamed), or a local JSON/JSONL/Parquet file."""
    if path:
        p = check_file(path, "data.path")
        builder = MESSAGE_FORMATS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"data.path={path!r} has an unknown format: expected one of {', '.join(MESSAGE_FORMATS)}")
        ds = load_local(builder, [p], "data.path", cache_dir)
        if "messages" not in ds.column_names:
            raise DataError(f"data.path={path!r} has no 'messages' column (columns: {', '.join(ds.column_names)})")
        try:  # pyarrow's JSON reader lets bad UTF-8 into string columns; it surfaces when rows are read
            rows, where = list(ds.select(range(min(limit, len(ds)))) if limit else ds), str(p)
        except UnicodeDecodeError as err:
            raise DataError(f"data.path: {_find_bad_utf8([p]) or f'{p} has text that is not UTF-8'}") from err
    else:
        offline = (f"data=ultrachat cannot reach {ULTRACHAT!r} on the Hugging Face Hub (offline): use "
                   "data=chatterbot, or data.path=<local JSON/JSONL/Parquet file with a 'messages' column>")
        if not hub_reachable():
            raise DataError(offline)
        try:  # streamed: a few thousand conversations need not download the whole split
            stream = datasets.load_dataset(ULTRACHAT, split=ULTRACHAT_SPLIT, streaming=True)
            rows = list(stream.take(limit) if limit else stream)
        except ConnectionError as err:
            raise DataError(offline) from err
        except Exception as err:  # noqa: BLE001 -- gated, renamed, interrupted...: one line, not a traceback
            raise DataError(f"data=ultrachat could not stream {ULTRACHAT!r} ({first_line(err)}): use "
                            "data=chatterbot, or data.path=<local JSON/JSONL/Parquet file>") from err
        where = f"{ULTRACHAT}[{ULTRACHAT_SPLIT}]"
    return [check_conversation(r["messages"], f"{where} conversation {i}") for i, r in enumerate(rows)]


def check_text_files(files: list[str]) -> list[Path]:
    """data.files as paths, each an existing non-empty file (reading them: newllm.data.textfiles)."""
    if not files:
        raise DataError("data=text needs data.files=[path, ...]: one or more UTF-8 plain-text files")
    return [check_file(f, "data.files") for f in files]
