"""Greedy generation of fixed prompts with the frozen prefix's states recorded and reused.

``verify`` judges the same eval prompts at every record while training changes only decoder
layers ``L..`` (a frozen prefix, :mod:`alignscope.curvature.prefix`). What layers ``< L``
compute for a position is a function of the tokens up to it, so it is the same at every record:

- the prompt positions: the keys and values layers ``< L`` put into the KV cache and the hidden
  states they hand to layer ``L``. :class:`GenerationPrefix` records them in the prefill of one
  ``model.generate`` call per batch of prompts (the prefill's own numbers) and, in every later
  prefill of that batch, stands in for layers ``< L``: each puts its recorded keys and values
  into the model's cache, the last hands layer ``L`` its recorded input;
- a generated position whose row has generated the same tokens before (in an earlier call on
  that batch): its new keys, values and hidden state are recorded per row and token history at
  every decode step; at a later step, the rows seen before take theirs from the record and only
  the others run layers ``< L`` (as a smaller batch, with their own rows of the cache).

``model.generate`` runs otherwise unchanged (its decoding loop and stopping rule, the suffix
layers on the whole batch), so the tokens are those of a plain ``generate`` (the same arithmetic;
in float32 a smaller batch may round differently in the last bit).

The plain forward runs (and nothing is recorded) where this does not apply: no recognised
decoder or no frozen prefix (:meth:`PrefixCache.build`), a KV cache whose prefix layers are
not plain :class:`~transformers.cache_utils.DynamicLayer` s (sliding windows, static or
offloaded caches keep or move states in other ways), a forward with other position ids than
the recorded prefill's, states beyond the memory budget (what fits is kept). A prefix parameter
changed in place since the recording drops the batch's records.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from alignscope.curvature.prefix import DEFAULT_PREFIX_MEMORY_BUDGET, PrefixCache
from alignscope.params import ParamSelection

log = logging.getLogger(__name__)


@dataclass
class _RowStep:
    """One row's prefix states at one decode step: per prefix layer the new key and value
    ``[heads, 1, d]``, and the hidden state ``[1, H]`` entering the first suffix layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor


@dataclass
class _Prompts:
    """One batch's records: the prefill's keys and values per prefix layer and the hidden
    states entering the first suffix layer; the decode steps' per row and token history."""

    ids: torch.Tensor
    mask: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor
    version: int
    positions: torch.Tensor | None  # the position ids the layers were called with
    steps: dict[tuple[int, bytes], _RowStep] = field(default_factory=dict)
    step_bytes: int = 0

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.hidden]
        return sum(t.numel() * t.element_size() for t in tensors) + self.step_bytes


@dataclass
class _Serving:
    """What one ``serving`` context knows: the batch's record (None until its prefill is
    recorded), the tokens fed at each decode step, and the current step's prefix states."""

    entry: _Prompts | None
    fed: list[torch.Tensor] = field(default_factory=list)
    rows: list[bytes] = field(default_factory=list)  # each row's token history, as a key
    step: _RowStep | None = None  # the whole batch's states at this decode step
    replayed: bool = False
    prefilled: bool = False  # this context's prefill was replayed or recorded


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


def _rows(obj, index: torch.Tensor, size: int, cache, sub):
    """``obj`` (a layer's arguments) for the rows ``index`` of a batch of ``size``: batch-sized
    tensors indexed, the KV cache replaced by ``sub``, anything else kept."""
    if obj is cache:
        return sub
    if isinstance(obj, torch.Tensor):
        return obj[index] if obj.dim() > 0 and obj.shape[0] == size else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(x, index, size, cache, sub) for x in obj)
    if isinstance(obj, dict):
        return {k: _rows(v, index, size, cache, sub) for k, v in obj.items()}
    return obj


