"""Adaptive mode: a guard that stays off (no cost per step) until an alignment signal moves.

:class:`AdaptiveGuard` wraps any guard. The inner guard is set up at theta0 like any other (so a
projection uses the aligned model's subspace and a penalty pulls towards the aligned weights),
but its per-step hooks run only once ``trigger()`` has returned True: by default the first early
warning of an :class:`~alignscope.train.watch.AlignmentWatcher` (or of the watcher inside an
``AlignmentCallback``). Once on, it stays on. The switch is read at ``before_step``, so the two
step hooks of one update always agree; the loss hooks follow from the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from alignscope.train.guards.base import Guard


def warned(watcher: Any) -> Callable[[], bool]:
    """A trigger: True once ``watcher`` (an AlignmentWatcher or AlignmentCallback) has warned."""

    def trigger() -> bool:
        inner = getattr(watcher, "watcher", watcher)  # the callback holds its watcher
        return inner is not None and bool(getattr(inner, "warnings", None))

    return trigger


class AdaptiveGuard(Guard):
    """``inner`` switched on by ``trigger`` (or by :meth:`activate`)."""

    def __init__(self, inner: Guard, trigger: Callable[[], bool] | Any) -> None:
        super().__init__()
        self.inner = inner
        self.trigger = trigger if callable(trigger) else warned(trigger)
        self.name = f"adaptive-{inner.name}"
        self.changes_loss = inner.changes_loss
        self.active = False
        self.activated_at: int | None = None

    def settings(self) -> dict[str, Any]:
        return {"inner": self.inner.name, **self.inner.settings()}

    def setup(self, model, selection, safety_batch=None, subspace=None) -> None:
        self.inner.setup(model, selection, safety_batch, subspace)
        self.selection = selection

    def use_prefix(self, prefix) -> None:
        super().use_prefix(prefix)
        self.inner.use_prefix(prefix)

    def activate(self, step: int) -> None:
        """Switch the inner guard on from update ``step``."""
        if not self.active:
            self.active, self.activated_at = True, step

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "activated_at": self.activated_at,
                "inner": self.inner.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active, self.activated_at = state["active"], state["activated_at"]
        self.inner.load_state_dict(state["inner"])

    def token_weights(self, batch, logprobs):
        return self.inner.token_weights(batch, logprobs) if self.active else None

    def extra_loss(self, model, step):
        return self.inner.extra_loss(model, step) if self.active else None

    def before_step(self, model, step) -> None:
        if not self.active and self.trigger():
            self.activate(step)
        if self.active:
            self.inner.before_step(model, step)

    def after_step(self, model, step) -> None:
        if self.active:
            self.inner.after_step(model, step)

    def finalize(self, model) -> dict[str, Any]:
        return self.inner.finalize(model) if self.active else {}

    def signals(self) -> dict[str, Any]:
        out = self.inner.signals() if self.active else {}
        return {"active": self.active, **out}
