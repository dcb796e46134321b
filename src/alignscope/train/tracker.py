"""Alignment measurements of a model during fine-tuning, one step at a time.

:class:`AlignmentTracker` is built once on the aligned model (theta0) and then called at any
step of a fine-tuning run (from ``finetune``'s callback, or later from a TrainerCallback). Each
call returns a JSON-ready record (docs/theory.md, "Drift during training"):

- ``kl``: mean per-token ``KL(pi_theta0 || pi_theta)`` over the alignment set's responses (the
  default alignment loss, exactly :class:`~alignscope.curvature.losses.AlignmentKL`; its
  reference at theta0 is computed once and kept while the ``[positions, vocabulary]`` table fits
  ``KL_TABLE_BUDGET``, else recomputed at every record: the same numbers either way);
- ``refusal_nll``: mean token NLL of the alignment set's reference responses;
- ``eval_kl`` / ``eval_nll``: the same on a held-out harmful set, when one is given;
- ``refusal_rate``: greedy generation on ``eval_prompts`` (None without them), judged by a
  pluggable judge (default: :class:`~alignscope.evaluate.KeywordRefusalJudge`);
- ``finetune_loss``: mean response NLL on a fixed fine-tuning batch;
- ``displacement`` ``|theta - theta0|``, ``subspace_displacement`` ``|P delta|``,
  ``subspace_fraction`` ``|P delta| / |delta|`` and ``fisher_drift``
  ``|F^1/2 P delta| = sqrt(sum_j lambda_j (v_j . delta)^2)`` when a subspace basis is given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.losses import AlignmentKL
from alignscope.curvature.prefix import DEFAULT_PREFIX_MEMORY_BUDGET
from alignscope.data.encode import LMBatch
from alignscope.evaluate import (
    KeywordRefusalJudge,
    RefusalJudge,
    RefusalReport,
    judge_prompts,
)
from alignscope.models import vocab_size
from alignscope.params import ParamSelection
from alignscope.train.prefix_generate import GenerationPrefix

# Bytes of theta0's log-probability table the tracker keeps per prompt set: the reference never
# changes, so a kept table saves a forward pass at every record; a larger table (a big
# vocabulary and many positions) is recomputed instead (AlignmentKL's reference="recompute").
KL_TABLE_BUDGET = 256 * 2**20


def _kl_reference(batch: LMBatch, vocab: int, itemsize: int) -> str:
    positions = int(batch.target_mask.sum())
    return "table" if positions * vocab * itemsize <= KL_TABLE_BUDGET else "recompute"


class AlignmentTracker:
    """Measures alignment drift of ``model`` (mutated in place by training) against theta0.

    ``basis`` ``[P, d]`` (orthonormal columns) and ``eigenvalues`` ``[d]`` describe the alignment
    subspace from ``diagnose``; without them the subspace entries of a record are ``None``.
    ``initial_responses``: greedy responses to ``eval_prompts`` at theta0 made the way
    :meth:`measure` makes them (:func:`~alignscope.evaluate.generate`, batches of 32); a record
    taken while the selected parameters still equal theta0 judges these instead of generating.
    ``generation_prefix``: the :class:`~alignscope.train.prefix_generate.GenerationPrefix` that
    made them (its recorded prompt states then serve every later record); by default one is
    built within ``prefix_memory_budget`` (0: none), so the refusal generation's prefill runs
    the layers above the frozen prefix only.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        selection: ParamSelection,
        safety_batch: LMBatch,
        *,
        eval_prompts: Sequence[str] | None = None,
        eval_batch: LMBatch | None = None,
        finetune_batch: LMBatch | None = None,
        basis: torch.Tensor | None = None,
        eigenvalues: torch.Tensor | None = None,
        judge: RefusalJudge | None = None,
        max_new_tokens: int = 48,
        generate_refusals: bool = True,
        prefix_memory_budget: int = DEFAULT_PREFIX_MEMORY_BUDGET,
        initial_responses: Sequence[str] | None = None,
        generation_prefix: GenerationPrefix | None = None,
    ) -> None:
        was_training = model.training
        self.model = model
        self.tokenizer = tokenizer
        self.selection = selection
        # theta0 = the parameters right now. The prompt sets never change: with a frozen prefix
        # their hidden states are computed at the first record and every later KL, NLL and
        # fine-tuning loss runs the suffix only (within the budget; 0: whole network).
        self.flm = FunctionalLM(
            model,
            selection,
            prefix_cache=prefix_memory_budget > 0,
            prefix_memory_budget=prefix_memory_budget,
        )
        model.train(was_training)
        self.theta0 = self.flm.theta0
        self.safety_batch = safety_batch
        vocab = vocab_size(model)
        itemsize = self.theta0.element_size()

        def kl(batch: LMBatch) -> AlignmentKL:
            ref = _kl_reference(batch, vocab, itemsize)
            return AlignmentKL(self.flm, batch, reference=ref)

        self.kl = kl(safety_batch)
        self.eval_batch = eval_batch
        self.eval_kl = kl(eval_batch) if eval_batch is not None else None
        self.finetune_batch = finetune_batch
        self.prompts = list(eval_prompts) if eval_prompts is not None else None
        if basis is not None:
            if basis.shape[0] != self.flm.dim:
                raise ValueError(
                    f"subspace basis has {basis.shape[0]} rows, the selection {self.flm.dim}"
                )
            if eigenvalues is None or eigenvalues.numel() != basis.shape[1]:
                raise ValueError("pass one eigenvalue per basis column")
        self.basis = basis
        self.eigenvalues = eigenvalues
        self.judge = judge or KeywordRefusalJudge()
        self.max_new_tokens = max_new_tokens
        self.generate_refusals = generate_refusals
        if generation_prefix is None and eval_prompts is not None:
            generation_prefix = GenerationPrefix.build(model, selection, prefix_memory_budget)
        self.generation_prefix = generation_prefix
        if initial_responses is not None and (
            self.prompts is None or len(initial_responses) != len(self.prompts)
        ):
            raise ValueError("initial_responses: one greedy response per eval prompt")
        # Greedy responses at theta0 made already (verify's reference responses of the eval
        # set, same prompts, same batches): a record at theta0 judges them instead of
        # generating them again.
        self.initial_responses = list(initial_responses) if initial_responses else None

    def current_theta(self) -> torch.Tensor:
        """The selected parameters of the live model, flattened (a detached copy)."""
        return self.selection.flatten(self.selection.tensors(self.model)).detach().clone()

    def subspace_stats(self, delta: torch.Tensor) -> dict[str, float | None]:
        """``|delta|``, ``|P delta|``, their ratio and ``|F^1/2 P delta|``."""
        norm = float(delta.double().norm())
        out: dict[str, float | None] = {
            "displacement": norm,
            "subspace_displacement": None,
            "subspace_fraction": None,
            "fisher_drift": None,
        }
        if self.basis is None:
            return out
        coeff = (self.basis.T.double() @ delta.double().to(self.basis.device)).cpu()
        proj = float(coeff.norm())
        lam = self.eigenvalues.double().cpu().clamp_min(0.0)
        out["subspace_displacement"] = proj
        out["subspace_fraction"] = proj / norm if norm > 0 else None
        out["fisher_drift"] = math.sqrt(float((lam * coeff.square()).sum()))
        return out

    def _at_theta0(self, theta: torch.Tensor) -> bool:
        # the frozen parameters never change, so the selected ones decide
        return bool(torch.equal(theta, self.theta0))

    @torch.no_grad()
    def measure(
        self, step: int, minibatch_loss: float | None = None, *, refusals: bool | None = None
    ) -> dict[str, Any]:
        """One record at ``step`` (the model's current parameters)."""
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()  # no dropout in the measurements
        try:
            theta = self.current_theta()
            rec: dict[str, Any] = {"step": int(step), "minibatch_loss": minibatch_loss}
            kl, nll = self.kl.with_nll(theta)
            rec["kl"], rec["refusal_nll"] = float(kl), float(nll)
            if self.eval_kl is not None:
                kl, nll = self.eval_kl.with_nll(theta)
                rec["eval_kl"], rec["eval_nll"] = float(kl), float(nll)
            if self.finetune_batch is not None:
                rec["finetune_loss"] = float(self.flm.mean_nll(theta, self.finetune_batch))
            rec.update(self.subspace_stats(theta - self.theta0))
            do_gen = self.generate_refusals if refusals is None else refusals
            rec["refusal_rate"] = None
            if do_gen and self.prompts and self.initial_responses and self._at_theta0(theta):
                refused = list(self.judge(self.initial_responses))
                report = RefusalReport(self.prompts, self.initial_responses, refused)
                rec["refusal_rate"] = report.rate
            elif do_gen and self.prompts:
                report = judge_prompts(
                    self.model,
                    self.tokenizer,
                    self.prompts,
                    judge=self.judge,
                    max_new_tokens=self.max_new_tokens,
                    prefix=self.generation_prefix,
                )
                rec["refusal_rate"] = report.rate
        finally:
            self.model.train(was_training)
        rec["seconds"] = time.perf_counter() - start
        return rec
