"""``finetune``: a real fine-tuning run under a guard (docs/guard.md), measured as it goes.

Loads the model (full, selected parameters, or a new/existing PEFT LoRA adapter), sets the guard
up at the aligned weights, fine-tunes through the one training loop
(:func:`alignscope.train.loop.finetune`) with the configured optimizer, and records every step's
task loss, time and guard signals, plus the alignment KL and refusal rate on held-out prompts at
the recorded steps (:class:`~alignscope.train.tracker.AlignmentTracker`). The output directory
holds the fine-tuned model (``model/``, a Hugging Face directory, or ``adapter/``, a PEFT
adapter), results.json and a report.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignscope.config import (
    Composed,
    CurvatureSpec,
    DataSpec,
    EvalSpec,
    FinetuneSpec,
    GuardSpec,
    ModelSpec,
    OptimSpec,
    RecordSpec,
    RuntimeSpec,
)
from alignscope.data.encode import batch_rows
from alignscope.data.sample import subsample
from alignscope.evaluate import KeywordRefusalJudge, RefusalJudge, generate
from alignscope.params import select_params
from alignscope.progress import Stages
from alignscope.report.output import results_header

SCHEMA = "alignscope.finetune/1"


@dataclass
class FinetuneConfig(Composed):
    """A guarded fine-tuning run: model, data, guard, parameters, optimizer, evaluation."""

    model: ModelSpec
    datasets: DataSpec
    finetune: FinetuneSpec
    guard: GuardSpec = field(default_factory=GuardSpec)
    curvature: CurvatureSpec = field(default_factory=CurvatureSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    record: RecordSpec = field(default_factory=RecordSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def validate(self) -> None:
        super().validate()
        check_guard_prerequisites(self.guard, self.model)


def check_guard_prerequisites(guard: GuardSpec, model: ModelSpec) -> None:
    """What a guard needs from the model options, checked before anything is loaded."""
    if guard.guard == "safe-lora" and not model.uses_adapter:
        raise ValueError("--guard safe-lora needs a LoRA adapter (--adapter or --lora-r)")


@dataclass
class FinetuneResult:
    config: FinetuneConfig
    guard: dict[str, Any]
    steps: list[dict[str, Any]]
    trajectory: list[dict[str, Any]]
    timings: dict[str, float]
    datasets: dict[str, Any]
    judge: str = "KeywordRefusalJudge"
    finalize: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: refusal at the start, end and its minimum, KL at the end, task
        loss at the end, mean time per step."""
        rates = [r["refusal_rate"] for r in self.trajectory if r.get("refusal_rate") is not None]
        secs = [s["seconds"] for s in self.steps]
        return {
            "refusal_rate_start": rates[0] if rates else None,
            "refusal_rate_end": rates[-1] if rates else None,
            "refusal_rate_min": min(rates) if rates else None,
            "kl_end": self.trajectory[-1]["kl"] if self.trajectory else None,
            "task_loss_end": self.steps[-1]["loss"] if self.steps else None,
            "seconds_per_step": sum(secs) / len(secs) if secs else None,
            "steps_run": len(self.steps),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **results_header(SCHEMA, self.config),
            "judge": self.judge,
            "guard": self.guard,
            "summary": self.summary(),
            "datasets": self.datasets,
            "steps": self.steps,
            "trajectory": self.trajectory,
            "finalize": self.finalize,
            "timings_s": self.timings,
        }


def safety_rows(cfg, model, tokenizer) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The alignment set: its explicit responses, else the model's own greedy responses."""
    from alignscope.data.loaders import load_data

    data = load_data(cfg.datasets.safety, "safety", format=cfg.datasets.safety_format)
    rows = subsample(data.rows, cfg.datasets.max_safety, cfg.runtime.seed)
    if not rows:
        raise ValueError(f"safety set {cfg.datasets.safety}: no prompts")
    if not all(r.get("response") for r in rows):
        prompts = [r["prompt"] for r in rows]
        greedy = generate(model, tokenizer, prompts, max_new_tokens=cfg.datasets.max_new_tokens)
        rows = [{"prompt": p, "response": g or "."} for p, g in zip(prompts, greedy, strict=True)]
    return rows, data.summary()


