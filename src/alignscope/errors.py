"""Exceptions the command line reports as plain errors (no torch import here: the CLI loads it)."""


class MissingExtraError(ImportError):
    """An optional dependency (a pyproject extra, e.g. ``alignscope[gguf]``) is not installed."""
