"""Choosing how to get the top Fisher eigenpairs: Gram route or matrix-free Lanczos, whole or
block-wise, from a memory budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignscope.curvature.eigen import (
    EigenResult,
    block_gram_eigs,
    block_krylov_default_iter,
    block_krylov_eigs,
    block_lanczos_eigs,
    gram_eigs,
    lanczos_eigs,
)
from alignscope.curvature.operator import FactorSource, LinearOperator, require_operator
from alignscope.curvature.per_sample import DEFAULT_MEMORY_BUDGET
from alignscope.params import ParamSelection


@dataclass(frozen=True)
class SpectrumPlan:
    """What will be computed and roughly how much memory it needs (bytes)."""

    method: str  # "gram" | "lanczos"
    blockwise: bool
    n_rows: int  # Gram: factor rows K
    iterations: int  # Lanczos: basis size
    bytes_needed: int
    block_size: int = 1  # Lanczos: vectors per product pass (1: single-vector Lanczos)

    @property
    def keeps_basis(self) -> bool:
        """Whether the solver's whole Krylov basis can be kept for the trace
        (:func:`~alignscope.curvature.trace.subspace_trace`): Lanczos on the whole selection.
        The Gram route has no Krylov basis, and a block-wise one spans one block at a time."""
        return self.method == "lanczos" and not self.blockwise

    def describe(self) -> str:
        gib = self.bytes_needed / 2**30
        where = "block-wise" if self.blockwise else "whole selection"
        if self.method == "gram":
            return f"Gram route, {self.n_rows} Monte-Carlo factor rows, {where}: ~{gib:.2f} GiB"
        solver = "Lanczos" if self.block_size == 1 else f"block Lanczos ({self.block_size}/pass)"
        return (
            f"matrix-free {solver}, up to {self.iterations} exact F-products, {where}: "
            f"~{gib:.2f} GiB"
        )


def plan_spectrum(
    dim: int,
    k: int,
    n_rows: int,
    *,
    method: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    itemsize: int = 4,
    blockwise: bool = False,
    block_dims: Sequence[int] | None = None,
    block_size: int = 1,
) -> SpectrumPlan:
    """Pick exact Lanczos when its basis fits the budget, else the Gram route when it fits and
    has rows enough for ``k`` eigenpairs, else raise.

    Lanczos keeps its basis at the operator's precision: ``(iterations + 1) x P x itemsize``
    bytes; block Lanczos (``block_size`` b > 1) a basis of ``iterations`` vectors (its larger
    default cap, whole blocks) plus one block of products, ``(iterations + b) x P``. Block-wise
    (``block_dims``: the size of each block) one block at a time, so the largest block's basis
    plus the blocks' eigenvectors and the merged top-``k`` (``2 k x P``).
    The Monte-Carlo Gram route is cheaper but its top eigenvalues are biased upward while the
    number of rows is far below the Fisher's effective rank (bench/curvature.py: 1.6x too large
    at 384 rows on a 0.7 M parameter block), so it is the fallback, or a deliberate choice. A
    request that fits neither raises :class:`MemoryError`; ``alignscope.memory`` words it with
    the options that would fit.
    """
    if method not in ("auto", "gram", "lanczos"):
        raise ValueError(f"unknown eigensolver {method!r}; use auto, gram or lanczos")
    if block_size < 1:
        raise ValueError(f"the Lanczos block size must be at least 1, got {block_size}")
    op_item = max(itemsize, 4)

    def basis_bytes(n: int) -> tuple[int, int]:
        if block_size == 1:
            its = min(n, max(6 * k, k + 60))
            return its, (its + 1) * n * op_item  # basis at operator precision
        cap = block_krylov_default_iter(k, block_size)
        its = min(n, -(-cap // block_size) * block_size)
        return its, (its + min(block_size, n)) * n * op_item  # basis + one block of products

    if blockwise and block_dims:
        largest = max(block_dims)
        iterations, basis = basis_bytes(largest)
        # while merging, the blocks' eigenvectors (up to k x P) and the merged top-k coexist
        lanczos_bytes = basis + 2 * k * dim * itemsize
    else:
        iterations, lanczos_bytes = basis_bytes(dim)
    gram_bytes = n_rows * dim * itemsize * 2 + n_rows * n_rows * 8
    # The Gram route finds at most n_rows eigenpairs (per block, block-wise), so 'auto' must not
    # fall back to it for a rank it cannot deliver: that would fail later with a message about
    # factor rows, although Lanczos with a larger budget would have given the rank asked for.
    gram_rank = n_rows * (len(block_dims) if blockwise and block_dims else 1)
    if method == "lanczos" or (method == "auto" and lanczos_bytes <= memory_budget):
        return SpectrumPlan("lanczos", blockwise, 0, iterations, lanczos_bytes, block_size)
    if method == "gram" or (gram_bytes <= memory_budget and gram_rank >= k):
        return SpectrumPlan("gram", blockwise, n_rows, 0, gram_bytes)
    if gram_bytes <= memory_budget:
        raise MemoryError(
            f"top-{k} eigenpairs over {dim:,} parameters: matrix-free Lanczos needs "
            f"~{lanczos_bytes / 2**30:.2f} GiB, over the budget of {memory_budget / 2**30:.2f} "
            f"GiB, and the Gram route that fits finds at most {gram_rank} eigenpairs (its "
            "Monte-Carlo factor rows: safety prompts x --samples-per-prompt): lower --rank, draw "
            "more rows (more safety prompts or --samples-per-prompt), or raise the budget so "
            "Lanczos fits"
        )
    need = min(gram_bytes, lanczos_bytes) / 2**30
    raise MemoryError(
        f"top-{k} eigenpairs over {dim:,} parameters need ~{need:.2f} GiB, over the budget of "
        f"{memory_budget / 2**30:.2f} GiB: analyse fewer parameters (--params lora or glob "
        "patterns), use block-wise subspaces (per layer), lower --rank, or raise the budget"
    )


def block_dims(selection: ParamSelection) -> list[int]:
    """The number of scalars in each block of a selection."""
    return [sum(selection.numels[i] for i in idx) for idx in selection.blocks.values()]


def fisher_eigs(
    op: LinearOperator,
    k: int,
    *,
    method: str = "auto",
    samples_per_example: int = 4,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    seed: int = 0,
    blocks: ParamSelection | None = None,
    tol: float = 1e-8,
    block_size: int = 1,
    keep_basis: bool = False,
) -> tuple[EigenResult, SpectrumPlan]:
    """Top-``k`` eigenpairs of the alignment Fisher, by the route ``plan_spectrum`` chooses.

    Lanczos is exact to ``tol`` on exact F-products; the Gram route is Monte-Carlo
    (``samples_per_example`` draws per prompt), cheaper, and biased upward at small sample
    counts.

    Args:
        op: the Fisher as a :class:`LinearOperator`; the Gram route also needs it to be a
            :class:`FactorSource` (``n_examples`` and ``mc_factor_rows``), as
            :class:`~alignscope.curvature.fisher.FisherOperator` is.
        k: how many eigenpairs.
        blocks: solve each block of this parameter selection separately (block-diagonal
            approximation); None: the whole operator at once.
        block_size: Lanczos's vectors per product pass: 1 is single-vector Lanczos
            (:func:`lanczos_eigs`), more is block Lanczos (:func:`block_krylov_eigs`, one
            ``op.matmat`` per block; more products, fewer passes).
        keep_basis: where the plan allows it (:attr:`SpectrumPlan.keeps_basis`), return the
            Krylov basis and its projected trace in the result (``basis``, ``basis_trace``)
            for :func:`~alignscope.curvature.trace.subspace_trace`; the plan's memory already
            counts the basis.

    Raises:
        TypeError: ``op`` is not a LinearOperator, or the Gram route on one without factor rows.
        ValueError: the selection's size differs from the operator's.
        MemoryError: neither route fits ``memory_budget``.
    """
    op = require_operator(op, "fisher_eigs")
    dim = op.shape[0]
    if blocks is not None and blocks.size != dim:
        raise ValueError(f"the selection has {blocks.size} parameters, the operator {dim}")
    factors = isinstance(op, FactorSource)
    n_rows = op.n_examples * samples_per_example if factors else 0
    plan = plan_spectrum(
        dim,
        k,
        n_rows,
        method=method,
        memory_budget=memory_budget,
        itemsize=torch.empty((), dtype=op.dtype).element_size(),
        blockwise=blocks is not None,
        block_dims=block_dims(blocks) if blocks is not None else None,
        block_size=block_size,
    )
    if plan.method == "gram":
        if not factors:
            raise TypeError(
                f"the Gram route needs Monte-Carlo factor rows, which {type(op).__name__} does "
                "not draw (no n_examples / mc_factor_rows): use method='lanczos'"
            )
        gen = torch.Generator().manual_seed(seed)
        rows = op.mc_factor_rows(samples_per_example, generator=gen, memory_budget=memory_budget)
        if blocks is not None:
            return block_gram_eigs(rows, blocks, k, keep=k), plan
        return gram_eigs(rows, k), plan
    if blocks is not None:
        eig = block_lanczos_eigs(op, blocks, k, keep=k, block_size=block_size, tol=tol, seed=seed)
        return eig, plan
    if block_size > 1:
        eig = block_krylov_eigs(
            op, k, block_size=block_size, tol=tol, seed=seed, keep_basis=keep_basis
        )
        return eig, plan
    return lanczos_eigs(op, k, tol=tol, seed=seed, keep_basis=keep_basis), plan
