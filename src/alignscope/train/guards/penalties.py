"""Loss-term guards: ``fisher`` (EWC on the alignment Fisher's diagonal) and ``anchor`` (the
alignment KL on safety prompts). docs/guard.md."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from alignscope import distributed as dist
from alignscope.curvature.fisher import FisherOperator
from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.losses import ResponsePositions
from alignscope.train.guards.base import (
    Guard,
    Reference,
    at_least_float32,
    read_theta,
    safety_fisher,
)
from alignscope.train.prefix import lm_logits

DIAG_METHODS = ("auto", "exact", "mc")
EXACT_MAX = 4096  # parameters up to which ``auto`` takes the exact diagonal (one product each)


def fisher_diagonal(
    op: FisherOperator, method: str = "mc", samples: int = 8, seed: int = 0, block: int = 64
) -> torch.Tensor:
    """The diagonal of the alignment Fisher ``F``.

    ``exact``: ``F_ii = e_i^T F e_i`` from exact forms, ``block`` unit vectors per batched pass
    (``P`` forward-mode products: small selections). ``mc``: the mean over ``samples`` draws of
    the squared Monte-Carlo factor rows (scores of tokens sampled from the model's own softmax),
    unbiased because ``E[R^T R] = F`` (docs/theory.md, "Computing the spectrum").
    """
    if method not in ("exact", "mc"):
        raise ValueError(f"Fisher diagonal method {method!r}: use exact or mc")
    p = op.dim
    if method == "exact":
        out = torch.empty(p, dtype=op.dtype, device=op.device)
        for s in range(0, p, block):
            idx = torch.arange(s, min(p, s + block), device=op.device)
            units = torch.zeros((idx.numel(), p), dtype=op.dtype, device=op.device)
            units[torch.arange(idx.numel()), idx] = 1.0
            out[idx] = op.quad_diag(units)
        return out
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(p, dtype=op.dtype, device=op.device)
    for _ in range(samples):  # one draw at a time: rows [B, P], not [B x samples, P]
        out += op.mc_factor_rows(1, generator=gen).square().sum(dim=0)
    return out / samples


class FisherGuard(Guard):
    """``fisher`` (EWC): ``lambda / 2 sum_i F_ii delta_i^2`` added to each step's loss; with
    ``rank = d > 0``, the diagonal-plus-low-rank Fisher instead (docs/guard.md, "fisher"):

        lambda / 2 (delta^T U S U^T delta + sum_i r_i delta_i^2),
        r_i = max(F_ii - sum_j S_j U_ij^2, 0),

    ``U``, ``S`` the top-``d`` eigenpairs of ``F``: exact on the top-``d`` subspace's part of
    ``F`` and equal to ``F`` on the diagonal (``r`` is the diagonal of ``F - U S U^T``)."""

    name = "fisher"
    changes_loss = True

    def __init__(self, lam: float = 1.0, method: str = "auto", samples: int = 8, rank: int = 0,
                 memory_budget: int = 2 * 2**30) -> None:  # fmt: skip
        super().__init__()
        if lam < 0:
            raise ValueError("--ewc-lambda must be >= 0")
        if method not in DIAG_METHODS:
            raise ValueError(f"--fisher-diag {method!r}: use {', '.join(DIAG_METHODS)}")
        if rank < 0:
            raise ValueError("--fisher-rank must be >= 0")
        self.lam, self.method, self.samples = float(lam), method, int(samples)
        self.rank, self.memory_budget = int(rank), int(memory_budget)
        self.basis: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def settings(self) -> dict[str, Any]:
        return {"lambda": self.lam, "diag": self.method, "samples": self.samples,
                "rank": self.rank}  # fmt: skip

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        from alignscope.curvature.spectrum import fisher_eigs
        from alignscope.train.guards.projection import (
            check_basis_memory,
            orthonormal,
            subspace_basis,
        )

        super().setup(model, selection, safety_batch, subspace)
        if safety_batch is None:
            raise ValueError("guard 'fisher' needs the safety batch (its Fisher)")
        method = self.method
        if method == "auto":
            method = "exact" if selection.size <= EXACT_MAX else "mc"
        if self.rank:
            itemsize = next(iter(selection.tensors(model).values())).element_size()
            check_basis_memory(selection.size, self.rank, itemsize, self.memory_budget,
                               "guard 'fisher' (--fisher-rank)")  # fmt: skip
        was = model.training
        try:
            op = safety_fisher(FunctionalLM(model, selection), safety_batch, None, self.sharded)
            diag = fisher_diagonal(op, method, self.samples).detach()
            if self.rank:
                basis, values = None, None
                if subspace is not None:  # the diagnosis' eigenpairs, when it has enough
                    vecs = subspace_basis(subspace, None)
                    if vecs[1] is not None and vecs[0].shape[1] >= self.rank:
                        basis, values = subspace_basis(subspace, self.rank)
                if basis is None:
                    eig, _ = fisher_eigs(op, self.rank, method="auto",
                                         memory_budget=self.memory_budget)  # fmt: skip
                    basis, values = eig.vectors[:, : self.rank], eig.values[: self.rank]
                self.basis = orthonormal(basis.detach().to(diag))
                self.values = values.detach().to(diag).clamp_min(0.0)
                # the diagonal of F - U S U^T (>= 0 for exact F; clamped against MC noise)
                diag = (diag - self.basis.square() @ self.values).clamp_min(0.0)
        finally:
            model.train(was)
        self.diag = diag
        self.method_used = method
        self.theta0 = read_theta(model, selection)

    def penalty(self, theta: torch.Tensor) -> torch.Tensor:
        """The penalty at the flat parameters ``theta`` (differentiable)."""
        delta = theta - self.theta0.to(theta)
        quad = (self.diag.to(theta) * delta.square()).sum()
        if self.basis is not None:
            coeff = self.basis.to(theta).T @ delta
            quad = quad + (self.values.to(theta) * coeff.square()).sum()
        return 0.5 * self.lam * quad

    def extra_loss(self, model, step) -> torch.Tensor | None:
        penalty = self.penalty(self.selection.flatten(self.selection.tensors(model)))
        self._signals = {"penalty": float(penalty.detach())}
        if self.sharded and not dist.is_main():
            # a function of the weights alone, the same on every rank: the gradients are
            # summed over the ranks, so it is added once, on rank 0
            return None
        return penalty


class AnchorGuard(Guard):
    """``anchor``: ``beta x`` the alignment KL from theta0 on a minibatch of safety prompts,
    added to every step's loss (safety replay)."""

    name = "anchor"
    changes_loss = True

    def __init__(self, beta: float = 1.0, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError("--anchor-beta must be >= 0")
        if batch_size < 1:
            raise ValueError("--guard-examples must be at least 1")
        self.beta, self.batch_size = float(beta), int(batch_size)
        self.gen = torch.Generator().manual_seed(seed)

    def settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "batch_size": self.batch_size}

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        super().setup(model, selection, safety_batch, subspace)
        if safety_batch is None:
            raise ValueError("guard 'anchor' needs the safety batch")
        self.safety = safety_batch
        self.reference = Reference(model, selection)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])

    def kl(self, model, batch, n_total: int | None = None) -> torch.Tensor:
        """Mean over examples of the per-token ``KL(pi_theta0 || pi_theta)`` on ``batch``
        (``n_total``: the size of the whole minibatch when ``batch`` is a rank's shard of it;
        the shard's share of its mean)."""
        device = next(model.parameters()).device
        batch = batch.to(device)
        pos = ResponsePositions(batch, torch.float64, n_total=n_total)
        ref = torch.log_softmax(
            at_least_float32(pos.gather(self.reference.batch_logits(batch, self.prefix))), -1
        )
        logq = F.log_softmax(at_least_float32(pos.gather(lm_logits(model, batch, self.prefix))), -1)
        per_pos = (ref.exp() * (ref - logq)).sum(-1)
        return (per_pos * pos.weights.to(per_pos)).sum()

    def extra_loss(self, model, step) -> torch.Tensor:
        n = self.safety.size
        idx = torch.randperm(n, generator=self.gen)[: min(self.batch_size, n)]
        minibatch = self.safety.select(idx.sort().values)
        if not self.sharded:
            kl = self.kl(model, minibatch)
            self._signals = {"anchor_kl": float(kl.detach())}
            return self.beta * kl
        # every rank draws the same minibatch (the same generator) and replays its shard of it
        mine = dist.shard_batch(minibatch, "safety prompts of the anchor's minibatch "
                                "(--guard-examples)")  # fmt: skip
        kl = self.kl(model, mine, n_total=minibatch.size)
        self._signals = {"anchor_kl": dist.all_reduce_float(float(kl.detach()))}
        return self.beta * kl
