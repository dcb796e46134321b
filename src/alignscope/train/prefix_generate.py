"""Greedy generation of fixed prompts with the frozen prefix's prompt states recorded once.

``verify`` judges the same eval prompts at every record while training changes only decoder
layers ``L..`` (a frozen prefix, :mod:`alignscope.curvature.prefix`). The keys and values that
layers ``< L`` put into the KV cache for the prompt positions, and the hidden states they hand
to layer ``L``, are then the same at every record. :class:`GenerationPrefix` records them during
the prefill of one ``model.generate`` call per batch of prompts (the prefill's own numbers, so
nothing is recomputed differently) and, in every later prefill of the same batch, stands in for
layers ``< L``: each of them puts its recorded keys and values into the model's cache and returns,
the last handing layer ``L`` its recorded input. ``model.generate`` runs otherwise unchanged
(its decoding loop, stopping rule, the suffix layers, every decode step through the whole
network), so the tokens are those of a plain ``generate`` and the prefill's cost drops to the
embeddings, the masks and layers ``L..``.

The plain prefill runs (and nothing is recorded) where this does not apply: no recognised
decoder or no frozen prefix (:meth:`PrefixCache.build`), a KV cache whose prefix layers are
not plain :class:`~transformers.cache_utils.DynamicLayer` s (sliding windows, static or
offloaded caches: their layers keep or move states in other ways), states beyond the memory
budget. A prefix parameter changed in place since the recording makes the next call record
again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from alignscope.curvature.prefix import DEFAULT_PREFIX_MEMORY_BUDGET, PrefixCache
from alignscope.params import ParamSelection

log = logging.getLogger(__name__)


@dataclass
class _Prompts:
    """One batch's recorded prefill: per prefix layer its keys and values, and the hidden
    states entering the first suffix layer."""

    ids: torch.Tensor
    mask: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor
    version: int
    positions: torch.Tensor | None  # the position ids the layers were called with

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.hidden]
        return sum(t.numel() * t.element_size() for t in tensors)


def _find_cache(args: tuple, kwargs: dict):
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def _plain_layers(cache, count: int) -> bool:
    """The cache's first ``count`` layers are plain dynamic ones (states grown by
    concatenation, never changed in place), so recorded tensors may be handed to them."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or getattr(cache, "offloading", False) or len(layers) < count:
        return False
    return all(type(layer) is DynamicLayer for layer in layers[:count])


def _positions(kwargs: dict) -> torch.Tensor | None:
    positions = kwargs.get("position_ids")
    return positions.detach().clone() if isinstance(positions, torch.Tensor) else None


def _same_or_none(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))


def _key(ids: torch.Tensor, mask: torch.Tensor) -> bytes:
    host = torch.cat([ids.detach().cpu().long(), mask.detach().cpu().long()], dim=1)
    return repr(tuple(ids.shape)).encode() + host.numpy().tobytes()


