"""``rank``: order candidate fine-tuning sets (or learning rates) by predicted alignment damage.

Every predictor of :mod:`alignscope.commands.predictors` is computed for every candidate, side
by side; the candidates are ordered by one of them (``RankConfig.predictor``, default the winner
of bench/study.py), least predicted damage - the recommended candidate - first.
:func:`run_rank` returns a :class:`RankResult` whose ``to_json()`` is the versioned results.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignscope import distributed as dist
from alignscope.commands.diagnose import DiagnoseConfig
from alignscope.commands.predictors import (
    DEFAULT_PREDICTOR,
    PREDICTORS,
    STEP_PREDICTORS,
    RankState,
    order,
)
from alignscope.config import (
    DAMAGE_ONSET_FRACTION,
    DAMAGE_ONSET_MEDIAN,
    DAMAGE_ONSET_SOURCE,
    REAL_DAMAGE_ONSET,
    REAL_DAMAGE_ONSET_SOURCE,
    REAL_LORA_TRIAL,
    Composed,
    CurvatureSpec,
    DataSpec,
    EvalSpec,
    FinetuneSpec,
    ModelSpec,
    OptimSpec,
    RankingSpec,
    RuntimeSpec,
)
from alignscope.data.sample import subsample
from alignscope.geometry import Subspace
from alignscope.progress import Stages
from alignscope.report.format import fmt
from alignscope.report.output import jsonable, results_header

SCHEMA = "alignscope.rank/1"

__all__ = [
    "DEFAULT_PREDICTOR",
    "PREDICTORS",
    "RankConfig",
    "RankResult",
    "run_rank",
    "summary",
    "trial_notes",
    "trial_warnings",
]


@dataclass
class RankConfig(Composed):
    """diagnose's specs for several candidates, recorded flat in results.json:
    ``ranking.data`` is a list of fine-tuning sets and ``ranking.lrs`` the learning rates
    (default ``[optim.lr]``); every set is ranked at every learning rate."""

    model: ModelSpec
    datasets: DataSpec
    ranking: RankingSpec
    curvature: CurvatureSpec = field(default_factory=CurvatureSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def __post_init__(self) -> None:
        self.ranking.lrs = self.ranking.lrs or [self.optim.lr]
        self.optim.lr = self.ranking.lrs[0]  # the lr results.json records is a ranked one

    @property
    def n_lookahead(self) -> int:
        """Optimizer steps of the lookahead: as given, else a tenth of the planned steps, at
        least 12 (12 of 200 swapped two sets on the demo organism that 20 ordered right,
        docs/rank.md), never more than the plan."""
        if self.ranking.lookahead_steps is not None:
            return self.ranking.lookahead_steps
        steps = self.optim.steps
        return min(steps, max(12, math.ceil(steps / 10)))

    def candidates(self) -> list[tuple[str, float]]:
        """``(data, lr)`` pairs: every set at every learning rate."""
        return [(d, lr) for d in self.ranking.data for lr in self.ranking.lrs or ()]

    def validate(self) -> None:
        super().validate()  # each spec's own fields
        r = self.ranking
        if len(self.candidates()) < 2:
            raise ValueError(
                "rank needs at least two candidates: pass two or more --data sets, or one set "
                "with two or more learning rates (--lr 1e-5 3e-5 1e-4)"
            )
        if r.predictor not in PREDICTORS:
            raise ValueError(f"--predictor {r.predictor!r}: use one of {', '.join(PREDICTORS)}")
        if r.predictor == "gradient_similarity" and r.compliance is None:
            raise ValueError("--predictor gradient_similarity needs --compliance FILE")
        if r.lookahead_steps is not None and r.lookahead_steps > self.optim.steps:
            raise ValueError("--lookahead-steps must be in 1..--steps")

    def eval_prompts(self) -> list[str] | None:
        """The ``--eval-prompts`` (at most ``--max-eval``, seeded subset), or None."""
        if self.eval.eval_prompts is None:
            return None
        from alignscope.data.loaders import load_data

        rows = load_data(self.eval.eval_prompts, "safety", format=self.datasets.safety_format).rows
        rows = subsample(rows, self.eval.max_eval, self.runtime.seed)
        if not rows:
            raise ValueError(f"--eval-prompts {self.eval.eval_prompts}: no prompts")
        return [r["prompt"] for r in rows]

    def trial_warnings(self) -> list[str]:
        """A warning when the trial run ends before half of the study's damaged runs of this
        optimizer had started (:func:`trial_warnings`)."""
        return trial_warnings(self.optim.optimizer, self.n_lookahead, self.optim.steps)

    def trial_notes(self) -> list[str]:
        """A note when the trial ends before three quarters of them had (:func:`trial_notes`),
        and one for a new LoRA adapter's trial shorter than a fifth (:func:`new_adapter_note`)."""
        notes = trial_notes(self.optim.optimizer, self.n_lookahead, self.optim.steps)
        if self.model.lora_r is not None:
            notes += new_adapter_note(self.n_lookahead, self.optim.steps, self.ranking.predictor)
        return notes

    def model_config(self) -> DiagnoseConfig:
        """The diagnosis config of the model as configured (adapter included; the first set)."""
        return DiagnoseConfig(
            self.model, self.datasets, FinetuneSpec(self.ranking.data[0]), self.curvature,
            self.optim, self.runtime,
        )  # fmt: skip


