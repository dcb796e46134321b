"""Frozen-prefix caching: run curvature products on the decoder layers that hold the selection.

When every selected parameter lies in decoder layer ``L`` or above (or in the final norm and the
LM head), the embeddings and layers ``< L`` are a fixed function of the input tokens. The hidden
states entering layer ``L`` are computed once per batch and every later logits evaluation runs
layers ``L..``, the final norm and the LM head only. What the suffix layers are called with
besides the hidden states (rotary embeddings, causal masks, position ids) is captured by
forward pre-hooks from one ordinary forward pass, so the suffix sees exactly the arguments the
model itself computes: the cached path is the same arithmetic as the whole network.

Dropout in the prefix would make its activations random: while any frozen module with dropout
is in training mode the cache is not used (the whole network runs, drawing the same random
numbers it always does); in eval mode, or with dropout probability 0, it is.

Recognised: Llama-style decoders (``model.layers`` / ``model.norm`` / ``lm_head``: Llama,
Qwen2, Qwen3, Mistral) and GPT-2 (``transformer.h`` / ``transformer.ln_f`` / ``lm_head``),
bare or wrapped (PEFT). Anything else, or a selected parameter in the prefix (embeddings, a
tied LM head, a layer below ``L``), falls back to the whole network.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from alignscope.params import ParamSelection

log = logging.getLogger(__name__)

DEFAULT_PREFIX_MEMORY_BUDGET = 2**30  # bytes of cached hidden states (and their layer inputs)

# model_type -> (decoder body attribute, layer list, final norm) under the *ForCausalLM module
_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "llama": ("model", "layers", "norm"),
    "qwen2": ("model", "layers", "norm"),
    "qwen3": ("model", "layers", "norm"),
    "mistral": ("model", "layers", "norm"),
    "gpt2": ("transformer", "h", "ln_f"),
}


class _StopForward(Exception):
    """Raised by the capture hook once the last suffix layer's inputs are known."""


@dataclass
class PrefixState:
    """The cached inputs of the suffix for one batch of token ids.

    ``hidden``: ``[B, T, H]`` hidden states entering the first suffix layer. ``layer_inputs``:
    for every suffix layer, the positional arguments after the hidden states and the keyword
    arguments the model called it with.
    """

    ids: torch.Tensor
    hidden: torch.Tensor
    layer_inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]
    version: int

    @property
    def nbytes(self) -> int:
        # the same tensor object may be passed to every layer (masks, rotary tables)
        unique = {id(t): t for t in [self.hidden, *_tensors(self.layer_inputs)]}
        return sum(t.numel() * t.element_size() for t in unique.values())


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors(x)]
    return []


