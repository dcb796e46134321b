"""Exceptions the command line reports as plain errors (no torch import here: the CLI loads it)."""


class MissingExtraError(ImportError):
    """An optional dependency (a pyproject extra, e.g. ``alignscope[gguf]``) is not installed."""


class RankFailure(RuntimeError):
    """Another rank of the ``torch.distributed`` process group raised; ``str()`` carries its
    message (:func:`alignscope.distributed.guard`)."""

    def __init__(self, rank: int, kind: str, message: str) -> None:
        super().__init__(f"rank {rank} failed: {kind}: {message}")
        self.rank, self.kind, self.message = rank, kind, message
