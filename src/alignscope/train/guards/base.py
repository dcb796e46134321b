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

Data parallel (alignscope's loop and commands under a ``torch.distributed`` group of several
ranks, :meth:`Guard.shard_over_ranks`): each rank computes its share of the step's loss, the
shares' gradients are summed over the ranks, and every rank then holds the same gradient and
takes the same update. So a guard's data terms (the task loss and its token weights, the anchor's
replayed safety minibatch) are sharded with the whole batch's weights; a term of the weights
alone (the fisher penalty) is added on rank 0 only, once; Fisher products over the safety
prompts are sharded and summed (:func:`safety_fisher`); what acts on the summed gradient or on
the update (projections, the curvature guard's pull) is the same on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from alignscope import distributed as dist
from alignscope.data.encode import LMBatch
from alignscope.params import ParamSelection
from alignscope.train.loop import TRAINING_SHARD, shard_share
from alignscope.train.prefix import lm_logits

if TYPE_CHECKING:
    from alignscope.curvature.fisher import FisherOperator
    from alignscope.curvature.functional import FunctionalLM
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


def safety_fisher(
    flm: FunctionalLM, batch: LMBatch, theta: torch.Tensor | None = None, sharded: bool = False
) -> FisherOperator | dist.SumOverRanks:
    """The alignment Fisher of ``batch`` at ``theta`` (default theta0), a
    :class:`~alignscope.curvature.fisher.FisherOperator`. ``sharded`` (data parallel): each rank
    holds its shard of the prompts with the whole batch's weights and every product, form and
    trace is summed over the ranks, the single-process numbers on every rank; Monte-Carlo factor
    rows are drawn from the whole batch on every rank, so they are the single-process draws too.
    """
    from alignscope.curvature.fisher import FisherOperator

    # The guards keep the exact vocabulary (vocab_keep=1.0): their products are few.
    if not (sharded and dist.active()):
        return FisherOperator(flm, batch, theta, vocab_keep=1.0)
    mine = dist.shard_batch(batch, "safety prompts")
    op = FisherOperator(flm, mine, theta, n_total=batch.size, vocab_keep=1.0)
    return _ShardedFisher(op, flm, batch, theta)


class _ShardedFisher(dist.SumOverRanks):
    """:class:`~alignscope.distributed.SumOverRanks` whose Monte-Carlo factor rows are the whole
    batch's, drawn on every rank from the same generator (one process' draws, not a rank's)."""

    def __init__(
        self, op: FisherOperator, flm: FunctionalLM, batch: LMBatch, theta: torch.Tensor | None
    ) -> None:
        super().__init__(op, n_examples=batch.size)
        self.whole = (flm, batch, theta)

    def mc_factor_rows(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        from alignscope.curvature.fisher import FisherOperator

        flm, batch, theta = self.whole
        op = FisherOperator(flm, batch, theta, vocab_keep=1.0)
        return op.mc_factor_rows(*args, **kwargs)


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
    #: True while the guard runs data-parallel (:meth:`shard_over_ranks`)
    sharded: bool = False

    def __init__(self) -> None:
        self.selection: ParamSelection | None = None
        self._signals: dict[str, Any] = {}

    def use_prefix(self, prefix: PrefixForward | None) -> None:
        """Run the guard's forward passes (the step's, anchor replay, the reference at theta0)
        through ``prefix``'s cache of the frozen layers (None: the whole network)."""
        self.prefix = prefix

    def shard_over_ranks(self, on: bool) -> None:
        """Run data-parallel (``on``, under a process group of several ranks; a no-op in one
        process): each rank returns its share of every step's loss, for gradients summed over
        the ranks, as alignscope's loop and commands do (docs/scale.md). Call it before
        :meth:`setup` to share the setup's Fisher products too (the commands do); the loop
        calls it when it starts. Off, every hook computes the whole step on each rank (the
        Trainer adapters: the Trainer's DDP averages the ranks' gradients)."""
        self.sharded = bool(on) and dist.active()

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
        """A term added to the loss of update ``step`` (0-based), or None. Data parallel
        (:attr:`sharded`): this rank's share of it, a term over data sharded with the whole
        data's weights, or a term of the weights alone on rank 0 only (None on the others)."""
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
        guard's token weights, plus its extra term; the task loss is the plain response NLL.
        Data parallel (:meth:`shard_over_ranks`): this rank's shares of both (its shard of
        ``batch`` weighted by the whole batch), which sum over the ranks to the step's."""
        share = 1.0
        if self.sharded:
            mine = dist.shard_batch(batch, TRAINING_SHARD)
            share = shard_share(batch, mine, weighting)
            batch = mine
        nll = token_nll(model, batch, self.prefix)
        mask = batch.target_mask
        task = reduce_nll(nll, mask, weighting)
        weights = self.token_weights(batch, -nll.detach())
        loss = task if weights is None else reduce_nll(nll, mask, weighting, weights.detach())
        if self.sharded:
            task, loss = task * share, loss * share
        extra = self.extra_loss(model, step)
        if extra is not None:
            loss = loss + extra
        return loss, task


class NoGuard(Guard):
    """``none``: the unguarded baseline."""

    name = "none"