class GenerationPrefix:
    """The frozen prefix's prompt states per batch of prompts, for ``model.generate``.

    Build it with :meth:`build` (None where the model or the selection allows no frozen
    prefix) and wrap each ``model.generate`` call on a left-padded batch in
    :meth:`serving` (:func:`alignscope.evaluate.generate` does with ``prefix=``).
    """

    def __init__(self, cache: PrefixCache, memory_budget: int) -> None:
        self.model = cache.root
        self.layers = list(cache.layers)[: cache.start]  # the frozen prefix layers
        self._cache = cache
        self.memory_budget = int(memory_budget)
        self._batches: dict[bytes, _Prompts] = {}
        self.n_recorded = 0  # prefills recorded (tests and benches read them)
        self.n_replayed = 0  # prefills that ran layers L.. only

    @classmethod
    def build(
        cls,
        model: nn.Module,
        selection: ParamSelection,
        memory_budget: int = DEFAULT_PREFIX_MEMORY_BUDGET,
    ) -> GenerationPrefix | None:
        """The prompt-state cache of ``model`` trained on ``selection``; None without a frozen
        prefix or with a budget of 0."""
        if memory_budget <= 0:
            return None
        cache = PrefixCache.build(model, selection, memory_budget)
        return None if cache is None else cls(cache, memory_budget)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._batches.values())

    def clear(self) -> None:
        self._batches.clear()

    @contextlib.contextmanager
    def serving(self, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """Within this context the prefill of ``ids`` / ``mask`` (``[B, T]``, left-padded) skips
        the prefix layers when it was recorded before, and is recorded otherwise."""
        key = _key(ids, mask)
        version = self._cache._version()
        hit = self._batches.get(key)
        if hit is not None and hit.version == version:
            with self._replay(hit):
                yield
            return
        self._batches.pop(key, None)
        with self._record(key, ids, mask, version):
            yield

    def _is_prefill(self, entry: _Prompts, hidden: torch.Tensor, cache, kwargs: dict,
                    index: int) -> bool:  # fmt: skip
        """The call is a prefill of the recorded batch: the same shape, an empty plain cache
        layer and the same position ids (generate derives them from the mask; a forward
        called with others gets the whole network)."""
        positions = kwargs.get("position_ids")
        return (
            cache is not None
            and tuple(hidden.shape[:2]) == tuple(entry.ids.shape)
            and _plain_layers(cache, len(self.layers))
            and cache.layers[index].get_seq_length() == 0
            and _same_or_none(positions, entry.positions)
        )

    @contextlib.contextmanager
    def _record(self, key: bytes, ids: torch.Tensor, mask: torch.Tensor, version: int):
        last = len(self.layers) - 1
        done = False

        def hook(_module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            nonlocal done
            if done:
                return
            done = True  # the first call is the prefill; decode steps are not recorded
            cache = _find_cache(args[1:], kwargs)
            if cache is None or tuple(args[0].shape[:2]) != tuple(ids.shape):
                return
            if not _plain_layers(cache, len(self.layers)):
                log.debug("generation prefix off: the KV cache's layers are not plain dynamic")
                return
            layers = cache.layers[: len(self.layers)]
            if any(layer.get_seq_length() != ids.shape[1] for layer in layers):
                return
            hidden = output[0] if isinstance(output, tuple) else output
            entry = _Prompts(
                ids.detach().clone(),
                mask.detach().clone(),
                [layer.keys for layer in layers],  # replaced, never changed, by later updates
                [layer.values for layer in layers],
                hidden.detach(),
                version,
                _positions(kwargs),
            )
            if self.nbytes + entry.nbytes > self.memory_budget:
                log.debug("generation prefix: the prompt states exceed the budget; not kept")
                return
            self._batches[key] = entry
            self.n_recorded += 1

        handle = self.layers[last].register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _replay(self, entry: _Prompts):
        last = len(self.layers) - 1
        replayed = False

        def stand_in(index: int, layer: nn.Module):
            real = layer.forward

            def forward(hidden: torch.Tensor, *args, **kwargs):
                nonlocal replayed
                cache = _find_cache(args, kwargs)
                if not self._is_prefill(entry, hidden, cache, kwargs, index):
                    return real(hidden, *args, **kwargs)  # a decode step
                cache.update(entry.keys[index], entry.values[index], index)
                if index < last:
                    return hidden  # ignored: the next prefix layer stands in too
                replayed = True
                return entry.hidden

            return forward

        # An instance attribute ``forward`` wins over the class's (nn.Module calls
        # self.forward); one already set (a patched module) is put back afterwards.
        saved = [layer.__dict__.get("forward") for layer in self.layers]
        try:
            for i, layer in enumerate(self.layers):
                layer.forward = stand_in(i, layer)
            yield
        finally:
            for layer, old in zip(self.layers, saved, strict=True):
                if old is None:
                    del layer.forward
                else:
                    layer.forward = old
            self.n_replayed += int(replayed)
