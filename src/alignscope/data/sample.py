"""Seeded subsets of dataset rows (the same subset for the same seed in every command)."""

from __future__ import annotations

from typing import TypeVar

import torch

T = TypeVar("T")


def subsample(rows: list[T], limit: int | None, seed: int) -> list[T]:
    """At most ``limit`` rows, a seeded choice kept in file order (all rows when ``limit`` is
    None or not smaller than the dataset)."""
    if limit is None or len(rows) <= limit:
        return rows
    idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]
    return [rows[i] for i in sorted(idx.tolist())]