class GenerationPrefix:
    """The frozen prefix's states per batch of prompts, for ``model.generate``.

    Build it with :meth:`build` (None where the model or the selection allows no frozen
    prefix) and wrap each ``model.generate`` call on a left-padded batch in
    :meth:`serving` (:func:`alignscope.evaluate.generate` does with ``prefix=``).
    """

    def __init__(self, cache: PrefixCache, memory_budget: int) -> None:
        self.model = cache.root
        self.layers = list(cache.layers)[: cache.start]  # the frozen prefix layers
        self._embedding = cache.root.get_input_embeddings()
        self._cache = cache
        self.memory_budget = int(memory_budget)
        self._batches: dict[bytes, _Prompts] = {}
        # counters (tests and benches read them)
        self.n_recorded = 0  # prefills recorded
        self.n_replayed = 0  # prefills that ran layers L.. only
        self.n_rows_reused = 0  # rows x decode steps that took their prefix states from a record
        self.n_rows_computed = 0  # rows x decode steps that ran the prefix layers
        self.n_split_steps = 0  # decode steps that ran the prefix for some rows only

    @classmethod
    def build(
        cls,
        model: nn.Module,
        selection: ParamSelection,
        memory_budget: int = DEFAULT_PREFIX_MEMORY_BUDGET,
    ) -> GenerationPrefix | None:
        """The prefix-state records of ``model`` trained on ``selection``; None without a
        frozen prefix or with a budget of 0."""
        if memory_budget <= 0:
            return None
        cache = PrefixCache.build(model, selection, memory_budget)
        if cache is None or not isinstance(cache.root.get_input_embeddings(), nn.Module):
            return None
        return cls(cache, memory_budget)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._batches.values())

    def clear(self) -> None:
        self._batches.clear()

    @contextlib.contextmanager
    def serving(self, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
        """Within this context the forwards of ``model.generate`` on ``ids`` / ``mask``
        (``[B, T]``, left-padded) take the prefix layers' states from the records where they
        can, and record the rest."""
        key = _key(ids, mask)
        version = self._cache._version()
        entry = self._batches.get(key)
        if entry is not None and entry.version != version:
            entry = None  # a prefix tensor changed: the records no longer hold
            self._batches.pop(key)
        state = _Serving(entry)
        size, width = (int(n) for n in ids.shape)

        def on_ids(_module: nn.Module, args: tuple) -> None:
            tokens = args[0] if args else None
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
                return
            state.step = None
            if tuple(tokens.shape) == (size, 1) and state.entry is not None:
                state.fed.append(tokens[:, 0].detach().cpu())
                history = torch.stack(state.fed, dim=1).numpy()
                state.rows = [history[b].tobytes() for b in range(size)]
            else:
                state.fed, state.rows = [], []

        handle = self._embedding.register_forward_pre_hook(on_ids)
        saved = [layer.__dict__.get("forward") for layer in self.layers]
        real = [layer.forward for layer in self.layers]
        try:
            # An instance attribute ``forward`` wins over the class's (nn.Module calls
            # self.forward); one already set (a patched module) is put back afterwards.
            for i, layer in enumerate(self.layers):
                layer.forward = self._stand_in(i, state, real, key, ids, mask, version, width)
            yield
        finally:
            handle.remove()
            for layer, old in zip(self.layers, saved, strict=True):
                if old is None:
                    del layer.forward
                else:
                    layer.forward = old
            self.n_replayed += int(state.replayed)

    def _stand_in(self, index: int, state: _Serving, real: list, key: bytes, ids: torch.Tensor,
                  mask: torch.Tensor, version: int, width: int):  # fmt: skip
        last = len(self.layers) - 1
        size = int(ids.shape[0])

        def forward(hidden: torch.Tensor, *args, **kwargs):
            cache = _find_cache(args, kwargs)
            if cache is None or not _plain_layers(cache, len(self.layers)):
                return real[index](hidden, *args, **kwargs)
            seen = cache.layers[index].get_seq_length()
            entry = state.entry
            if seen == 0:  # a prefill
                if entry is not None and self._is_prefill(entry, hidden, kwargs):
                    cache.update(entry.keys[index], entry.values[index], index)
                    if index < last:
                        return hidden  # ignored: the next prefix layer stands in too
                    state.replayed = state.prefilled = True
                    return entry.hidden
                out = real[index](hidden, *args, **kwargs)
                if index == last and entry is None:
                    self._record_prefill(key, ids, mask, version, hidden, cache, kwargs, out,
                                         state)  # fmt: skip
                return out
            decode = (
                entry is not None
                and state.prefilled
                and state.rows
                and tuple(hidden.shape[:2]) == (size, 1)
                and seen == width + len(state.fed) - 1
            )
            if not decode:
                return real[index](hidden, *args, **kwargs)
            if index == 0:
                state.step = self._decode_step(entry, state, hidden, args, kwargs, cache, real)
            step = state.step
            if step is None:  # every row new: the whole batch runs, as generate would
                out = real[index](hidden, *args, **kwargs)
                if index == last:
                    self._record_step(entry, state.rows, range(size), cache, out)
                    self.n_rows_computed += size
                return out
            cache.update(step.keys[index], step.values[index], index)
            return step.hidden if index == last else hidden

        return forward

    def _is_prefill(self, entry: _Prompts, hidden: torch.Tensor, kwargs: dict) -> bool:
        """The call is a prefill of the recorded batch: the same shape and the same position
        ids (generate derives them from the mask; a forward with others gets the network)."""
        return tuple(hidden.shape[:2]) == tuple(entry.ids.shape) and _same_or_none(
            kwargs.get("position_ids"), entry.positions
        )

    def _record_prefill(self, key, ids, mask, version, hidden, cache, kwargs, out, state):
        layers = cache.layers[: len(self.layers)]
        if tuple(hidden.shape[:2]) != tuple(ids.shape) or any(
            layer.get_seq_length() != ids.shape[1] for layer in layers
        ):
            return
        entry = _Prompts(
            ids.detach().clone(),
            mask.detach().clone(),
            [layer.keys for layer in layers],  # replaced, never changed, by later updates
            [layer.values for layer in layers],
            (out[0] if isinstance(out, tuple) else out).detach(),
            version,
            _positions(kwargs),
        )
        if self.nbytes + entry.nbytes > self.memory_budget:
            log.debug("generation prefix: the prompt states exceed the budget; not kept")
            return
        self._batches[key] = state.entry = entry
        state.prefilled = True
        self.n_recorded += 1

    def _record_step(self, entry: _Prompts, rows: list[bytes], which, cache, out) -> None:
        """Keep the new position's prefix states of the rows ``which`` (within the budget)."""
        n = len(self.layers)
        keys = [cache.layers[i].keys[:, :, -1:].clone() for i in range(n)]
        values = [cache.layers[i].values[:, :, -1:].clone() for i in range(n)]
        hidden = (out[0] if isinstance(out, tuple) else out).detach()
        self._store(entry, rows, list(which), keys, values, hidden)

    def _store(self, entry, rows, which, keys, values, hidden) -> None:
        per_row = sum(t[0].numel() * t.element_size() for t in [*keys, *values, hidden])
        for j, b in enumerate(which):
            if self.nbytes + per_row > self.memory_budget:
                return
            if (b, rows[b]) in entry.steps:
                continue
            entry.steps[(b, rows[b])] = _RowStep(
                [k[j] for k in keys], [v[j] for v in values], hidden[j]
            )
            entry.step_bytes += per_row

    def _decode_step(self, entry, state, hidden, args, kwargs, cache, real) -> _RowStep | None:
        """The whole batch's prefix states at this decode step: recorded rows from the
        records, the others through the prefix layers as a smaller batch (None when no row
        was recorded: the whole batch then runs as usual)."""
        from transformers.cache_utils import DynamicCache

        size = hidden.shape[0]
        found = [entry.steps.get((b, state.rows[b])) for b in range(size)]
        miss = [b for b, f in enumerate(found) if f is None]
        if len(miss) == size:
            return None
        n = len(self.layers)
        keys = [torch.stack([f.keys[i] for f in found if f is not None]) for i in range(n)]
        values = [torch.stack([f.values[i] for f in found if f is not None]) for i in range(n)]
        out = torch.stack([f.hidden for f in found if f is not None])
        self.n_rows_reused += size - len(miss)
        if miss:
            index = torch.tensor(miss, device=hidden.device)
            sub = DynamicCache(
                [(cache.layers[i].keys[index], cache.layers[i].values[index]) for i in range(n)]
            )
            h = hidden[index]
            sub_args = _rows(args, index, size, cache, sub)
            sub_kwargs = _rows(kwargs, index, size, cache, sub)
            for i in range(n):
                h = real[i](h, *sub_args, **sub_kwargs)
                h = h[0] if isinstance(h, tuple) else h
            new_k = [sub.layers[i].keys[:, :, -1:].clone() for i in range(n)]
            new_v = [sub.layers[i].values[:, :, -1:].clone() for i in range(n)]
            self._store(entry, state.rows, miss, new_k, new_v, h)
            self.n_rows_computed += len(miss)
            self.n_split_steps += 1
            # the whole batch in row order: recorded rows first, then the computed ones
            hit = [b for b in range(size) if found[b] is not None]
            order = torch.tensor(hit + miss, device=hidden.device).argsort()
            keys = [torch.cat([k, nk])[order] for k, nk in zip(keys, new_k, strict=True)]
            values = [torch.cat([v, nv])[order] for v, nv in zip(values, new_v, strict=True)]
            out = torch.cat([out, h])[order]
        return _RowStep(keys, values, out)
