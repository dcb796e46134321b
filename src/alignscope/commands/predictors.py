"""Predictors of alignment damage, each computed before fine-tuning, for ``rank`` and the study.

One function per predictor family, all fed by one :class:`RankState` built once per model: the
model is loaded once and the alignment subspace (which depends only on the model, the safety set
and the parameter selection) is computed once, by the first diagnosis, and reused for every
candidate fine-tuning set (``run_diagnose(subspace=...)``).

Every predictor returns ``{"value", "score", "seconds"}``: ``value`` the quantity as measured
(None where it does not exist, e.g. no collapse forecast), ``score`` a damage score where higher
means more predicted damage (what ``rank`` orders by; ``None`` sorts last), ``seconds`` what it
cost for this candidate (shared per-candidate work, such as the diagnosis behind the AIC numbers,
is counted in each predictor that needs it; one-off work per model is in
``RankState.shared_timings``).

Predictors (docs/theory.md, "Predictors of damage"; issue #7):

- ``overlap_sgd`` / ``gamma_sgd`` / ``kappa_sgd``: the AIC quantities of the gradient ``g``;
- ``overlap_adam`` / ``gamma_adam`` / ``kappa_adam``: the same for Adam's first-step direction
  ``D g`` (diagonal preconditioner, an approximation);
- ``forecast_dL``: the forecast dL_a at the step budget, or at the forecast's validity horizon
  when that comes first (the forecast does not extend past it);
- ``forecast_collapse_step``: the forecast's collapse step (score ``steps / step``; 0 if none);
- ``gradient_similarity``: cosine between the fine-tuning gradient and the gradient of the NLL
  of compliant answers to harmful prompts (in the spirit of He et al. 2024);
- ``lookahead_kl`` / ``lookahead_collapse_step``: a few real optimizer steps on a copy of the
  model, the alignment KL measured at each, its power-law trend extrapolated to the budget;
  ``lookahead_kl_measured``: the KL at the end of that run, not extrapolated. By default this
  trial run draws its batches on a seed the planned run does not use (``seed +
  TRIAL_SEED_OFFSET``, :func:`alignscope.config.trial_seed`); ``lookahead_order="same"`` replays
  the planned run's order instead (its first steps, exactly).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignscope.commands.diagnose import DiagnoseConfig, DiagnoseResult, run_diagnose
from alignscope.config import DEFAULT_PREDICTOR, trial_seed
from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.prefix import DEFAULT_PREFIX_MEMORY_BUDGET
from alignscope.data.encode import LMBatch, batch_rows
from alignscope.data.sample import subsample
from alignscope.forecast import Forecast, forecast_from_aic
from alignscope.geometry import AIC, finetune_gradient
from alignscope.params import select_params

# Name -> one-line description, in display order.
PREDICTORS: dict[str, str] = {
    "lookahead_kl_measured": "alignment KL at the end of the short real run (no extrapolation)",
    "lookahead_kl": "alignment KL extrapolated to the step budget from a short real run",
    "lookahead_collapse_step": "step where the extrapolated KL trend crosses the threshold",
    "forecast_dL": "forecast dL_a at the budget (or at the forecast's validity horizon)",
    "forecast_collapse_step": "forecast collapse step (first step with dL_a >= threshold)",
    "gradient_similarity": "cosine of the fine-tuning gradient with a harmful-compliance gradient",
    "overlap_sgd": "|P_d g| / |g| of the gradient",
    "gamma_sgd": "gamma = |F^1/2 P_d H g|",
    "kappa_sgd": "kappa = (a'Fa/|a|^2) / (g'Fg/|g|^2), a = H g",
    "overlap_adam": "|P_d D g| / |D g| of Adam's first step (approximate)",
    "gamma_adam": "gamma of Adam's first-step flow (approximate)",
    "kappa_adam": "kappa of Adam's first-step flow (approximate)",
}
__all__ = ["DEFAULT_PREDICTOR", "PREDICTORS", "STEP_PREDICTORS", "RankState", "order"]
# Predictors whose value is a step (smaller = more damage); the rest: larger = more damage.
STEP_PREDICTORS = ("lookahead_collapse_step", "forecast_collapse_step")
# DEFAULT_PREDICTOR (the predictor rank orders by unless told otherwise) is stated in config.py
# with the options; it is re-exported here beside the predictors.


# --- data helpers (same seeded subset as diagnose/verify) ------------------------------------


def _load_rows(path: str, role: str, fmt: str = "auto") -> list[dict]:
    from alignscope.data.loaders import load_data

    return load_data(path, role, format=fmt).rows


# --- gradient similarity ---------------------------------------------------------------------


def gradient_cosine(flm: FunctionalLM, batch: LMBatch, reference: torch.Tensor) -> float:
    """Cosine between ``grad L_f`` on ``batch`` and ``reference`` (computed in float64)."""
    return cosine(finetune_gradient(flm, batch), reference)


def cosine(g: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine of two flat vectors in float64 (0 when either is zero)."""
    g, r = g.double(), reference.double()
    denom = float(g.norm() * r.norm())
    return float(g @ r) / denom if denom > 0 else 0.0


