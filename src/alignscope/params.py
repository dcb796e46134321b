"""Which parameters are analysed, and a flat-vector view over them.

A :class:`ParamSelection` names a subset of a model's parameters (all trainable ones, the LoRA
adapters, or glob patterns over names) and maps between a flat vector of length ``P`` and the
per-tensor views. Curvature operators work on flat vectors; the model sees tensors.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class ParamSelection:
    """An ordered selection of named parameters with flat-vector views."""

    names: list[str]
    shapes: list[torch.Size]
    blocks: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        if not self.blocks:
            self.blocks = {"all": list(range(len(self.names)))}

    @property
    def size(self) -> int:
        """P, the number of scalar parameters selected."""
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.names)

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The live parameter tensors of ``model`` for this selection, by name."""
        named = dict(model.named_parameters())
        return {n: named[n] for n in self.names}

    def train_only(self, model: nn.Module) -> None:
        """Make this selection ``model``'s only trainable parameters (the fine-tuning runs of
        verify and rank's lookahead train exactly what was analysed)."""
        chosen = set(self.names)
        for name, p in model.named_parameters():
            p.requires_grad_(name in chosen)

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors (by name or in selection order) into one flat vector."""
        seq = [tensors[n] for n in self.names] if isinstance(tensors, dict) else list(tensors)
        return torch.cat([t.reshape(-1) for t in seq])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector (or a batch ``[..., P]`` of them) shaped like the parameters."""
        if vector.shape[-1] != self.size:
            raise ValueError(
                f"vector has {vector.shape[-1]} entries, the selection has {self.size}"
            )
        lead = vector.shape[:-1]
        # split (one backward node for all pieces), not one slice per tensor: each slice's
        # backward materialises a zero-filled gradient the size of the whole vector.
        parts = vector.split(self.numels, dim=-1)
        return {
            n: part.reshape(*lead, *s)
            for n, s, part in zip(self.names, self.shapes, parts, strict=True)
        }

    def block_slices(self) -> dict[str, list[slice]]:
        """For each block, the slices of the flat vector it owns."""
        return {
            b: [slice(self.offsets[i], self.offsets[i + 1]) for i in idx]
            for b, idx in self.blocks.items()
        }

    def block_index(self, block: str) -> torch.Tensor:
        """Flat indices (long tensor) of one block."""
        return torch.cat([torch.arange(s.start, s.stop) for s in self.block_slices()[block]])

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: how many tensors and scalars, and the blocks."""
        return {
            "n_tensors": len(self.names),
            "n_params": self.size,
            "blocks": {b: sum(self.numels[i] for i in idx) for b, idx in self.blocks.items()},
            "names": list(self.names),
        }


def _block_key(name: str, group: str | None) -> str:
    if group in (None, "none"):
        return "all"
    if group == "tensor":
        return name
    if group == "module":
        return name.rsplit(".", 1)[0] if "." in name else name
    if group == "layer":
        m = _LAYER_RE.search(name)
        return f"layer.{m.group(1)}" if m else "other"
    raise ValueError(f"unknown grouping {group!r}; use one of: none, tensor, module, layer")


def _examples(names: Iterable[str], k: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:k])
    more = f", ... ({len(names)} in all)" if len(names) > k else ""
    return shown + more


def select_params(
    model: nn.Module,
    spec: str | Sequence[str] = "all",
    group: str | None = None,
) -> ParamSelection:
    """Select parameters of ``model``.

    ``spec`` is ``"all"`` (every parameter with ``requires_grad``), ``"lora"`` (PEFT adapter
    weights only), or one or more glob patterns over parameter names (``"*.mlp.*"``); patterns
    match parameters whether or not they are trainable. ``group`` splits the selection into blocks
    for block-diagonal curvature: ``None`` (one block), ``"tensor"``, ``"module"`` or ``"layer"``.
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters")
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ValueError("empty parameter selection: pass 'all', 'lora' or glob patterns")
    if patterns == ["all"]:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "no parameter requires grad; unfreeze some or select them by name "
                f"(names look like: {_examples(n for n, _ in named)})"
            )
    elif patterns == ["lora"]:
        chosen = [(n, p) for n, p in named if "lora_" in n]
        if not chosen:
            raise ValueError(
                "--params lora matched nothing: the model has no LoRA adapter weights "
                "(wrap it with PEFT or pass --adapter / --lora-r); "
                f"parameter names look like: {_examples(n for n, _ in named)}"
            )
    else:
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not chosen:
            raise ValueError(
                f"parameter patterns {patterns} matched nothing; "
                f"names look like: {_examples(n for n, _ in named)}"
            )
    blocks: dict[str, list[int]] = {}
    for i, (n, _) in enumerate(chosen):
        blocks.setdefault(_block_key(n, group), []).append(i)
    return ParamSelection([n for n, _ in chosen], [p.shape for _, p in chosen], blocks)
