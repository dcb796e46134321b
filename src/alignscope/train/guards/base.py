"""The guard protocol: the hooks a guard may use inside one training step, and shared helpers.

A guard is set up once at the aligned weights theta0 (:meth:`Guard.setup`) and then acts through
these hooks of the training loop (:func:`alignscope.train.loop.finetune`; the Trainer adapters in
:mod:`alignscope.train.guards.trainer` call the same ones):

1. :meth:`Guard.token_weights` -- per-position weights of the task loss (detached);
2. :meth:`Guard.extra_loss` -- a term added to the step's loss (its gradient joins the task's);
3. :meth:`Guard.before_step` -- after the backward pass, before the optimizer: may change the
   gradients and remembers the parameters before the update;
4. :meth:`Guard.after_step` -- after the optimizer: may correct the parameters (projections);
5. :meth:`Guard.finalize` -- once after training (post-hoc transforms such as Safe LoRA).

:meth:`Guard.signals` returns the guard's own numbers for the step just taken (logged per step),
:meth:`Guard.record` what it did over the run (results.json).
The math of every guard is in docs/guard.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from alignscope.data.encode import LMBatch
from alignscope.params import ParamSelection
from alignscope.train.prefix import lm_logits

if TYPE_CHECKING:
    from alignscope.train.prefix import PrefixForward


def read_theta(model: nn.Module, selection: ParamSelection) -> torch.Tensor:
    """The selected parameters of ``model`` as one detached flat copy."""
    with torch.no_grad():
        return selection.flatten(selection.tensors(model)).detach().clone()


def write_theta(model: nn.Module, selection: ParamSelection, theta: torch.Tensor) -> None:
    """Copy a flat vector into the selected parameters of ``model`` (in place, no autograd)."""
    live = selection.tensors(model)
    with torch.no_grad():
        for name, piece in selection.unflatten(theta).items():
            live[name].copy_(piece)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it is float64 (16-bit logits are upcast for the loss)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_nll(
    model: nn.Module, batch: LMBatch, prefix: PrefixForward | None = None
) -> torch.Tensor:
    """``[B, T-1]`` token NLL of every next-token prediction of ``batch`` (with grad); the
    frozen prefix from ``prefix``'s cache when given."""
    logits = lm_logits(model, batch, prefix)[:, :-1]
    return F.cross_entropy(
        at_least_float32(logits).transpose(1, 2), batch.targets, reduction="none"
    )


def reduce_nll(
    nll: torch.Tensor, mask: torch.Tensor, weighting: str, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The loop's task loss from token NLLs (``response_nll``'s reductions), each token's NLL
    multiplied by ``weights`` when given: ``token`` the mean over the batch's response tokens,
    ``example`` the mean over examples of each example's token mean."""
    m = mask.to(nll.dtype)
    values = nll * weights.to(nll.dtype) if weights is not None else nll
    if weighting == "token":
        return (values * m).sum() / m.sum().clamp_min(1)
    if weighting != "example":
        raise ValueError(f"unknown loss weighting {weighting!r}; use token or example")
    per_example = m / m.sum(dim=1, keepdim=True).clamp_min(1)
    return (values * per_example).sum(dim=1).mean()


class Reference:
    """The aligned model (theta0 of a selection) evaluated through the live module: the selected
    parameters are swapped for their theta0 values in a functional call, so no second copy of
    the model is kept."""

    def __init__(self, model: nn.Module, selection: ParamSelection) -> None:
        self.model = model
        self.theta0 = {n: t.detach().clone() for n, t in selection.tensors(model).items()}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        was = self.model.training
        self.model.eval()  # the reference is the aligned model itself: no dropout
        try:
            out = functional_call(self.model, self.theta0, (input_ids,), {"use_cache": False})
        finally:
            self.model.train(was)
        return out.logits if hasattr(out, "logits") else out

    @torch.no_grad()
    def batch_logits(self, batch: LMBatch, prefix: PrefixForward | None = None) -> torch.Tensor:
        """:meth:`logits` of ``batch``, the frozen prefix from ``prefix``'s cache when given."""
        if prefix is None:
            return self.logits(batch.input_ids)
        was = self.model.training
        self.model.eval()
        try:
            return lm_logits(self.model, batch, prefix, self.theta0)
        finally:
            self.model.train(was)


