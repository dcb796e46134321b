"""Worker of the two-process (gloo) test of block Lanczos on an all-reduced operator
(tests/test_block_krylov.py): like a Fisher sharded over ranks, each rank holds the Gram
matrix of half the factor rows, and the operator sums the two products."""

from __future__ import annotations

import torch

from alignscope.curvature import DenseOperator, block_krylov_eigs
from alignscope.distributed import SumOverRanks


def shards(dim: int = 80, rows: int = 60, seed: int = 0) -> list[torch.Tensor]:
    """``R_r^T R_r`` for the two halves of a factor ``R`` with a decaying spectrum."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64)
    factor = torch.randn(rows, dim, generator=gen, dtype=torch.float64) * scale[:, None]
    return [factor[r::2].T @ factor[r::2] for r in range(2)]


def eigs_worker(rank: int, out: str) -> None:
    op = SumOverRanks(DenseOperator(shards()[rank]))
    res = block_krylov_eigs(op, 6, block_size=4, tol=1e-12, seed=3)
    torch.save(
        {"values": res.values, "vectors": res.vectors, "n": res.n_products}, f"{out}/{rank}.pt"
    )