@dataclass
class RankResult:
    config: RankConfig
    candidates: list[dict[str, Any]]  # in input order
    ranking: list[int]  # candidate indices, least predicted damage (recommended) first
    shared_timings: dict[str, float]
    timings: dict[str, float]
    parameters: dict[str, Any] | None = None  # what was analysed (diagnose's "parameters")
    n_eval_prompts: int | None = None  # --eval-prompts used for the refusal rate (None: none)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str:
        if len(self.config.ranking.data) > 1 and len(self.config.ranking.lrs) > 1:
            return "datasets x learning rates"
        return "learning rates" if len(self.config.ranking.lrs) > 1 else "datasets"

    def to_json(self) -> dict[str, Any]:
        cands = self.candidates
        return jsonable(
            {
                **results_header(SCHEMA, self.config),
                "mode": self.mode,
                "parameters": self.parameters,
                "predictor": self.config.ranking.predictor,
                # the trial run's batch order: the planned --seed (same) or one it does not use
                "lookahead_order": self.config.ranking.lookahead_order,
                "trial_seed": self.config.ranking.trial_seed(self.config.runtime.seed),
                "predictor_descriptions": PREDICTORS,
                "refusal": self.refusal_source(),
                "warnings": self.warnings,
                "notes": self.notes,
                "candidates": cands,
                "ranking": [cands[i]["label"] for i in self.ranking],
                "recommended": cands[self.ranking[0]]["label"],
                "most_damaging": cands[self.ranking[-1]]["label"],
                "summary": summary(
                    cands, self.ranking, self.config.ranking.predictor, self.config.optim.steps
                ),
                "shared_timings_s": self.shared_timings,
                "timings_s": self.timings,
            }
        )

    def refusal_source(self) -> dict[str, Any]:
        """Where each candidate's refusal rate (``candidates[i]["refusal"]``) was measured."""
        cfg = self.config
        if cfg.eval.eval_prompts is None:
            return {
                "prompts": None,
                "n_prompts": None,
                "measured": "not measured after the trial run (no --eval-prompts); "
                "details.refusal_rate is the safety prompts' at step 0",
            }
        return {
            "prompts": cfg.eval.eval_prompts,
            "n_prompts": self.n_eval_prompts,
            "judge": "KeywordRefusalJudge",
            "measured": f"greedy generation at the start and the end of each "
            f"{cfg.n_lookahead}-step trial run",
        }


