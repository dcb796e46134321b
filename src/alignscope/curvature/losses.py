"""Alignment losses over response positions: the KL from a frozen reference, and the refusal NLL.

The KL ``KL(pi_ref || pi_theta)`` per response token, averaged per example and then over
examples, is the default alignment ("utility") loss: at the reference its gradient is exactly
zero and its Hessian exactly the Fisher / Gauss-Newton matrix of the softmax outputs.
"""

from __future__ import annotations

import torch

from alignscope.curvature.functional import FunctionalLM, response_weights
from alignscope.data.encode import LMBatch


class ResponsePositions:
    """The response-predicting positions of a batch, flattened, with their loss weights.

    ``weights[n] = 1 / (B * n_b)`` for position ``n`` of example ``b`` (``B`` = ``n_total``):
    summing any per-position quantity against them gives the mean over examples of the
    per-example token mean.
    """

    def __init__(self, batch: LMBatch, dtype: torch.dtype, n_total: int | None = None) -> None:
        # n_total: the size of the whole batch when this is one chunk of it.
        self.batch = batch
        self.mask = batch.target_mask  # [B, T-1]
        w = response_weights(batch, dtype) / (n_total or batch.size)
        self.weights = w[self.mask]  # [N]
        self.example = torch.arange(batch.size)[:, None].expand_as(self.mask)[self.mask]  # [N]

    @property
    def count(self) -> int:
        return int(self.weights.numel())

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` logits at the response-predicting positions from ``[B, T, V]`` logits."""
        return logits[:, :-1, :][self.mask]


class AlignmentKL:
    """Mean per-token ``KL(pi_ref || pi_theta)`` over the response positions of a batch.

    The reference distribution is the model at ``flm.theta0`` (the aligned model), stored as
    log-probabilities at the response positions only.
    """

    def __init__(self, flm: FunctionalLM, batch: LMBatch) -> None:
        self.flm = flm
        self.batch = batch
        self.positions = ResponsePositions(batch, flm.dtype)
        with torch.no_grad():
            z0 = self.positions.gather(flm.logits(flm.theta0, batch.input_ids))
            self.ref_logprobs = torch.log_softmax(z0, dim=-1)

    def position_logits(self, theta: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` logits at the response positions."""
        return self.positions.gather(self.flm.logits(theta, self.batch.input_ids))

    def per_position(self, theta: torch.Tensor) -> torch.Tensor:
        """``[N]`` token KL at each response position."""
        logq = torch.log_softmax(self.position_logits(theta), dim=-1)
        p = self.ref_logprobs.exp()
        return (p * (self.ref_logprobs - logq)).sum(dim=-1)

    def per_example(self, theta: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean token KL of each example."""
        kl = self.per_position(theta) * self.positions.weights * self.batch.size
        out = torch.zeros(self.batch.size, dtype=kl.dtype, device=kl.device)
        return out.index_add(0, self.positions.example, kl)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """The scalar alignment loss."""
        return (self.per_position(theta) * self.positions.weights).sum()

    def with_nll(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(KL, NLL of the batch's responses)`` from one forward pass; the NLL equals
        ``flm.mean_nll(theta, batch)`` (mean over examples of the token mean)."""
        logq = torch.log_softmax(self.position_logits(theta), dim=-1)
        kl = (self.ref_logprobs.exp() * (self.ref_logprobs - logq)).sum(dim=-1)
        targets = self.batch.targets[self.positions.mask]
        nll = -logq.gather(-1, targets[:, None]).squeeze(-1)
        w = self.positions.weights
        return (kl * w).sum(), (nll * w).sum()