# --- lookahead -------------------------------------------------------------------------------


@dataclass
class Trend:
    """A power law ``value = C k^p`` fitted to the tail of a short measured trajectory."""

    exponent: float | None
    coefficient: float | None
    value_at_target: float | None
    crossing_step: int | None  # first step with value >= threshold (measured, else extrapolated)
    fitted_points: int


def extrapolate_trend(
    steps: Sequence[int],
    values: Sequence[float],
    target: int,
    threshold: float | None = None,
    fit_last: float = 0.5,
) -> Trend:
    """Fit ``log v = p log k + log C`` on the last ``fit_last`` fraction of the positive points
    (at least two) and extrapolate to ``target`` and to the ``threshold`` crossing.

    A threshold already crossed in the measured points is reported at the first measured step
    that crossed it. Fewer than two positive points: the last value is carried forward.
    """
    pts = [(int(k), float(v)) for k, v in zip(steps, values, strict=True) if k >= 1 and v > 0]
    crossed = None
    if threshold is not None:
        crossed = next((k for k, v in zip(steps, values, strict=True) if v >= threshold), None)
    if len(pts) < 2:
        last = float(values[-1]) if len(values) else None
        return Trend(None, None, last, crossed, len(pts))
    n = max(2, math.ceil(len(pts) * fit_last))
    ks = np.log([k for k, _ in pts[-n:]])
    vs = np.log([v for _, v in pts[-n:]])
    p, logc = (float(x) for x in np.polyfit(ks, vs, 1))
    coeff = math.exp(logc)
    value = float(np.exp(logc + p * math.log(target)))
    if crossed is None and threshold is not None and p > 0 and threshold > 0:
        k_star = math.exp((math.log(threshold) - logc) / p)
        crossed = max(pts[-1][0] + 1, math.ceil(k_star)) if k_star < 1e12 else None
    return Trend(p, coeff, value, crossed, n)


def run_lookahead(
    model,
    tokenizer,
    safety_batch: LMBatch,
    rows: list[dict],
    *,
    optimizer: str,
    lr: float,
    n_steps: int,
    batch_size: int,
    seed: int,
    max_length: int | None,
    params: Sequence[str] = ("all",),
    eval_prompts: Sequence[str] | None = None,
    prefix_memory_budget: int = DEFAULT_PREFIX_MEMORY_BUDGET,
) -> tuple[list[int], list[float], dict[int, float]]:
    """``n_steps`` real optimizer steps on a copy of ``model`` (the fine-tuning loop and the
    tracker verify uses); the alignment KL at steps ``0..n_steps`` and, with ``eval_prompts``,
    the refusal rate on them at the first and the last step (``{step: rate}``, else empty).
    ``prefix_memory_budget``: bytes of cached frozen-layer activations (0: off)."""
    from alignscope.train.loop import finetune, make_optimizer
    from alignscope.train.prefix import PrefixForward
    from alignscope.train.stream import training_stream
    from alignscope.train.tracker import AlignmentTracker

    work = copy.deepcopy(model)
    selection = select_params(work, list(params))
    selection.train_only(work)
    tracker = AlignmentTracker(
        work, tokenizer, selection, safety_batch, eval_prompts=eval_prompts,
        generate_refusals=False, prefix_memory_budget=prefix_memory_budget,
    )  # fmt: skip
    prefix = PrefixForward.build(work, selection, prefix_memory_budget)
    stream = training_stream(
        tokenizer, rows, batch_size=batch_size, seed=seed, max_length=max_length
    )
    opt = make_optimizer(optimizer, [p for p in work.parameters() if p.requires_grad], lr)
    ks: list[int] = []
    kls: list[float] = []
    refusal: dict[int, float] = {}

    def callback(step: int, loss: float | None) -> bool:
        ends = eval_prompts is not None and step in (0, n_steps)  # generation is the costly part
        rec = tracker.measure(step, loss, refusals=ends)
        ks.append(step)
        kls.append(rec["kl"])
        if rec["refusal_rate"] is not None:
            refusal[step] = rec["refusal_rate"]
        return False

    torch.manual_seed(seed)
    finetune(
        work,
        tokenizer,
        None,
        n_steps,
        lr=lr,
        stream=stream,
        callback=callback,
        optimizer=opt,
        loss_weighting="example",
        prefix=prefix,
    )
    return ks, kls, refusal


