"""Task performance of a fine-tuning run on a held-out split of its task.

:class:`TaskEval` holds held-out ``{"prompt", "response"}`` rows of the fine-tuning task and
measures a model on them: ``task_exact_match``, the fraction of greedy responses that match the
reference (a pluggable matcher; default: equal after whitespace normalisation), and ``task_nll``,
the mean over rows of each reference response's mean token NLL (the fine-tuning loss's
weighting), in evaluation mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from alignscope.data.encode import batch_rows
from alignscope.evaluate import generate

TaskMatch = Callable[[str, str, str], bool]


def exact_match(prompt: str, generated: str, reference: str) -> bool:
    """The generated response equals the reference after whitespace normalisation."""
    del prompt  # the reference alone decides
    return " ".join(generated.split()) == " ".join(reference.split())


class TaskEval:
    """Greedy exact match and response NLL of a model on held-out task rows."""

    def __init__(
        self,
        tokenizer,
        rows: Sequence[Mapping[str, str]],
        *,
        max_length: int | None = 256,
        max_new_tokens: int = 48,
        match: TaskMatch | None = None,
        chunk: int = 32,
    ) -> None:
        self.tokenizer = tokenizer
        self.rows = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
        if not self.rows:
            raise ValueError("held-out task split: no rows")
        self.match = match or exact_match
        self.max_new_tokens = max_new_tokens
        # chunks bound the memory of one forward pass on a real model
        self.batches = [
            batch_rows(tokenizer, self.rows[i : i + chunk], max_length, "held-out task split")
            for i in range(0, len(self.rows), chunk)
        ]

    @torch.no_grad()
    def nll(self, model: torch.nn.Module) -> float:
        """Mean over rows of the mean token NLL of the reference response."""
        from alignscope.train.loop import response_nll

        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch, fit in self.batches:
            batch = batch.to(device)
            n = len(fit.kept)
            total += float(response_nll(model, batch, "example")) * n
            count += n
        return total / count

    def exact_match(self, model: torch.nn.Module) -> float:
        """Fraction of greedy responses the matcher accepts."""
        prompts = [r["prompt"] for r in self.rows]
        got = generate(model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens)
        hits = [
            self.match(r["prompt"], g, r["response"]) for r, g in zip(self.rows, got, strict=True)
        ]
        return sum(hits) / len(hits)

    def measure(self, model: torch.nn.Module) -> dict[str, Any]:
        """``{"task_exact_match", "task_nll"}`` of ``model`` (left in its training mode)."""
        was_training = model.training
        model.eval()
        try:
            return {"task_exact_match": self.exact_match(model), "task_nll": self.nll(model)}
        finally:
            model.train(was_training)

    def summary(self) -> dict[str, Any]:
        return {"rows": len(self.rows), "kept": sum(len(f.kept) for _, f in self.batches),
                "max_new_tokens": self.max_new_tokens}  # fmt: skip
