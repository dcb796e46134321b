"""Projection guards: ``project`` (the subspace of theta0) and ``project-tracking`` (re-estimated
at the current weights). docs/guard.md, "project" and "project-tracking".

Both remove from each update ``u = theta_after - theta_before`` (the optimizer's whole step:
momentum, Adam's preconditioning, weight decay) its component in ``span(U)``:
``u <- u - U (U^T u)``. With ``U`` fixed at theta0 and ``U^T delta_0 = 0`` this keeps
``U^T delta = 0`` after every step, to round-off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignscope.curvature.eigen import EigenResult
from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.operator import LinearOperator, require_operator
from alignscope.curvature.spectrum import fisher_eigs
from alignscope.data.encode import LMBatch
from alignscope.params import ParamSelection
from alignscope.train.guards.base import Guard, read_theta, safety_fisher, write_theta

DEFAULT_MEMORY_BUDGET = 2 * 2**30


def orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``basis``'s (QR; exact projections need ``U^T U = I``)."""
    q, _ = torch.linalg.qr(basis)
    return q


def subspace_basis(subspace: Any, d: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(basis [P, d], eigenvalues [d] or None)`` from a :class:`~alignscope.geometry.Subspace`,
    a ``(basis, values)`` pair or a bare ``[P, k]`` tensor."""
    if isinstance(subspace, torch.Tensor):
        vectors, values = subspace, None
    elif isinstance(subspace, tuple | list):
        vectors, values = subspace
    else:
        vectors, values = getattr(subspace, "vectors", None), getattr(subspace, "values", None)
    if vectors is None:
        raise ValueError(
            "the subspace holds no eigenvectors (a results.json read without its subspace.pt); "
            "pass the diagnosis directory or let the guard compute the subspace"
        )
    d = vectors.shape[1] if d is None else d
    if not 1 <= d <= vectors.shape[1]:
        raise ValueError(f"guard rank {d} outside 1..{vectors.shape[1]} (the subspace's vectors)")
    return vectors[:, :d], None if values is None else values[:d]


def check_basis_memory(dim: int, d: int, itemsize: int, budget: int, what: str) -> None:
    """Refuse a basis that does not fit the memory budget (before training)."""
    need = dim * d * itemsize
    if need > budget:
        raise MemoryError(
            f"{what}: a {d}-dimensional subspace of {dim:,} parameters needs "
            f"{need / 2**30:.2f} GiB, over the budget of {budget / 2**30:.2f} GiB; guard fewer "
            "parameters (--params lora or glob patterns), lower --guard-rank or raise --memory-gb"
        )


def warm_block_eigs(
    op: LinearOperator,
    start: torch.Tensor,
    k: int | None = None,
    *,
    max_blocks: int = 4,
    tol: float = 1e-8,
) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator by block Lanczos started from ``start``.

    The Krylov space ``span[S, A S, A^2 S, ...]`` of the start block ``S`` ``[P, b]`` is built a
    block at a time (one ``matmat`` each) with full reorthogonalisation, and the Ritz pairs of
    ``A`` on it are taken (Rayleigh-Ritz); it stops when every wanted pair has residual
    ``|A x - l x| <= tol * l_1`` or after ``max_blocks`` blocks. Started from the previous basis
    (the subspace a few optimizer steps earlier), it needs far fewer products than a cold start.
    """
    op = require_operator(op, "warm_block_eigs")
    k = start.shape[1] if k is None else k
    basis = [orthonormal(start.to(op.dtype))]
    products = [op.matmat(basis[0])]
    n_products = basis[0].shape[1]
    converged = False
    while True:
        v, av = torch.cat(basis, 1), torch.cat(products, 1)
        t = v.T @ av
        vals, vecs = torch.linalg.eigh((t + t.T) / 2)
        order = torch.argsort(vals, descending=True)[:k]
        vals, vecs = vals[order], vecs[:, order]
        x, ax = v @ vecs, av @ vecs
        res = (ax - x * vals).norm(dim=0)
        scale = max(float(vals[0].abs()), 1e-300)
        if bool((res <= tol * scale).all()) or v.shape[1] >= op.shape[0]:
            converged = True
            break
        if len(basis) >= max_blocks:
            break
        w = products[-1]
        for _ in range(2):  # twice is enough (Kahan-Parlett) for full reorthogonalisation
            w = w - v @ (v.T @ w)
        q, r = torch.linalg.qr(w)
        keep = r.diagonal().abs() > 1e-10 * max(float(r.diagonal().abs().max()), 1e-300)
        if not bool(keep.any()):  # an invariant subspace: the Ritz pairs are exact
            converged = True
            break
        q = q[:, keep]
        basis.append(q)
        products.append(op.matmat(q))
        n_products += q.shape[1]
    return EigenResult(
        vals.clamp_min(0.0), x, "warm-block-lanczos", n_products, res, converged=converged
    )


class ProjectGuard(Guard):
    """``project``: every update loses its component in the top-``d`` alignment subspace of
    theta0 (docs/guard.md). Needs a subspace, or computes one at setup (exact Fisher, Lanczos)."""

    name = "project"

    def __init__(self, rank: int = 20, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("--guard-rank must be at least 1")
        self.rank = rank
        self.memory_budget = int(memory_budget)
        self.basis: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._before: torch.Tensor | None = None
        self.theta0: torch.Tensor | None = None

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def _fresh_subspace(
        self, model: nn.Module, selection: ParamSelection, batch: LMBatch, theta=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        was = model.training
        try:
            op = safety_fisher(FunctionalLM(model, selection), batch, theta, self.sharded)
            # Lanczos when its Krylov basis fits the budget, else the Gram route, else MemoryError
            eig, _ = fisher_eigs(op, self.rank, method="auto", memory_budget=self.memory_budget)
        finally:
            model.train(was)
        return eig.vectors, eig.values

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        super().setup(model, selection, safety_batch, subspace)
        p = selection.size
        itemsize = next(iter(selection.tensors(model).values())).element_size()
        check_basis_memory(p, self.rank, itemsize, self.memory_budget, f"guard {self.name!r}")
        if subspace is not None:
            basis, values = subspace_basis(subspace, self.rank)
        else:
            if safety_batch is None:
                raise ValueError(f"guard {self.name!r} needs a subspace or a safety batch")
            basis, values = self._fresh_subspace(model, selection, safety_batch)
        if basis.shape[0] != p:
            raise ValueError(f"the subspace has {basis.shape[0]} rows, the selection {p}")
        self.theta0 = read_theta(model, selection)
        self.basis = orthonormal(basis.to(self.theta0))
        self.values = values
        self.safety_batch = safety_batch

    def before_step(self, model, step) -> None:
        self._before = read_theta(model, self.selection)

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u - U U^T u, U^T u)``."""
        coeff = self.basis.T @ u
        return u - self.basis @ coeff, coeff

    def after_step(self, model, step) -> None:
        u = read_theta(model, self.selection) - self._before
        kept, coeff = self.project(u)
        write_theta(model, self.selection, self._before + kept)
        norm = float(u.norm())
        self._signals = {
            "removed_fraction": float(coeff.norm()) / norm if norm > 0 else 0.0,
            "update_norm": norm,
        }


class TrackingGuard(ProjectGuard):
    """``project-tracking``: as ``project``, with the subspace re-estimated at the current
    weights by block Lanczos warm-started from the previous basis, every ``every`` steps
    (0: never on a schedule) and whenever the drift signal has moved: the weights have gone
    ``|theta - theta_last| >= drift |theta0|`` from where the basis was last estimated
    (``drift=None``: the schedule only). Every re-estimation is kept in :attr:`estimates`
    (step, reason, rotation, products)."""

    name = "project-tracking"

    def __init__(
        self,
        rank: int = 20,
        every: int = 10,
        max_blocks: int = 4,
        tol: float = 1e-6,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        drift: float | None = None,
    ) -> None:
        super().__init__(rank, memory_budget)
        if every < 0:
            raise ValueError("--track-every must be >= 0")
        if drift is not None and not drift > 0:
            raise ValueError("--track-drift must be positive")
        if every == 0 and drift is None:
            raise ValueError("--track-every 0 re-estimates only on drift: pass --track-drift")
        self.every, self.max_blocks, self.tol, self.drift = every, max_blocks, tol, drift
        self.n_estimates = 0
        self.rotation: float | None = None
        self.estimates: list[dict[str, Any]] = []
        self.moved: float = 0.0  # |theta - theta_last| / |theta0| before the current step
        self.theta_last: torch.Tensor | None = None

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "every": self.every, "drift": self.drift,
                "max_blocks": self.max_blocks}  # fmt: skip

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        if safety_batch is None:
            raise ValueError("guard 'project-tracking' needs the safety batch (re-estimation)")
        itemsize = next(iter(selection.tensors(model).values())).element_size()
        # the block Krylov space holds up to max_blocks blocks and their products
        check_basis_memory(selection.size, 2 * self.max_blocks * self.rank, itemsize,
                           self.memory_budget, "guard 'project-tracking'")  # fmt: skip
        super().setup(model, selection, safety_batch, subspace)
        was = model.training
        self.flm = FunctionalLM(model, selection)
        model.train(was)
        self.theta_last = self.theta0.clone()
        self.theta0_norm = max(float(self.theta0.double().norm()), 1e-300)

    def reestimate(self, model: nn.Module, step: int | None = None, reason: str = "manual"
                   ) -> EigenResult:  # fmt: skip
        """The top-``d`` Fisher eigenpairs at the current weights, warm-started."""
        theta = read_theta(model, self.selection)
        was = model.training
        try:
            op = safety_fisher(self.flm, self.safety_batch, theta, self.sharded)
            eig = warm_block_eigs(op, self.basis, self.rank, max_blocks=self.max_blocks,
                                  tol=self.tol)  # fmt: skip
        finally:
            model.train(was)
        new = orthonormal(eig.vectors.to(self.basis))
        overlap = float((self.basis.T @ new).square().sum()) / self.rank
        self.rotation = 1.0 - overlap  # 0: the same subspace, 1: orthogonal to the old one
        self.basis, self.values = new, eig.values
        self.n_estimates += 1
        self.theta_last = theta
        self.estimates.append({"step": step, "reason": reason, "rotation": self.rotation,
                               "moved": self.moved, "products": eig.n_products,
                               "converged": eig.converged})  # fmt: skip
        return eig

    def state_dict(self) -> dict[str, Any]:
        return {"basis": self.basis, "values": self.values, "estimates": self.n_estimates,
                "rotation": self.rotation, "theta_last": self.theta_last,
                "log": [dict(e) for e in self.estimates]}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.basis, self.values = state["basis"], state["values"]
        self.n_estimates, self.rotation = state["estimates"], state["rotation"]
        if state.get("theta_last") is not None:
            self.theta_last = state["theta_last"]
        self.estimates = [dict(e) for e in state.get("log", [])]

    def due(self, step: int, theta: torch.Tensor) -> str | None:
        """Why the subspace is re-estimated before update ``step`` (``every`` or ``drift``), or
        None."""
        self.moved = float((theta - self.theta_last).double().norm()) / self.theta0_norm
        if step > 0 and self.every and step % self.every == 0:
            return "every"
        if step > 0 and self.drift is not None and self.moved >= self.drift:
            return "drift"
        return None

    def before_step(self, model, step) -> None:
        super().before_step(model, step)  # reads theta before the update into self._before
        reason = self.due(step, self._before)
        if reason is not None:
            self.reestimate(model, step, reason)

    def after_step(self, model, step) -> None:
        super().after_step(model, step)
        self._signals.update({"estimates": self.n_estimates, "rotation": self.rotation,
                              "moved": self.moved})  # fmt: skip

    def record(self) -> dict[str, Any]:
        """Every re-estimation: the update (0-based) it came before, why (``every``/``drift``),
        the rotation of the subspace, the drift at that point and the Fisher products spent."""
        return {"reestimations": [dict(e) for e in self.estimates]}
