"""The Fisher (Gauss-Newton) matrix of the alignment loss, as exact products and factor rows.

``F = sum_n w_n J_n^T (diag q_n - q_n q_n^T) J_n`` over the response-predicting positions ``n``,
with ``J_n`` the Jacobian of that position's logits with respect to the selected parameters,
``q_n`` the model's softmax there and ``w_n`` the per-example-mean weights of
:class:`ResponsePositions`. At the aligned model this is exactly the Hessian of the KL alignment
loss. No ``P x P`` matrix is ever formed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.func import jvp, vjp, vmap

from alignscope.curvature.functional import (
    FunctionalLM,
    ensure_eager_attention,
    response_weights,
)
from alignscope.curvature.losses import ResponsePositions
from alignscope.curvature.per_sample import DEFAULT_MEMORY_BUDGET, per_sample_grads
from alignscope.data.encode import LMBatch


class _Chunk:
    """One slice of examples: its positions, softmax at theta, and (optionally) a cached vjp."""

    def __init__(self, flm: FunctionalLM, batch: LMBatch, theta: torch.Tensor, n_total: int):
        self.batch = batch
        self.positions = ResponsePositions(batch, flm.dtype, n_total=n_total)
        self.fn = lambda th: self.positions.gather(flm.logits(th, batch.input_ids))
        with torch.no_grad():
            self.q = torch.softmax(self.fn(theta), dim=-1)
        self.vjp_fn: Callable | None = None


class FisherOperator:
    """Exact Fisher / GGN products of the softmax outputs at the response positions of ``batch``.

    ``theta`` defaults to the aligned parameters ``flm.theta0``. ``chunk_size`` limits how many
    examples go through the model at once; ``cache_vjp`` keeps each chunk's backward graph so a
    product costs one forward-mode pass and one backward pass. ``jvp_mode`` is ``"forward"``
    (forward-mode AD, needs eager attention), ``"reverse"`` (the double-vjp trick, works with any
    kernel) or ``"auto"`` (forward, falling back to reverse with a warning).
    """

    def __init__(
        self,
        flm: FunctionalLM,
        batch: LMBatch,
        theta: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
        cache_vjp: bool = True,
        jvp_mode: str = "auto",
    ) -> None:
        if jvp_mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"unknown jvp_mode {jvp_mode!r}; use auto, forward or reverse")
        self.flm, self.batch = flm, batch
        if jvp_mode != "reverse" and not ensure_eager_attention(flm.model):
            jvp_mode = "reverse"  # fused attention kernels have no forward-mode AD
        self.theta = (flm.theta0 if theta is None else theta).detach()
        self.cache_vjp, self.jvp_mode = cache_vjp, jvp_mode
        size = chunk_size or batch.size
        self.chunks = [
            _Chunk(flm, batch.select(slice(s, s + size)), self.theta, batch.size)
            for s in range(0, batch.size, size)
        ]
        self.n_products = 0

    @property
    def dim(self) -> int:
        return self.theta.numel()

    # -- the three factors J, Lambda, J^T -------------------------------------------------------
    def _jvp_chunk(self, chunk: _Chunk, v: torch.Tensor) -> torch.Tensor:
        if self.jvp_mode != "reverse":
            try:
                return jvp(chunk.fn, (self.theta,), (v,))[1]
            except (NotImplementedError, RuntimeError) as err:
                if self.jvp_mode == "forward":
                    raise
                warnings.warn(
                    f"forward-mode J v failed ({type(err).__name__}: {err}); using the "
                    "double-vjp trick (slower, works with every attention kernel)",
                    stacklevel=3,
                )
                self.jvp_mode = "reverse"
        # J v = d/du <J^T u, v>: two reverse passes, no forward-mode AD needed.
        x = self.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            z = chunk.fn(x)
            u = torch.zeros_like(z, requires_grad=True)
            (jtu,) = torch.autograd.grad(z, x, u, create_graph=True)
            (jv,) = torch.autograd.grad(jtu, u, v)
        return jv

    def output_jvp(self, v: torch.Tensor) -> list[torch.Tensor]:
        """``J v`` per chunk: a list of ``[N_c, V]`` logit perturbations."""
        v = v.to(self.theta.dtype)
        return [self._jvp_chunk(c, v) for c in self.chunks]

    def _lambda(self, chunk: _Chunk, jv: torch.Tensor) -> torch.Tensor:
        q = chunk.q
        return chunk.positions.weights[:, None] * (q * jv - q * (q * jv).sum(-1, keepdim=True))

    def _vjp_chunk(self, chunk: _Chunk, u: torch.Tensor) -> torch.Tensor:
        if chunk.vjp_fn is not None:
            return chunk.vjp_fn(u)[0]
        _, fn = vjp(chunk.fn, self.theta)
        if self.cache_vjp:
            chunk.vjp_fn = fn
        return fn(u)[0]

    # -- public products -------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F v``."""
        self.n_products += 1
        v = v.to(self.theta.dtype)
        out = torch.zeros_like(self.theta)
        for chunk in self.chunks:
            out += self._vjp_chunk(chunk, self._lambda(chunk, self._jvp_chunk(chunk, v)))
        return out

    __call__ = matvec

    def quad(self, u: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """``u^T F w`` (``u^T F u`` when ``w`` is None) from J u and J w alone: no backward pass."""
        ju = self.output_jvp(u)
        jw = ju if w is None else self.output_jvp(w)
        return sum(
            (a * self._lambda(c, b)).sum() for c, a, b in zip(self.chunks, ju, jw, strict=True)
        )

    def quad_diag(
        self, vectors: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET
    ) -> torch.Tensor:
        """``[v_m^T F v_m for each row v_m]``: forward-mode products batched with vmap.

        The tangents go through the model together in blocks sized so their output
        perturbations ``[m, N_c, V]`` fit ``memory_budget``; falls back to one at a time when
        vmap or forward mode cannot run the model.
        """
        vectors = vectors.to(self.theta.dtype)
        out = torch.zeros(vectors.shape[0], dtype=self.theta.dtype, device=self.theta.device)
        for chunk in self.chunks:
            n, v = chunk.q.shape
            block = max(1, memory_budget // max(1, 3 * n * v * self.theta.element_size()))
            for start in range(0, vectors.shape[0], block):
                part = vectors[start : start + block]
                try:
                    if self.jvp_mode == "reverse":
                        raise NotImplementedError("forward mode disabled")
                    jv = vmap(lambda t, c=chunk: jvp(c.fn, (self.theta,), (t,))[1])(part)
                except (NotImplementedError, RuntimeError):
                    jv = torch.stack([self._jvp_chunk(chunk, t) for t in part])
                lam = self._lambda(chunk, jv)
                out[start : start + part.shape[0]] += (jv * lam).sum(dim=(-1, -2))
        return out

    def gram(self, vectors: torch.Tensor) -> torch.Tensor:
        """``V F V^T`` for the rows of ``vectors`` ``[k, P]``: all pairwise exact forms."""
        jvs = [self.output_jvp(v) for v in vectors]
        k = len(jvs)
        out = torch.zeros((k, k), dtype=self.theta.dtype, device=self.theta.device)
        for i in range(k):
            lam = [self._lambda(c, j) for c, j in zip(self.chunks, jvs[i], strict=True)]
            for j in range(i, k):
                val = sum((a * b).sum() for a, b in zip(jvs[j], lam, strict=True))
                out[i, j] = out[j, i] = val
        return out

    # -- factor rows -----------------------------------------------------------------------------
    def mc_factor_rows(
        self,
        samples_per_example: int = 1,
        generator: torch.Generator | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Monte-Carlo factor rows ``R`` ``[B * S, P]`` with ``E[R^T R] = F``.

        Row ``(b, s)`` is ``sqrt(1 / (B n_b S)) * grad sum_t log q_t(y_t)`` with every ``y_t``
        sampled from the model's own softmax at response position ``t`` (teacher forcing on the
        reference tokens). Scores have zero mean under ``q``, so cross-position terms vanish in
        expectation and the rows average to the exact ``F``.
        """
        s = int(samples_per_example)
        if s < 1:
            raise ValueError("samples_per_example must be at least 1")
        ids_rows, ys_rows, cs_rows = [], [], []
        for chunk in self.chunks:
            mask = chunk.positions.mask
            coef = (chunk.positions.weights / s).sqrt()
            for _ in range(s):
                drawn = torch.multinomial(chunk.q, 1, generator=generator).squeeze(-1)
                ys = torch.zeros(mask.shape, dtype=torch.long)
                cs = torch.zeros(mask.shape, dtype=self.theta.dtype)
                ys[mask], cs[mask] = drawn, coef
                ids_rows.append(chunk.batch.input_ids)
                ys_rows.append(ys)
                cs_rows.append(cs)
        width = max(x.shape[1] for x in ids_rows)
        ids = torch.cat([_pad(x, width) for x in ids_rows])
        ys = torch.cat([_pad(x, width - 1) for x in ys_rows])
        cs = torch.cat([_pad(x, width - 1) for x in cs_rows])
        flm = self.flm

        def score(theta: torch.Tensor, i: torch.Tensor, y: torch.Tensor, c: torch.Tensor):
            logp = torch.log_softmax(flm.logits(theta, i)[:-1], dim=-1)
            return (c * logp.gather(-1, y[:, None]).squeeze(-1)).sum()

        return per_sample_grads(
            score, self.theta, (ids, ys, cs), memory_budget=memory_budget, out_dtype=out_dtype
        )

    def empirical_factor_rows(
        self, memory_budget: int = DEFAULT_MEMORY_BUDGET, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Empirical-Fisher rows ``[B, P]``: ``grad NLL_b / sqrt(B)`` of the observed tokens.

        Only an option: at a saturated aligned model the observed tokens carry almost no
        gradient and this underestimates F by orders of magnitude (~200x on an early organism;
        docs/theory.md, "The Fisher of the alignment loss").
        """
        b = self.batch
        weights = response_weights(b, self.theta.dtype) / b.size**0.5
        return per_sample_grads(
            self.flm.example_nll,
            self.theta,
            (b.input_ids, weights),
            memory_budget=memory_budget,
            out_dtype=out_dtype,
        )


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
