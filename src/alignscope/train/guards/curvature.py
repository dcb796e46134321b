"""``curvature``: the curvature-aware guard (docs/guard.md, "curvature").

The alignment KL's quadratic model at theta0 is ``Q(delta) = delta^T F delta / 2`` (``F`` the
alignment Fisher, exactly the KL's Hessian there). One step ``u`` changes it by

    Q(delta + u) - Q(delta) = (F delta) . u  +  u^T F u / 2.

The cross term ``(F delta) . u`` carries every cross-step product of the forecast: the third-order
``g^T F a`` term and all of the quartic ``a^T F a`` term except its step-diagonal part, i.e. the
growth driven by the fine-tuning loss's curvature bending new steps into directions the
accumulated displacement already occupies. Per step, with one exact product ``w = F delta``:

1. the gradient gains ``mu w``, the exact gradient of ``mu Q(delta)`` (a pull back whose
   strength follows the current displacement, not a frozen basis);
2. after the optimizer, if ``w . u > 0`` the update loses its component along ``w``:
   ``u <- u - (w . u / |w|^2) w``, so the cross term is never positive.

With a LoRA adapter (``space="weights"``, the default for one) the quadratic model lives where
the alignment loss does, on the merged weight change of each adapted layer,
``dW = s (B A - B0 A0)``: ``Q = dW^T F_W dW / 2`` with ``F_W`` the Fisher of the layers' base
weights at theta0, and its gradient in the adapter's coordinates by the chain rule,
``dQ/dB = s G A^T``, ``dQ/dA = s B^T G`` with ``G = F_W dW``. The adapter's own Fisher at theta0
cannot stand in for it: with ``B0 = 0`` (PEFT's initialisation) the logits do not move with
``A`` at theta0, so that Fisher is blind to every ``A`` direction and to the ``dB dA`` part of
``dW``, which grows as the adapter trains. The pull and the cross-term projection then use this
gradient in place of ``F delta`` (the two agree for a parametrisation linear in theta).

Cost: one Fisher product per step on the guard's safety examples. ``F`` is fixed at theta0, so
both linearisations are built once: ``J^T w`` is a backward pass through the stored graph of the
logits, and ``J v`` the backward pass of the linear map ``u -> J^T u`` (the double-vjp trick) on
its own stored graph. A product is then two backward passes and no forward pass: 21 ms against a
47 ms gradient step on the test organism (forward-mode ``J v`` took 88 ms).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import vjp

from alignscope import distributed as dist
from alignscope.config import CURVATURE_SPACES
from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.losses import ResponsePositions
from alignscope.data.encode import LMBatch
from alignscope.params import ParamSelection, select_params
from alignscope.train.guards.base import Guard, read_theta, write_theta

# Weight-sized vectors the weight-space guard holds: theta0 of the base weights, dW and its start,
# F dW, and the Fisher product's J^T output and gradient buffer.
WEIGHT_SPACE_VECTORS = 6


def _lora_factors(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """``{parameter name: (module name, adapter, "A" | "B")}`` for the A and B matrices of the
    model's PEFT LoRA layers."""
    from alignscope.train.guards.safe_lora import lora_layers

    out = {}
    for module_name, layer in lora_layers(model).items():
        for adapter in layer.lora_A:
            out[f"{module_name}.lora_A.{adapter}.weight"] = (module_name, adapter, "A")
            out[f"{module_name}.lora_B.{adapter}.weight"] = (module_name, adapter, "B")
    return out


def _is_lora(model: nn.Module, selection: ParamSelection) -> bool:
    """The trained parameters are exactly A and B of some LoRA layers' adapters, both factors
    of each (``auto`` then picks the weight space). With one factor frozen (B alone, say) the
    merged change is linear in what trains and the adapter's own coordinates are exact."""
    factors = _lora_factors(model)
    if not selection.names or any(n not in factors for n in selection.names):
        return False
    kinds: dict[tuple[str, str], set[str]] = {}
    for n in selection.names:
        module, adapter, kind = factors[n]
        kinds.setdefault((module, adapter), set()).add(kind)
    return all(k == {"A", "B"} for k in kinds.values())


