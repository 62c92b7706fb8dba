"""Errors newllm reports as one clear line (the bad value and what is allowed)."""


class NewllmError(Exception):
    """Base class: caught at the CLI and printed as a single line."""


class DataError(NewllmError):
    """Bad or insufficient input data (missing file, empty corpus, too few tokens...)."""


class TrainingError(NewllmError):
    """Training cannot go on (a NaN loss, for instance)."""