# --- shared state and per-candidate predictors -----------------------------------------------


@dataclass
class CandidateGeometry:
    """What one diagnosis of a candidate set gives every lr and optimizer of that set."""

    data: str
    diagnosis: DiagnoseResult  # (its forecast is for the first lr)
    seconds: float  # the diagnosis, less the (shared) subspace
    gradient_similarity: float | None
    gradient_similarity_seconds: float
    rows: list[dict] = field(repr=False, default_factory=list)  # the whole set (lookahead)

    @property
    def aic_sgd(self) -> AIC:
        return self.diagnosis.aic_gradient

    @property
    def aic_adam(self) -> AIC:
        """Adam's first-step geometry (rank's diagnoses always measure it)."""
        return self.diagnosis.aic_step

    @property
    def noise_sgd(self) -> float:
        return self.diagnosis.noise_trace

    @property
    def noise_adam(self) -> float:
        pre = self.diagnosis.noise_trace_preconditioned
        return self.diagnosis.noise_trace if pre is None else pre


class RankState:
    """The model, tokenizer, alignment subspace and compliance gradient, computed once.

    ``base``: the diagnosis config of the model as configured (its adapter included, any one
    candidate set); every candidate is diagnosed with it, on the loaded model. ``compliance``:
    harmful prompts with compliant answers (the gradient-similarity reference), or None.
    ``lookahead_steps``: optimizer steps of each lookahead run. ``lookahead_order``:
    ``"independent"`` (default: the trial run's batch order and torch draws are seeded with
    ``trial_seed(seed)``, an order the planned run does not use) or ``"same"`` (the planned
    run's seed). ``eval_prompts``: held-out harmful prompts whose refusal rate each lookahead
    measures at its first and last step.
    """

    def __init__(
        self,
        base: DiagnoseConfig,
        *,
        lookahead_steps: int,
        lookahead_order: str = "independent",
        compliance: str | None = None,
        eval_prompts: Sequence[str] | None = None,
        model=None,
        tokenizer=None,
        quiet: bool = True,
        subspace=None,
    ):
        self.cfg = base
        self.compliance = compliance
        self.lookahead_steps = lookahead_steps
        trial_seed(0, lookahead_order)  # checks the name
        self.lookahead_order = lookahead_order
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else None
        self.quiet = quiet
        self.shared_timings: dict[str, float] = {}
        if base.runtime.threads is not None:
            torch.set_num_threads(base.runtime.threads)
        if model is None:
            start = time.perf_counter()
            model, tokenizer = base.load_model()  # with its adapter, if any
            self.shared_timings["load_model"] = time.perf_counter() - start
        self.model, self.tokenizer = model, tokenizer
        self.subspace = subspace  # an earlier diagnosis' (same model, safety set, params)
        self.safety_batch: LMBatch | None = None
        self._flm: FunctionalLM | None = None
        self.compliance_grad: torch.Tensor | None = None

    def diagnose_config(self, data: str, seed: int | None = None) -> DiagnoseConfig:
        """The diagnosis of one candidate set, on the model already loaded (its adapter attached,
        so the selection is resolved here). Always Adam's preconditioned direction too (so both
        the SGD and the Adam AIC numbers exist); forecasts are made per candidate."""
        base = self.cfg
        return base.with_options(
            data=data, params=base.param_spec(), optimizer="adamw",
            seed=base.runtime.seed if seed is None else seed,
            adapter=None, lora_r=None, lora_alpha=None, lora_targets=None,
        )  # fmt: skip

    @property
    def flm(self) -> FunctionalLM:
        if self._flm is None:
            spec = self.cfg.param_spec()
            budget = self.cfg.runtime.prefix_budget
            self._flm = FunctionalLM(
                self.model, select_params(self.model, spec), prefix_cache=budget > 0,
                prefix_memory_budget=budget,
            )  # fmt: skip
        return self._flm

    def _compliance(self) -> torch.Tensor | None:
        if self.compliance is None:
            return None
        if self.compliance_grad is None:
            start = time.perf_counter()
            rows = _load_rows(self.compliance, "data", self.cfg.datasets.data_format)
            rows = subsample(rows, self.cfg.datasets.max_data, self.cfg.runtime.seed)
            if not rows:
                raise ValueError(f"--compliance {self.compliance}: no rows")
            batch = batch_rows(self.tokenizer, rows, self.cfg.datasets.max_length, "rank")[0]
            self.compliance_grad = finetune_gradient(self.flm, batch).detach()
            self.shared_timings["compliance_gradient"] = time.perf_counter() - start
        return self.compliance_grad

    def geometry(self, data: str, seed: int | None = None) -> CandidateGeometry:
        """Diagnose one candidate set (reusing the subspace) and its gradient similarity."""
        dcfg = self.diagnose_config(data, seed)
        res = run_diagnose(
            dcfg, model=self.model, tokenizer=self.tokenizer, quiet=self.quiet,
            subspace=self.subspace,
        )  # fmt: skip
        timings = dict(res.timings)
        if self.subspace is None:
            self.subspace = res.subspace
            self.shared_timings["subspace"] = timings.get("subspace", 0.0)
        if self.safety_batch is None:
            rows = res.alignment.rows()
            self.safety_batch = batch_rows(self.tokenizer, rows, dcfg.datasets.max_length, "rank")[
                0
            ]
        seconds = sum(v for k, v in timings.items() if k != "subspace")
        rows = _load_rows(data, "data", self.cfg.datasets.data_format)
        sim, sim_seconds = None, 0.0
        reference = self._compliance()
        if reference is not None:  # the diagnosis' own gradient, over the same batch
            start = time.perf_counter()
            sim = cosine(res.finetune_gradient, reference)
            sim_seconds = time.perf_counter() - start
        return CandidateGeometry(
            data=data,
            diagnosis=res,
            seconds=seconds,
            gradient_similarity=sim,
            gradient_similarity_seconds=sim_seconds,
            rows=rows,
        )

    def forecast(self, geo: CandidateGeometry, optimizer: str, lr: float) -> Forecast:
        """The diagnosis' forecast for ``optimizer`` at ``lr`` (cheap: no new curvature)."""
        adam = optimizer in ("adam", "adamw")
        return forecast_from_aic(
            geo.aic_adam if adam else geo.aic_sgd,
            geo.noise_adam if adam else geo.noise_sgd,
            optimizer=optimizer,
            lr=lr,
            n_steps=self.cfg.optim.steps,
            batch_size=self.cfg.optim.batch_size,
            threshold=self.cfg.optim.threshold,
        )

    def trial_seed(self, seed: int | None = None, order: str | None = None) -> int:
        """The trial run's seed for a planned run on ``seed`` (default the config's)."""
        planned = self.cfg.runtime.seed if seed is None else seed
        return trial_seed(planned, order or self.lookahead_order)

    def lookahead(
        self,
        geo: CandidateGeometry,
        optimizer: str,
        lr: float,
        seed: int | None = None,
        *,
        order: str | None = None,
        n_steps: int | None = None,
    ) -> tuple[list[int], list[float], dict[int, float], float]:
        """The trial run for a planned run on ``seed``: ``(steps, KL, refusal, seconds)``.
        ``order`` and ``n_steps`` override the state's ``lookahead_order`` and length."""
        start = time.perf_counter()
        ks, kls, refusal = run_lookahead(
            self.model,
            self.tokenizer,
            self.safety_batch,
            geo.rows,
            optimizer=optimizer,
            lr=lr,
            n_steps=self.lookahead_steps if n_steps is None else n_steps,
            batch_size=self.cfg.optim.batch_size,
            seed=self.trial_seed(seed, order),
            max_length=self.cfg.datasets.max_length,
            params=self.cfg.param_spec(),
            eval_prompts=self.eval_prompts,
            prefix_memory_budget=self.cfg.runtime.prefix_budget,
        )
        return ks, kls, refusal, time.perf_counter() - start

    def predict(
        self, geo: CandidateGeometry, optimizer: str, lr: float, seed: int | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """Every predictor for one candidate: ``({name: {value, score, seconds}}, details)``.
        ``seed``: the planned run's (default the config's); the trial run's seed and order are
        in ``details["lookahead"]``."""
        steps = self.cfg.optim.steps
        start = time.perf_counter()
        fc = self.forecast(geo, optimizer, lr)
        fc_seconds = geo.seconds + time.perf_counter() - start
        dl = [float(v) for v in fc.dL if math.isfinite(v)]  # the valid window
        fc_dl = dl[-1] if dl else None
        fc_step = fc.collapse_step
        ks, kls, refusal, la_seconds = self.lookahead(geo, optimizer, lr, seed)
        trend = extrapolate_trend(ks, kls, steps, self.cfg.optim.threshold)

        def step_score(k: int | None) -> float:
            return steps / k if k else 0.0

        out: dict[str, dict[str, Any]] = {
            "lookahead_kl": {
                "value": trend.value_at_target,
                "score": trend.value_at_target,
                "seconds": la_seconds,
            },
            "lookahead_collapse_step": {
                "value": trend.crossing_step,
                "score": step_score(trend.crossing_step),
                "seconds": la_seconds,
            },
            "lookahead_kl_measured": {"value": kls[-1], "score": kls[-1], "seconds": la_seconds},
            "forecast_dL": {"value": fc_dl, "score": fc_dl or 0.0, "seconds": fc_seconds},
            "forecast_collapse_step": {
                "value": fc_step,
                "score": step_score(fc_step),
                "seconds": fc_seconds,
            },
            "gradient_similarity": {
                "value": geo.gradient_similarity,
                "score": geo.gradient_similarity,
                "seconds": geo.gradient_similarity_seconds if geo.gradient_similarity is not None
                else None,
            },
        }  # fmt: skip
        for tag, aic in (("sgd", geo.aic_sgd), ("adam", geo.aic_adam)):
            for name, value in (("overlap", aic.Pg_ratio), ("gamma", aic.gamma),
                                ("kappa", aic.kappa)):  # fmt: skip
                out[f"{name}_{tag}"] = {"value": value, "score": value, "seconds": geo.seconds}
        details = {
            "forecast": {
                "horizon_steps": fc.horizon_steps,
                "collapse_step": fc.collapse_step,
                "collapse_status": fc.collapse_status,
            },
            "forecast_dL_step": len(dl) if dl else None,
            "lookahead": {
                "order": self.lookahead_order,
                "seed": self.trial_seed(seed),
                "steps": ks,
                "kl": kls,
                "exponent": trend.exponent,
                "coefficient": trend.coefficient,
                "fitted_points": trend.fitted_points,
                "refusal_rate": refusal,  # {step: rate} on --eval-prompts (empty without)
            },
        }
        return {k: out[k] for k in PREDICTORS}, details


def order(candidates: Sequence[dict[str, Any]], predictor: str) -> list[int]:
    """Indices of ``candidates`` (each with ``["predictors"][name]["score"]``) from most to
    least predicted damage; missing scores last, ties in input order."""

    def key(i: int) -> tuple[int, float, int]:
        s = candidates[i]["predictors"][predictor]["score"]
        ok = s is not None and not (isinstance(s, float) and math.isnan(s))
        return (0 if ok else 1, -float(s) if ok else 0.0, i)

    return sorted(range(len(candidates)), key=key)
