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
from alignscope.curvature.head import (
    DEFAULT_VOCAB_KEEP,
    TopK,
    describe,
    kept_fraction,
    select_k,
)
from alignscope.curvature.losses import REFERENCES, ResponsePositions
from alignscope.curvature.operator import ParameterOperator, check_matmat_input
from alignscope.curvature.per_sample import DEFAULT_MEMORY_BUDGET, per_sample_grads
from alignscope.data.encode import LMBatch


class _Chunk:
    """One slice of examples: its positions, its softmax at theta (stored, or recomputed when
    asked for), optionally a cached vjp, and, when the vocabulary is coarsened, the hidden-space
    curvature factor ``[N_c, k+1, H]`` (``fn`` then maps theta to hidden states ``[N_c, H]``)."""

    def __init__(
        self, flm: FunctionalLM, batch: LMBatch, theta: torch.Tensor, n_total: int, store: bool
    ):
        self.batch = batch
        self.theta = theta
        self.positions = ResponsePositions(batch, flm.dtype, n_total=n_total)
        ids, mask = batch.input_ids, self.positions.mask
        self.logits_fn = lambda th: flm.position_logits(th, ids, mask)
        self.hidden_fn = lambda th: flm.position_hidden(th, ids, mask)
        self.fn = self.logits_fn
        self.factor: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.table = self.softmax() if store else None
        self.vjp_fn: Callable | None = None
        self.jvp_fn: Callable | None = None  # J t by transposing vjp_fn (jvp_mode auto/reverse)
        self.out_shape: torch.Size | None = None  # the shape of fn's output

    def softmax(self) -> torch.Tensor:
        """``[N_c, V]`` softmax at theta: the stored table, or one no-grad forward pass."""
        if self.table is not None:
            return self.table
        with torch.no_grad():
            return torch.softmax(self.logits_fn(self.theta), dim=-1)

    def curvature(self) -> torch.Tensor:
        """The output curvature: the factor ``L`` when coarsened, else the softmax ``q``."""
        return self.factor if self.factor is not None else self.softmax()