class Guard:
    """A guard: the baseline ``none`` (every hook a no-op) and the base class of the others.

    Subclasses override the hooks they need; ``settings()`` names the guard's options for
    results.json.
    """

    name = "none"
    #: True when the guard changes the loss (needs a loss hook inside transformers.Trainer)
    changes_loss = False
    #: the training loop's cached frozen prefix, while a run uses one (:meth:`use_prefix`)
    prefix: PrefixForward | None = None

    def __init__(self) -> None:
        self.selection: ParamSelection | None = None
        self._signals: dict[str, Any] = {}

    def use_prefix(self, prefix: PrefixForward | None) -> None:
        """Run the guard's forward passes (the step's, anchor replay, the reference at theta0)
        through ``prefix``'s cache of the frozen layers (None: the whole network)."""
        self.prefix = prefix

    def settings(self) -> dict[str, Any]:
        """The guard's options (JSON-ready)."""
        return {}

    def setup(
        self,
        model: nn.Module,
        selection: ParamSelection,
        safety_batch: LMBatch | None = None,
        subspace: Any = None,
    ) -> None:
        """Prepare at theta0 (the current weights of ``model``).

        ``selection``: the parameters trained (the guard acts on them and refuses ones that do
        not require grad); ``safety_batch``: the alignment set; ``subspace``: a
        :class:`~alignscope.geometry.Subspace` (or ``(basis, values)``) from diagnose, for the
        guards that use one.
        """
        frozen = [n for n, p in selection.tensors(model).items() if not p.requires_grad]
        if frozen:
            shown = ", ".join(frozen[:4]) + (
                f", ... ({len(frozen)} in all)" if len(frozen) > 4 else ""
            )
            raise ValueError(
                f"guard {self.name!r}: the guarded parameters are not trained ({shown}); guard "
                "the parameters the optimizer updates (the same --params)"
            )
        self.selection = selection

    def token_weights(self, batch: LMBatch, logprobs: torch.Tensor) -> torch.Tensor | None:
        """``[B, T-1]`` weights of the task loss's token NLLs (None: unweighted); ``logprobs``
        are the live model's detached log-probabilities of the targets."""
        return None

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """A term added to the loss of update ``step`` (0-based), or None."""
        return None

    def before_step(self, model: nn.Module, step: int) -> None:
        """After the backward pass of update ``step``, before the optimizer."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """After the optimizer's update ``step``."""

    def finalize(self, model: nn.Module) -> dict[str, Any]:
        """Once after training; returns what it did (JSON-ready)."""
        return {}

    def signals(self) -> dict[str, Any]:
        """The guard's numbers for the last step (JSON-ready floats)."""
        return dict(self._signals)

    def record(self) -> dict[str, Any]:
        """What the guard did over the run, for results.json (JSON-ready; e.g. when an adaptive
        guard switched on, when a tracking guard re-estimated its subspace)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides theta0 (which ``setup`` recomputes): tensors and
        plain values only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after ``setup``."""

    def step_loss(
        self, model: nn.Module, batch: LMBatch, step: int, weighting: str = "token"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss to differentiate, task loss)`` of one guarded step: the task NLL with the
        guard's token weights, plus its extra term; the task loss is the plain response NLL."""
        nll = token_nll(model, batch, self.prefix)
        mask = batch.target_mask
        task = reduce_nll(nll, mask, weighting)
        weights = self.token_weights(batch, -nll.detach())
        loss = task if weights is None else reduce_nll(nll, mask, weighting, weights.detach())
        extra = self.extra_loss(model, step)
        if extra is not None:
            loss = loss + extra
        return loss, task


class NoGuard(Guard):
    """``none``: the unguarded baseline."""

    name = "none"
