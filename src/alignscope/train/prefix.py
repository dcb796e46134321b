"""Training steps on the suffix only: the frozen prefix's activations cached per example.

When every trainable parameter (``requires_grad``) lies in decoder layer ``L`` or above (a
last-layers selection, LoRA on late layers), the embeddings and layers ``< L`` are a fixed
function of each example's tokens. :class:`PrefixForward` computes the hidden states entering
layer ``L`` once per example, keeps them within a memory budget, and runs every later forward
pass on those examples (the training step's, a guard's anchor replay on safety prompts, a
guard's reference at theta0) through layers ``L..``, the final norm and the LM head only, with
the live parameters, so autograd trains the suffix as the whole network would.

Why per example: a batch is a new draw of examples at every step (seeded permutations), so a
batch's activations would never be reused; an example's recur every epoch, and a fixed
replay set (the safety prompts) at every step. Batches are right-padded and unmasked, so the
causal attention makes position ``t`` of an example depend on its tokens ``<= t`` only: its
real positions are the same whatever the batch. Positions past an example's end (padding) feed
nothing the losses read, so the assembled batch carries zeros there (from a cached row) or the
prefix's own values (from a fresh pass); the logits at real positions are the whole network's.
What the suffix layers get besides the hidden states (rotary tables, the causal mask) depends
only on the batch's shape and is kept per ``(batch size, width)``; a batch of a new shape whose
examples are all cached runs at the nearest wider width it knows (its logits cut back), or
recomputes the prefix when there is none.

The cache is dropped when a prefix tensor changes in place (an optimizer touching a frozen
parameter) and is not used while the prefix has active dropout, gradients on a prefix
parameter, or params swapped in that the prefix uses: those forwards run the whole network.
Only the recognised decoders of :mod:`alignscope.curvature.prefix`, and not with rotary
embeddings that change with the sequence length (``dynamic``, ``longrope``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from alignscope.curvature.prefix import DEFAULT_PREFIX_MEMORY_BUDGET, PrefixCache, _tensors
from alignscope.data.encode import LMBatch
from alignscope.params import ParamSelection

log = logging.getLogger(__name__)

LayerInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


def _nbytes(tensors: list[torch.Tensor]) -> int:
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


_WIDTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope_type(config: Any) -> str | None:
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            return params.get("rope_type") or params.get("type")
    return None


def trainable_selection(model: nn.Module) -> ParamSelection:
    """The parameters of ``model`` that require grad, as a selection."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return ParamSelection([n for n, _ in named], [p.shape for _, p in named])


