"""``finetune``: a real fine-tuning run under a guard (docs/guard.md), measured as it goes.

Loads the model (full, selected parameters, or a new/existing PEFT LoRA adapter), sets the guard
up at the aligned weights, fine-tunes through the one training loop
(:func:`alignscope.train.loop.finetune`) with the configured optimizer, and records every step's
task loss, time and guard signals, plus the alignment KL and refusal rate on held-out prompts at
the recorded steps (:class:`~alignscope.train.tracker.AlignmentTracker`). The output directory
holds the fine-tuned model (``model/``, a Hugging Face directory, or ``adapter/``, a PEFT
adapter), results.json and a report.

Resuming: with ``partial_dir`` the steps and measurements so far and a checkpoint (the trained
parameters, the optimizer, the RNG and the guard's state, every ``checkpoint_every`` recorded
steps) are kept there; a rerun with the same config sets the guard up at the aligned weights
again, restores the checkpoint and continues with the batches an uninterrupted run would see.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignscope import distributed as dist
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
    TaskEvalSpec,
)
from alignscope.data.encode import batch_rows
from alignscope.data.sample import subsample
from alignscope.evaluate import KeywordRefusalJudge, RefusalJudge, generate
from alignscope.params import select_params
from alignscope.progress import Stages
from alignscope.report.output import (
    jsonable,
    results_header,
    save_torch_atomic,
    write_text_atomic,
)
from alignscope.train.task_eval import TaskMatch

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
    task: TaskEvalSpec = field(default_factory=TaskEvalSpec)
    record: RecordSpec = field(default_factory=RecordSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    def validate(self) -> None:
        super().validate()
        self.guard.check_model(self.model)


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
    resumed_from: int | None = None

    def summary(self) -> dict[str, Any]:
        """Headline numbers: refusal at the start, end and its minimum, KL at the end, task
        loss at the end, held-out task exact match and NLL at the start and end (None without
        a held-out split), mean time per step, and in adaptive mode the update the guard
        switched on at."""
        rates = [r["refusal_rate"] for r in self.trajectory if r.get("refusal_rate") is not None]
        secs = [s["seconds"] for s in self.steps]
        cpu = [s["cpu_seconds"] for s in self.steps if s.get("cpu_seconds") is not None]
        task = [r for r in self.trajectory if r.get("task_exact_match") is not None]
        return {
            "task_exact_match_start": task[0]["task_exact_match"] if task else None,
            "task_exact_match_end": task[-1]["task_exact_match"] if task else None,
            "task_nll_start": task[0]["task_nll"] if task else None,
            "task_nll_end": task[-1]["task_nll"] if task else None,
            "refusal_rate_start": rates[0] if rates else None,
            "refusal_rate_end": rates[-1] if rates else None,
            "refusal_rate_min": min(rates) if rates else None,
            "kl_end": self.trajectory[-1]["kl"] if self.trajectory else None,
            "task_loss_end": self.steps[-1]["loss"] if self.steps else None,
            "seconds_per_step": sum(secs) / len(secs) if secs else None,
            # this process' CPU time (all its threads): on a shared machine other processes
            # inflate the wall time but not this, so guards compare fairly by it there
            "cpu_seconds_per_step": sum(cpu) / len(cpu) if cpu and len(cpu) == len(secs) else None,
            "steps_run": len(self.steps),
            # adaptive mode: the update (0-based) from which the guard ran, None: never/not adaptive
            "guard_activated_at": self.guard.get("record", {}).get("activated_at"),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **results_header(SCHEMA, self.config),
            "judge": self.judge,
            "resumed_from_step": self.resumed_from,
            "guard": self.guard,
            "summary": self.summary(),
            "datasets": self.datasets,
            "steps": self.steps,
            "trajectory": self.trajectory,
            "finalize": self.finalize,
            "timings_s": self.timings,
        }


class _Partial:
    """``<out>.partial/``: config.json, steps.jsonl, trajectory.jsonl, checkpoint.pt."""

    def __init__(self, path: Path, cfg: FinetuneConfig) -> None:
        self.path = path
        self.key = json.dumps(jsonable(cfg.flat()), sort_keys=True)
        cfg_file = path / "config.json"
        if cfg_file.exists() and cfg_file.read_text(encoding="utf-8") != self.key:
            raise ValueError(
                f"{path} holds a partial run with other arguments; delete it or rerun with them"
            )
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg_file, self.key)

    def write(self, steps: list[dict], trajectory: list[dict]) -> None:
        for name, records in (("steps.jsonl", steps), ("trajectory.jsonl", trajectory)):
            lines = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in records)
            write_text_atomic(self.path / name, lines)

    def checkpoint(self, step: int, model, opt, guard) -> None:
        state = {
            "step": step,
            # only what training changes: the frozen weights are reloaded from --model
            "model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "guard": guard.state_dict(),
        }
        save_torch_atomic(self.path / "checkpoint.pt", state)

    def resume(self) -> tuple[dict | None, list[dict], list[dict]]:
        ckpt_file = self.path / "checkpoint.pt"
        if not ckpt_file.exists():
            return None, [], []
        ckpt = torch.load(ckpt_file, weights_only=True)

        def read(name: str) -> list[dict]:
            text = (self.path / name).read_text(encoding="utf-8")
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            return [r for r in rows if r["step"] <= ckpt["step"]]

        return ckpt, read("steps.jsonl"), read("trajectory.jsonl")


def safety_rows(cfg, model, tokenizer) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The alignment set: its explicit responses, else the model's own greedy responses."""
    from alignscope.data.loaders import load_data

    data = load_data(cfg.datasets.safety, "safety", format=cfg.datasets.safety_format)
    rows = subsample(data.rows, cfg.datasets.max_safety, cfg.runtime.seed)
    if not rows:
        raise ValueError(f"safety set {cfg.datasets.safety}: no prompts")
    if not all(r.get("response") for r in rows):
        from alignscope.commands.diagnose import GENERATE_BATCH

        prompts = [r["prompt"] for r in rows]
        # data parallel: the ranks share the generate() calls a single process makes
        new_tokens = cfg.datasets.max_new_tokens
        greedy = dist.sharded_map(
            prompts,
            lambda part: generate(model, tokenizer, part, max_new_tokens=new_tokens),
            GENERATE_BATCH,
        )
        rows = [{"prompt": p, "response": g or "."} for p, g in zip(prompts, greedy, strict=True)]
    return rows, data.summary()