class FrozenFisher:
    """Exact products ``F v`` with the alignment Fisher at theta0, both factors' graphs kept.

    ``F v = J^T Lambda J v`` over the response positions of ``batch`` (docs/theory.md), with
    ``J^T w`` the vjp of the logits at theta0 and ``J v`` the vjp of ``u -> J^T u`` at ``u = 0``
    (linear in ``u``, so exact): two backward passes per product, no forward pass.

    ``sharded`` (data parallel): each rank keeps the graphs of its shard of ``batch`` (with the
    whole batch's weights) and the products are summed over the ranks.
    """

    def __init__(self, flm: FunctionalLM, batch: LMBatch, sharded: bool = False) -> None:
        self.sharded = sharded and dist.active()
        n_total = batch.size
        if self.sharded:
            batch = dist.shard_batch(batch, "safety examples of the curvature guard "
                                     "(--guard-examples)")  # fmt: skip
        positions = ResponsePositions(batch, flm.dtype, n_total=n_total)
        self.weights = positions.weights

        def logits(theta: torch.Tensor) -> torch.Tensor:
            return positions.gather(flm.logits(theta, batch.input_ids))

        z, self._transpose = vjp(logits, flm.theta0)
        self.q = torch.softmax(z.detach(), dim=-1)
        _, self._forward = vjp(lambda u: self._transpose(u)[0], torch.zeros_like(z))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F v``."""
        jv = self._forward(v.to(self.q.dtype))[0]
        q = self.q
        lam = self.weights[:, None] * (q * jv - q * (q * jv).sum(-1, keepdim=True))
        out = self._transpose(lam)[0]
        return dist.all_reduce_sum(out) if self.sharded else out


class LoRAWeightMap:
    """``theta`` (LoRA adapters' trained A and B, flat) to the merged weight change of every
    adapted layer, ``dW = sum_adapters s (B A - B0 A0)`` in the base weight's layout, flat over
    the selection of those base weights (``self.weights``); with its vjp (the chain rule)."""

    def __init__(self, model: nn.Module, selection: ParamSelection) -> None:
        from alignscope.train.guards.safe_lora import lora_layers

        if not _is_lora(model, selection):
            raise ValueError(
                "--curvature-space weights: the trained parameters must be the A and B matrices "
                "of LoRA adapters, both factors of each (a new adapter with --lora-r, or "
                "--adapter); otherwise use --curvature-space params (or auto)"
            )
        factors, layers = _lora_factors(model), lora_layers(model)
        # per adapted module, in model order: its trained adapters (scaling, layout)
        self.modules: dict[str, list[tuple[str, float, bool]]] = {}
        for name in selection.names:
            module, adapter, _ = factors[name]
            layer = layers[module]
            active = getattr(layer, "active_adapters", [adapter])
            if adapter not in active:
                raise ValueError(
                    f"--curvature-space weights: adapter {adapter!r} of {module!r} is trained but "
                    "not active (it does not enter the forward pass); train the active adapter"
                )
            if getattr(layer, "use_dora", {}).get(adapter, False):
                raise ValueError(f"curvature guard in weight space: {module!r} uses DoRA, "
                                 "not plain LoRA; pass --curvature-space params")  # fmt: skip
            entry = (adapter, float(layer.scaling[adapter]),
                     bool(getattr(layer, "fan_in_fan_out", False)))  # fmt: skip
            if entry not in self.modules.setdefault(module, []):
                self.modules[module].append(entry)
        self.selection = selection
        wanted = [f"{m}.base_layer.weight" for m in self.modules]
        self.weights = select_params(model, wanted)
        if self.weights.names != wanted:  # the flat layouts of dW and F_W must agree
            raise ValueError("curvature guard in weight space: the adapted layers' base weights "
                             "are not in model order")  # fmt: skip
        self.theta0 = read_theta(model, selection)
        self._w0 = self.delta_w(self.theta0, from_start=False)

    def delta_w(self, theta: torch.Tensor, from_start: bool = True) -> torch.Tensor:
        """The flat merged weight change at ``theta`` (from the start's; or the raw sum of
        ``s B A``)."""
        t = self.selection.unflatten(theta)
        out = []
        for module, adapters in self.modules.items():
            d = 0
            for adapter, s, transposed in adapters:
                ba = s * (t[f"{module}.lora_B.{adapter}.weight"]
                          @ t[f"{module}.lora_A.{adapter}.weight"])  # fmt: skip
                d = d + (ba.T if transposed else ba)
            out.append(d.reshape(-1))
        flat = torch.cat(out)
        return flat - self._w0 if from_start else flat

    def pullback(self, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``J^T g``: a covector on the merged weights as one on the adapter's ``theta``."""
        _, back = vjp(self.delta_w, theta)
        return back(g.to(theta.dtype))[0]


class CurvatureGuard(Guard):
    """The curvature-aware guard: penalty ``mu`` on ``Q(delta)`` and the cross-term projection."""

    name = "curvature"

    def __init__(self, mu: float = 30.0, project: bool = True, examples: int | None = 8,
                 space: str = "auto", memory_budget: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if mu < 0:
            raise ValueError("--curvature-mu must be >= 0")
        if space not in CURVATURE_SPACES:
            raise ValueError(f"--curvature-space {space!r}: use {', '.join(CURVATURE_SPACES)}")
        self.mu, self.do_project, self.examples = float(mu), project, examples
        self.space, self.memory_budget = space, memory_budget
        self.lora: LoRAWeightMap | None = None
        self._w: torch.Tensor | None = None
        self._before: torch.Tensor | None = None

    def settings(self) -> dict[str, Any]:
        return {"mu": self.mu, "project": self.do_project, "examples": self.examples,
                "space": self.space}  # fmt: skip

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        super().setup(model, selection, safety_batch, subspace)
        if safety_batch is None:
            raise ValueError("guard 'curvature' needs the safety batch (its Fisher)")
        batch = safety_batch
        if self.examples is not None and batch.size > self.examples:
            # spread over the set: safety files are often grouped by topic
            batch = batch.select(torch.linspace(0, batch.size - 1, self.examples).round().long())
        if self.space == "auto":
            self.space = "weights" if _is_lora(model, selection) else "params"
        was = model.training
        try:
            if self.space == "weights":
                self.lora = LoRAWeightMap(model, selection)
                self._check_memory(self.lora.weights.size)
                # the factors train; the products stay at theta0's
                flm = FunctionalLM(model, self.lora.weights, copy_unselected=selection.names)
            else:
                flm = FunctionalLM(model, selection)
            self.op = FrozenFisher(flm, batch, sharded=self.sharded)
        finally:
            model.train(was)
        self.theta0 = read_theta(model, selection)

    def _check_memory(self, dim: int) -> None:
        """Refuse a weight space whose vectors do not fit the budget: about
        ``WEIGHT_SPACE_VECTORS`` float32 vectors the size of the adapted layers' base weights."""
        need = WEIGHT_SPACE_VECTORS * dim * 4
        if self.memory_budget is not None and need > self.memory_budget:
            raise MemoryError(
                f"guard 'curvature' in weight space: the adapted layers hold {dim:,} base weights "
                f"and its products need about {need / 2**30:.2f} GiB, over the budget of "
                f"{self.memory_budget / 2**30:.2f} GiB; adapt fewer layers (--lora-targets), "
                "raise --memory-gb, or use --curvature-space params (blind to the adapter's A "
                "at PEFT's B = 0: docs/guard.md)"
            )

    def fisher_delta(self, theta: torch.Tensor) -> torch.Tensor:
        """``F (theta - theta0)``: one exact product (skipped at delta = 0)."""
        delta = theta - self.theta0
        if not bool(delta.any()):
            return torch.zeros_like(delta)
        return self.op.matvec(delta)

    def grad_q(self, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(grad Q, Q)`` at ``theta`` in the trained parameters' coordinates: ``F delta`` and
        ``delta . F delta / 2``, or in weight space through the adapter's chain rule."""
        if self.lora is None:
            w = self.fisher_delta(theta)
            return w, 0.5 * float(w @ (theta - self.theta0))
        dw = self.lora.delta_w(theta)
        if not bool(dw.any()):
            return torch.zeros_like(theta), 0.0
        g = self.op.matvec(dw.to(self.op.q.dtype))
        return self.lora.pullback(theta, g), 0.5 * float(g @ dw.to(g.dtype))

    def before_step(self, model, step) -> None:
        self._before = read_theta(model, self.selection)
        self._w, quad = self.grad_q(self._before)
        self._signals = {"quad": quad}
        if self.mu > 0 and bool(self._w.any()):
            grads = self.selection.unflatten(self.mu * self._w)
            for name, p in self.selection.tensors(model).items():
                extra = grads[name].to(p.dtype)
                p.grad = extra.clone() if p.grad is None else p.grad + extra

    def after_step(self, model, step) -> None:
        if not self.do_project:
            return
        u = read_theta(model, self.selection) - self._before
        w = self._w
        cross = float(w @ u)
        ww = float(w @ w)
        clipped = cross > 0 and ww > 0
        if clipped:
            u = u - (cross / ww) * w
            write_theta(model, self.selection, self._before + u)
        self._signals.update({"cross": cross, "clipped": clipped})
