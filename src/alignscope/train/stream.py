"""The fine-tuning set as training consumes it: encoded, fitted to the context, in seeded batches.

verify's real run, rank's lookahead and the fine-tuning loop read their data through one
:class:`TrainingStream`, so every command that trains fits examples the same way (responses cut,
over-long prompts dropped with a count, as diagnose fits its batches) and sees the same batch
order for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from alignscope.data.encode import EncodedPair, Fit, LMBatch, collate, encode_pairs, fit_to_length


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """An endless deterministic stream of minibatch indices (epochs of seeded permutations)."""
    gen = torch.Generator().manual_seed(seed)
    buf: list[int] = []
    while True:
        while len(buf) < batch_size:
            buf.extend(torch.randperm(n, generator=gen).tolist())
        yield buf[:batch_size]
        buf = buf[batch_size:]


@dataclass
class TrainingStream:
    """Encoded examples and the seeded order in which training draws them in batches.

    ``fit`` records what fitting to ``max_length`` did (None when the examples were passed
    already encoded and unfitted).
    """

    examples: list[EncodedPair] = field(repr=False)
    batch_size: int
    seed: int
    max_length: int | None = None
    pad_id: int = 0
    fit: Fit | None = None

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("cannot fine-tune on an empty dataset")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, start_step: int = 0) -> Iterator[LMBatch]:
        """The endless stream of collated minibatches; the first ``start_step`` are skipped
        unseen, so a resumed run sees the batches an uninterrupted one would."""
        order = batch_indices(len(self.examples), self.batch_size, self.seed)
        for _ in range(start_step):
            next(order)
        for idx in order:
            yield collate(
                [self.examples[i] for i in idx], pad_id=self.pad_id, max_length=self.max_length
            )

    def summary(self) -> dict[str, int | None]:
        """How the set was fitted (examples, truncated, dropped), for results.json."""
        if self.fit is None:
            return {"max_length": self.max_length, "examples": len(self.examples)}
        return self.fit.summary()


def training_stream(
    tokenizer,
    rows: Sequence[Mapping[str, str] | tuple[str, str]],
    *,
    batch_size: int,
    seed: int,
    max_length: int | None,
    what: str = "fine-tuning set",
) -> TrainingStream:
    """Encode ``rows`` (``{"prompt", "response"}`` dicts or pairs) with the chat template, fit
    them into ``max_length`` and order them for training.

    Args:
        tokenizer: the model's tokenizer (with a chat template).
        rows: the whole fine-tuning set.
        batch_size: examples per step.
        seed: seed of the batch order.
        max_length: context length (None: no fitting).
        what: how errors name the set (e.g. its path).

    Returns:
        The stream; ``stream.fit`` says how many examples were cut or dropped.

    Raises:
        ValueError: the set is empty, or every prompt alone fills the context.
    """
    pairs = [(r["prompt"], r["response"]) if isinstance(r, Mapping) else tuple(r) for r in rows]
    if not pairs:
        raise ValueError(f"{what}: no examples to fine-tune on")
    try:
        encoded, fit = fit_to_length(encode_pairs(tokenizer, pairs), max_length)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TrainingStream(encoded, batch_size, seed, max_length, pad, fit)
