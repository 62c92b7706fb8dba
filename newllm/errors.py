"""Errors newllm reports as one clear line (the bad value and what is allowed)."""

from __future__ import annotations

import sys
from typing import NoReturn


class NewllmError(Exception):
    """Base class: caught at the CLI and printed as a single line."""


class DataError(NewllmError):
    """Bad or insufficient input data (missing file, empty corpus, too few tokens...)."""


class TrainingError(NewllmError):
    """Training cannot go on (a NaN loss, for instance)."""


def describe(err: BaseException) -> str:
    """An unexpected exception as one line: its type (module-qualified, as tracebacks print it), message and notes."""
    kind, module = type(err).__qualname__, type(err).__module__
    kind = kind if module == "builtins" else f"{module}.{kind}"
    text = "\n".join([str(err), *getattr(err, "__notes__", [])])  # notes: e.g. Hydra's 'full_key: model'
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"{kind}: {message}" if message else kind


def exit_one_line(err: BaseException) -> NoReturn:
    """What the CLI does with a NewllmError: `error: <message>` on stderr, exit status 2."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
