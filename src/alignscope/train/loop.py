"""A small, generic fine-tuning loop on (prompt, response) pairs.

Loss: the mean negative log-likelihood over all response tokens of a batch (prompt tokens are
context only). Batches are right-padded (see :mod:`alignscope.data.encode`), so no attention mask
is passed. Data order is a deterministic function of ``seed``: a stream of seeded permutations of
the dataset, cut into batches, so every example is seen once per epoch
(:class:`~alignscope.train.stream.TrainingStream`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from alignscope import distributed as dist
from alignscope.data.encode import EncodedPair, LMBatch, encode_pairs
from alignscope.train.stream import TrainingStream

if TYPE_CHECKING:  # for the annotation only: the guards pull in the curvature engine
    from alignscope.train.guards import Guard
    from alignscope.train.prefix import PrefixForward

# callback(step, loss): step 0 is called before any update with loss None; step k after the k-th
# update with that update's minibatch loss. Returning True stops training.
StepCallback = Callable[[int, float | None], bool | None]


def as_pairs(rows: Sequence[Mapping[str, str] | tuple[str, str]]) -> list[tuple[str, str]]:
    """Accept ``{"prompt", "response"}`` dicts or ``(prompt, response)`` tuples."""
    out = []
    for r in rows:
        if isinstance(r, Mapping):
            out.append((r["prompt"], r["response"]))
        else:
            p, resp = r
            out.append((p, resp))
    return out


def response_nll(
    model: torch.nn.Module,
    batch: LMBatch,
    weighting: str = "token",
    prefix: PrefixForward | None = None,
) -> torch.Tensor:
    """Mean NLL of the response tokens of ``batch`` (a scalar tensor with grad).

    ``weighting="token"``: the mean over all response tokens of the batch (what Trainer does);
    ``"example"``: the mean over examples of each example's token mean, the fine-tuning loss
    ``L_f`` that diagnose differentiates (``FunctionalLM.mean_nll``), so that verify runs the
    flow the forecast describes. ``prefix``: run the frozen prefix from its per-example cache
    (:class:`~alignscope.train.prefix.PrefixForward`; the same numbers).
    """
    if weighting not in ("token", "example"):
        raise ValueError(f"unknown loss weighting {weighting!r}; use token or example")
    from alignscope.train.prefix import lm_logits

    # Only the response-predicting positions are projected onto the vocabulary where the frozen
    # prefix's cache runs the suffix (for SmolLM2 the tied LM head is most of a training step,
    # and prompt and padding positions are most of a batch); the whole network gathers them.
    mask = batch.target_mask  # [B, T-1]: position t predicts token t + 1
    logits = lm_logits(model, batch, prefix, rows=F.pad(mask, (0, 1)))  # [N, V]
    # 16-bit logits upcast to float32; float64 ones stay float64 (exact float64 checks)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, batch.targets[mask], reduction="none")  # [N]
    if weighting == "token":
        return nll.mean()
    weights = (mask.to(nll.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1))[mask]
    return (nll * weights).sum() / batch.size


# what a training batch too small for the ranks is called in the error
TRAINING_SHARD = "examples of a training batch (--batch-size)"


def shard_share(batch: LMBatch, mine: LMBatch, weighting: str = "token") -> float:
    """The factor that turns the loss of ``mine`` (a shard of ``batch``) into its share of
    ``batch``'s loss: its fraction of the batch's response tokens (``token`` weighting) or of
    its examples (``example``)."""
    if weighting == "token":
        return int(mine.target_mask.sum()) / max(int(batch.target_mask.sum()), 1)
    return mine.size / batch.size


def shard_nll(
    model: torch.nn.Module,
    batch: LMBatch,
    weighting: str = "token",
    prefix: PrefixForward | None = None,
) -> torch.Tensor:
    """This rank's share of :func:`response_nll` of ``batch``: the loss of its shard of the
    examples, weighted by the whole batch's example or token count, so that the shares (and
    their gradients) sum over the ranks to the batch's. ``response_nll`` itself in one process.
    """
    if not dist.active():
        return response_nll(model, batch, weighting, prefix)
    mine = dist.shard_batch(batch, TRAINING_SHARD)
    return response_nll(model, mine, weighting, prefix) * shard_share(batch, mine, weighting)


def make_optimizer(name: str, params, lr: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer diagnose forecasts: ``sgd`` (no momentum), ``adam``, or ``adamw`` with
    weight decay 0 (the forecast does not model decay)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=0.0)
    raise ValueError(f"optimizer {name!r}: use sgd, adam or adamw")


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at (0-based) update ``step``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    raise ValueError(f"unknown schedule {schedule!r}: use 'constant' or 'cosine'")


def finetune(
    model: torch.nn.Module,
    tokenizer,
    pairs: Sequence[Mapping[str, str] | tuple[str, str]] | None,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup: int = 0,
    schedule: str = "constant",
    grad_clip: float | None = None,
    max_length: int | None = None,
    encoded: Sequence[EncodedPair] | None = None,
    callback: StepCallback | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    loss_weighting: str = "token",
    stream: TrainingStream | None = None,
    guard: Guard | None = None,
    prefix: PrefixForward | None = None,
) -> list[float]:
    """Fine-tune ``model`` in place with AdamW on ``pairs``; return the per-step losses.

    ``encoded`` may be passed instead of ``pairs`` to skip tokenization. A custom ``optimizer``
    replaces the default ``AdamW(lr, betas, weight_decay)``; its learning rate is still scaled by
    the warmup/schedule factor relative to ``lr``.

    ``start_step`` resumes a run: the first ``start_step`` batches of the (seeded) stream are
    skipped unseen, so the data order matches an uninterrupted run; the model and optimizer must
    already hold that step's state, and the step-0 callback is not made.
    ``loss_weighting``: see :func:`response_nll`. ``stream``: a prepared
    :class:`~alignscope.train.stream.TrainingStream` (see
    :func:`~alignscope.train.stream.training_stream`); its examples, batch size, seed and
    ``max_length`` are used in place of ``pairs``/``encoded``, ``batch_size``, ``seed`` and
    ``max_length``. ``guard``: a :class:`~alignscope.train.guards.Guard` already set up at the
    starting weights; its hooks run inside each step (docs/guard.md) and the returned losses are
    the task loss without the guard's term or weights. ``prefix``: a
    :class:`~alignscope.train.prefix.PrefixForward` of ``model`` (built on its trainable
    parameters): every forward pass of the steps, the guard's included, runs the frozen layers
    from its per-example cache; same losses and weights as without it.

    Data parallel: under a ``torch.distributed`` group of several ranks (every rank calling
    this with the same model, stream and seed) each batch is sharded across the ranks and the
    gradients summed over them (:func:`shard_nll`), so every rank takes the single-process step.
    A guard runs data-parallel too (:meth:`~alignscope.train.guards.Guard.shard_over_ranks`,
    switched on here): its data terms are shared among the ranks like the task loss, and what
    it does to the summed gradient or the update is the same on every rank.
    """
    if stream is None:
        if encoded is None:
            if pairs is None:
                raise ValueError("pass pairs, encoded examples or a stream")
            encoded = encode_pairs(tokenizer, as_pairs(pairs), max_length=max_length)
        if not encoded:
            raise ValueError("cannot fine-tune on an empty dataset")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stream = TrainingStream(list(encoded), batch_size, seed, max_length, pad_id)
    elif pairs is not None or encoded is not None:
        raise ValueError("pass either a stream or pairs/encoded examples, not both")
    if prefix is not None and prefix.model is not model:
        raise ValueError("the prefix cache was built for another model; build it on this one")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses: list[float] = []
    if guard is not None and prefix is not None:
        guard.use_prefix(prefix)
    if guard is not None:
        guard.shard_over_ranks(dist.active())
    try:
        if start_step == 0 and callback is not None and callback(0, None):
            return losses
        batches = stream.batches(start_step)
        for step in range(start_step, steps):
            batch = next(batches)
            factor = lr_factor(step, steps, warmup, schedule)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            if guard is None:
                loss = task = shard_nll(model, batch.to(device), loss_weighting, prefix)
            else:
                loss, task = guard.step_loss(model, batch.to(device), step, loss_weighting)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.all_reduce_grads(params)  # data parallel: the batch gradient on every rank
            if guard is not None:
                guard.before_step(model, step)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if guard is not None:
                guard.after_step(model, step)
            losses.append(float(dist.all_reduce_sum(task.detach())))
            if callback is not None and callback(step + 1, losses[-1]):
                break
    finally:
        model.train(was_training)
        if guard is not None and prefix is not None:
            guard.use_prefix(None)
    return losses
