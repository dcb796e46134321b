"""Hessian-vector products of a scalar loss ``f(theta)``.

Two modes: ``"reverse"`` (double backward: differentiate ``grad f . v``; works with every
attention kernel) and ``"forward"`` (forward-over-reverse, ``jvp(grad f)``: cheaper, but needs
forward-mode AD through the model, i.e. eager attention for transformers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from alignscope.curvature.operator import ParameterOperator, check_matmat_input
from alignscope.curvature.per_sample import DEFAULT_MEMORY_BUDGET, chunk_size_for

Loss = Callable[[torch.Tensor], torch.Tensor]


def hvp_reverse(f: Loss, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v`` by double backward."""
    x = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, v)
    return hv


def hvp_reverse_batched(f: Loss, theta: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``H v`` for every row of ``vectors`` ``[m, P]``: one gradient graph, then one vmapped
    double backward over all the rows (``is_grads_batched``)."""
    x = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, vectors, is_grads_batched=True)
    return hv


def hvp_forward(f: Loss, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v`` by forward-over-reverse (``jvp`` of ``grad``)."""
    return jvp(grad(f), (theta.detach(),), (v,))[1]


class HessianOperator(ParameterOperator):
    """The Hessian of ``f`` at ``theta`` as a matrix-free operator.

    ``mode="auto"`` uses double backward: measured side by side (bench/curvature.py) it costs
    ~2-3x a gradient on CPU against ~4x for forward-over-reverse, and it works with every
    attention kernel. ``"forward"`` asks for forward-over-reverse, falling back to double
    backward (with a warning naming the error) when forward-mode AD is not supported.

    Implements :class:`~alignscope.curvature.operator.LinearOperator`; ``matmat`` runs one
    gradient graph and a vmapped double backward over blocks of vectors (with ``cache_graph``,
    one backward per vector through the kept graph).

    Args:
        f: the scalar loss as a function of the flat parameters.
        theta: where the Hessian is taken.
        mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (see above).
        memory_budget: bytes for the vectors of one batched pass (a rough rule: three
            parameter-sized buffers per vector, as for per-sample gradients).
        cache_graph: in double-backward mode, build the gradient's graph once and keep it:
            every product is one backward pass through it (``H v = d(g . v)/d theta``), not a
            forward, a backward and a double backward (1.56x for four HVPs on SmolLM2 with
            LoRA, bench/lora_products.py); ``matmat`` then loops over its vectors. Holds the
            graph (about two forward passes' activations) until :meth:`release` or the
            operator is dropped.

    Raises:
        ValueError: an unknown ``mode``.
    """

    def __init__(
        self,
        f: Loss,
        theta: torch.Tensor,
        mode: str = "auto",
        *,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        cache_graph: bool = False,
    ) -> None:
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"unknown HVP mode {mode!r}; use auto, forward or reverse")
        self.f, self.theta = f, theta.detach()
        self.mode = "reverse" if mode == "auto" else mode
        self.memory_budget = int(memory_budget)
        self.vmap_ok = True  # set False (with one warning) when vmap cannot run the loss
        self.n_products = 0
        self.cache_graph = cache_graph
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None  # (theta leaf, grad f)

    def _gradient_graph(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The leaf and ``grad f`` with its graph, built on first use and kept."""
        if self._graph is None:
            x = self.theta.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.f(x), x, create_graph=True)
            self._graph = (x, g)
        return self._graph

    def release(self) -> None:
        """Drop the cached gradient graph (``cache_graph``); the next product builds it again."""
        self._graph = None

    def _cached_hvp(self, v: torch.Tensor) -> torch.Tensor:
        x, g = self._gradient_graph()
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(g, x, v, retain_graph=True)
        return hv

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v``."""
        v = v.to(self.theta.dtype)
        self.n_products += 1
        if self.mode == "reverse":
            if self.cache_graph:
                return self._cached_hvp(v)
            return hvp_reverse(self.f, self.theta, v)
        try:
            return hvp_forward(self.f, self.theta, v)
        except (NotImplementedError, RuntimeError) as err:
            warnings.warn(
                f"forward-over-reverse HVP unavailable ({type(err).__name__}: {err}); "
                "using double backward",
                stacklevel=2,
            )
            self.mode = "reverse"
            return hvp_reverse(self.f, self.theta, v)

    __call__ = matvec

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` for the columns of ``vectors`` ``[P, k]``, several per pass.

        Falls back to one vector at a time (with one warning naming the error) when vmap cannot
        run the loss.
        """
        vectors = check_matmat_input(self, vectors)
        k = vectors.shape[1]
        rows = vectors.T.contiguous()
        block = chunk_size_for(self.dim, self.theta.element_size(), self.memory_budget, max(k, 1))
        parts = [self._rows_hvp(rows[s : s + block]) for s in range(0, k, block)]
        self.n_products += k
        if not parts:
            return vectors.clone()
        return torch.cat(parts).T

    def _rows_hvp(self, rows: torch.Tensor) -> torch.Tensor:
        if self.cache_graph and self.mode == "reverse":
            # One backward pass per vector through the kept graph: vmapping them
            # (is_grads_batched) was 1.36x slower than this loop on SmolLM2 with LoRA.
            return torch.stack([self._cached_hvp(v) for v in rows])
        if self.vmap_ok:
            try:
                if self.mode == "forward":
                    try:
                        return vmap(lambda v: hvp_forward(self.f, self.theta, v))(rows)
                    except (NotImplementedError, RuntimeError):
                        # forward mode or its batching unsupported: matvec decides which (and
                        # warns when it switches to double backward); retry batched reverse
                        self.matvec(rows[0])
                        self.n_products -= 1
                        if self.mode == "forward":
                            raise
                return hvp_reverse_batched(self.f, self.theta, rows)
            except (NotImplementedError, RuntimeError) as err:
                warnings.warn(
                    f"batched Hessian-vector products failed under vmap "
                    f"({type(err).__name__}: {err}); multiplying one vector at a time",
                    stacklevel=3,
                )
                self.vmap_ok = False
        products = [self.matvec(v) for v in rows]
        self.n_products -= len(products)  # counted once, by matmat
        return torch.stack(products)

    def gradient(self) -> torch.Tensor:
        """``grad f(theta)`` (from the cached graph when there is one)."""
        if self._graph is not None:
            return self._graph[1].detach().clone()
        return grad(self.f)(self.theta)


class HessianSum(ParameterOperator):
    """The Hessian of ``sum_c f_c`` at ``theta``, one term at a time: for every product call each
    term's gradient graph is built once (``HessianOperator(cache_graph=True)``), takes all the
    vectors of the call, and is dropped before the next term's. Peak memory is one term's graph,
    not the whole sum's; a ``matmat`` of ``k`` vectors costs one graph per term instead of ``k``.

    Implements :class:`~alignscope.curvature.operator.LinearOperator`.
    """

    def __init__(self, terms: list[Loss], theta: torch.Tensor) -> None:
        if not terms:
            raise ValueError("HessianSum needs at least one loss term")
        self.terms, self.theta = list(terms), theta.detach()
        self.n_products = 0

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` for the columns of ``vectors`` ``[P, k]``."""
        vectors = check_matmat_input(self, vectors)
        out = torch.zeros_like(vectors)
        for f in self.terms:
            op = HessianOperator(f, self.theta, cache_graph=True)
            out += op.matmat(vectors)
            op.release()
        self.n_products += vectors.shape[1]
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v``."""
        return self.matmat(v.reshape(-1, 1))[:, 0]

    __call__ = matvec
