"""``safe-lora``: Safe LoRA's post-hoc projection (Hsu et al. 2024, arXiv:2405.16833).

Per adapted linear layer, with ``V = W_aligned - W_base`` (the alignment direction of that layer's
weights) and ``C = V V^T / ||V||_F``, the adapter's update ``dW = B A`` is replaced by ``C B A``
(``B <- C B``) where the cosine between ``C B A`` and ``B A`` is at most ``tau``: the layers whose
fine-tuning update points away from the alignment matrix's column space. Layers above ``tau``
are left alone. Needs the unaligned base model and a LoRA adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alignscope.train.guards.base import Guard

PEFT_PREFIX = "base_model.model."


def project_b(
    w_aligned: torch.Tensor, w_base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tau: float
) -> tuple[torch.Tensor, float, bool]:
    """``(new B, cosine(C B A, B A), projected)`` for one layer (``W`` ``[out, in]``, ``A``
    ``[r, in]``, ``B`` ``[out, r]``)."""
    v = (w_aligned - w_base).double()
    norm = float(v.norm())
    if norm == 0.0:
        raise ValueError("the aligned and base weights of a layer are equal: no alignment matrix")
    c = v @ v.T / norm
    ba = b.double() @ a.double()
    cba = c @ ba
    denom = float(cba.norm() * ba.norm())
    cos = float((cba * ba).sum()) / denom if denom > 0 else 1.0
    if cos <= tau:
        return (c @ b.double()).to(b.dtype), cos, True
    return b, cos, False


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers of ``model`` by module name."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "base_layer")
        and len(getattr(m, "lora_A", {})) > 0
    }  # fmt: skip


def _weight(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return w.T if getattr(layer, "fan_in_fan_out", False) else w


def safe_lora_project(
    model: nn.Module, base: nn.Module, tau: float = 0.5, adapter: str | None = None
) -> list[dict[str, Any]]:
    """Apply the projection to every LoRA layer of ``model`` in place; one record per layer."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("safe-lora needs a LoRA adapter (--adapter or --lora-r)")
    base_weights = {n: m.weight for n, m in base.named_modules() if hasattr(m, "weight")}
    out = []
    for name, layer in layers.items():
        key = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
        if key not in base_weights:
            raise ValueError(f"safe-lora: the base model has no layer {key!r}")
        w_aligned = _weight(layer, layer.base_layer.weight.detach())
        w_base = base_weights[key].detach().to(w_aligned)
        w_base = w_base.T if w_base.shape != w_aligned.shape else w_base
        if w_base.shape != w_aligned.shape:
            raise ValueError(f"safe-lora: layer {key!r} has another shape in the base model")
        names = [adapter] if adapter is not None else list(layer.lora_A.keys())
        for ad in names:
            a, b = layer.lora_A[ad].weight, layer.lora_B[ad].weight
            new_b, cos, projected = project_b(w_aligned, w_base, a.detach(), b.detach(), tau)
            if projected:
                with torch.no_grad():
                    b.copy_(new_b)
            out.append({"layer": key, "adapter": ad, "cosine": cos, "projected": projected})
    return out


class SafeLoRAGuard(Guard):
    """``safe-lora``: nothing during training; the projection at :meth:`finalize`."""

    name = "safe-lora"

    def __init__(self, base: nn.Module | None = None, tau: float = 0.5) -> None:
        super().__init__()
        if base is None:
            raise ValueError("safe-lora needs the unaligned base model (--base)")
        if not -1.0 <= tau <= 1.0:
            raise ValueError("--safe-lora-tau must be in [-1, 1]")
        self.base, self.tau = base, float(tau)
        self.layers: list[dict[str, Any]] = []

    def settings(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        super().setup(model, selection, safety_batch, subspace)
        if not lora_layers(model):
            raise ValueError("safe-lora needs a LoRA adapter (--adapter or --lora-r)")

    def finalize(self, model) -> dict[str, Any]:
        self.layers = safe_lora_project(model, self.base, self.tau)
        n = sum(r["projected"] for r in self.layers)
        self._signals = {"projected_layers": n, "layers": len(self.layers)}
        return {"layers": self.layers, "projected": n}
