"""Top eigenpairs of a symmetric PSD operator: the Gram route, Lanczos, and block-diagonal variants.

- Gram: given factor rows ``R`` ``[K, P]`` with ``F = R^T R``, the nonzero spectrum of ``F`` is
  that of the ``K x K`` Gram matrix ``R R^T``; its eigenvectors lift as ``v = R^T u / sqrt(l)``.
- Lanczos: matrix-free on exact products, with full reorthogonalisation and a float64
  tridiagonal problem. scipy's ``eigsh`` (ARPACK) would also work but restarts implicitly, needs
  more products for the same accuracy here, and cannot report our residuals per Ritz pair, so the
  short loop is written out below.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from alignscope.curvature.operator import BlockOperator, LinearOperator, require_operator
from alignscope.params import ParamSelection


@dataclass
class EigenResult:
    """Eigenvalues (descending, float64) and eigenvectors as columns ``[P, k]``."""

    values: torch.Tensor
    vectors: torch.Tensor
    method: str
    n_products: int = 0
    residuals: torch.Tensor | None = None
    blocks: dict[str, list[int]] = field(default_factory=dict)  # block -> columns of `vectors`
    converged: bool = True
    # With ``keep_basis``: the whole Krylov basis Q as orthonormal rows ``[m, P]`` and
    # ``tr(Q^T A Q)`` from the solver's own projections (no further products), for
    # :func:`~alignscope.curvature.trace.deflated_trace`. Large (``m x P``): drop it once used.
    basis: torch.Tensor | None = field(default=None, repr=False)
    basis_trace: float | None = None

    @property
    def k(self) -> int:
        return int(self.values.numel())


def gram_eigs(rows: torch.Tensor, k: int) -> EigenResult:
    """Top-``k`` eigenpairs of ``R^T R`` from the ``K x K`` Gram matrix (float64)."""
    if rows.dim() != 2 or rows.shape[0] == 0:
        raise ValueError("gram_eigs needs a non-empty [K, P] matrix of factor rows")
    n_rows = rows.shape[0]
    if k > n_rows:
        raise ValueError(
            f"asked for {k} eigenpairs but there are only {n_rows} factor rows; the Gram route "
            f"finds at most K = {n_rows}: lower the rank or draw more samples"
        )
    r64 = rows.to(torch.float64)
    evals, evecs = torch.linalg.eigh(r64 @ r64.T)
    order = torch.argsort(evals, descending=True)[:k]
    values = evals[order].clamp_min(0.0)
    lifted = r64.T @ evecs[:, order]
    norms = lifted.norm(dim=0)
    vectors = lifted / torch.where(norms > 0, norms, torch.ones_like(norms))
    return EigenResult(values, vectors, "gram", n_products=0)


def lanczos_eigs(
    op: LinearOperator,
    k: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-10,
    seed: int = 0,
    check_every: int = 5,
    basis_dtype: torch.dtype | None = None,
    keep_basis: bool = False,
) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Stops when every wanted Ritz pair has residual ``|beta_m s_mj| <= tol * |lambda_1|`` or after
    ``max_iter`` products (default ``min(dim, max(6k, k + 60))``), then warns and sets
    ``converged=False``. On breakdown (an invariant
    subspace, common for low-rank Fishers) it continues from a fresh random direction orthogonal
    to the basis, so zero eigenvalues are still returned with their vectors.

    Args:
        op: the operator (one ``matvec`` per iteration, on ``op.device`` in ``op.dtype``).
        k: how many of the largest eigenpairs.
        max_iter, tol, seed, check_every: see above; ``check_every``: iterations between
            convergence checks.
        basis_dtype: the Krylov basis's precision; default float64 for a float64 operator, else
            float32 (a tighter reference on a float32 operator asks for float64).
        keep_basis: return the Krylov basis ``Q_m`` and ``tr(Q_m^T A Q_m) = tr T_m`` (the sum
            of the alphas) in ``basis`` / ``basis_trace``. ``Q_m^T A Q_m = T_m`` holds for any
            ``m``, converged or not (``A Q_m = Q_m T_m + r e_m^T`` with ``r`` orthogonal to
            ``Q_m``), up to the basis's orthogonality, which full reorthogonalisation keeps.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``k`` outside ``1..P``.
    """
    op = require_operator(op, "lanczos_eigs")
    dim, op_dtype, device = op.shape[0], op.dtype, op.device
    if k < 1 or k > dim:
        raise ValueError(f"k must be between 1 and the dimension {dim}, got {k}")
    m_max = min(dim, max_iter or max(6 * k, k + 60))
    gen = torch.Generator().manual_seed(seed)
    # The basis is kept at the operator's precision (at least float32): products of a float32
    # model carry float32 errors anyway, and reorthogonalisation against a float64 basis was
    # 60% of Lanczos's time in bench/curvature.py. The tridiagonal problem stays float64.
    # empty, not zeros: untouched rows of a large allocation never become resident memory.
    bdtype = basis_dtype or (torch.float64 if op_dtype == torch.float64 else torch.float32)
    basis = torch.empty((m_max + 1, dim), dtype=bdtype, device=device)
    q = torch.randn(dim, generator=gen, dtype=bdtype).to(device)
    basis[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    m = 0
    converged = False
    block_start = 0  # where the current Krylov block began (after the last restart)
    for j in range(m_max):
        w = op.matvec(basis[j].to(op_dtype)).to(bdtype)
        alpha = float(basis[j] @ w)
        alphas.append(alpha)
        # Full reorthogonalisation (classical Gram-Schmidt against the whole basis) keeps it
        # orthogonal to machine precision, which three-term Lanczos loses as soon as a Ritz value
        # converges. A second pass only when the first cancelled most of w (the DGKS criterion).
        before = float(w.norm())
        w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        if beta < 0.7071 * before:
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            beta = float(w.norm())
        m = j + 1
        scale = max(scale, abs(alpha), beta)
        done = m == m_max
        breakdown = beta <= 1e-12 * max(scale, 1e-300)
        # At a breakdown every residual is ~0, but the Krylov space holds one vector per distinct
        # eigenvalue: a repeated one is still missing. Only accept convergence once the block
        # since the last restart has had k steps to find such copies.
        fresh = m - block_start >= k
        if m >= k and fresh and not breakdown and (m % check_every == 0 or done):
            ritz, vecs = _tridiag_eigs(alphas, betas)
            top = np.argsort(ritz)[::-1][:k]
            res = np.abs(beta * vecs[-1, top])
            if np.all(res <= tol * max(abs(ritz[top[0]]), 1e-300)):
                converged = True
                break
        if done:
            break
        if breakdown:
            block_start = m
            w = torch.randn(dim, generator=gen, dtype=bdtype).to(device)
            for _ in range(2):
                w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            beta_next, w = 0.0, w / w.norm()
        else:
            beta_next, w = beta, w / beta
        betas.append(beta_next)
        basis[j + 1] = w
    ritz, vecs = _tridiag_eigs(alphas, betas[: m - 1])
    top = np.argsort(ritz)[::-1][:k]
    values = torch.from_numpy(ritz[top].copy()).to(device)
    coeffs = torch.from_numpy(np.ascontiguousarray(vecs[:, top])).to(device, bdtype)
    vectors = basis[:m].T @ coeffs
    vectors /= vectors.norm(dim=0, keepdim=True)
    residuals = torch.from_numpy(np.abs(beta * vecs[-1, top]))
    if m == dim:
        converged = True  # the whole space: the Ritz pairs are exact
    if not converged:
        warnings.warn(
            f"Lanczos stopped after {m} products without reaching tol={tol:g} for the top {k} "
            f"eigenpairs (largest residual {float(residuals.max()):.2e}); raise max_iter",
            stacklevel=2,
        )
    res = EigenResult(values.clamp_min(0.0), vectors, "lanczos", m, residuals, converged=converged)
    if keep_basis:
        res.basis, res.basis_trace = basis[:m], float(sum(alphas[:m]))
    return res


def block_krylov_default_iter(k: int, block_size: int) -> int:
    """The default product cap of :func:`block_krylov_eigs`: Lanczos's ``max(6k, k + 60)`` plus
    eight products per extra block column (blocks need more vectors for the same accuracy: on
    decaying spectra ~1.5x at ``b = 4`` and ~2-2.5x at ``b = 8``, tests/test_eigen.py)."""
    return max(6 * k, k + 60) + 8 * (block_size - 1)


def block_krylov_eigs(
    op: LinearOperator,
    k: int,
    *,
    block_size: int = 4,
    max_iter: int | None = None,
    tol: float = 1e-10,
    seed: int = 0,
    check_every: int = 5,
    basis_dtype: torch.dtype | None = None,
    keep_basis: bool = False,
) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator by block Lanczos: ``block_size`` vectors per
    ``op.matmat`` pass, full reorthogonalisation, Rayleigh-Ritz on the whole Krylov basis.

    Not :func:`block_lanczos_eigs` (the block-*diagonal* approximation): this is the exact
    operator, its Krylov space ``span[S, A S, A^2 S, ...]`` grown ``b`` vectors at a time.

    Why block Lanczos rather than subspace iteration: subspace (or randomized power) iteration
    keeps only the newest block, so its error for a top-k pair shrinks like
    ``(l_{k+1}/l_j)^q`` after ``q`` passes; Rayleigh-Ritz on the whole block Krylov space is a
    polynomial filter of degree ``q`` chosen optimally, a Chebyshev rate ``~exp(-2 q sqrt(gap))``
    (Saad, *Numerical methods for large eigenvalue problems*, ch. 6; Musco & Musco 2015), so it
    reaches a decaying PSD spectrum's top-k in far fewer passes for the same basis memory as
    Lanczos's. Blocks pay in products: for the same accuracy they need more vectors than
    single-vector Lanczos (a block of ``b`` is a degree-``q/b`` polynomial per direction); they
    win where a pass of ``b`` vectors costs much less than ``b`` single products (a batched
    ``matmat``) and where eigenvalues are clustered or repeated (up to ``b`` copies at once).

    Same stopping rule and reporting as :func:`lanczos_eigs`: stops when every wanted Ritz pair
    has residual ``||A x - l x|| <= tol * |lambda_1|`` (checked every
    ``max(1, check_every // b)`` blocks) or after ``max_iter`` products (default
    :func:`block_krylov_default_iter`, Lanczos's for ``b = 1``) rounded up to whole blocks,
    then warns and sets
    ``converged=False``. ``n_products`` counts vectors. A column whose new direction vanishes (an
    invariant subspace) is replaced by a fresh random one orthogonal to the basis. The start
    block comes from ``seed`` alone, so every rank of a distributed run (products all-reduced in
    the operator) builds the same basis. ``keep_basis``: return the basis ``V`` and
    ``tr(V^T A V)`` (the projected matrix's diagonal, kept whole here) as :func:`lanczos_eigs`
    does.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``k`` outside ``1..P`` or ``block_size < 1``.
    """
    op = require_operator(op, "block_krylov_eigs")
    dim, op_dtype, device = op.shape[0], op.dtype, op.device
    if k < 1 or k > dim:
        raise ValueError(f"k must be between 1 and the dimension {dim}, got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    b = min(block_size, dim)
    m_max = min(dim, -(-min(dim, max_iter or block_krylov_default_iter(k, b)) // b) * b)
    check_blocks = max(1, check_every // b)
    gen = torch.Generator().manual_seed(seed)
    bdtype = basis_dtype or (torch.float64 if op_dtype == torch.float64 else torch.float32)
    # rows are basis vectors (as in lanczos_eigs); empty: untouched rows never become resident
    basis = torch.empty((m_max, dim), dtype=bdtype, device=device)
    # the projected matrix V^T A V, filled block column by block column from the projections
    proj = np.zeros((m_max, m_max), dtype=np.float64)
    owner = np.zeros(m_max, dtype=np.int64)  # block index of each basis vector
    scale = 0.0
    restart = 0  # basis size after the last random replacement

    def fill(block: torch.Tensor, start: int, random_rows: bool) -> tuple[int, bool]:
        """Orthonormalise ``block``'s rows against one another (CGS2) into ``basis[start:]``
        (they are already orthogonal to ``basis[:start]``); rows that vanish (or all, when
        ``random_rows``) are replaced by random directions orthogonalised against the whole
        basis. Returns the number of rows placed and whether any was replaced."""
        placed, replaced = start, False
        for row in block:
            if placed >= basis.shape[0]:
                break
            w = row.clone()
            fresh = random_rows
            for _ in range(3):
                if fresh:
                    w = torch.randn(dim, generator=gen, dtype=bdtype).to(device)
                before = float(w.norm())
                against = basis[:placed] if fresh else basis[start:placed]
                for _ in range(2):  # twice is enough (Kahan-Parlett)
                    w -= against.T @ (against @ w)
                norm = float(w.norm())
                # a random row must keep a fair share of its norm; a Krylov row must not vanish
                if (fresh and norm > 1e-6 * before) or (
                    not fresh and norm > 1e-12 * max(scale, 1e-300)
                ):
                    break
                fresh, replaced = True, True
            else:
                continue
            basis[placed] = w / norm
            placed += 1
        return placed - start, replaced

    n, _ = fill(torch.empty((b, dim), dtype=bdtype), 0, random_rows=True)
    m, blocks_done, converged = 0, 0, False
    residuals = torch.zeros(k, dtype=torch.float64)
    ritz = vecs = top = None
    while True:
        lo, m = m, m + n
        q = basis[lo:m]
        w = op.matmat(q.T.to(op_dtype)).T.to(bdtype).contiguous()  # [n, P]
        # Full reorthogonalisation against the whole basis (block classical Gram-Schmidt, one
        # GEMM each way); a second pass only when the first cancelled most of a row (DGKS).
        before = w.norm(dim=1)
        coeffs = basis[:m] @ w.T
        w -= coeffs.T @ basis[:m]
        if bool((w.norm(dim=1) < 0.7071 * before).any()):
            c = basis[:m] @ w.T
            w -= c.T @ basis[:m]
            coeffs += c
        proj[:m, lo:m] = coeffs.double().cpu().numpy()
        owner[lo:m] = blocks_done
        blocks_done += 1
        scale = max(scale, float(np.abs(proj[:m, lo:m]).max()), float(w.norm(dim=1).max()))
        done = m >= m_max
        if m >= k and m - restart >= k and (blocks_done % check_blocks == 0 or done):
            ritz, vecs = _block_ritz(proj[:m, :m], owner[:m])
            top = np.argsort(ritz)[::-1][:k]
            last = torch.from_numpy(np.ascontiguousarray(vecs[lo:m][:, top])).to(device, bdtype)
            residuals = (last.T @ w).norm(dim=1).double().cpu()
            if bool((residuals <= tol * max(abs(ritz[top[0]]), 1e-300)).all()):
                converged = True
                break
        if done:
            break
        n, replaced = fill(w, m, random_rows=False)
        if replaced:
            restart = m
        if n == 0:  # no direction left: the basis spans the whole space
            break
    if ritz is None or vecs is None or top is None or vecs.shape[0] != m:
        ritz, vecs = _block_ritz(proj[:m, :m], owner[:m])
        top = np.argsort(ritz)[::-1][:k]
        if m < dim:
            last = torch.from_numpy(np.ascontiguousarray(vecs[lo:m][:, top])).to(device, bdtype)
            residuals = (last.T @ w).norm(dim=1).double().cpu()
    values = torch.from_numpy(ritz[top].copy()).to(device)
    coeffs_top = torch.from_numpy(np.ascontiguousarray(vecs[:, top])).to(device, bdtype)
    vectors = basis[:m].T @ coeffs_top
    vectors /= vectors.norm(dim=0, keepdim=True)
    if m == dim:
        converged = True  # the whole space: the Ritz pairs are exact
        residuals = torch.zeros(k, dtype=torch.float64)
    if not converged:
        warnings.warn(
            f"block Lanczos (block size {b}) stopped after {m} products without reaching "
            f"tol={tol:g} for the top {k} eigenpairs (largest residual "
            f"{float(residuals.max()):.2e}); raise max_iter",
            stacklevel=2,
        )
    res = EigenResult(
        values.clamp_min(0.0), vectors, "block-krylov", m, residuals, converged=converged
    )
    if keep_basis:
        res.basis, res.basis_trace = basis[:m], float(np.trace(proj[:m, :m]))
    return res


def _block_ritz(upper: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of ``V^T A V`` from its block upper triangle (each block column holds the
    projections of that block's products on the basis before it); diagonal blocks averaged with
    their transposes, the rest mirrored."""
    above = owner[:, None] < owner[None, :]
    same = owner[:, None] == owner[None, :]
    sym = np.where(above, upper, 0.0)
    sym = sym + sym.T + np.where(same, (upper + upper.T) / 2, 0.0)
    return np.linalg.eigh(sym)


def _tridiag_eigs(alphas: Sequence[float], betas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(alphas, dtype=np.float64)
    if a.size == 1:
        return a.copy(), np.ones((1, 1))
    return eigh_tridiagonal(a, np.asarray(betas[: a.size - 1], dtype=np.float64))


def _merge_blocks(
    parts: dict[str, tuple[EigenResult, torch.Tensor]], dim: int, method: str, keep: int | None
):
    """The union of the blocks' eigenpairs (those of the block-diagonal operator), largest first;
    ``keep``: only the top ``keep`` of them, so the full-length basis is ``dim x keep`` rather
    than ``dim x (k x blocks)`` (what makes block-wise subspaces fit large models)."""
    values, owner = [], []
    for name, (res, _) in parts.items():
        values.extend(res.values.tolist())
        owner.extend((name, j) for j in range(res.k))
    vals = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(vals, descending=True)[: keep if keep is not None else len(values)]
    first = next(iter(parts.values()))[0].vectors
    basis = torch.zeros((dim, len(order)), dtype=first.dtype, device=first.device)
    blocks: dict[str, list[int]] = {name: [] for name in parts}
    residuals = []
    for col, i in enumerate(order.tolist()):
        name, j = owner[i]
        res, index = parts[name]
        basis[index, col] = res.vectors[:, j]
        blocks[name].append(col)
        if res.residuals is not None:
            residuals.append(float(res.residuals[j]))
    results = [r for r, _ in parts.values()]
    return EigenResult(
        vals[order],
        basis,
        method,
        sum(r.n_products for r in results),
        torch.tensor(residuals, dtype=torch.float64) if len(residuals) == len(order) else None,
        {b: cols for b, cols in blocks.items() if cols},
        converged=all(r.converged for r in results),
    )


def block_lanczos_eigs(
    op: LinearOperator,
    selection: ParamSelection,
    k: int,
    keep: int | None = None,
    *,
    block_size: int = 1,
    **kwargs,
) -> EigenResult:
    """Top-``k`` eigenpairs of every diagonal block of the operator (block-diagonal approximation),
    merged largest first (the top ``keep`` of them when given).

    Each block's product embeds the block vector in the full space, applies the operator and keeps
    the block's rows (:class:`BlockOperator`): exactly the diagonal block, never the cross-block
    coupling. ``kwargs`` go to :func:`lanczos_eigs`, or with ``block_size > 1`` to
    :func:`block_krylov_eigs` (``block_size`` vectors per product pass on each block).
    """
    op = require_operator(op, "block_lanczos_eigs")
    dim = selection.size
    if op.shape[0] != dim:
        raise ValueError(f"the operator has dimension {op.shape[0]}, the selection {dim}")
    parts = {}
    for name in selection.blocks:
        index = selection.block_index(name)
        kb = min(k, index.numel())
        block_op = BlockOperator(op, index)
        if block_size > 1:
            eig = block_krylov_eigs(block_op, kb, block_size=block_size, **kwargs)
        else:
            eig = lanczos_eigs(block_op, kb, **kwargs)
        parts[name] = (eig, index)
    return _merge_blocks(parts, dim, "block-lanczos", keep)


def block_gram_eigs(
    rows: torch.Tensor, selection: ParamSelection, k: int, keep: int | None = None
) -> EigenResult:
    """Top-``k`` eigenpairs of each diagonal block of ``R^T R``, from that block's columns of R."""
    parts = {}
    for name in selection.blocks:
        index = selection.block_index(name)
        parts[name] = (gram_eigs(rows[:, index], min(k, rows.shape[0], index.numel())), index)
    return _merge_blocks(parts, selection.size, "block-gram", keep)
