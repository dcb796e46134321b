"""Baseline eigensolvers that bench/curvature.py compares the curvature engine against.

Only the bench uses these; they are not part of the alignscope package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PowerResult:
    """Output of :func:`pyhessian_power`, in the order the pairs were found."""

    values: torch.Tensor  # (k,) float64
    vectors: torch.Tensor  # (dim, k) float64, column j belongs to values[j]
    n_products: int
    iterations: list[int]  # operator products spent on each pair
    converged: list[bool]  # whether each pair met the tolerance before max_iter


def _orthnormal(w: torch.Tensor, found: list[torch.Tensor], eps: float) -> torch.Tensor:
    """PyHessian's ``orthnormal``: Gram-Schmidt against each found vector in turn, then
    ``w / (||w|| + eps)``."""
    for v in found:
        w = w - (w @ v) * v
    return w / (w.norm() + eps)


def pyhessian_power(
    matvec: MatVec,
    dim: int,
    k: int,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    op_dtype: torch.dtype = torch.float64,
    eps: float = 1e-6,
) -> PowerResult:
    """Top-``k`` eigenpairs by power iteration as PyHessian's ``hessian.eigenvalues()`` does it.

    Re-implemented from amirgholami/PyHessian, ``pyhessian/hessian.py`` (``eigenvalues``, commit
    00c4f3bc) and ``pyhessian/utils.py`` (``orthnormal``, ``normalization``, commit ef10b13a):
    for each pair, from a random normalised start, at most ``max_iter`` times:
    ``v <- orthnormal(v, found)``; ``Hv``; ``lam = Hv . v``; ``v <- Hv / (||Hv|| + eps)``; stop
    when ``|lam_prev - lam| / (|lam_prev| + 1e-6) < tol``. As there, the stored eigenvalue is the
    previous iterate's Rayleigh quotient and the stored vector the last normalised ``Hv``
    (no final re-orthogonalisation), and ``eps`` (their 1e-6) is added to every norm.
    Vectors are kept in float64; the operator is applied at ``op_dtype``.
    """
    if k < 1 or k > dim:
        raise ValueError(f"k must be between 1 and the dimension {dim}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    iterations: list[int] = []
    converged: list[bool] = []
    n = 0
    for _ in range(k):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        v = v / (v.norm() + eps)
        eigenvalue: float | None = None
        done = False
        it = 0
        for _ in range(max_iter):
            v = _orthnormal(v, vectors, eps)
            hv = matvec(v.to(op_dtype)).to(torch.float64)
            n += 1
            it += 1
            lam = float(hv @ v)
            v = hv / (hv.norm() + eps)
            if eigenvalue is None:
                eigenvalue = lam
            elif abs(eigenvalue - lam) / (abs(eigenvalue) + 1e-6) < tol:
                done = True
                break
            else:
                eigenvalue = lam
        values.append(float(eigenvalue if eigenvalue is not None else 0.0))
        vectors.append(v)
        iterations.append(it)
        converged.append(done)
    return PowerResult(
        torch.tensor(values, dtype=torch.float64),
        torch.stack(vectors, dim=1),
        n,
        iterations,
        converged,
    )


def max_rel_err(values: torch.Tensor, ref: torch.Tensor) -> float:
    """Max relative error of the sorted top values against the (sorted) reference values.

    ``inf`` when fewer values than reference values are given.
    """
    k = ref.numel()
    if values.numel() < k:
        return float("inf")
    top = torch.sort(values.to(torch.float64), descending=True).values[:k]
    ref = torch.sort(ref.to(torch.float64), descending=True).values
    return float(((top - ref).abs() / ref.abs()).max())


def subspace_sine(vectors: torch.Tensor, ref_vectors: torch.Tensor) -> float:
    """Sine of the largest principal angle between span(vectors) and span(ref_vectors).

    ``ref_vectors`` must have orthonormal columns; ``vectors`` (same column count) need not.
    Computed as ``||Q - V (V^T Q)||_2`` for an orthonormal basis ``Q`` of ``vectors``, which keeps
    small angles accurate (``sqrt(1 - cos^2)`` loses them below ~1e-8).
    """
    if vectors.shape[1] < ref_vectors.shape[1]:
        return float("nan")
    q, _ = torch.linalg.qr(vectors.to(torch.float64))
    v = ref_vectors.to(torch.float64)
    return float(torch.linalg.matrix_norm(q - v @ (v.T @ q), ord=2))
