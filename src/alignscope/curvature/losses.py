"""Alignment losses over response positions: the KL from a frozen reference, and the refusal NLL.

The KL ``KL(pi_ref || pi_theta)`` per response token, averaged per example and then over
examples, is the default alignment ("utility") loss: at the reference its gradient is exactly
zero and its Hessian exactly the Fisher / Gauss-Newton matrix of the softmax outputs.
"""

from __future__ import annotations

import torch

from alignscope.curvature.functional import FunctionalLM, ResponsePositions
from alignscope.data.encode import LMBatch

__all__ = ["REFERENCES", "AlignmentKL", "ResponsePositions"]


REFERENCES = ("recompute", "table")


class AlignmentKL:
    """Mean per-token ``KL(pi_ref || pi_theta)`` over the response positions of a batch.

    The reference distribution is the model at ``flm.theta0`` (the aligned model).

    Args:
        flm: the model as a function of the selected parameters.
        batch: the (prompt, response) examples whose response positions the KL averages over.
        reference: ``"recompute"`` (default) evaluates the reference at ``flm.theta0`` in a
            no-grad forward pass inside every call, so nothing vocabulary-sized stays resident;
            ``"table"`` stores its ``[positions, vocabulary]`` log-probabilities once (about
            2 GB in float32 for 64 prompts x 64 tokens x a 128k vocabulary) and saves that
            forward pass. Both give the same value and gradient: the reference is a constant of
            the loss either way (the same forward pass at the same ``theta0``).

    Raises:
        ValueError: an unknown ``reference``.
    """

    def __init__(self, flm: FunctionalLM, batch: LMBatch, reference: str = "recompute") -> None:
        if reference not in REFERENCES:
            raise ValueError(f"unknown KL reference {reference!r}; use recompute or table")
        self.flm = flm
        self.batch = batch
        self.reference = reference
        self.positions = ResponsePositions(batch, flm.dtype)
        self._table = self._reference_logprobs() if reference == "table" else None

    def _reference_logprobs(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.position_logits(self.flm.theta0), dim=-1)

    @property
    def ref_logprobs(self) -> torch.Tensor:
        """``[N, V]`` reference log-probabilities: the stored table, or computed now."""
        return self._table if self._table is not None else self._reference_logprobs()

    def position_logits(self, theta: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` logits at the response positions (a recognised head projects only
        those: :meth:`FunctionalLM.position_logits`)."""
        return self.flm.position_logits(theta, self.batch.input_ids, self.positions.mask)

    def _token_kl(self, logq: torch.Tensor) -> torch.Tensor:
        ref = self.ref_logprobs
        return (ref.exp() * (ref - logq)).sum(dim=-1)

    def per_position(self, theta: torch.Tensor) -> torch.Tensor:
        """``[N]`` token KL at each response position."""
        return self._token_kl(torch.log_softmax(self.position_logits(theta), dim=-1))

    def per_example(self, theta: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean token KL of each example."""
        return self.positions.per_example(self.per_position(theta)) * self.batch.size

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """The scalar alignment loss."""
        return (self.per_position(theta) * self.positions.weights).sum()

    def with_nll(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(KL, NLL of the batch's responses)`` from one forward pass at ``theta``; the NLL
        equals ``flm.mean_nll(theta, batch)`` (mean over examples of the token mean)."""
        logq = torch.log_softmax(self.position_logits(theta), dim=-1)
        kl = self._token_kl(logq)
        targets = self.batch.targets[self.positions.mask]
        nll = -logq.gather(-1, targets[:, None]).squeeze(-1)
        w = self.positions.weights
        return (kl * w).sum(), (nll * w).sum()
