"""Every error newllm reports as one clear line (the bad value and what is allowed).

A `NewllmError` reaching a CLI is printed as `error: <message>` with exit status 2 (`exit_one_line`);
any other exception is a bug and keeps its traceback. The subclasses say which part of a run refused:

    NewllmError
      ConfigError        a config value or combination newllm does not allow (also a ValueError)
        FolderOwned      a sweep folder or job folder that another study owns
      DataError          bad or insufficient input data
      TrainingError      training cannot go on (a NaN loss)
      ResourceError      more memory than the device has
      CheckpointError    a checkpoint that is missing, truncated, foreign or does not fit
      RunFolderError     a run folder that is taken, or a run that is still running
      OutputError        a file or folder newllm cannot write (disk full, read-only, no permission)
      PretrainedError    a pretrained model that cannot be fetched or does not fit
      GenerationError    a sampling request the model cannot serve (also a ValueError)
      AnalysisError      nothing to analyse (missing folder, no runs, unknown study, unreadable file)
      ScalingError       too few or unusable points for a power-law fit
      SweepAborted       too many failed trials
      CompatError        an Optuna / Hydra release without a private API newllm.sweep.compat wraps

"""

from __future__ import annotations

import sys
from typing import NoReturn


class NewllmError(Exception):
    """Base class: caught at the CLI and printed as a single line."""


class ConfigError(NewllmError, ValueError):
    """A config value outside what newllm allows (one clear line, raised before any work).

    Also a ValueError: callers (and tests) that validated configs before the error contract caught that."""


class FolderOwned(ConfigError):
    """A sweep folder or job folder that belongs to another study (or to no study)."""


class DataError(NewllmError):
    """Bad or insufficient input data (missing file, empty corpus, too few tokens...)."""


class TrainingError(NewllmError):
    """Training cannot go on (a NaN loss, for instance)."""


class ResourceError(NewllmError):
    """The run needs more memory than the device has."""


class CheckpointError(NewllmError):
    """A checkpoint that is missing, truncated, foreign, or does not fit the current run."""


class RunFolderError(NewllmError):
    """The run folder asked for is taken (or cannot be made), or the run to resume is still running."""


class OutputError(NewllmError, OSError):
    """A file or folder newllm cannot write: the disk is full, the file system read-only, no permission.

    Also an OSError, which the write raised before the error contract."""


class PretrainedError(NewllmError):
    """A pretrained model that cannot be fetched or does not fit this model."""


class GenerationError(NewllmError, ValueError):
    """A sampling request the model cannot serve (an empty prompt, more positions than model.max_len).

    Also a ValueError, which `generate` raised before the error contract."""


class AnalysisError(NewllmError):
    """Nothing to analyse (missing folder, no runs, unknown study, unreadable file...)."""


class ScalingError(NewllmError):
    """Too few or unusable points for a power-law fit."""


class SweepAborted(NewllmError):
    """Too many failed trials (every result was stored before this was raised)."""


class JobDied(NewllmError):
    """A cluster job that ended without a result (cancelled, killed, out of time or memory, node failure): its
    trial's fail_reason (hydra_plugins/newllm_sweeper/launcher.py)."""


class CompatError(NewllmError, ImportError):
    """An installed Optuna or Hydra lacks a private API that newllm.sweep.compat wraps (the message names the
    package, the version found and the version range newllm is tested with).

    Also an ImportError: Hydra's plugin scanner then skips the newllm sweeper with this message as a
    warning, instead of failing every run (sweep or not) at start-up."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """A wrapped library error in one line: `Type: first line of its message` (`Type` when it has none),
    that line cut to `limit` characters if given."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__


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
