"""``alignscope.guard``: the guards' public names in one place (defined in
:mod:`alignscope.train.guards`; docs/guard.md)."""

from alignscope.train.guards import (
    GUARDS,
    AdaptiveGuard,
    AnchorGuard,
    ConstrainedSFTGuard,
    CurvatureGuard,
    FisherGuard,
    Guard,
    NoGuard,
    ProjectGuard,
    SafeLoRAGuard,
    TrackingGuard,
    make_guard,
    warned,
    watched_guard,
)
from alignscope.train.guards.trainer import GuardCallback, attach_guard

__all__ = [
    "GUARDS",
    "AdaptiveGuard",
    "AnchorGuard",
    "ConstrainedSFTGuard",
    "CurvatureGuard",
    "FisherGuard",
    "Guard",
    "GuardCallback",
    "NoGuard",
    "ProjectGuard",
    "SafeLoRAGuard",
    "TrackingGuard",
    "attach_guard",
    "make_guard",
    "warned",
    "watched_guard",
]