def _trial_message(n_lookahead: int, steps: int, optimizer: str, share: str, onset: float) -> str:
    need = math.ceil(DAMAGE_ONSET_FRACTION[optimizer] * steps)
    return (
        f"the trial run covers {n_lookahead} of {steps} planned steps "
        f"({n_lookahead / steps:.0%}), but in {DAMAGE_ONSET_SOURCE} {share} of the "
        f"{optimizer} runs whose alignment KL reached 0.1 reached it only after "
        f"{onset:.1%} of their budget: damage that starts after the trial ends is not measured "
        f"(the lookahead predictors rank by the trial alone). --lookahead-steps {need} covers "
        "the time by which three quarters of the study's damaged runs had started"
        + _real_onset_clause(optimizer, n_lookahead / steps)
        + "; either way, check the chosen candidate with `alignscope verify`."
    )


def _real_onset_clause(optimizer: str, covered: float) -> str:
    """What the real-model study adds to the note, for AdamW (and Adam) trials that end before
    its earliest damage could have begun (:data:`alignscope.config.REAL_DAMAGE_ONSET`)."""
    real = REAL_DAMAGE_ONSET
    if optimizer not in ("adamw", "adam") or covered >= real["earliest_after"]:
        return ""
    return (
        f". In {REAL_DAMAGE_ONSET_SOURCE} the {real['damaged']} of its {real['runs']} AdamW runs "
        f"whose KL reached 0.1 all reached it after {real['earliest_after']:.0%} of their "
        f"budget (the earliest by {real['earliest_by']:.0%}, half by {real['median_by']:.0%}): "
        "there a trial this short saw none of that damage begin and ranked those runs by their "
        "early KL alone"
    )


def trial_warnings(optimizer: str, n_lookahead: int, steps: int) -> list[str]:
    """A warning (else none) when a trial of ``n_lookahead`` of ``steps`` planned steps ends
    before the median damage onset of the study's runs with ``optimizer``
    (:data:`alignscope.config.DAMAGE_ONSET_MEDIAN`): half of the damage it was built to see
    started later. Shorter than rank's default tenth under both optimizers."""
    onset = DAMAGE_ONSET_MEDIAN.get(optimizer)
    if onset is None or steps < 1 or n_lookahead / steps >= onset:
        return []
    return [_trial_message(n_lookahead, steps, optimizer, "half", onset)]


def trial_notes(optimizer: str, n_lookahead: int, steps: int) -> list[str]:
    """A note (else none) when the trial is long enough not to be warned about
    (:func:`trial_warnings`) but shorter than the fraction of the budget by which three
    quarters of the study's damaged runs of ``optimizer`` had started
    (:data:`alignscope.config.DAMAGE_ONSET_FRACTION`), or, under AdamW, than the earliest onset
    of the real-model study (:data:`alignscope.config.REAL_DAMAGE_ONSET`). rank's default tenth
    under AdamW is such a trial; in both studies it still ranked the damaged runs above the
    others, so this is information, not a warning."""
    onset = DAMAGE_ONSET_FRACTION.get(optimizer)
    if onset is None or steps < 1 or trial_warnings(optimizer, n_lookahead, steps):
        return []
    if n_lookahead / steps < onset:
        return [_trial_message(n_lookahead, steps, optimizer, "a quarter", onset)]
    # long enough for the organism study, not for the real model's later damage
    real = _real_onset_clause(optimizer, n_lookahead / steps)
    if not real:
        return []
    return [
        f"the trial run covers {n_lookahead} of {steps} planned steps "
        f"({n_lookahead / steps:.0%}){real}; check the chosen candidate with `alignscope verify`."
    ]