def run_finetune(
    cfg: FinetuneConfig,
    *,
    model=None,
    tokenizer=None,
    judge: RefusalJudge | None = None,
    quiet: bool = False,
) -> FinetuneResult:
    """Fine-tune under the configured guard and measure alignment along the way.

    Args:
        cfg: the run.
        model, tokenizer: an already loaded model (copied, never modified); default: load
            ``cfg.model``.
        judge: refusal judge of the generated responses (default keyword judge).
        quiet: no progress output.

    Returns:
        The result, holding the fine-tuned ``model`` (to save or use).

    Raises:
        ValueError: a bad option or a missing guard prerequisite (before training).
        MemoryError: the guard's subspace does not fit ``--memory-gb``.
    """
    from rich.progress import Progress

    from alignscope.commands.verify import record_steps
    from alignscope.data.loaders import load_data
    from alignscope.train.guards import guard_from_spec
    from alignscope.train.loop import finetune, make_optimizer
    from alignscope.train.stream import training_stream
    from alignscope.train.tracker import AlignmentTracker

    cfg.validate()
    cfg.runtime.apply()
    judge = judge or KeywordRefusalJudge()
    stages = Stages(quiet=quiet)
    with stages.stage("setup", "model, data, guard"):
        if model is None:
            model, tokenizer = cfg.load_model()
        elif cfg.model.uses_adapter:
            raise ValueError("--adapter/--lora-r apply when alignscope loads the model")
        else:
            model = copy.deepcopy(model)
        selection = select_params(model, cfg.param_spec(), group=cfg.curvature.group)
        selection.train_only(model)
        rows, safety_summary = safety_rows(cfg, model, tokenizer)
        safety_batch, safety_fit = batch_rows(
            tokenizer, rows, cfg.datasets.max_length, f"safety set {cfg.datasets.safety}"
        )
        data = load_data(cfg.finetune.data, "data", format=cfg.datasets.data_format)
        stream = training_stream(
            tokenizer, data.rows, batch_size=cfg.optim.batch_size, seed=cfg.runtime.seed,
            max_length=cfg.datasets.max_length, what=f"fine-tuning set {cfg.finetune.data}",
        )  # fmt: skip
        datasets: dict[str, Any] = {
            "finetune": {**data.summary(), **stream.summary()},
            "safety": {**safety_summary, **safety_fit.summary()},
        }
        prompts = [rows[i]["prompt"] for i in safety_fit.kept]
        eval_source = "safety prompts (not held out)"
        if cfg.eval.eval_prompts is not None:
            evals = load_data(cfg.eval.eval_prompts, "safety", format=cfg.datasets.safety_format)
            prompts = [r["prompt"] for r in subsample(evals.rows, cfg.eval.max_eval,
                                                       cfg.runtime.seed)]  # fmt: skip
            if not prompts:
                raise ValueError(f"eval prompts {cfg.eval.eval_prompts}: no prompts")
            datasets["eval"] = evals.summary()
            eval_source = "held-out eval prompts"
        tracker = AlignmentTracker(
            model, tokenizer, selection, safety_batch, eval_prompts=prompts, judge=judge,
            max_new_tokens=cfg.datasets.max_new_tokens,
        )  # fmt: skip
    with stages.stage("guard", f"{cfg.guard.guard} at the aligned weights"):
        guard = guard_from_spec(
            cfg.guard, memory_budget=int(cfg.curvature.memory_budget_gb * 2**30),
            seed=cfg.runtime.seed, dtype=cfg.model.dtype, device=cfg.model.device,
        )  # fmt: skip
        guard.setup(model, selection, safety_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optim.optimizer, params, cfg.optim.lr, cfg.optim.adam_eps)
    wanted = set(record_steps(cfg.optim.steps, cfg.record.eval_every))
    trajectory: list[dict[str, Any]] = []
    per_step: list[dict[str, Any]] = []
    clock = {"last": time.perf_counter()}
    torch.manual_seed(cfg.runtime.seed)
    progress = Progress(console=stages.console, transient=True)

    def callback(step: int, loss: float | None) -> bool:
        now = time.perf_counter()
        if step > 0:  # the step's own time: measurements are excluded
            per_step.append({"step": step, "loss": loss, "seconds": now - clock["last"],
                             **guard.signals()})  # fmt: skip
            progress.update(task, advance=1, description=f"loss {loss:.4f}")
        if step in wanted:
            trajectory.append(tracker.measure(step, loss))
        clock["last"] = time.perf_counter()
        return False

    start = time.perf_counter()
    with progress:
        task = progress.add_task("fine-tuning", total=cfg.optim.steps)
        finetune(
            model, tokenizer, None, cfg.optim.steps, lr=cfg.optim.lr,
            batch_size=cfg.optim.batch_size, seed=cfg.runtime.seed, stream=stream,
            callback=callback, optimizer=opt, loss_weighting="example",
            guard=None if cfg.guard.guard == "none" else guard,
        )  # fmt: skip
    timings = dict(stages.timings)
    timings["finetune"] = time.perf_counter() - start
    finalized = guard.finalize(model)
    if finalized:  # a post-hoc guard changed the weights: measure the model that is saved
        rec = tracker.measure(cfg.optim.steps, per_step[-1]["loss"] if per_step else None)
        trajectory.append({**rec, "after_finalize": True})
    model.eval()
    return FinetuneResult(
        cfg, {"name": guard.name, "settings": guard.settings(), "eval_prompts": eval_source},
        per_step, trajectory, timings, datasets, type(judge).__name__, finalized, model,
        tokenizer,
    )  # fmt: skip


def save_model(model, tokenizer, folder: Path) -> str:
    """The PEFT adapter (``adapter/``) or the whole model (``model/``) with its tokenizer."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        return "adapter"
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return "model"