def run_finetune(
    cfg: FinetuneConfig,
    *,
    model=None,
    tokenizer=None,
    judge: RefusalJudge | None = None,
    partial_dir: str | Path | None = None,
    quiet: bool = False,
    task_rows: Sequence[Mapping[str, str]] | None = None,
    task_match: TaskMatch | None = None,
    guard: Any = None,
) -> FinetuneResult:
    """Fine-tune under the configured guard and measure alignment along the way.

    Args:
        cfg: the run.
        model, tokenizer: an already loaded model (copied, never modified); default: load
            ``cfg.model``.
        judge: refusal judge of the generated responses (default keyword judge).
        partial_dir: keep checkpoints there and resume from them (the caller removes it after
            a successful run).
        quiet: no progress output.
        task_rows: held-out rows of the fine-tuning task (instead of ``--task-eval``; e.g.
            :meth:`~alignscope.organism.Organism.heldout`): their greedy exact match and
            response NLL are measured at every recorded step.
        task_match: ``(prompt, generated, reference) -> bool`` of the exact match (default:
            equal after whitespace normalisation; the organism's is
            :func:`~alignscope.organism.corpus.task_match`).
        guard: a :class:`~alignscope.train.guards.Guard` to run instead of the configured one
            (e.g. a wrapper that records extra measurements); set up here like that one.

    Under an initialised ``torch.distributed`` process group of several ranks (torchrun), every
    rank calls this with the same arguments: each training batch is sharded across the ranks
    with the gradients summed over them, the guard runs data-parallel
    (:meth:`~alignscope.train.guards.Guard.shard_over_ranks`), every rank takes the
    single-process step and returns the single-process result; rank 0 alone writes
    ``partial_dir`` and shows progress (docs/scale.md).

    Returns:
        The result, holding the fine-tuned ``model`` (to save or use).

    Raises:
        ValueError: a bad option or a missing guard prerequisite (before training).
        MemoryError: the guard's subspace does not fit ``--memory-gb``.
        alignscope.distributed.RankFailure: another rank failed (its message).
    """
    with dist.guard():
        return _run_finetune(
            cfg, model=model, tokenizer=tokenizer, judge=judge, partial_dir=partial_dir,
            quiet=quiet, task_rows=task_rows, task_match=task_match, guard=guard,
        )  # fmt: skip


