"""``watch``: alignment measurements and an early warning during someone else's fine-tuning run.

:class:`AlignmentWatcher` is the plain-PyTorch piece: built on the aligned model (theta0) before
training, called with ``watcher.step(step, loss)`` from any training loop. At the steps of its
schedule it measures (through :class:`~alignscope.train.tracker.AlignmentTracker`) the KL
alignment loss on the safety set, the greedy refusal rate on held-out harmful prompts, the drift
``|theta - theta0|`` (and into the alignment subspace when a diagnosis is given), plus
``soft_refusal``: the mean probability of the aligned model's refusal's *first* token on the
held-out prompts it refused. That is the decision point of the greedy refusal, and it moves
continuously while the greedy rate still reads 100 %, so its trend warns before the rate falls.

Early warning: a least-squares line through the last ``window`` measurements of the refusal
signals (``refusal_rate`` and ``soft_refusal``), or an exponential through the KL, extrapolated
``horizon`` steps ahead; when a refusal signal is predicted (or measured) below ``floor``, or the
KL above ``kl_threshold``, ``warnings.warn`` is raised and the record carries ``warning``. With
``stop_on_collapse`` the watcher asks to stop and the parameters of the last measurement whose
refusal rate was above the floor (kept in memory) are saved to ``<output_dir>/last-safe``.

:class:`AlignmentCallback` wraps a watcher as a ``transformers.TrainerCallback``.
Every record is appended, one JSON line per ``os.write`` on an ``O_APPEND`` descriptor, to
``log_path``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignscope.data.encode import (
    EncodedPair,
    LMBatch,
    batch_rows,
    collate,
    encode_pairs,
    fit_to_length,
)
from alignscope.data.sample import subsample
from alignscope.evaluate import KeywordRefusalJudge, RefusalJudge, generate
from alignscope.params import select_params
from alignscope.report.output import jsonable
from alignscope.train.tracker import AlignmentTracker

try:  # transformers is a dependency, but keep the plain watcher importable without it
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[assignment,misc]


class AlignmentCollapseWarning(UserWarning):
    """The measured trend predicts (or the measurement shows) loss of alignment."""


def schedule_steps(every: int, log_spaced: bool = True) -> tuple[set[int], int]:
    """The early steps to measure at and the period after them.

    ``log_spaced``: 0 and the powers of two below ``every``, then every ``every`` steps; else 0
    and every ``every`` steps.
    """
    if every < 1:
        raise ValueError("every must be a positive integer")
    early = {0}
    if log_spaced:
        early |= {2**i for i in range(every.bit_length()) if 2**i < every}
    return early, every


def _zero3(args) -> bool:
    if not getattr(args, "deepspeed", None):
        return False
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def _rows(rows: Sequence[Mapping[str, str] | str]) -> list[dict[str, str]]:
    out = []
    for r in rows:
        out.append({"prompt": r} if isinstance(r, str) else dict(r))
    return out


def _trend(points: list[tuple[int, float]], at: float, log: bool = False) -> float | None:
    """Least-squares line (in ``log`` of the values when ``log``) through points, at ``at``."""
    pts = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    if log:
        pts = [(s, math.log(v)) for s, v in pts if v > 0]
    if len(pts) < 2 or len({s for s, _ in pts}) < 2:
        return None
    slope, icept = np.polyfit([s for s, _ in pts], [v for _, v in pts], 1)
    pred = float(slope * at + icept)
    return math.exp(min(pred, 700.0)) if log else pred


def _as_diagnosis(diagnosis):
    """A DiagnoseResult as is; a results.json dict or an output folder read into one."""
    from alignscope.commands.diagnose import DiagnoseResult, load

    if isinstance(diagnosis, DiagnoseResult):
        return diagnosis
    if isinstance(diagnosis, str | Path):
        return load(diagnosis)
    if isinstance(diagnosis, Mapping):
        return DiagnoseResult.from_json(dict(diagnosis))
    raise TypeError(
        f"diagnosis: a DiagnoseResult, a results.json dict or a folder, not {type(diagnosis)}"
    )


class AlignmentWatcher:
    """Alignment measurements of ``model`` (trained in place) every ``every`` steps.

    ``safety_rows``: the alignment set (``{"prompt", "response"}``; rows without a response get the
    aligned model's greedy response), for the KL. ``eval_rows``: held-out harmful prompts (strings
    or rows) for the refusal rate; default the safety prompts. ``diagnosis``: a
    :class:`~alignscope.commands.diagnose.DiagnoseResult`, its results.json as a dict, or its
    output folder (read with ``DiagnoseResult.from_json`` / ``diagnose.load``), for the subspace
    entries (when it holds the eigenvectors; else pass ``basis``/``eigenvalues``) and the
    forecast's running error; without one, ``subspace_rank=k`` computes the top-``k`` alignment
    subspace on the fly at construction (exact Fisher, Lanczos, as diagnose does), else those
    entries are None. ``params``: the parameter selection compared to theta0 (default every
    trainable parameter: the adapters of a PEFT model).
    ``max_length``: responses are cut to it and rows whose prompt alone fills it are dropped, as
    every command fits its data; ``watcher.datasets`` counts them (``{"safety": {...},
    "soft_refusal": {...}}``, each ``examples``/``truncated``/``dropped``).

    Args:
        model, tokenizer: the model being fine-tuned (full or PEFT) and its tokenizer; the
            watcher snapshots theta0 and the reference responses at construction.
        safety_rows, eval_rows, diagnosis, basis, eigenvalues, params, max_length: see above.
        every, log_spaced: measure at 0 1 2 4 8 16 (``log_spaced``), then every ``every`` steps.
        generate_every: greedy generation (the refusal rate) at every N-th measurement.
        max_prompts, seed: a seeded subsample of the safety and eval prompts.
        floor, kl_threshold, horizon, window: the early warning: a trend of the last ``window``
            measurements of a refusal signal projected ``horizon`` steps ahead below ``floor``,
            or the KL's exponential trend above ``kl_threshold``.
        stop_on_collapse: set ``should_stop`` at the first warning and keep the last safe state.
        output_dir, log_path: where the JSONL log (one line per measurement) and last-safe go.

    Returns (from :meth:`step`): the measurement record at a scheduled step, else None.

    Raises:
        ValueError: empty safety or eval rows, every row dropped by ``max_length``, or a bad
            setting (``every``, ``floor``, ``window``, ``generate_every``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        safety_rows: Sequence[Mapping[str, str] | str],
        eval_rows: Sequence[Mapping[str, str] | str] | None = None,
        *,
        every: int = 25,
        log_spaced: bool = True,
        generate_every: int = 4,
        max_prompts: int | None = 32,
        seed: int = 0,
        floor: float = 0.5,
        kl_threshold: float | None = None,
        horizon: int | None = None,
        window: int = 3,
        stop_on_collapse: bool = False,
        output_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        diagnosis=None,
        basis: torch.Tensor | None = None,
        eigenvalues: torch.Tensor | None = None,
        params: str | Sequence[str] = "all",
        judge: RefusalJudge | None = None,
        max_new_tokens: int = 16,
        max_length: int | None = None,
        keep_safe_state: bool | None = None,
        subspace_rank: int | None = None,
        memory_budget_gb: float = 2.0,
    ) -> None:
        if not 0.0 <= floor <= 1.0:
            raise ValueError("floor is a refusal rate in [0, 1]")
        if window < 2:
            raise ValueError("window must be >= 2 measurements")
        if generate_every < 1:
            raise ValueError("generate_every must be >= 1 (1: generate at every measurement)")
        self.generate_every = generate_every
        self.early, self.every = schedule_steps(every, log_spaced)
        self.floor = floor
        self.kl_threshold = kl_threshold
        self.horizon = 2 * every if horizon is None else int(horizon)
        self.window = window
        self.stop_on_collapse = stop_on_collapse
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.keep_safe_state = stop_on_collapse if keep_safe_state is None else keep_safe_state
        self.model = model
        self.tokenizer = tokenizer
        self.judge = judge or KeywordRefusalJudge()
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.forecast_dL: list[float | None] = []
        if diagnosis is not None:
            diagnosis = _as_diagnosis(diagnosis)
            top = diagnosis.top
            if top.vectors is not None:
                basis, eigenvalues = top.vectors, top.values
            dl = diagnosis.forecast.dL
            self.forecast_dL = [float(v) if math.isfinite(v) else None for v in dl]
        self.records: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.should_stop = False
        self.last_safe_step: int | None = None
        self.last_safe_path: Path | None = None
        self._safe_state: dict[str, torch.Tensor] | None = None
        self._prev_step: int | None = None

        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        safety = subsample(_rows(safety_rows), max_prompts, seed)
        if not safety:
            raise ValueError("safety_rows is empty")
        missing = [r["prompt"] for r in safety if not r.get("response")]
        if missing:
            greedy = iter(generate(model, tokenizer, missing, max_new_tokens=max_new_tokens))
            for r in safety:
                if not r.get("response"):
                    r["response"] = next(greedy) or "."
        # too long for max_length: dropped with a count, as every command does
        safety_batch, safety_fit = batch_rows(tokenizer, safety, max_length, "safety_rows")
        safety_batch = safety_batch.to(device)
        self.datasets: dict[str, dict[str, Any]] = {"safety": safety_fit.summary()}
        evals = _rows(eval_rows) if eval_rows is not None else safety
        prompts = [r["prompt"] for r in subsample(evals, max_prompts, seed)]
        if not prompts:
            raise ValueError("eval_rows is empty")
        # The aligned model's own greedy answers: which prompts it refuses, and with what token.
        ref = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        refused = self.judge(ref)
        kept = [(p, r) for p, r, ok in zip(prompts, ref, refused, strict=True) if ok and r]
        # Only the prompt and the refusal's first token are needed: a short batch keeps this
        # forward cheap (it runs at every measurement).
        self.soft_batch = None
        if kept:
            encoded = encode_pairs(tokenizer, kept)
            pairs = [EncodedPair(e.prompt_ids, e.response_ids[:1]) for e in encoded]
            try:
                firsts, soft_fit = fit_to_length(pairs, max_length)
            except ValueError as err:
                raise ValueError(f"eval_rows: {err}") from None
            self.soft_batch = collate(firsts, pad, max_length).to(device)
            self.datasets["soft_refusal"] = soft_fit.summary()
        self.selection = select_params(model, params)
        self.subspace_seconds: float | None = None
        if basis is None and subspace_rank:
            basis, eigenvalues = self._subspace(safety_batch, subspace_rank, memory_budget_gb, seed)
        self.tracker = AlignmentTracker(
            model,
            tokenizer,
            self.selection,
            safety_batch,
            eval_prompts=prompts,
            basis=basis,
            eigenvalues=eigenvalues,
            judge=self.judge,
            max_new_tokens=max_new_tokens,
        )

    def _subspace(
        self, batch: LMBatch, k: int, budget_gb: float, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-``k`` eigenpairs of the alignment Fisher at theta0 on the safety batch (what
        diagnose computes), for the subspace entries when no diagnosis is given."""
        from alignscope.curvature import FisherOperator, FunctionalLM, fisher_eigs

        start = time.perf_counter()
        was_training = self.model.training
        try:
            flm = FunctionalLM(self.model, self.selection)
            # reverse-mode products: forward mode would switch the user's model to eager
            # attention for the rest of their training run
            op = FisherOperator(flm, batch, jvp_mode="reverse", vocab_keep=1.0)  # exact
            eig, _ = fisher_eigs(op, k, memory_budget=int(budget_gb * 2**30), seed=seed)
        finally:
            self.model.train(was_training)
        self.subspace_seconds = time.perf_counter() - start
        return eig.vectors[:, :k].detach(), eig.values[:k].detach()

    # --- schedule and measurements -------------------------------------------------------------

    def due(self, step: int) -> bool:
        return step in self.early or (step > 0 and step % self.every == 0)

    @torch.no_grad()
    def soft_refusal(self) -> float | None:
        """Mean probability of the first token of the aligned model's refusal, over the held-out
        prompts it refused (greedy decoding refuses while this token is the argmax)."""
        b = self.soft_batch
        if b is None:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=b.input_ids).logits[:, :-1].float()
        finally:
            self.model.train(was_training)
        first = b.target_mask.float().argmax(dim=1)  # first response prediction position
        rows = torch.arange(b.size, device=logits.device)
        logp = torch.log_softmax(logits[rows, first], dim=-1)
        return float(logp.gather(-1, b.targets[rows, first, None]).exp().mean())

    def step(self, step: int, loss: float | None = None, *, force: bool = False) -> dict | None:
        """Measure at ``step`` when it is due (or ``force``); return the record, else None."""
        if not (force or self.due(step)):
            return None
        if self.records and step <= self.records[-1]["step"]:
            return None  # already measured (e.g. the last step of a run)
        # Greedy generation is most of a measurement's cost: only every generate_every-th one
        # (and a forced one) generates; soft_refusal tracks the refusal in between.
        gen = force or len(self.records) % self.generate_every == 0
        rec = self.tracker.measure(step, loss, refusals=gen)
        self._prev_step = self.records[-1]["step"] if self.records else None
        rec["soft_refusal"] = self.soft_refusal()
        rec.update(self._forecast_error(step, rec["kl"]))
        rec["warning"] = self._check(rec)
        self.records.append(rec)
        signals = [rec[k] for k in ("refusal_rate", "soft_refusal") if rec.get(k) is not None]
        safe = bool(signals) and all(v > self.floor for v in signals)  # measured, and above
        if self.keep_safe_state and safe:
            self._safe_state = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
            self.last_safe_step = step
        rec["last_safe_step"] = self.last_safe_step
        self._append(rec)
        if rec["warning"] is not None:
            new = not self.warnings or self.warnings[-1]["step"] != self._prev_step
            self.warnings.append(rec["warning"])
            if new:  # once per run of warned measurements, not at every one of them
                warnings.warn(
                    f"alignscope step {step}: {rec['warning']['message']}",
                    AlignmentCollapseWarning,
                    stacklevel=2,
                )
            if self.stop_on_collapse and not self.should_stop:
                self.should_stop = True
                if self.output_dir is not None and self._safe_state is not None:
                    self.save_last_safe(self.output_dir / "last-safe")
        return rec

    def state_dict(self) -> dict[str, Any]:
        """The measurements and warnings so far (JSON-ready), so a resumed training run's watcher
        continues the same trends; theta0 and the references are rebuilt at construction."""
        return {"records": jsonable(self.records), "warnings": jsonable(self.warnings),
                "last_safe_step": self.last_safe_step, "prev_step": self._prev_step,
                "should_stop": self.should_stop}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on a watcher built at theta0)."""
        self.records, self.warnings = list(state["records"]), list(state["warnings"])
        self.last_safe_step, self._prev_step = state["last_safe_step"], state["prev_step"]
        self.should_stop = state["should_stop"]

    def _forecast_error(self, step: int, kl: float) -> dict[str, float | None]:
        """The diagnosis' forecast dL_a at ``step`` and the measured KL's relative error to it
        (None outside the forecast's window or without a diagnosis)."""
        pred = self.forecast_dL[step - 1] if 1 <= step <= len(self.forecast_dL) else None
        err = abs(kl - pred) / abs(pred) if pred else None
        return {"forecast_kl": pred, "forecast_rel_error": err}

    def _check(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """The early-warning rule on the last ``window`` measurements of each signal (``rec``
        included); a signal measured only at some records (the greedy refusal rate, every
        ``generate_every``-th) uses its own last ``window`` values."""

        def history(key: str) -> list[tuple[int, float]]:
            done = [r for r in self.records if r.get(key) is not None][-(self.window - 1) :]
            return [(r["step"], r[key]) for r in [*done, rec]]

        at = rec["step"] + self.horizon
        reasons = []
        for key in ("refusal_rate", "soft_refusal"):
            now = rec.get(key)
            if now is None:
                continue
            if now < self.floor:
                reasons.append(
                    {"signal": key, "measured": now, "predicted": now, "at": rec["step"]}
                )
                continue
            pred = _trend(history(key), at)
            if pred is not None and pred < self.floor:
                reasons.append({"signal": key, "measured": now, "predicted": pred, "at": at})
        if self.kl_threshold is not None:
            now = rec["kl"]
            pred = (
                now
                if now > self.kl_threshold
                else _trend(history("kl"), at, log=True)
            )
            if pred is not None and pred > self.kl_threshold:
                reasons.append({"signal": "kl", "measured": now, "predicted": pred, "at": at})
        if not reasons:
            return None
        parts = [
            f"{r['signal']} {r['measured']:.3g} -> {r['predicted']:.3g} by step {r['at']}"
            for r in reasons
        ]
        limit = f"refusal floor {self.floor:g}"
        if self.kl_threshold is not None:
            limit += f", KL threshold {self.kl_threshold:g}"
        return {
            "step": rec["step"],
            "reasons": reasons,
            "message": "alignment collapse predicted (" + "; ".join(parts) + f"; {limit})",
        }

    # --- output ----------------------------------------------------------------------------------

    def _append(self, rec: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(jsonable(rec), allow_nan=False) + "\n").encode("utf-8")
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one write per line: readers never see half a record
        finally:
            os.close(fd)

    def save_last_safe(self, path: str | Path) -> Path:
        """Save the model with the trainable parameters of the last safe measurement, then put the
        current parameters back. PEFT models save their adapter only (``save_pretrained``)."""
        if self._safe_state is None:
            raise RuntimeError("no safe state kept: pass keep_safe_state=True or stop_on_collapse")
        path = Path(path)
        named = dict(self.model.named_parameters())
        current = {n: named[n].detach().clone() for n in self._safe_state}
        with torch.no_grad():
            for n, t in self._safe_state.items():
                named[n].copy_(t)
            try:
                self.model.save_pretrained(path)
                if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(path)
            finally:
                for n, t in current.items():
                    named[n].copy_(t)
        meta = {"step": self.last_safe_step, "floor": self.floor}
        meta["record"] = next((r for r in self.records if r["step"] == self.last_safe_step), None)
        (path / "alignscope_last_safe.json").write_text(
            json.dumps(jsonable(meta), indent=2), encoding="utf-8"
        )
        self.last_safe_path = path
        return path

    def metrics(self, rec: dict[str, Any], prefix: str = "alignscope/") -> dict[str, float]:
        """The numeric entries of a record, prefixed, for a logger."""
        keys = ("kl", "refusal_nll", "refusal_rate", "soft_refusal", "displacement",
                "subspace_displacement", "subspace_fraction", "fisher_drift")  # fmt: skip
        out = {f"{prefix}{k}": float(rec[k]) for k in keys if rec.get(k) is not None}
        out[f"{prefix}warning"] = float(rec.get("warning") is not None)
        return out


class AlignmentCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` around :class:`AlignmentWatcher`.

    ``on_train_begin`` builds the watcher on the model the Trainer holds (full or PEFT) and
    measures step 0; ``on_step_end`` measures at the watcher's steps. Each measurement goes into
    ``state.log_history`` (``alignscope/kl``, ``alignscope/refusal_rate``, ...; or through
    ``trainer.log`` after :meth:`bind`, which also reaches the reporting integrations) and into
    ``log_path`` (default ``<output_dir>/alignscope_watch.jsonl``). With ``stop_on_collapse`` a
    warning stops training and saves ``<output_dir>/last-safe``. Other keyword arguments go to
    :class:`AlignmentWatcher`.

    Multi-process data-parallel runs (DDP): only the main process measures and logs; at the start
    and at each scheduled step its stop decision is broadcast (``torch.distributed``), so every
    process stops at the same step instead of the others waiting forever in the next all-reduce.
    Sharded models (FSDP, DeepSpeed ZeRO-3) are refused: a forward pass on one process alone
    would wait forever for the other shards.

    Args:
        safety, eval_rows: the alignment set and the held-out harmful prompts (as for the
            watcher).
        tokenizer: the model's tokenizer (required).
        every, log_path, output_dir: measurement cadence and where the log goes.
        **watcher_kwargs: any other :class:`AlignmentWatcher` argument.

    Raises:
        ValueError: no tokenizer, or a sharded (FSDP / ZeRO-3) training run.
    """

    def __init__(
        self,
        safety: Sequence[Mapping[str, str] | str],
        eval_rows: Sequence[Mapping[str, str] | str] | None = None,
        *,
        tokenizer=None,
        every: int = 25,
        log_path: str | Path | None = None,
        output_dir: str | Path | None = None,
        **watcher_kwargs,
    ) -> None:
        self.safety = safety
        self.eval_rows = eval_rows
        self.tokenizer = tokenizer
        self.every = every
        self.log_path = log_path
        self.output_dir = output_dir
        self.watcher_kwargs = watcher_kwargs
        self.watcher: AlignmentWatcher | None = None
        self._due = schedule_steps(every, watcher_kwargs.get("log_spaced", True))
        self._trainer = None
        self._last_loss: float | None = None

    def bind(self, trainer) -> AlignmentCallback:
        """Log through ``trainer.log`` (reaches every integration); returns self."""
        self._trainer = trainer
        return self

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.watcher.records if self.watcher is not None else []

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if getattr(args, "fsdp", None) or _zero3(args):
            raise ValueError(
                "AlignmentCallback does not support sharded models (FSDP, DeepSpeed ZeRO-3) yet: "
                "its measurements run on the main process alone; use DDP or a single process"
            )
        if state.is_world_process_zero:
            self._start(args, state, control, model, processing_class)
        self._sync_stop(control)  # process 0 may already have decided to stop

    def _start(self, args, state, control, model, processing_class) -> None:
        tok = self.tokenizer or processing_class
        if tok is None:
            raise ValueError("AlignmentCallback needs a tokenizer: pass tokenizer=...")
        out = Path(self.output_dir or args.output_dir)
        log_path = self.log_path or out / "alignscope_watch.jsonl"
        self.watcher = AlignmentWatcher(
            model, tok, self.safety, self.eval_rows, every=self.every, output_dir=out,
            log_path=log_path, **self.watcher_kwargs,
        )  # fmt: skip
        self._measure(state.global_step, state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._last_loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.watcher is not None:
            self._measure(step, state, control)
        early, every = self._due
        if step in early or step % every == 0:
            self._sync_stop(control)

    def _sync_stop(self, control) -> None:
        """Make every process follow the main process' stop decision (no-op in one process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        stop = self.watcher is not None and self.watcher.should_stop
        device = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend() == "nccl") else torch.device("cpu")  # fmt: skip
        flag = torch.tensor([int(stop)], device=device)
        dist.broadcast(flag, src=0)
        if flag.item():
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        w = self.watcher
        if w is None or w.should_stop:
            return
        if not w.records or w.records[-1]["step"] < state.global_step:
            self._measure(state.global_step, state, control, force=True)

    def _measure(self, step, state, control, force: bool = False):
        rec = self.watcher.step(step, self._last_loss, force=force)
        if rec is None:
            return
        metrics = self.watcher.metrics(rec)
        if self._trainer is not None:
            self._trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": step})
        if self.watcher.should_stop:
            control.should_training_stop = True
