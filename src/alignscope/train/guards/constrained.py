"""``constrained-sft``: the token-wise constrained fine-tuning objective of Qi et al. 2024
("Safety Alignment Should Be Made More Than Just a Few Tokens Deep", arXiv:2406.05946).

Per response position ``t`` (1-based) with ``r_t = log pi_theta(y_t) - log pi_theta0(y_t)``, the
objective ``(2 / beta_t) log(1 + exp(beta_t r_t))``-type constraint has gradient
``w_t x grad NLL_t`` with ``w_t = 2 (1 - sigmoid(beta_t r_t))`` (detached): ``w = 1`` at the
aligned model, and a token whose probability has already risen above the aligned model's stops
being pushed. ``beta_t``: ``beta x first_factor`` at t = 1, ``beta x bias_factor`` for
``t = 2..bias_length``, ``beta`` after (the paper's repository: beta = 0.1, factors 5 and 20,
length 5, i.e. 0.5, 2, 2, 2, 2, 0.1, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from alignscope import distributed as dist
from alignscope.data.encode import LMBatch
from alignscope.train.guards.base import Guard, Reference, at_least_float32


def position_betas(
    n: int, beta: float = 0.1, first_factor: float = 5.0, bias_factor: float = 20.0,
    bias_length: int = 5,
) -> torch.Tensor:  # fmt: skip
    """``[n]`` betas of response positions 1..n."""
    out = torch.full((n,), float(beta), dtype=torch.float64)
    out[1:bias_length] = beta * bias_factor
    if n:
        out[0] = beta * first_factor
    return out


def constrained_weights(log_ratio: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """``2 (1 - sigmoid(beta_t r_t))`` elementwise (``betas`` broadcast against the ratios)."""
    return 2.0 * (1.0 - torch.sigmoid(betas.to(log_ratio) * log_ratio))


def response_index(batch: LMBatch) -> torch.Tensor:
    """``[B, T-1]`` 0-based index of each predicting position within its response (-1 outside)."""
    mask = batch.target_mask.long()
    return torch.where(mask.bool(), mask.cumsum(dim=1) - 1, torch.full_like(mask, -1))


class ConstrainedSFTGuard(Guard):
    """Token-wise constrained SFT: the task NLL reweighted per response position."""

    name = "constrained-sft"
    changes_loss = True

    def __init__(self, beta: float = 0.1, first_factor: float = 5.0, bias_factor: float = 20.0,
                 bias_length: int = 5) -> None:  # fmt: skip
        super().__init__()
        if beta <= 0:
            raise ValueError("--csft-beta must be positive")
        self.beta, self.first_factor = float(beta), float(first_factor)
        self.bias_factor, self.bias_length = float(bias_factor), int(bias_length)

    def settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "first_factor": self.first_factor,
                "bias_factor": self.bias_factor, "bias_length": self.bias_length}  # fmt: skip

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        super().setup(model, selection, safety_batch, subspace)
        self.reference = Reference(model, selection)

    def weights_from(self, batch: LMBatch, logprobs, ref_logprobs) -> torch.Tensor:
        """The weights from the live and reference log-probabilities of the targets."""
        index = response_index(batch)
        betas = position_betas(int(index.max()) + 1 if index.numel() else 0, self.beta,
                               self.first_factor, self.bias_factor, self.bias_length)  # fmt: skip
        b = torch.zeros(index.shape, dtype=torch.float64)
        inside = index >= 0
        b[inside] = betas[index[inside].cpu()]
        w = constrained_weights((logprobs - ref_logprobs).double(), b.to(logprobs.device))
        return torch.where(inside.to(w.device), w, torch.zeros_like(w)).to(logprobs.dtype)

    def token_weights(self, batch, logprobs) -> torch.Tensor:
        logits = at_least_float32(self.reference.batch_logits(batch, self.prefix)[:, :-1])
        ref = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
        w = self.weights_from(batch, logprobs, ref)
        mask = batch.target_mask
        if self.sharded:
            # ``batch`` is this rank's shard: the weights are per token, so its weights are the
            # batch's; their mean is over the whole batch's tokens
            total = dist.all_reduce_float(float(w[mask].double().sum()))
            count = dist.all_reduce_float(float(mask.sum()))
            self._signals = {"mean_weight": total / count if count else None}
        else:
            self._signals = {"mean_weight": float(w[mask].mean()) if bool(mask.any()) else None}
        return w.detach()