def new_adapter_note(n_lookahead: int, steps: int, predictor: str) -> list[str]:
    """A note (else none) for a trial of a *new* LoRA adapter shorter than a fifth of the budget:
    PEFT starts it at B = 0, the first steps barely move the model, and in the real-model study
    (docs/rank.md) a tenth ranked such runs poorly where a fifth and ``lookahead_kl`` did better."""
    if steps < 1 or n_lookahead / steps >= 0.2:
        return []
    fifth = min(steps, math.ceil(steps / 5))
    other = "" if predictor == "lookahead_kl" else " and read --predictor lookahead_kl beside it"
    t = REAL_LORA_TRIAL
    return [
        f"a new LoRA adapter starts at B = 0 and barely moves in its first steps: in "
        f"{REAL_DAMAGE_ONSET_SOURCE} a trial of a tenth ranked the adapter's runs at Spearman "
        f"{t['tenth']:+.2f} ({t['tenth_lr_3e-4']:+.2f} within lr 3e-4), a fifth at "
        f"{t['fifth']:+.2f} and the extrapolated lookahead_kl at {t['lookahead_kl']:+.2f} (AUC "
        f"{t['auc_lookahead_kl']:.2f} against {t['auc_tenth']:.2f}); consider --lookahead-steps "
        f"{fifth}{other}."
    ]


def _label(data: str, lr: float, cfg: RankConfig) -> str:
    name = Path(data).stem
    if len(cfg.ranking.lrs) == 1:
        return name
    if len(cfg.ranking.data) == 1:
        return f"lr {lr:g}"
    return f"{name} @ lr {lr:g}"


def summary(candidates: list[dict], ranking: list[int], predictor: str, steps: int) -> str:
    """A plain-language paragraph: the most damaging candidate, the recommended one, and how
    much the other predictors agree."""
    worst, best = candidates[ranking[-1]], candidates[ranking[0]]
    wv = worst["predictors"][predictor]["value"]
    bv = best["predictors"][predictor]["value"]
    if predictor in STEP_PREDICTORS:
        what = (
            f"its {predictor.replace('_', ' ')} is {fmt(wv)} "
            f"(vs {fmt(bv)} for {best['label']}) of a {steps}-step budget"
        )
    else:
        what = f"its {predictor.replace('_', ' ')} is {fmt(wv)} vs {fmt(bv)} for {best['label']}"
    agree = []
    for name in PREDICTORS:
        if name == predictor:
            continue
        sw, sb = worst["predictors"][name]["score"], best["predictors"][name]["score"]
        if sw is None or sb is None or (isinstance(sw, float) and math.isnan(sw)):
            continue
        agree.append(sw > sb)
    text = (
        f"{worst['label']} is predicted to damage alignment most: {what}. "
        f"Recommended: {best['label']} (least predicted damage by {predictor})."
    )
    if agree:
        text += (
            f" {sum(agree)} of {len(agree)} other predictors also score {worst['label']} as more "
            f"damaging than {best['label']}."
        )
    lk = worst.get("details", {}).get("lookahead", {})
    if predictor.startswith("lookahead") and lk.get("kl"):
        text += (
            f" In a {lk['steps'][-1]}-step trial run the alignment KL of {worst['label']} reached "
            f"{fmt(lk['kl'][-1])} nats/token (trend exponent {fmt(lk.get('exponent'))})."
        )
    rw, rb = worst.get("refusal") or {}, best.get("refusal") or {}
    if rw.get("after_trial") is not None and rb.get("after_trial") is not None:
        text += (
            f" On the held-out prompts (--eval-prompts) the refusal rate went from "
            f"{rw['start']:.0%} to {rw['after_trial']:.0%} in the trial run of {worst['label']} "
            f"({rb['start']:.0%} to {rb['after_trial']:.0%} for {best['label']})."
        )
    text += (
        " These are predictions made before training; check the chosen candidate with "
        "`alignscope verify`."
    )
    return text