class FisherOperator(ParameterOperator):
    """Exact Fisher / GGN products of the softmax outputs at the response positions of ``batch``.

    Implements :class:`~alignscope.curvature.operator.LinearOperator`; ``matmat`` pushes several
    vectors through one vmapped pass.

    Args:
        flm: the model as a function of the selected parameters.
        batch: the (prompt, response) examples whose response positions define ``F``.
        theta: where ``F`` is measured; defaults to the aligned parameters ``flm.theta0``.
        chunk_size: how many examples go through the model at once (default: all).
        cache_vjp: keep each chunk's backward graph (``J^T u``) and, in modes ``"auto"`` and
            ``"reverse"``, the graph of its transpose (``J t``), so a product costs one
            backward-of-backward pass and one backward pass, with no forward pass of the model.
        jvp_mode: how ``J t`` is computed. ``"auto"`` (default): with ``cache_vjp``, as the
            vjp of the cached linear map ``u -> J^T u`` (kept per chunk; 3.8x faster than
            forward mode per product on SmolLM2 with LoRA, which recomputes the primal and
            multiplies every frozen weight by its zero tangent), falling back with a warning to
            forward mode when the model has no double backward; without ``cache_vjp``, forward
            mode falling back to reverse. ``"forward"``: forward-mode AD (needs eager attention).
            ``"reverse"``: the double-vjp trick (the cached transpose with ``cache_vjp``),
            works with any kernel that has a double backward.
        memory_budget: bytes that the vectors of one batched pass may take (their output
            perturbations ``[m, N_c, V]`` and parameter-sized results); ``matmat``, ``gram`` and
            ``quad_diag`` split their vectors into blocks that fit it.
        reference: where the softmax ``q`` of the curvature ``diag q - q q^T`` comes from (at
            ``flm.theta0`` it is the KL's reference distribution): ``"recompute"`` (default)
            runs one no-grad forward pass per chunk and call (per block of vectors in
            ``matmat``/``gram``/``quad_diag``), so only one chunk's ``[N_c, V]`` is alive at a
            time; ``"table"`` keeps every chunk's ``q`` resident (``positions x vocabulary``)
            and saves that pass. The products are the same numbers either way.
        n_total: the number of examples of the whole batch when ``batch`` is one process'
            shard of it (data parallel, :mod:`alignscope.distributed`): the weights stay those
            of the whole batch, so the shards' products sum to its product. Default:
            ``batch.size``.
        vocab_keep: coarsen the vocabulary (docs/theory.md, "The Fisher through the LM head"):
            the products work on the final hidden states with the output curvature of the
            top-``k`` tokens plus one tail class, ``k`` the smallest of 1, 2, 4, ... whose kept
            trace fraction ``tr F_c / tr F`` is at least ``vocab_keep``. The coarsened ``F_c`` is
            a lower bound of ``F`` (``F - F_c`` is PSD); ``1.0`` is the exact vocabulary. Only
            with a recognised decoder whose linear LM head is not selected, a vocabulary at
            least 4x the hidden size, a factor at most a quarter of the vocabulary wide and
            within ``memory_budget``; otherwise exact. ``self.vocabulary`` says which.
        vocab_k: coarsen to exactly this ``k`` (tests, benchmarks; overrides ``vocab_keep``
            and the rules above except the head's).

    Raises:
        ValueError: an unknown ``jvp_mode`` or ``reference``, or a ``vocab_keep`` outside
            ``(0, 1]``.
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
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        reference: str = "recompute",
        n_total: int | None = None,
        vocab_keep: float = DEFAULT_VOCAB_KEEP,
        vocab_k: int | None = None,
    ) -> None:
        if jvp_mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"unknown jvp_mode {jvp_mode!r}; use auto, forward or reverse")
        if reference not in REFERENCES:
            raise ValueError(f"unknown reference {reference!r}; use recompute or table")
        self.reference = reference
        self.flm, self.batch = flm, batch
        if jvp_mode != "reverse" and not ensure_eager_attention(flm.model):
            jvp_mode = "reverse"  # fused attention kernels have no forward-mode AD
        self.theta = (flm.theta0 if theta is None else theta).detach()
        self.cache_vjp, self.jvp_mode = cache_vjp, jvp_mode
        self.memory_budget = int(memory_budget)
        self.vmap_ok = True  # set False (with one warning) when vmap cannot run the model
        self.transpose_ok = True  # set False (with one warning) when J t cannot be transposed
        size = chunk_size or batch.size
        self.n_total = batch.size if n_total is None else int(n_total)
        table = reference == "table"
        self.chunks = [
            _Chunk(flm, batch.select(slice(s, s + size)), self.theta, self.n_total, table)
            for s in range(0, batch.size, size)
        ]
        self.vocabulary = self._coarsen(float(vocab_keep), vocab_k)
        self.n_products = 0

    def _coarsen(self, keep: float, vocab_k: int | None) -> dict:
        """Choose ``k`` and build each chunk's factor, or stay exact; the record of which."""
        head = self.flm.head

        def parts(kmax: int) -> list[TopK]:
            weight, bias = self.flm.head_params(self.theta)
            with torch.no_grad():
                return [
                    TopK(c.hidden_fn(self.theta), weight, bias, c.positions.weights, kmax)
                    for c in self.chunks
                ]

        n = sum(c.positions.count for c in self.chunks)
        item = self.theta.element_size()
        k, tops, why = select_k(head, keep, vocab_k, n, item, self.memory_budget, parts)
        vocab = None if head is None else head.vocab
        if k is None:
            return describe("exact", None, 1.0, vocab, why)
        kept = 0.0
        for chunk, part in zip(self.chunks, tops, strict=True):
            chunk.factor, part_kept = part.factor(k)
            chunk.fn = chunk.hidden_fn
            chunk.table, chunk.vjp_fn, chunk.jvp_fn = None, None, None
            kept += part_kept
        frac = kept_fraction(kept, sum(p.total for p in tops))
        return describe("coarsened", k, frac, vocab, None)

    @property
    def n_examples(self) -> int:
        """How many examples ``F`` averages over (the rows per draw of the Gram route)."""
        return self.batch.size

    # -- the three factors J, Lambda, J^T -------------------------------------------------------
    def _transposed(self, chunk: _Chunk) -> Callable | None:
        """``t -> (J t,)`` for ``chunk``: the vjp of the linear map ``u -> J^T u`` through the
        cached backward graph, itself cached; None when not used (``cache_vjp`` off, forward
        mode, or it failed before)."""
        if not (self.cache_vjp and self.transpose_ok and self.jvp_mode in ("auto", "reverse")):
            return None
        if chunk.jvp_fn is None:
            fn = self._chunk_vjp_fn(chunk)
            zeros = self.theta.new_zeros(chunk.out_shape)
            # J^T u is linear in u, so its vjp at u = 0 is J t at every t: one graph for all.
            _, chunk.jvp_fn = vjp(lambda u: fn(u)[0], zeros)
        return chunk.jvp_fn

    def _transpose_failed(self, err: Exception) -> None:
        if self.jvp_mode == "reverse":
            raise err
        warnings.warn(
            f"J v by transposing the cached backward graph failed ({type(err).__name__}: "
            f"{err}); using forward-mode AD",
            stacklevel=4,
        )
        self.transpose_ok = False

    def _jvp_chunk(self, chunk: _Chunk, v: torch.Tensor) -> torch.Tensor:
        try:
            lin = self._transposed(chunk)
            if lin is not None:
                return lin(v)[0]
        except (NotImplementedError, RuntimeError) as err:
            self._transpose_failed(err)
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
        """``J v`` per chunk: a list of ``[N_c, V]`` logit perturbations (``[N_c, H]`` hidden
        ones when the vocabulary is coarsened)."""
        v = v.to(self.theta.dtype)
        return [self._jvp_chunk(c, v) for c in self.chunks]

    def _lambda(self, chunk: _Chunk, jv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The weighted output curvature applied to ``jv`` (``[..., N_c, V]`` logit or, with a
        factor ``q`` ``[N_c, k+1, H]``, ``[..., N_c, H]`` hidden perturbations)."""
        w = chunk.positions.weights
        if q.dim() == 3:  # coarsened: w_n L_n L_n^T on the hidden states
            # row vectors times L_n^T and L_n: batched products that read L once, ~3x faster
            # on CPU than the einsum's matrix-times-column form
            x = (jv[None] if jv.dim() == 2 else jv).transpose(0, 1)  # [N_c, m, H]
            s = torch.bmm(x, q.mT) * w[:, None, None]
            out = torch.bmm(s, q).transpose(0, 1)
            return out[0] if jv.dim() == 2 else out
        return w[:, None] * (q * jv - q * (q * jv).sum(-1, keepdim=True))

    def _chunk_vjp_fn(self, chunk: _Chunk) -> Callable:
        if chunk.vjp_fn is not None:
            return chunk.vjp_fn
        out, fn = vjp(chunk.fn, self.theta)
        chunk.out_shape = out.shape
        if self.cache_vjp:
            chunk.vjp_fn = fn
        return fn

    def _vjp_chunk(self, chunk: _Chunk, u: torch.Tensor) -> torch.Tensor:
        return self._chunk_vjp_fn(chunk)(u)[0]

    # -- the same factors for a block of vectors at once ----------------------------------------
    def _block_size(self, chunk: _Chunk, q: torch.Tensor) -> int:
        """How many vectors one vmapped pass over ``chunk`` takes within the memory budget.

        Per vector: its output perturbation and curvature-weighted copy ``[N_c, V]`` (``[N_c,
        H]`` and the ``[N_c, k+1]`` projection when coarsened; and the vmapped pass's own copy
        of it), plus the parameter-sized result and its tangent.
        """
        per_vector = (_out_floats(q) + 2 * self.dim) * self.theta.element_size()
        return max(1, self.memory_budget // max(1, per_vector))

    def _jvp_vmapped(self, chunk: _Chunk, tangents: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        try:
            lin = self._transposed(chunk)
            if lin is not None:
                return vmap(lambda t: lin(t)[0])(tangents)
        except (NotImplementedError, RuntimeError):
            if self.jvp_mode == "reverse":
                raise
            # vmap or the transpose failed: one plain product tells which (it warns and
            # switches to forward mode if it is the transpose)
            self._jvp_chunk(chunk, tangents[0])
            if self.transpose_ok:
                raise
        if self.jvp_mode == "reverse":
            # J t = the vjp of the linear map u -> J^T u, taken at u = 0: vmappable, and it
            # reuses the chunk's cached backward graph.
            fn = self._chunk_vjp_fn(chunk)
            _, lin = vjp(lambda u: fn(u)[0], _out_zeros(q))
            return vmap(lambda t: lin(t)[0])(tangents)
        return vmap(lambda t: jvp(chunk.fn, (self.theta,), (t,))[1])(tangents)

    def _vmap_failed(self, err: Exception) -> None:
        warnings.warn(
            f"batched Fisher products failed under vmap ({type(err).__name__}: {err}); "
            "multiplying one vector at a time",
            stacklevel=4,
        )
        self.vmap_ok = False

    def _jvp_block(self, chunk: _Chunk, tangents: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``J t`` for every row ``t`` of ``tangents`` ``[m, P]``: ``[m, N_c, V]`` (``[m, N_c,
        H]`` when coarsened) in one pass."""
        if self.vmap_ok:
            try:
                return self._jvp_vmapped(chunk, tangents, q)
            except (NotImplementedError, RuntimeError) as err:
                failure = err
                if self.jvp_mode == "auto":
                    # Forward mode itself may be what failed: one plain product decides (it warns
                    # and switches to reverse mode if so), then the batched reverse route.
                    self._jvp_chunk(chunk, tangents[0])
                    if self.jvp_mode == "reverse":
                        try:
                            return self._jvp_vmapped(chunk, tangents, q)
                        except (NotImplementedError, RuntimeError) as again:
                            failure = again
                self._vmap_failed(failure)
        return torch.stack([self._jvp_chunk(chunk, t) for t in tangents])

    def _vjp_block(self, chunk: _Chunk, cotangents: torch.Tensor) -> torch.Tensor:
        """``J^T u`` for every ``u`` in ``cotangents`` ``[m, N_c, V]``: ``[m, P]``."""
        fn = self._chunk_vjp_fn(chunk)
        if self.vmap_ok:
            try:
                return vmap(lambda u: fn(u)[0])(cotangents)
            except (NotImplementedError, RuntimeError) as err:
                self._vmap_failed(err)
        return torch.stack([fn(u)[0] for u in cotangents])

    # -- public products -------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F v``."""
        self.n_products += 1
        v = v.to(self.theta.dtype)
        out = torch.zeros_like(self.theta)
        for chunk in self.chunks:
            jv = self._jvp_chunk(chunk, v)
            out += self._vjp_chunk(chunk, self._lambda(chunk, jv, chunk.curvature()))
        return out

    __call__ = matvec

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``F V`` for the columns of ``vectors`` ``[P, k]``: exact, several vectors per pass.

        Each chunk of examples runs one vmapped forward-mode pass (``J V``) and one vmapped
        backward pass (``J^T Lambda J V``) per block of vectors that fits ``memory_budget``;
        falls back to one vector at a time (with one warning naming the error) when vmap cannot
        run the model.
        """
        vectors = check_matmat_input(self, vectors)
        k = vectors.shape[1]
        self.n_products += k
        rows = vectors.T.contiguous()  # vmap maps over the leading dimension
        out = torch.zeros((k, self.dim), dtype=self.theta.dtype, device=self.theta.device)
        for chunk in self.chunks:
            q = chunk.curvature()
            block = self._block_size(chunk, q)
            for start in range(0, k, block):
                part = rows[start : start + block]
                lam = self._lambda(chunk, self._jvp_block(chunk, part, q), q)
                out[start : start + part.shape[0]] += self._vjp_block(chunk, lam)
        return out.T

    def quad(self, u: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """``u^T F w`` (``u^T F u`` when ``w`` is None) from J u and J w alone: no backward pass."""
        ju = self.output_jvp(u)
        jw = ju if w is None else self.output_jvp(w)
        return sum(
            (a * self._lambda(c, b, c.curvature())).sum()
            for c, a, b in zip(self.chunks, ju, jw, strict=True)
        )

    def quad_diag(self, vectors: torch.Tensor, memory_budget: int | None = None) -> torch.Tensor:
        """``[v_m^T F v_m for each row v_m]``: forward-mode products batched with vmap.

        The tangents go through the model together in blocks sized so their output
        perturbations ``[m, N_c, V]`` fit ``memory_budget`` (default: the operator's); falls
        back to one at a time when vmap cannot run the model.
        """
        vectors = vectors.to(self.theta.dtype)
        out = torch.zeros(vectors.shape[0], dtype=self.theta.dtype, device=self.theta.device)
        for chunk in self.chunks:
            q = chunk.curvature()
            block = self._forms_block(q, memory_budget)
            for start in range(0, vectors.shape[0], block):
                part = vectors[start : start + block]
                jv = self._jvp_block(chunk, part, q)
                lam = self._lambda(chunk, jv, q)
                out[start : start + part.shape[0]] += (jv * lam).sum(dim=(-1, -2))
        return out

    def gram(self, vectors: torch.Tensor) -> torch.Tensor:
        """``V F V^T`` for the rows of ``vectors`` ``[k, P]``: all pairwise exact forms.

        ``(J V)^T Lambda (J V)`` per chunk from batched forward-mode products alone: the same
        numbers as ``V @ matmat(V.T)`` without its backward pass.
        """
        vectors = vectors.to(self.theta.dtype)
        k = vectors.shape[0]
        out = torch.zeros((k, k), dtype=self.theta.dtype, device=self.theta.device)
        for chunk in self.chunks:
            q = chunk.curvature()
            block = self._forms_block(q, None)
            jv = torch.cat(
                [self._jvp_block(chunk, vectors[s : s + block], q) for s in range(0, k, block)]
            )
            out += torch.einsum("inv,jnv->ij", jv, self._lambda(chunk, jv, q))
        return (out + out.T) / 2  # symmetric to the last bit, as a Gram matrix must be

    def _forms_block(self, q: torch.Tensor, memory_budget: int | None) -> int:
        """Vectors per pass for forms (no backward): ``J v`` and ``Lambda J v`` and vmap's copy."""
        budget = self.memory_budget if memory_budget is None else memory_budget
        return max(1, budget // max(1, _out_floats(q) * self.theta.element_size()))

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
        expectation and the rows average to the exact ``F``: the exact vocabulary always (the
        samples are tokens, so coarsening would save nothing here).
        """
        s = int(samples_per_example)
        if s < 1:
            raise ValueError("samples_per_example must be at least 1")
        ids_rows, ys_rows, cs_rows = [], [], []
        for chunk in self.chunks:
            mask = chunk.positions.mask
            coef = (chunk.positions.weights / s).sqrt()
            q = chunk.softmax()
            for _ in range(s):
                drawn = torch.multinomial(q, 1, generator=generator).squeeze(-1)
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

        def score(theta: torch.Tensor, i: torch.Tensor, y: torch.Tensor, c: torch.Tensor, *h):
            logp = torch.log_softmax(flm.example_logits(theta, i, *h)[:-1], dim=-1)
            return (c * logp.gather(-1, y[:, None]).squeeze(-1)).sum()

        return per_sample_grads(
            score,
            self.theta,
            (ids, ys, cs, *flm.example_extra(ids)),  # the cached prefix, when there is one
            memory_budget=memory_budget,
            out_dtype=out_dtype,
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
        weights = response_weights(b, self.theta.dtype) / self.n_total**0.5
        return per_sample_grads(
            self.flm.example_nll,
            self.theta,
            (b.input_ids, weights, *self.flm.example_extra(b.input_ids)),
            memory_budget=memory_budget,
            out_dtype=out_dtype,
        )


def _out_floats(q: torch.Tensor) -> int:
    """Floats per vector of a block: ``J v``, its curvature-weighted copy and vmap's copy."""
    if q.dim() == 3:  # coarsened factor [N, k+1, H]
        n, k1, h = q.shape
        return n * (3 * h + k1)
    return 3 * q.numel()


def _out_zeros(q: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like one vector's output perturbation."""
    if q.dim() == 3:
        return q.new_zeros(q.shape[0], q.shape[2])
    return torch.zeros_like(q)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
