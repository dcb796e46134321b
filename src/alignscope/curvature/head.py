"""The LM head seen from the hidden states, and the softmax curvature coarsened to the top-k tokens.

At a response position with final-normed hidden state ``h``, logits ``z = W h (+ b)`` and softmax
``q``, the Fisher's curvature pulled back to the hidden state is
``M = W^T (diag q - q q^T) W = sum_i q_i (w_i - m)(w_i - m)^T`` with ``m = W^T q``. Merging every
token outside the top-``k`` set ``S`` into one tail class ``T`` (mass ``r``, mean row ``w_T``)
gives ``M_c = L L^T`` with the ``H x (k+1)`` factor
``L = [sqrt(q_i) (w_i - m) for i in S, sqrt(r) (w_T - m)]``: the Fisher of the coarsened
categorical, so ``M - M_c`` (the within-tail spread) is positive semi-definite and the coarsened
Fisher is a lower bound of the exact one. ``tr M`` is cheap and exact, so the kept fraction
``tr M_c / tr M`` is measured and reported (docs/theory.md, "The Fisher through the LM head").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alignscope.curvature.prefix import _find_lm
from alignscope.params import ParamSelection

log = logging.getLogger(__name__)

DEFAULT_VOCAB_KEEP = 0.99
# Coarsening pays only when the head dominates a product: a vocabulary at least this many times
# the hidden size, and a factor at most 1/COARSE_MIN_GAIN of the vocabulary wide.
COARSE_MIN_GAIN = 4
_GATHER_BYTES = 2**27  # rows of W gathered at once while measuring the ladder


@dataclass
class LMHead:
    """Where a recognised causal LM's decoder body and LM head are, by root parameter name."""

    body: nn.Module  # returns the final-normed hidden states
    body_prefix: str  # root names of the body's parameters start with it
    weight_name: str  # root name of the head weight (the embedding's name when tied)
    bias_name: str | None
    vocab: int
    hidden: int
    selected: bool  # the head's weight or bias is in the selection: it depends on theta


def find_head(root: nn.Module, selection: ParamSelection) -> LMHead | None:
    """The decoder body and linear LM head of ``root`` (bare or PEFT-wrapped), or None when the
    architecture is not recognised or the head is not a plain ``nn.Linear`` (an adapter on it)."""
    found = _find_lm(root)
    if found is None:
        return None
    path, lm, arch = found
    head = lm.lm_head
    if type(head) is not nn.Linear:
        log.debug("LM head is %s, not nn.Linear: the vocabulary path stays exact", type(head))
        return None
    names = {id(p): n for n, p in root.named_parameters()}
    weight_name = names.get(id(head.weight))
    bias_name = None if head.bias is None else names.get(id(head.bias))
    if weight_name is None or (head.bias is not None and bias_name is None):
        return None
    chosen = {id(p) for p in selection.tensors(root).values()}
    selected = id(head.weight) in chosen or (head.bias is not None and id(head.bias) in chosen)
    body = getattr(lm, arch[0])
    # The body's name under root by identity: a PEFT wrapper forwards attribute lookups, so the
    # LM may be found at root itself while its parameters are named base_model.model....
    base = {id(m): n for n, m in root.named_modules()}.get(id(body))
    if base is None:
        return None
    return LMHead(
        body=body,
        body_prefix=base + "." if base else "",
        weight_name=weight_name,
        bias_name=bias_name,
        vocab=int(head.out_features),
        hidden=int(head.in_features),
        selected=selected,
    )


def ladder(vocab: int) -> list[int]:
    """The candidate ``k``: powers of two whose factor (``k + 1`` columns) is at most
    ``vocab / COARSE_MIN_GAIN`` wide."""
    out, k = [], 1
    while (k + 1) * COARSE_MIN_GAIN <= vocab:
        out.append(k)
        k *= 2
    return out


