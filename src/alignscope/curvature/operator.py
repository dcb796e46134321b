"""The linear-operator protocol shared by the curvature operators, eigensolvers and traces.

A :class:`LinearOperator` is a square symmetric ``P x P`` matrix known only through products:
``matvec(v)`` for one vector ``[P]`` and ``matmat(V)`` for several columns ``[P, k]``. The Fisher
and Hessian operators implement ``matmat`` by pushing the columns through one vmapped pass;
eigensolvers and trace estimators take the protocol and nothing else, so a new operator (a
prefix-cached one, a distributed one) works with all of them by implementing five members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric ``P x P`` operator known through its products.

    Attributes:
        shape: ``(P, P)``.
        dtype: the precision products are computed in; inputs are cast to it.
        device: where products are computed; inputs and outputs live there.
    """

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``[P]``."""
        ...

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V`` of shape ``[P, k]`` (column ``j`` is ``A V[:, j]``)."""
        ...


@runtime_checkable
class FactorSource(Protocol):
    """An operator ``F = E[R^T R]`` that can draw Monte-Carlo factor rows ``R`` (the Gram route).

    ``n_examples`` rows come from each draw per example.
    """

    @property
    def n_examples(self) -> int: ...

    def mc_factor_rows(
        self,
        samples_per_example: int = 1,
        generator: torch.Generator | None = None,
        memory_budget: int = ...,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``[n_examples * samples_per_example, P]`` rows with ``E[R^T R] = F``."""
        ...


def check_matmat_input(op: LinearOperator, vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` cast to the operator's dtype and device, after checking it is ``[P, k]``."""
    if vectors.dim() != 2 or vectors.shape[0] != op.shape[1]:
        raise ValueError(
            f"matmat takes a [P, k] matrix with P = {op.shape[1]}, got {tuple(vectors.shape)}"
        )
    return vectors.to(device=op.device, dtype=op.dtype)


def stacked_matvecs(op: LinearOperator, vectors: torch.Tensor) -> torch.Tensor:
    """``A V`` one column at a time: the reference for, and fallback of, a batched ``matmat``."""
    vectors = check_matmat_input(op, vectors)
    if vectors.shape[1] == 0:
        return vectors.clone()
    return torch.stack([op.matvec(vectors[:, j]) for j in range(vectors.shape[1])], dim=1)


class ParameterOperator:
    """Shape, dtype and device of an operator on the flat parameter vector ``self.theta``
    (the Fisher and the Hessian share them)."""

    theta: torch.Tensor

    @property
    def dim(self) -> int:
        return self.theta.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device


class DenseOperator:
    """An explicit symmetric matrix as a :class:`LinearOperator` (tests, small problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n_products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.matrix.shape[0]), int(self.matrix.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_products += 1
        return self.matrix @ v.to(device=self.device, dtype=self.dtype)

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = check_matmat_input(self, vectors)
        self.n_products += vectors.shape[1]
        return self.matrix @ vectors


class CallableOperator:
    """A matvec function as a :class:`LinearOperator`; ``matmat`` multiplies column by column.

    For operators that only exist as a function (a baseline in a benchmark, a closed-form test
    matrix); the curvature operators implement ``matmat`` themselves.
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        self._matvec, self.dim = matvec, int(dim)
        self._dtype, self._device = dtype, torch.device(device)
        self.n_products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n_products += 1
        return self._matvec(v.to(device=self.device, dtype=self.dtype))

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return stacked_matvecs(self, vectors)


class BlockOperator:
    """The diagonal block ``A[index, index]`` of an operator: products embed the block vector in
    the full space, apply ``A`` and keep the block's rows (never the cross-block coupling)."""

    def __init__(self, op: LinearOperator, index: torch.Tensor) -> None:
        self.op, self.index = op, index.to(op.device)

    @property
    def shape(self) -> tuple[int, int]:
        n = int(self.index.numel())
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.shape[1], dtype=self.dtype, device=self.device)
        full[self.index] = v.to(device=self.device, dtype=self.dtype)
        return self.op.matvec(full)[self.index]

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = check_matmat_input(self, vectors)
        full = torch.zeros(
            (self.op.shape[1], vectors.shape[1]), dtype=self.dtype, device=self.device
        )
        full[self.index] = vectors
        return self.op.matmat(full)[self.index]


def require_operator(op: object, who: str) -> LinearOperator:
    """``op`` itself when it implements :class:`LinearOperator`, else a TypeError saying how."""
    if not isinstance(op, LinearOperator):
        raise TypeError(
            f"{who} takes a LinearOperator (shape, dtype, device, matvec, matmat), got "
            f"{type(op).__name__}: wrap a matrix in DenseOperator or a function in "
            "CallableOperator"
        )
    return op