def _run_finetune(
    cfg: FinetuneConfig,
    *,
    model,
    tokenizer,
    judge: RefusalJudge | None,
    partial_dir: str | Path | None,
    quiet: bool,
    task_rows: Sequence[Mapping[str, str]] | None,
    task_match: TaskMatch | None,
    guard: Any,
) -> FinetuneResult:
    from rich.progress import Progress

    from alignscope.commands.verify import record_steps, refusal_steps
    from alignscope.data.loaders import load_data
    from alignscope.train.guards import adaptive_from_spec, guard_from_spec
    from alignscope.train.loop import finetune, make_optimizer
    from alignscope.train.prefix import PrefixForward
    from alignscope.train.stream import training_stream
    from alignscope.train.task_eval import TaskEval
    from alignscope.train.tracker import AlignmentTracker
    from alignscope.train.watch import AlignmentCollapseWarning

    cfg.validate()
    cfg.runtime.apply()
    judge = judge or KeywordRefusalJudge()
    stages = Stages(quiet=quiet or not dist.is_main())
    # Rank 0 alone reads and writes the checkpoints and hands what it read to the others (their
    # file system may not be its own on several nodes).
    partial = (
        _Partial(Path(partial_dir), cfg) if partial_dir is not None and dist.is_main() else None
    )
    with stages.stage("setup", "model, data, guard"):
        if model is None:
            model, tokenizer = cfg.load_model()
        elif cfg.model.uses_adapter:
            raise ValueError("--adapter/--lora-r apply when alignscope loads the model")
        else:
            model = copy.deepcopy(model)
        dist.check_unsharded(model)
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
        task_eval = None
        if task_rows is None and cfg.task.task_eval is not None:
            held = load_data(cfg.task.task_eval, "data", format=cfg.datasets.data_format)
            task_rows = subsample(held.rows, cfg.task.max_task_eval, cfg.runtime.seed)
            datasets["task_eval"] = held.summary()
        if task_rows is not None:
            task_eval = TaskEval(
                tokenizer, task_rows, max_length=cfg.datasets.max_length,
                max_new_tokens=cfg.task.task_new_tokens or cfg.datasets.max_new_tokens,
                match=task_match,
            )  # fmt: skip
            datasets.setdefault("task_eval", {}).update(task_eval.summary())
        tracker = AlignmentTracker(
            model, tokenizer, selection, safety_batch, eval_prompts=prompts, judge=judge,
            max_new_tokens=cfg.datasets.max_new_tokens,
            prefix_memory_budget=cfg.runtime.prefix_budget,
        )  # fmt: skip
    with stages.stage("guard", f"{cfg.guard.guard} at the aligned weights"):
        custom = guard is not None
        guard = guard or guard_from_spec(
            cfg.guard, memory_budget=int(cfg.curvature.memory_budget_gb * 2**30),
            seed=cfg.runtime.seed, dtype=cfg.model.dtype, device=cfg.model.device,
        )  # fmt: skip
        # adaptive mode: a watcher at theta0 (built before a checkpoint is restored)
        guard = adaptive_from_spec(
            cfg.guard, guard, model, tokenizer, [rows[i] for i in safety_fit.kept], prompts,
            seed=cfg.runtime.seed, max_new_tokens=cfg.datasets.max_new_tokens,
            max_length=cfg.datasets.max_length,
        )  # fmt: skip
        guard.shard_over_ranks(dist.active())  # its setup's Fisher products too
        guard.setup(model, selection, safety_batch)
    watcher = getattr(guard, "watcher", None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optim.optimizer, params, cfg.optim.lr, cfg.optim.adam_eps)
    # the frozen layers' activations of the fine-tuning set, kept per example
    prefix = PrefixForward.build(model, selection, cfg.runtime.prefix_budget)
    wanted = set(record_steps(cfg.optim.steps, cfg.record.eval_every))
    generate_at = refusal_steps(wanted, cfg.record.refusal_every)
    trajectory: list[dict[str, Any]] = []
    per_step: list[dict[str, Any]] = []
    torch.manual_seed(cfg.runtime.seed)
    start = 0
    if partial_dir is not None:
        ckpt, per_step, trajectory = partial.resume() if partial is not None else (None, [], [])
        ckpt, per_step, trajectory = dist.broadcast_object((ckpt, per_step, trajectory))
        if ckpt is not None:
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            if set(ckpt["model"]) != trained:
                raise ValueError(
                    f"{partial_dir}: the checkpoint holds other parameters than this run trains; "
                    "remove that directory to start over"
                )
            model.load_state_dict(ckpt["model"], strict=False)
            opt.load_state_dict(ckpt["optimizer"])
            guard.load_state_dict(ckpt["guard"])
            torch.set_rng_state(ckpt["rng"])
            if torch.cuda.is_available() and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
            start = int(ckpt["step"])
    clock = {"last": time.perf_counter(), "cpu": time.process_time(), "since_ckpt": 0}
    progress = Progress(console=stages.console, transient=True)

    def callback(step: int, loss: float | None) -> bool:
        now = time.perf_counter()
        if step > 0:  # the step's own time: measurements are excluded
            per_step.append({"step": step, "loss": loss, "seconds": now - clock["last"],
                             "cpu_seconds": time.process_time() - clock["cpu"],
                             **guard.signals()})  # fmt: skip
            progress.update(task, advance=1, description=f"loss {loss:.4f}")
        if watcher is not None:  # adaptive mode: its warning switches the guard on
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AlignmentCollapseWarning)  # recorded instead
                watcher.step(step, loss)
        if step in wanted:
            gen = None if step in generate_at else False  # None: the tracker's default
            rec = tracker.measure(step, loss, refusals=gen)
            if task_eval is not None and gen is None:  # greedy generation too
                rec.update(task_eval.measure(model))
            trajectory.append(rec)
            if partial is not None:
                partial.write(per_step, trajectory)
                clock["since_ckpt"] += 1
                every = cfg.record.checkpoint_every
                if every and clock["since_ckpt"] >= every and step > 0:
                    partial.checkpoint(step, model, opt, guard)
                    clock["since_ckpt"] = 0
        clock["last"], clock["cpu"] = time.perf_counter(), time.process_time()
        return False

    began = time.perf_counter()
    with progress:
        task = progress.add_task("fine-tuning", total=cfg.optim.steps, completed=start)
        finetune(
            model, tokenizer, None, cfg.optim.steps, lr=cfg.optim.lr,
            batch_size=cfg.optim.batch_size, seed=cfg.runtime.seed, stream=stream,
            callback=callback, optimizer=opt, start_step=start, loss_weighting="example",
            guard=guard if custom or cfg.guard.guard != "none" else None, prefix=prefix,
        )  # fmt: skip
    timings = dict(stages.timings)
    timings["finetune"] = time.perf_counter() - began
    finalized = guard.finalize(model)
    if finalized:  # a post-hoc guard changed the weights: measure the model that is saved
        rec = tracker.measure(cfg.optim.steps, per_step[-1]["loss"] if per_step else None)
        if task_eval is not None:
            rec.update(task_eval.measure(model))
        trajectory.append({**rec, "after_finalize": True})
    model.eval()
    return FinetuneResult(
        cfg, {"name": guard.name, "settings": guard.settings(), "eval_prompts": eval_source,
              "record": guard.record()},
        per_step, trajectory, timings, datasets, type(judge).__name__, finalized, model,
        tokenizer, resumed_from=start or None,
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
