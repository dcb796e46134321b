"""Guards: fine-tuning that keeps alignment (docs/guard.md).

``make_guard(name, **options)`` builds one by name; :class:`Guard` is the protocol (the hooks of
one training step). Each guard works in :func:`alignscope.train.loop.finetune` (``guard=``) and,
through :mod:`alignscope.train.guards.trainer`, inside ``transformers.Trainer``.
"""

from __future__ import annotations

from typing import Any

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


__all__ = [
    "GUARDS",
    "AnchorGuard",
    "ConstrainedSFTGuard",
    "CurvatureGuard",
    "FisherGuard",
    "Guard",
    "NoGuard",
    "ProjectGuard",
    "SafeLoRAGuard",
    "TrackingGuard",
    "make_guard",
    "read_theta",
    "warm_block_eigs",
    "write_theta",
]
