"""Guards inside ``transformers.Trainer`` (and TRL's ``SFTTrainer``, a Trainer subclass).

Where a callback can change the update, it does: :class:`GuardCallback` runs the guard's
``before_step`` at ``on_pre_optimizer_step`` (after the backward pass and gradient clipping;
the curvature guard adds ``mu F delta`` to the gradients there) and ``after_step`` at
``on_optimizer_step`` (the projections correct the weights the optimizer just wrote), and
``finalize`` at ``on_train_end`` (Safe LoRA). That covers ``project``, ``project-tracking``,
``curvature`` and ``safe-lora``.

A callback cannot change the loss. The guards that do (``anchor``, ``fisher``,
``constrained-sft``: ``guard.changes_loss``) need the loss hook :func:`attach_guard` installs:
it replaces the trainer's ``compute_loss`` by the guard's ``step_loss`` on the batch's response
tokens (``labels != -100``). ``attach_guard`` adds the callback too, so one call serves every
guard; it composes with :class:`~alignscope.train.watch.AlignmentCallback` (both are plain
callbacks; the watcher measures the guarded weights).
"""

from __future__ import annotations

from typing import Any

import torch

from alignscope.data.encode import LMBatch
from alignscope.train.guards.base import Guard

try:  # transformers is a dependency, but keep the guards importable without it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[assignment,misc]


def batch_from_inputs(inputs: dict[str, Any]) -> LMBatch:
    """An :class:`LMBatch` from a Trainer batch: ``input_ids`` and ``labels`` (``-100`` where
    not trained on, HF's unshifted convention)."""
    ids, labels = inputs["input_ids"], inputs["labels"]
    mask = labels != -100
    if "attention_mask" in inputs:
        lengths = inputs["attention_mask"].sum(dim=1)
    else:
        lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
    return LMBatch(ids, mask, lengths)


class GuardCallback(TrainerCallback):
    """A guard's step hooks as a ``TrainerCallback``; ``signals`` of each step go into the logs
    (``guard/<name>``)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.history: list[dict[str, Any]] = []
        self.finalized: dict[str, Any] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.guard.before_step(model, state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.guard.after_step(model, state.global_step)
        self.history.append({"step": state.global_step + 1, **self.guard.signals()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the Trainer appends a copy of ``logs`` to the history before the callbacks run
        if not self.history or not state.log_history:
            return
        entry = state.log_history[-1]
        for key, value in self.history[-1].items():
            if key != "step" and isinstance(value, int | float):
                entry[f"guard/{key}"] = float(value)
                if logs is not None:
                    logs[f"guard/{key}"] = float(value)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.finalized = self.guard.finalize(model)


def attach_guard(trainer, guard: Guard) -> GuardCallback:
    """Put a guard (already set up at the starting weights) into ``trainer``: its callback, and
    for a guard that changes the loss, a ``compute_loss`` running ``guard.step_loss``."""
    callback = GuardCallback(guard)
    trainer.add_callback(callback)
    if guard.changes_loss:
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or "labels" not in inputs:
                return original(model, inputs, return_outputs, num_items_in_batch)
            loss, _ = guard.step_loss(model, batch_from_inputs(inputs), trainer.state.global_step)
            return loss

        trainer.compute_loss = compute_loss
        if hasattr(trainer, "loss_is_scaled_for_ga"):
            # step_loss is a per-batch mean: the Trainer must still divide it by the number of
            # gradient-accumulation steps
            trainer.loss_is_scaled_for_ga = False
    return callback
