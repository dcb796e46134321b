"""Adaptive mode: a guard that stays off (no cost per step) until an alignment signal moves.

:class:`AdaptiveGuard` wraps any guard. The inner guard is set up at theta0 like any other (so a
projection uses the aligned model's subspace and a penalty pulls towards the aligned weights),
but its per-step hooks run only once ``trigger()`` has returned True: by default the first early
warning of an :class:`~alignscope.train.watch.AlignmentWatcher` (or of the watcher inside an
``AlignmentCallback``). Once on, it stays on. The switch is read at the first hook of an update
(``step_loss`` in alignscope's loop and in a Trainer whose loss the guard replaces,
``before_step`` otherwise), so every hook of one update agrees: a warning raised at the
measurement after update ``k`` switches the guard on for update ``k`` (0-based) onwards, the
first update after the warning.

:func:`watched_guard` builds the whole thing for the commands (``finetune`` and ``verify``
``--guard-adaptive``): a watcher on the run's safety set and held-out prompts, and the guard it
switches on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alignscope import distributed as dist
from alignscope.train.guards.base import Guard


def warned(watcher: Any) -> Callable[[], bool]:
    """A trigger: True once ``watcher`` (an AlignmentWatcher or AlignmentCallback) has warned."""

    def trigger() -> bool:
        inner = getattr(watcher, "watcher", watcher)  # the callback holds its watcher
        return inner is not None and bool(getattr(inner, "warnings", None))

    return trigger


class AdaptiveGuard(Guard):
    """``inner`` switched on by ``trigger`` (or by :meth:`activate`).

    ``trigger``: a callable returning True to switch on, or a watcher (its first warning).
    A watcher passed here is also kept as :attr:`watcher`: its measurements and warnings are part
    of :meth:`state_dict` (a resumed run continues its trend) and of :meth:`record`.
    """

    def __init__(self, inner: Guard, trigger: Callable[[], bool] | Any) -> None:
        super().__init__()
        self.inner = inner
        self.watcher = None if callable(trigger) else trigger
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

    def shard_over_ranks(self, on: bool) -> None:
        super().shard_over_ranks(on)
        self.inner.shard_over_ranks(on)

    def activate(self, step: int) -> None:
        """Switch the inner guard on from update ``step``."""
        if not self.active:
            self.active, self.activated_at = True, step

    def _switch(self, step: int) -> None:
        if self.active:
            return
        on = bool(self.trigger())
        if self.sharded:  # data parallel: every rank follows rank 0's decision
            on = dist.broadcast_object(on)
        if on:
            self.activate(step)

    def state_dict(self) -> dict[str, Any]:
        state = {"active": self.active, "activated_at": self.activated_at,
                 "inner": self.inner.state_dict()}  # fmt: skip
        if self.watcher is not None and hasattr(self.watcher, "state_dict"):
            state["watcher"] = self.watcher.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active, self.activated_at = state["active"], state["activated_at"]
        self.inner.load_state_dict(state["inner"])
        if state.get("watcher") is not None and self.watcher is not None:
            self.watcher.load_state_dict(state["watcher"])

    def step_loss(self, model, batch, step, weighting="token"):
        self._switch(step)  # the first hook of an update: its loss hooks follow the switch
        return super().step_loss(model, batch, step, weighting)

    def token_weights(self, batch, logprobs):
        return self.inner.token_weights(batch, logprobs) if self.active else None

    def extra_loss(self, model, step):
        return self.inner.extra_loss(model, step) if self.active else None

    def before_step(self, model, step) -> None:
        self._switch(step)
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

    def record(self) -> dict[str, Any]:
        """``activated_at`` (the 0-based update from which the guard ran, None: never), the
        watcher's first warning and its measurements (when it has a watcher), and the inner
        guard's own record."""
        out: dict[str, Any] = {"adaptive": True, "active": self.active,
                               "activated_at": self.activated_at}  # fmt: skip
        inner = getattr(self.watcher, "watcher", self.watcher)
        if inner is not None and hasattr(inner, "records"):
            out["warning"] = inner.warnings[0] if inner.warnings else None
            keys = ("step", "kl", "refusal_rate", "soft_refusal", "warning")
            out["watcher"] = {
                "every": inner.every, "floor": inner.floor, "kl_threshold": inner.kl_threshold,
                "horizon": inner.horizon, "window": inner.window,
                "records": [{k: r.get(k) for k in keys} for r in inner.records],
            }  # fmt: skip
        return {**out, **self.inner.record()}


def watched_guard(
    inner: Guard,
    model,
    tokenizer,
    safety_rows: Sequence[dict[str, str]],
    eval_prompts: Sequence[str],
    *,
    every: int = 10,
    floor: float = 0.8,
    kl_threshold: float | None = None,
    seed: int = 0,
    max_new_tokens: int = 48,
    max_length: int | None = None,
) -> AdaptiveGuard:
    """``inner`` in adaptive mode, switched on by a new
    :class:`~alignscope.train.watch.AlignmentWatcher` of ``model`` at its current weights
    (theta0; build it before training and before a checkpoint is restored): KL on
    ``safety_rows``, greedy refusal and first-token refusal probability on ``eval_prompts``,
    measured at 0 1 2 4 8 ... then every ``every`` steps, warning when a refusal trend falls
    below ``floor`` (or the KL's rises above ``kl_threshold``). The caller calls
    ``guard.watcher.step(step, loss)`` after every update; set the guard up as any other."""
    from alignscope.train.watch import AlignmentWatcher

    watcher = AlignmentWatcher(
        model, tokenizer, list(safety_rows), list(eval_prompts), every=every, floor=floor,
        kl_threshold=kl_threshold, seed=seed, max_prompts=None, max_new_tokens=max_new_tokens,
        max_length=max_length,
    )  # fmt: skip
    return AdaptiveGuard(inner, watcher)
