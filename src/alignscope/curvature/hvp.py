"""Hessian-vector products of a scalar loss ``f(theta)``.

Two modes: ``"reverse"`` (double backward: differentiate ``grad f . v``; works with every
attention kernel) and ``"forward"`` (forward-over-reverse, ``jvp(grad f)``: cheaper, but needs
forward-mode AD through the model, i.e. eager attention for transformers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import grad, jvp

Loss = Callable[[torch.Tensor], torch.Tensor]


def hvp_reverse(f: Loss, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v`` by double backward."""
    x = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, v)
    return hv


def hvp_forward(f: Loss, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v`` by forward-over-reverse (``jvp`` of ``grad``)."""
    return jvp(grad(f), (theta.detach(),), (v,))[1]


class HessianOperator:
    """The Hessian of ``f`` at ``theta`` as a matrix-free operator.

    ``mode="auto"`` uses double backward: measured side by side (bench/curvature.py) it costs
    ~2-3x a gradient on CPU against ~4x for forward-over-reverse, and it works with every
    attention kernel. ``"forward"`` asks for forward-over-reverse, falling back to double
    backward (with a warning naming the error) when forward-mode AD is not supported.
    """

    def __init__(self, f: Loss, theta: torch.Tensor, mode: str = "auto") -> None:
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"unknown HVP mode {mode!r}; use auto, forward or reverse")
        self.f, self.theta = f, theta.detach()
        self.mode = "reverse" if mode == "auto" else mode
        self.n_products = 0

    @property
    def dim(self) -> int:
        return self.theta.numel()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v``."""
        v = v.to(self.theta.dtype)
        self.n_products += 1
        if self.mode == "reverse":
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

    def gradient(self) -> torch.Tensor:
        """``grad f(theta)``."""
        return grad(self.f)(self.theta)