class PrefixForward:
    """Logits of ``model`` on :class:`~alignscope.data.encode.LMBatch` es with the frozen
    prefix's hidden states cached per example (see the module docstring).

    Build it with :meth:`build` (None when the model or its trainable parameters allow no
    frozen prefix). ``logits`` returns None where the cache does not apply; callers then run
    the whole network (:func:`lm_logits` does both).
    """

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache
        self.model = cache.root
        self.memory_budget = cache.memory_budget
        self._suffix_names = set(cache.suffix_names)
        self._rows: dict[bytes, torch.Tensor] = {}  # per example: [length, H]
        self._inputs: OrderedDict[tuple[int, int], LayerInputs] = OrderedDict()
        self._inputs_bytes: dict[tuple[int, int], int] = {}
        self._row_bytes = 0
        self._version = cache._version()
        self.n_prefix = 0  # forwards that ran the prefix (a fresh capture)
        self.n_suffix = 0  # forwards that ran the suffix only, every example from the cache
        self.n_whole = 0  # forwards the cache did not apply to

    @classmethod
    def build(
        cls,
        model: nn.Module,
        selection: ParamSelection | None = None,
        memory_budget: int = DEFAULT_PREFIX_MEMORY_BUDGET,
    ) -> PrefixForward | None:
        """The cached forward of ``model`` whose trained parameters are ``selection`` (default:
        those that require grad); None when there is no frozen prefix or the budget is 0."""
        if memory_budget <= 0:
            return None
        selection = selection if selection is not None else trainable_selection(model)
        if not selection.names:
            return None
        cache = PrefixCache.build(model, selection, memory_budget)
        if cache is None:
            return None
        rope = _rope_type(cache.config)
        if rope in _WIDTH_DEPENDENT_ROPE:
            # these rotary tables change with the batch's length: an example's activations
            # would depend on the batch it is in
            log.debug("prefix forward off: %s rotary embeddings depend on the width", rope)
            return None
        return cls(cache)

    @property
    def nbytes(self) -> int:
        """Bytes held: the examples' hidden states and the layer inputs per batch shape."""
        return self._row_bytes + sum(self._inputs_bytes.values())

    def clear(self) -> None:
        self._rows.clear()
        self._inputs.clear()
        self._inputs_bytes.clear()
        self._row_bytes = 0

    def _usable(self, params: dict[str, torch.Tensor] | None) -> bool:
        if self.cache.dropout_active():
            return False
        if any(p.requires_grad for p in self.cache.prefix_params):
            return False  # a trained prefix parameter would get no gradient through the cache
        if params is not None and not set(params) <= self._suffix_names:
            return False
        version = self.cache._version()
        if version != self._version:  # a frozen tensor changed in place: start over
            log.debug("prefix forward: a prefix parameter changed; cache cleared")
            self.clear()
            self._version = version
        return True

    @staticmethod
    def _lengths(batch: LMBatch) -> list[int]:
        """Each example's positions that a loss may read: its real length, and at least up to
        its last response token (a batch with short ``lengths`` stays exact)."""
        ids = batch.input_ids
        width = int(ids.shape[1])
        pos = torch.arange(1, width + 1, device=ids.device)
        last = (batch.response_mask.to(torch.long) * pos).amax(dim=1)
        lengths = torch.maximum(batch.lengths.to(ids.device).to(torch.long), last)
        return [min(width, max(1, int(n))) for n in lengths.tolist()]

    def _store_row(self, key: bytes, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        # First come, kept: training revisits the set in epochs, where evicting the oldest
        # would make every later lookup miss.
        if self.nbytes + size > self.memory_budget:
            return
        self._rows[key] = hidden.detach().clone()
        self._row_bytes += size

    def _store_inputs(self, shape: tuple[int, int], inputs: LayerInputs) -> None:
        size = _nbytes(_tensors(inputs))
        while self._inputs and self.nbytes + size > self.memory_budget:
            old, _ = self._inputs.popitem(last=False)
            self._inputs_bytes.pop(old)
        if self.nbytes + size <= self.memory_budget:
            self._inputs[shape] = inputs
            self._inputs_bytes[shape] = size

    def _known_inputs(self, size: int, width: int) -> tuple[LayerInputs, int] | None:
        """Layer inputs for ``size`` examples at ``width``, or the nearest wider width known."""
        if (size, width) in self._inputs:
            self._inputs.move_to_end((size, width))
            return self._inputs[(size, width)], width
        wider = [w for b, w in self._inputs if b == size and w > width]
        if not wider:
            return None
        best = min(wider)
        self._inputs.move_to_end((size, best))
        return self._inputs[(size, best)], best

    def _capture(self, ids: torch.Tensor):
        self.n_prefix += 1
        return self.cache.capture({}, ids)

    def logits(
        self,
        batch: LMBatch,
        params: dict[str, torch.Tensor] | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Logits ``[B, T, V]`` of ``batch`` through the suffix, with the live parameters or
        with ``params`` (root names, all in the suffix: e.g. theta0 of the selection) swapped
        in; None where the cache does not apply (then run the whole network). ``rows``: a
        ``[B, T]`` boolean mask; the logits ``[N, V]`` at those positions only (the LM head
        skips the others)."""
        if not self._usable(params):
            self.n_whole += 1
            return None
        ids = batch.input_ids
        size, width = (int(n) for n in ids.shape)
        lengths = self._lengths(batch)
        host = ids.detach().cpu()
        keys = [host[b, : lengths[b]].numpy().tobytes() for b in range(size)]
        missing = [b for b, k in enumerate(keys) if k not in self._rows]
        known = self._known_inputs(size, width)
        if known is None:
            state = self._capture(ids)
            for b in missing:
                self._store_row(keys[b], state.hidden[b, : lengths[b]])
            self._store_inputs((size, width), state.layer_inputs)
            hidden, inputs, run_width = state.hidden, state.layer_inputs, width
        else:
            inputs, run_width = known
            fresh: dict[int, torch.Tensor] = {}
            if missing:
                state = self._capture(ids[missing])
                for i, b in enumerate(missing):
                    fresh[b] = state.hidden[i, : lengths[b]]
                    self._store_row(keys[b], fresh[b])
            else:
                self.n_suffix += 1
            cached = [fresh.get(b, self._rows.get(keys[b])) for b in range(size)]
            first = cached[0]
            hidden = first.new_zeros((size, run_width, first.shape[-1]))
            for b, row in enumerate(cached):
                hidden[b, : row.shape[0]] = row
        if rows is not None and run_width != width:
            # a wider known shape: its extra positions are padding, never selected
            rows = torch.nn.functional.pad(rows, (0, run_width - width))
        if params is None:
            out = self.cache.suffix(hidden, inputs, rows=rows)
        else:
            wrapped = {f"root.{n}": t for n, t in params.items()}
            out = functional_call(self.cache.suffix, wrapped, (hidden, inputs), {"rows": rows})
        if rows is not None:
            return out
        return out[:, :width] if run_width != width else out


def lm_logits(
    model: nn.Module,
    batch: LMBatch,
    prefix: PrefixForward | None = None,
    params: dict[str, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``model`` on ``batch``: through ``prefix``'s cache where it
    applies, else the whole network (with ``params`` swapped in by a functional call).
    ``rows``: a ``[B, T]`` boolean mask; the ``[N, V]`` logits at those positions (the cached
    path projects only them onto the vocabulary)."""
    if prefix is not None:
        out = prefix.logits(batch, params, rows)
        if out is not None:
            return out
    if params is None:
        out = model(input_ids=batch.input_ids).logits
    else:
        out = functional_call(model, params, (batch.input_ids,), {"use_cache": False})
        out = out.logits if hasattr(out, "logits") else out
    return out if rows is None else out[rows]
