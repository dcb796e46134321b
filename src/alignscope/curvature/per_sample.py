"""Per-sample gradients over a parameter selection: vmap(grad) in memory-sized chunks, or a loop.

``fn(theta, *example)`` is a scalar loss of one example; ``inputs`` are tensors whose leading
dimension indexes examples. The result is an ``[N, P]`` matrix of gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import grad, vmap

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes
# A vmapped backward holds the per-sample gradients plus roughly as much again in
# intermediate parameter-shaped buffers; 3x the output size is a safe rule of thumb.
_GRAD_OVERHEAD = 3


def chunk_size_for(dim: int, itemsize: int, memory_budget: int, n: int) -> int:
    """How many examples to vmap at once so that their gradients fit ``memory_budget`` bytes."""
    per_example = max(1, dim * itemsize * _GRAD_OVERHEAD)
    return int(max(1, min(n, memory_budget // per_example)))


def _loop(fn: Callable, theta: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    g = grad(fn)
    return torch.stack([g(theta, *(x[i] for x in inputs)) for i in range(inputs[0].shape[0])])


def per_sample_grads(
    fn: Callable[..., torch.Tensor],
    theta: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    *,
    method: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_size: int | None = None,
    out_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Gradients of ``fn(theta, *example)`` for every example, stacked to ``[N, P]``.

    ``method``: ``"vmap"`` (torch.func vmap over grad, chunked), ``"loop"`` (one example at a
    time) or ``"auto"`` (vmap, falling back to the loop with a logged reason when vmap cannot run
    the model, e.g. data-dependent control flow inside it). ``progress`` is called with the number
    of examples finished after each chunk.
    """
    if not inputs or inputs[0].shape[0] == 0:
        raise ValueError("per-sample gradients of zero examples: the dataset is empty")
    n = int(inputs[0].shape[0])
    if any(int(x.shape[0]) != n for x in inputs):
        raise ValueError("all per-example inputs must have the same leading dimension")
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"unknown method {method!r}; use auto, vmap or loop")
    out_dtype = out_dtype or theta.dtype
    chunk = chunk_size or chunk_size_for(theta.numel(), theta.element_size(), memory_budget, n)
    out = torch.empty((n, theta.numel()), dtype=out_dtype, device=theta.device)
    use_vmap = method != "loop"
    batched = vmap(grad(fn), in_dims=(None, *([0] * len(inputs))))
    for start in range(0, n, chunk):
        part = [x[start : start + chunk] for x in inputs]
        if use_vmap:
            try:
                block = batched(theta, *part)
            except Exception as err:  # noqa: BLE001 - any vmap failure: fall back, say why
                if method == "vmap":
                    raise
                warnings.warn(
                    f"vmap per-sample gradients failed ({type(err).__name__}: {err}); "
                    "falling back to one example at a time",
                    stacklevel=2,
                )
                use_vmap = False
        if not use_vmap:
            block = _loop(fn, theta, part)
        out[start : start + block.shape[0]] = block.to(out_dtype)
        if progress is not None:
            progress(start + block.shape[0])
    return out
