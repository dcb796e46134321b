"""A hidden-space surrogate of the fine-tuning NLL: Hessian-vector products without the vocabulary.

``L~(theta) = sum_n w_n [g0_n . h_n(theta) + 1/2 |L_n^T (h_n(theta) - h0_n)|^2]`` over the response
positions, with ``h_n`` the final-normed hidden state, ``h0_n`` its value at theta0, ``g0_n =
W^T (q_n - e_{y_n}) = m_n - w_{y_n}`` (the NLL's gradient in the hidden state, exact) and ``L_n``
the top-k factor of curvature/head.py. At theta0 its gradient is exactly the NLL's gradient and
its Hessian is ``J^T M_c J + sum_n w_n g0_n . d^2 h_n``: the NLL's Hessian with only the softmax
curvature ``M`` coarsened to ``M_c`` (docs/theory.md, "The Fisher through the LM head").
"""

from __future__ import annotations

import copy

import torch

from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.head import (
    DEFAULT_VOCAB_KEEP,
    TopK,
    describe,
    kept_fraction,
    select_k,
)
from alignscope.curvature.losses import ResponsePositions
from alignscope.curvature.per_sample import DEFAULT_MEMORY_BUDGET
from alignscope.data.encode import LMBatch


class HiddenNLLSurrogate:
    """The fine-tuning loss for Hessian-vector products at ``flm.theta0`` (a callable of theta).

    Falls back to the exact mean NLL (``flm.mean_nll``) under the same rules as
    :class:`~alignscope.curvature.fisher.FisherOperator`'s ``vocab_keep``; ``self.vocabulary``
    records which, with ``k`` and the kept trace fraction of ``M`` over this batch. Its value is
    not the NLL: only its gradient and Hessian at theta0 are those stated above.

    Args:
        flm: the model as a function of the selected parameters.
        batch: the fine-tuning examples (this process' shard of ``n_total`` when data parallel;
            ``k`` is chosen from sums over the ranks, so it is the same on every rank).
        n_total: the size of the whole batch (default ``batch.size``).
        vocab_keep, vocab_k, memory_budget: as for ``FisherOperator``.
    """

    def __init__(
        self,
        flm: FunctionalLM,
        batch: LMBatch,
        n_total: int | None = None,
        *,
        vocab_keep: float = DEFAULT_VOCAB_KEEP,
        vocab_k: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.flm, self.batch, self.n_total = flm, batch, n_total
        self.positions = ResponsePositions(batch, flm.dtype, n_total=n_total)
        self.factor: torch.Tensor | None = None
        head = flm.head
        theta = flm.theta0
        ids, mask = batch.input_ids, self.positions.mask
        w = self.positions.weights
        h0: list[torch.Tensor] = []

        def parts(kmax: int) -> list[TopK]:
            weight, bias = flm.head_params(theta)
            with torch.no_grad():
                h0.append(flm.position_hidden(theta, ids, mask))
                return [TopK(h0[0], weight, bias, w, kmax)]

        k, tops, why = select_k(
            head, float(vocab_keep), vocab_k, self.positions.count, theta.element_size(),
            memory_budget, parts,
        )  # fmt: skip
        vocab = None if head is None else head.vocab
        if k is None:
            self.vocabulary = describe("exact", None, 1.0, vocab, why)
            return
        (part,) = tops
        self.factor, kept = part.factor(k)
        targets = batch.targets[mask]
        self.g0 = (part.m64 - part.W[targets].double()).to(flm.dtype)  # W^T (q - e_y), exact
        self.h0 = h0[0]
        frac = kept_fraction(kept, part.total)
        self.vocabulary = describe("coarsened", k, frac, vocab, None)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        if self.factor is None:
            return self.flm.mean_nll(theta, self.batch, self.n_total)
        h = self.flm.position_hidden(theta, self.batch.input_ids, self.positions.mask)
        s = torch.bmm((h - self.h0)[:, None, :], self.factor.mT)[:, 0]
        per = (self.g0 * h).sum(-1) + 0.5 * (s * s).sum(-1)
        return (self.positions.weights * per).sum()

    def split(self, parts: list[LMBatch]) -> list[HiddenNLLSurrogate]:
        """This surrogate as a sum of terms over ``parts``, consecutive sub-batches of its batch
        in order (``batch.select``): each term holds its positions' slice of the factors, so
        the terms sum to this surrogate exactly. No collective calls (safe per rank)."""
        n_total = self.n_total or self.batch.size
        pieces, start = [], 0
        for part in parts:
            piece = copy.copy(self)
            piece.batch, piece.n_total = part, n_total
            piece.positions = ResponsePositions(part, self.flm.dtype, n_total=n_total)
            stop = start + piece.positions.count
            if self.factor is not None:
                piece.factor = self.factor[start:stop]
                piece.g0, piece.h0 = self.g0[start:stop], self.h0[start:stop]
            pieces.append(piece)
            start = stop
        if start != self.positions.count:
            raise ValueError("the parts do not cover the surrogate's batch")
        return pieces
