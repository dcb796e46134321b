"""Guards: fine-tuning that keeps alignment (docs/guard.md).

``make_guard(name, **options)`` builds one by name; :class:`Guard` is the protocol (the hooks of
one training step). Each guard works in :func:`alignscope.train.loop.finetune` (``guard=``) and,
through :mod:`alignscope.train.guards.trainer`, inside ``transformers.Trainer``.
"""

from __future__ import annotations

from typing import Any

from alignscope.train.guards.adaptive import AdaptiveGuard, warned, watched_guard
from alignscope.train.guards.base import Guard, NoGuard, read_theta, write_theta
from alignscope.train.guards.constrained import ConstrainedSFTGuard
from alignscope.train.guards.curvature import CurvatureGuard
from alignscope.train.guards.penalties import AnchorGuard, FisherGuard
from alignscope.train.guards.projection import ProjectGuard, TrackingGuard, warm_block_eigs
from alignscope.train.guards.safe_lora import SafeLoRAGuard

GUARDS: dict[str, type[Guard]] = {
    "none": NoGuard,
    "project": ProjectGuard,
    "project-tracking": TrackingGuard,
    "curvature": CurvatureGuard,
    "fisher": FisherGuard,
    "anchor": AnchorGuard,
    "safe-lora": SafeLoRAGuard,
    "constrained-sft": ConstrainedSFTGuard,
}


def make_guard(name: str, **options: Any) -> Guard:
    """The guard ``name`` with its options (the keyword arguments of its class)."""
    if name not in GUARDS:
        raise ValueError(f"unknown guard {name!r}; use one of: {', '.join(GUARDS)}")
    return GUARDS[name](**options)


def guard_from_spec(spec, *, memory_budget: int, seed: int = 0, dtype: str = "float32",
                    device: str = "cpu") -> Guard:  # fmt: skip
    """The guard a :class:`~alignscope.config.GuardSpec` asks for (safe-lora loads ``--base``)."""
    name = spec.guard
    if name == "none":
        return NoGuard()
    if name == "project":
        return ProjectGuard(spec.guard_rank, memory_budget)
    if name == "project-tracking":
        return TrackingGuard(spec.guard_rank, spec.track_every, drift=spec.track_drift,
                             memory_budget=memory_budget)  # fmt: skip
    if name == "curvature":
        return CurvatureGuard(spec.curvature_mu, examples=spec.guard_examples,
                              space=spec.curvature_space, memory_budget=memory_budget)  # fmt: skip
    if name == "fisher":
        return FisherGuard(spec.ewc_lambda, spec.fisher_diag, rank=spec.fisher_rank,
                           memory_budget=memory_budget)  # fmt: skip
    if name == "anchor":
        return AnchorGuard(spec.anchor_beta, spec.guard_examples, seed)
    if name == "constrained-sft":
        return ConstrainedSFTGuard(spec.csft_beta)
    if name == "safe-lora":
        if not spec.base:
            raise ValueError("--guard safe-lora needs --base (the unaligned base model)")
        from alignscope.models import load_model

        base, _ = load_model(spec.base, dtype=dtype, device=device)
        return SafeLoRAGuard(base, spec.safe_lora_tau)
    raise ValueError(f"unknown guard {name!r}; use one of: {', '.join(GUARDS)}")


def adaptive_from_spec(spec, guard: Guard, model, tokenizer, safety_rows, eval_prompts, *,
                       seed: int = 0, max_new_tokens: int = 48,
                       max_length: int | None = None) -> Guard:  # fmt: skip
    """``guard`` in adaptive mode when ``spec.guard_adaptive`` (a watcher of ``model`` at its
    current weights switches it on, :func:`watched_guard`), else ``guard`` itself."""
    if not spec.guard_adaptive:
        return guard
    return watched_guard(
        guard, model, tokenizer, safety_rows, eval_prompts, every=spec.adaptive_every,
        floor=spec.adaptive_floor, kl_threshold=spec.adaptive_kl, seed=seed,
        max_new_tokens=max_new_tokens, max_length=max_length,
    )  # fmt: skip


__all__ = [
    "GUARDS",
    "AdaptiveGuard",
    "AnchorGuard",
    "ConstrainedSFTGuard",
    "CurvatureGuard",
    "FisherGuard",
    "Guard",
    "NoGuard",
    "ProjectGuard",
    "SafeLoRAGuard",
    "TrackingGuard",
    "adaptive_from_spec",
    "guard_from_spec",
    "make_guard",
    "read_theta",
    "warm_block_eigs",
    "warned",
    "watched_guard",
    "write_theta",
]