class TopK:
    """The hidden-space curvature of one set of positions, measured in float64 for any ``k``.

    ``kept(k)`` (``sum_n w_n tr M_c,n`` for the top-``k`` coarsening) is evaluated for growing
    ``k`` only: each call gathers the rows of ``W`` between the previous ``k`` and this one once,
    and keeps their factor columns (in the model's dtype) for :meth:`factor`.
    """

    def __init__(
        self,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weights: torch.Tensor,
        kmax: int,
    ) -> None:
        self.dtype = h.dtype
        # The logits in the model's dtype (as the exact path has them); the softmax, the mean
        # row m and every sum in float64, where tr M's cancellation costs ~1e-16 |w|^2.
        self.W = weight.detach()
        z = h.detach() @ self.W.T
        if bias is not None:
            z = z + bias.detach()
        q = torch.softmax(z.double(), dim=-1)
        del z
        w64 = self.W.double()
        m = q @ w64  # [N, H]
        tr = (q @ (w64**2).sum(-1) - (m**2).sum(-1)).clamp_min(0)  # sum q_i |w_i|^2 - |m|^2
        del w64
        self.m64 = m
        self.m = m.to(self.dtype)
        self.w = weights.double()
        self.total = float((self.w * tr).sum())
        self.vocab = q.shape[-1]
        self.q, self.idx = q.topk(min(int(kmax), self.vocab), dim=-1)  # sorted, descending
        self.rest = q.sum(-1, keepdim=True) - self.q.cumsum(-1)  # tail mass r after each k
        del q
        n = self.m.shape[0]
        self._head = torch.zeros(n, dtype=torch.float64)  # sum_{i in S} q_i |w_i - m|^2
        self._v = torch.zeros_like(self.m64)  # sum_{i in S} q_i (w_i - m)
        self._cols: list[torch.Tensor] = []  # sqrt(q_i) (w_i - m) for i in S, [N, k_b, H]
        self._done = 0

    def _advance(self, k: int) -> None:
        if k < self._done:
            raise ValueError("TopK.kept takes growing k")
        if k == self._done:
            return
        n, h = self.m.shape
        block = torch.empty(n, k - self._done, h, dtype=self.dtype)
        step = max(1, _GATHER_BYTES // ((k - self._done) * h * block.element_size()))
        for s in range(0, n, step):
            part = block[s : s + step]
            torch.index_select(self.W, 0, self.idx[s : s + step, self._done : k].reshape(-1),
                               out=part.view(-1, h))  # fmt: skip
            part -= self.m[s : s + step, None]
            root = self.q[s : s + step, self._done : k].sqrt()
            part *= root.to(self.dtype)[..., None]  # the factor's columns
            self._head[s : s + step] += (part**2).sum((1, 2)).double()
            self._v[s : s + step] += torch.einsum("nk,nkh->nh", root.to(self.dtype), part).double()
        self._cols.append(block)
        self._done = k

    def _tail(self, k: int) -> torch.Tensor:
        """``sqrt(r) (w_T - m) = -v / sqrt(r)`` per position (zero when nothing is left)."""
        r = self.rest[:, k - 1] if k < self.vocab else torch.zeros_like(self.rest[:, 0])
        safe = torch.where(r > 0, r, torch.ones_like(r))
        return torch.where((r > 0)[:, None], -self._v / safe.sqrt()[:, None], 0.0)

    def kept(self, k: int) -> float:
        """``sum_n w_n tr M_c,n`` for the top-``k`` coarsening."""
        self._advance(k)
        tail = (self._tail(k) ** 2).sum(-1)
        return float((self.w * (self._head + tail)).sum())

    def factor(self, k: int) -> tuple[torch.Tensor, float]:
        """``L`` ``[N, k+1, H]`` in the model's dtype (the last ``k`` asked for), and
        ``sum_n w_n |L_n|_F^2`` (float64)."""
        kept = self.kept(k)  # raises for a k below the last one measured
        full = torch.cat([*self._cols, self._tail(k).to(self.dtype)[:, None]], dim=1)
        self._cols = []
        return full, kept


def choose_k(
    parts: Sequence[TopK],
    keep: float,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    candidates: Sequence[int],
) -> tuple[int | None, float]:
    """The smallest candidate ``k`` whose kept trace fraction over all ``parts`` (summed over
    the ranks by ``reduce``, so every rank takes the same ``k``) is at least ``keep``; ``(None,
    best fraction seen)`` when none is."""
    total = float(reduce(torch.tensor([sum(p.total for p in parts)], dtype=torch.float64))[0])
    best = 0.0
    for k in candidates:
        kept = float(reduce(torch.tensor([sum(p.kept(k) for p in parts)], dtype=torch.float64))[0])
        frac = kept / total if total > 0 else 1.0
        best = max(best, frac)
        if frac >= keep:
            return k, frac
    return None, best


def vocab_plan(
    head: LMHead | None, keep: float, vocab_k: int | None
) -> tuple[list[int], str | None]:
    """The candidate ``k`` for coarsening, or ``([], reason)`` when the exact path is taken."""
    if head is None:
        return [], "no recognised linear LM head (exact vocabulary)"
    if head.selected:
        return [], "the LM head is in the selection (exact vocabulary)"
    if vocab_k is not None:
        if not 1 <= vocab_k <= head.vocab:
            raise ValueError(f"vocab_k={vocab_k}: use 1..{head.vocab} (the vocabulary size)")
        return [int(vocab_k)], None
    if not 0 < keep <= 1:
        raise ValueError(f"vocab_keep={keep}: use a fraction in (0, 1]; 1.0 is exact")
    if keep >= 1.0:
        return [], "vocab_keep 1.0 (exact vocabulary)"
    if head.vocab < COARSE_MIN_GAIN * head.hidden:
        return [], (
            f"vocabulary {head.vocab} < {COARSE_MIN_GAIN} x hidden {head.hidden}: the head is "
            "cheap, exact vocabulary"
        )
    return ladder(head.vocab), None


def select_k(
    head: LMHead | None,
    keep: float,
    vocab_k: int | None,
    n_positions: int,
    itemsize: int,
    memory_budget: int,
    make_parts: Callable[[int], list[TopK]],
) -> tuple[int | None, list[TopK], str | None]:
    """``(k, parts, None)`` for the coarsening to take, or ``(None, [], why)`` for the exact path.

    ``n_positions``: this process' response positions (summed over the ranks, like every sum
    here, so every rank decides alike); candidates whose factor (over all positions) exceeds
    ``memory_budget`` are dropped first. ``make_parts(kmax)``: the :class:`TopK` of each chunk.
    """
    from alignscope import distributed as dist

    candidates, why = vocab_plan(head, keep, vocab_k)
    if not candidates:
        return None, [], why
    total = dist.all_reduce_sum(torch.tensor([float(n_positions)], dtype=torch.float64))
    if vocab_k is None:
        fits = int(total[0]) * head.hidden * itemsize
        candidates = [k for k in candidates if (k + 1) * fits <= memory_budget]
        if not candidates:
            return None, [], "the smallest factor exceeds the memory budget (exact vocabulary)"
    parts = make_parts(max(candidates))
    # a forced k is taken whatever it keeps
    k, _ = choose_k(parts, 0.0 if vocab_k else keep, dist.all_reduce_sum, candidates)
    if k is None:
        return None, [], f"no k <= {max(candidates)} keeps {keep} of the trace (exact vocabulary)"
    return k, parts, None


def kept_fraction(kept: float, total: float) -> float:
    """``kept / total`` summed over the ranks (1 for a zero curvature)."""
    from alignscope import distributed as dist

    sums = dist.all_reduce_sum(torch.tensor([kept, total], dtype=torch.float64))
    return float(sums[0] / sums[1]) if float(sums[1]) > 0 else 1.0


def describe(mode: str, k: int | None, kept: float, vocab: int | None, why: str | None) -> dict:
    """The record diagnose writes: ``{"mode", "k", "kept_trace", "vocab"[, "why"]}``."""
    out = {"mode": mode, "k": k, "kept_trace": kept, "vocab": vocab}
    if why:
        out["why"] = why
    return out