class _Suffix(nn.Module):
    """Layers ``L..``, the final norm and the LM head, callable on cached layer inputs."""

    def __init__(
        self, root: nn.Module, layers: nn.ModuleList, start: int, norm: nn.Module, head: nn.Module
    ) -> None:
        super().__init__()
        # ``root`` is the one registered child, so functional_call takes the root's parameter
        # names. The suffix modules are kept unregistered: registered, they would be a second
        # name for the same parameters, which functional_call treats as tied weights and does
        # not put back correctly.
        self.root = root
        object.__setattr__(self, "_parts", (list(layers)[start:], norm, head))

    def forward(
        self,
        hidden: torch.Tensor,
        layer_inputs: list,
        head: bool = True,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` (the final norm's output without ``head``); with ``rows`` (a
        ``[B, T]`` boolean mask) ``[N, V]`` at those positions only: the final norm and the LM
        head act per position, so the others' vocabulary projection (prompt and padding
        positions a loss never reads) is skipped."""
        layers, norm, lm_head = self._parts
        for layer, (args, kwargs) in zip(layers, layer_inputs, strict=True):
            out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if rows is not None:
            hidden = hidden[rows]
        return lm_head(norm(hidden)) if head else norm(hidden)


def _find_lm(root: nn.Module) -> tuple[str, nn.Module, tuple[str, str, str]] | None:
    """The recognised causal LM inside ``root`` (itself, or under a PEFT wrapper)."""
    for path, module in root.named_modules():
        config = getattr(module, "config", None)
        arch = _ARCHITECTURES.get(getattr(config, "model_type", None) or "")
        if arch is None or not hasattr(module, "lm_head"):
            continue
        body = getattr(module, arch[0], None)
        if body is not None and isinstance(getattr(body, arch[1], None), nn.ModuleList):
            return path, module, arch
    return None


class PrefixCache:
    """Hidden states at the first selected decoder layer, per batch, within a memory budget.

    Build it with :meth:`build`, which returns None (and logs why at debug level) when the
    model or the selection does not allow a frozen prefix.
    """

    def __init__(
        self,
        root: nn.Module,
        lm: nn.Module,
        arch: tuple[str, str, str],
        start: int,
        suffix_names: list[str],
        prefix_params: list[torch.Tensor],
        memory_budget: int,
        prefix_modules: list[nn.Module] | None = None,
    ) -> None:
        body = getattr(lm, arch[0])
        self.layers: nn.ModuleList = getattr(body, arch[1])
        self.start = start
        self.root = root
        self.suffix = _Suffix(root, self.layers, start, getattr(body, arch[2]), lm.lm_head)
        self.suffix_names = suffix_names
        self._prefix_params = prefix_params
        self.memory_budget = int(memory_budget)
        self.config = lm.config
        self.hidden_size = int(lm.config.hidden_size)
        self.itemsize = next(iter(lm.parameters())).element_size()
        self._dropout = [m for m in prefix_modules or () if _has_dropout(m)]
        self._states: OrderedDict[int, PrefixState] = OrderedDict()
        self.n_computed = 0  # how many prefix passes ran (tests and benches read it)

    @classmethod
    def build(
        cls,
        root: nn.Module,
        selection: ParamSelection,
        memory_budget: int = DEFAULT_PREFIX_MEMORY_BUDGET,
    ) -> PrefixCache | None:
        found = _find_lm(root)
        if found is None:
            log.debug("prefix cache off: architecture not recognised (%s)", type(root).__name__)
            return None
        path, lm, arch = found
        layers: nn.ModuleList = getattr(getattr(lm, arch[0]), arch[1])
        selected = set(selection.names)
        named = dict(root.named_parameters())
        chosen = {id(named[n]) for n in selected}
        first = None
        for i, layer in enumerate(layers):
            if any(id(p) in chosen for p in layer.parameters()):
                first = i
                break
        if first is None or first == 0:
            why = "no selected parameter in a decoder layer" if first is None else "layer 0"
            log.debug("prefix cache off: the first selected layer is %s", why)
            return None
        suffix_modules = [*layers[first:], getattr(getattr(lm, arch[0]), arch[2]), lm.lm_head]
        suffix_ids = {id(p) for m in suffix_modules for p in m.parameters()}
        inside = {id(m) for s in suffix_modules for m in s.modules()}
        # Parameters of every module outside the suffix, by identity: a tied LM head shares its
        # tensor with the input embedding, so it is in both.
        prefix_modules = [m for m in root.modules() if id(m) not in inside]
        prefix_params = list(
            {id(p): p for m in prefix_modules for p in m.parameters(recurse=False)}.values()
        )
        prefix_ids = {id(p) for p in prefix_params}
        # A selected tensor the prefix uses (embeddings, a tied LM head) or that the suffix does
        # not (an unknown module) would make the cached hidden states wrong.
        outside = [
            n for n in selected if id(named[n]) not in suffix_ids or id(named[n]) in prefix_ids
        ]
        if outside:
            log.debug("prefix cache off: selected parameters outside the suffix: %s", outside[:4])
            return None
        # Parameter names of the root whose tensors the suffix uses (tied ones included).
        suffix_names = [n for n, p in root.named_parameters() if id(p) in suffix_ids]
        log.debug("prefix cache on: %s layers %d.. of %d", path or "model", first, len(layers))
        return cls(
            root, lm, arch, first, suffix_names, prefix_params, memory_budget, prefix_modules
        )

    def dropout_active(self) -> bool:
        """True while a frozen (prefix) module with dropout is in training mode: its
        activations are then random and must not be cached."""
        return any(m.training for m in self._dropout)

    @property
    def prefix_params(self) -> list[torch.Tensor]:
        """The tensors the prefix computes with (the cached activations assume them fixed)."""
        return self._prefix_params

    def _version(self) -> int:
        # In-place changes to prefix parameters (a training step on them) invalidate the cache.
        return sum(p._version for p in self._prefix_params)

    def capture(self, params: dict[str, torch.Tensor], ids: torch.Tensor) -> PrefixState:
        """One forward pass up to the last suffix layer, recording the suffix layers' inputs."""
        inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        hidden: list[torch.Tensor] = []
        last = len(self.layers) - 1

        def hook(index: int):
            def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                if index == self.start:
                    hidden.append(args[0])
                inputs.append((tuple(args[1:]), dict(kwargs)))
                if index == last:
                    raise _StopForward

            return pre

        handles = [
            self.layers[i].register_forward_pre_hook(hook(i), with_kwargs=True)
            for i in range(self.start, len(self.layers))
        ]
        try:
            # Outside any torch.func transform (the prefix does not depend on theta): tensors
            # made inside one are wrappers of that transform and must not outlive it.
            with _outside_transforms(), torch.no_grad():
                functional_call(self.root, params, (ids,), {"use_cache": False})
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        self.n_computed += 1
        return PrefixState(ids, hidden[0].detach(), inputs, self._version())

    def state(self, params: dict[str, torch.Tensor], ids: torch.Tensor) -> PrefixState | None:
        """The cached state for ``ids`` [B, T], computed on a miss; None when it does not fit the
        memory budget (the caller then runs the whole network)."""
        if self.dropout_active():
            return None  # random activations: run the whole network
        version = self._version()
        key = ids.data_ptr()
        hit = self._states.get(key)
        if hit is not None and hit.version == version and _same(hit.ids, ids):
            self._states.move_to_end(key)
            return hit
        if ids.numel() * self.hidden_size * self.itemsize > self.memory_budget:
            log.debug("prefix cache: the hidden states exceed the budget; whole network")
            return None
        if _DISABLE_FUNCTORCH is None and torch._C._functorch.maybe_current_level() is not None:
            return None  # cannot leave the transform to capture: run the whole network
        new = self.capture(params, ids)
        size = new.nbytes
        if size > self.memory_budget:
            log.debug("prefix cache: %d bytes exceed the budget; running the whole network", size)
            return None
        while self._states and sum(s.nbytes for s in self._states.values()) + size > (
            self.memory_budget
        ):
            self._states.popitem(last=False)
        # Keep our own copy of the ids: the caller's tensor may be changed in place later.
        new.ids = ids.clone()
        self._states[key] = new
        return new

    def clear(self) -> None:
        self._states.clear()

    def logits(
        self,
        params: dict[str, torch.Tensor],
        hidden: torch.Tensor,
        layer_inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
    ) -> torch.Tensor:
        """Suffix logits ``[B, T, V]`` from cached hidden states, at parameters ``params``
        (a dict by root parameter name that must cover ``suffix_names``)."""
        return self._run(params, hidden, layer_inputs, head=True)

    def hidden(
        self,
        params: dict[str, torch.Tensor],
        hidden: torch.Tensor,
        layer_inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
    ) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, H]``: :meth:`logits` without the LM head."""
        return self._run(params, hidden, layer_inputs, head=False)

    def _run(self, params: dict[str, torch.Tensor], hidden: torch.Tensor, layer_inputs: list,
             head: bool) -> torch.Tensor:  # fmt: skip
        wrapped = {f"root.{n}": params[n] for n in self.suffix_names}
        return functional_call(self.suffix, wrapped, (hidden, layer_inputs), {"head": head})


_DISABLE_FUNCTORCH = getattr(torch._C, "_DisableFuncTorch", None)


def _outside_transforms() -> contextlib.AbstractContextManager:
    return _DISABLE_FUNCTORCH() if _DISABLE_FUNCTORCH is not None else contextlib.nullcontext()


def _has_dropout(module: nn.Module) -> bool:
    """A dropout layer with p > 0, or a module that applies dropout itself (HF attention keeps
    its probability in an attribute such as ``attention_dropout``)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return any(
        isinstance(v, float) and v > 0 and ("dropout" in k or "pdrop" in k)
        for k, v in vars(module).items()
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))
