"""data=hf: any Hugging Face dataset with a text column, by hub id or from a `save_to_disk` folder.

    data=hf data.dataset=<hub id> data.config=<name> data.text_column=text      (streamed from the Hub)
    data=hf data.dataset=/path/to/folder                                          (datasets.save_to_disk)

Each row is one document, ended by <|endoftext|>; rows of only whitespace are skipped. Split names map
to newllm's splits (HF_SPLITS: train; validation / valid / val / dev; test) and are kept; a held-out
split the dataset lacks is cut from its training rows (data.val_fraction / test_fraction, seeded by
data.split_seed), and a dataset of one split is split by newllm like every other source. The documents
come train first, so deduplication (data.dedup) keeps the training copy and drops a held-out row that
repeats one. data.num_conversations caps the rows read from each split.

Online the dataset is streamed (a capped read fetches only what it reads). Offline -- HF_HUB_OFFLINE=1,
or the Hub unreachable -- a dataset in the local `datasets` cache (a `load_dataset` made earlier with
a network) is used, anything else fails at once with one line, not after the Hub client's retries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import datasets

from newllm import keys
from newllm.data.hub import hub_reachable
from newllm.data.tokenizer import END_OF_TEXT
from newllm.errors import DataError, first_line

HF_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}


@contextmanager
def _offline() -> Iterator[None]:
    """datasets' own offline switch for one call: the cache is used and the Hub never retried."""
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _from_disk(folder: Path) -> dict[str, datasets.Dataset]:
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 -- missing files, another format, ...: one line
        raise DataError(f"data.dataset={str(folder)!r} is not a folder written by datasets.save_to_disk "
                        f"({first_line(err)})") from err
    return dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}


def _from_hub(name: str, config: str | None) -> dict:
    offline = (f"data.dataset={name!r} is not in the local Hugging Face datasets cache and the Hub is unreachable "
               "(offline): use data.dataset=<folder written by datasets.save_to_disk>, or load it once with a network")
    try:
        if hub_reachable():
            return dict(datasets.load_dataset(name, config, streaming=True))
        with _offline():
            return dict(datasets.load_dataset(name, config))
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        if not hub_reachable():
            raise DataError(offline) from err
        raise DataError(f"data.dataset={name!r} cannot be loaded from the Hub ({first_line(err)})") from err
    except Exception as err:  # noqa: BLE001 -- a missing config name, a gated repo, ...: one line
        hint = "" if config else " (does it need data.config=<name>?)"
        raise DataError(f"data.dataset={name!r} data.config={config!r} cannot be loaded{hint}: "
                        f"{first_line(err)}") from err


def _rows(split, column: str, where: str, limit: int | None) -> Iterable[str]:
    names = getattr(split, "column_names", None)
    if names is not None and column not in names:
        raise DataError(f"data.text_column={column!r} is not a column of {where} (columns: {', '.join(names)})")
    rows = split.select_columns([column]) if names is not None else split
    for i, row in enumerate(islice(rows, limit)):
        text = row.get(column)
        if not isinstance(text, str):
            raise DataError(f"data.text_column={column!r} of {where} row {i} is not text: {text!r:.60}")
        yield text


def hf_documents(dataset: str, config: str | None, column: str, limit: int | None
                 ) -> tuple[list[str], list[str] | None, dict]:
    """(documents, the newllm split each comes from -- None when the dataset has one split --, info)."""
    if not dataset:
        raise DataError("data=hf needs data.dataset=<hub id> or data.dataset=<folder written by "
                        "datasets.save_to_disk>")
    splits = _from_disk(Path(dataset)) if Path(dataset).exists() else _from_hub(dataset, config)
    if len(splits) == 1:
        chosen = {"own": next(iter(splits))}
    else:
        chosen = {}
        for name in splits:  # the first name of each newllm split wins (validation before dev)
            chosen.setdefault(HF_SPLITS.get(name), name)
        chosen.pop(None, None)
        if "train" not in chosen:
            raise DataError(f"data.dataset={dataset!r} has splits {', '.join(splits)}: none is named train, so "
                            "newllm cannot tell what to train on; save the one to use as a single split")
    texts, given = [], []
    for ours in ("train", "val", "test", "own"):
        if ours in chosen:
            pieces = [t.strip() + END_OF_TEXT for t in _rows(splits[chosen[ours]], column,
                                                             f"{dataset}[{chosen[ours]}]", limit) if t.strip()]
            texts += pieces
            given += [ours] * len(pieces)
    if not texts:
        raise DataError(f"data.dataset={dataset!r}: column {column!r} holds no text")
    info = {keys.DATA_HF_DATASET: dataset, keys.DATA_HF_CONFIG: config or "",
            keys.DATA_HF_SPLITS: ",".join(f"{k}={v}" for k, v in chosen.items())}
    return texts, (None if "own" in chosen else given), info