def run_rank(
    cfg: RankConfig,
    *,
    model=None,
    tokenizer=None,
    quiet: bool = False,
    subspace: Subspace | None = None,
) -> RankResult:
    """Compute every predictor for every candidate and order them by ``cfg.ranking.predictor``.

    Args:
        cfg: the candidates (fine-tuning sets x learning rates) and the shared settings.
        model, tokenizer: the aligned model (never modified); default loaded from ``cfg.model``.
        quiet: no progress lines.
        subspace: the alignment subspace of an earlier diagnosis of the same model, safety set
            and parameters (``DiagnoseResult.subspace``), reused instead of recomputed.

    Under an initialised ``torch.distributed`` process group of several ranks (torchrun), every
    rank calls this with the same arguments: the diagnoses and the lookahead runs are
    data-parallel (as in ``diagnose`` and ``verify``) and every rank returns the same result;
    progress shows on rank 0 only (docs/scale.md).

    Returns:
        The :class:`RankResult`: every predictor per candidate and the ranking, least predicted
        damage (recommended) first.

    Raises:
        ValueError: fewer than two candidates, invalid settings, or data that does not fit.
        alignscope.distributed.RankFailure: another rank failed (its message).
    """
    with dist.guard():
        return _run_rank(cfg, model=model, tokenizer=tokenizer, quiet=quiet, subspace=subspace)


def _run_rank(
    cfg: RankConfig, *, model, tokenizer, quiet: bool, subspace: Subspace | None
) -> RankResult:
    cfg.validate()
    torch.manual_seed(cfg.runtime.seed)
    if cfg.runtime.threads is not None:
        torch.set_num_threads(cfg.runtime.threads)
    stages = Stages(quiet=quiet or not dist.is_main())
    eval_prompts = cfg.eval_prompts()
    with stages.stage("load", cfg.model.model):
        state = RankState(
            cfg.model_config(), lookahead_steps=cfg.n_lookahead,
            lookahead_order=cfg.ranking.lookahead_order, compliance=cfg.ranking.compliance,
            eval_prompts=eval_prompts, model=model, tokenizer=tokenizer, quiet=True,
            subspace=subspace,
        )  # fmt: skip
    candidates: list[dict[str, Any]] = []
    parameters = None
    for i, data in enumerate(cfg.ranking.data):
        first = i == 0 and subspace is None
        detail = "alignment subspace (once) + " if first else "reusing the subspace, "
        with stages.stage(f"diagnose {Path(data).stem}", detail + "AIC, gradient similarity"):
            geo = state.geometry(data)
        diag = geo.diagnosis
        parameters = parameters or diag.parameters.to_json()
        for lr in cfg.ranking.lrs:
            label = _label(data, lr, cfg)
            with stages.stage(f"predict {label}", f"forecast + {cfg.n_lookahead}-step lookahead"):
                preds, details = state.predict(geo, cfg.optim.optimizer, lr)
            refusal = details["lookahead"]["refusal_rate"]  # {step: rate} on --eval-prompts
            candidates.append(
                {
                    "label": label,
                    "data": data,
                    "optimizer": cfg.optim.optimizer,
                    "lr": lr,
                    "predictors": preds,
                    "refusal": {
                        "start": refusal.get(0),
                        "after_trial": refusal.get(cfg.n_lookahead),
                        "trial_steps": cfg.n_lookahead,
                    }
                    if refusal
                    else None,
                    "details": {
                        **details,
                        "aic": {
                            "gradient": diag.aic_gradient.to_dict(),
                            "optimizer_step": diag.aic_step.to_dict(),
                        },
                        "verdict": diag.verdict["aic_holds"],
                        "refusal_rate": diag.alignment.refusal_rate,
                        "n_params": diag.parameters.n_params,
                    },
                }
            )
    # least predicted damage (recommended) first; candidates without a score at the end
    damage = order(candidates, cfg.ranking.predictor)
    missing = [
        i for i in damage if candidates[i]["predictors"][cfg.ranking.predictor]["score"] is None
    ]
    ranking = [i for i in damage[::-1] if i not in missing] + missing
    return RankResult(
        cfg, candidates, ranking, dict(state.shared_timings), stages.timings, parameters,
        n_eval_prompts=len(eval_prompts) if eval_prompts is not None else None,
        warnings=cfg.trial_warnings(),
        notes=cfg.trial_notes(),
    )  # fmt: skip
