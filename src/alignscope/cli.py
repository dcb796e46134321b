"""The ``alignscope`` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterator
from inspect import Parameter
from typing import Any

import typer

from alignscope import __version__
from alignscope import config as specs
from alignscope.errors import MissingExtraError, RankFailure

KEYWORD_ONLY = Parameter.KEYWORD_ONLY

app = typer.Typer(
    name="alignscope",
    help="Predict, watch and prevent the collapse of safety alignment during fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alignscope {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """alignscope: geometry of alignment collapse, measured on your model and data."""


# Every option of diagnose, verify, rank (and any later command) is generated from the fields of
# the config specs (alignscope.config): their help, flags and defaults are written there once.
OVERWRITE = typer.Option(False, help="Replace an existing output directory.")
ERRORS = (ValueError, FileNotFoundError, FileExistsError, MemoryError, FloatingPointError)
ERRORS += (MissingExtraError,)  # a missing optional package: how to install it
ERRORS += (RankFailure,)  # another torchrun process failed: its message


def out_option(command: str) -> Any:
    """``--out``, defaulting to ``alignscope-out/<command>``."""
    return typer.Option(f"alignscope-out/{command}", help="Output directory.")


def spec_options(*specs: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per command-line field of ``specs`` (help, flags, default from the
    field), as keyword parameters named after the fields."""
    params = []
    for spec in specs:
        hints = typing.get_type_hints(spec)
        for f in dataclasses.fields(spec):
            if not f.metadata.get("cli", True) or f.name in exclude:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = ...  # required
            flags = f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)
            option = typer.Option(default, *flags, help=f.metadata["help"])
            params.append(inspect.Parameter(f.name, KEYWORD_ONLY, default=option,
                                            annotation=hints[f.name]))  # fmt: skip
    return params


def with_spec_options(*specs: type, exclude: tuple[str, ...] = ()) -> Callable:
    """Give a command the options of ``specs``: it declares its own (``out``, ``overwrite``)
    and takes the spec fields as ``**options``, flat names ready for ``Config.from_options``."""

    def wrap(fn: Callable) -> Callable:
        own = inspect.signature(fn, eval_str=True).parameters
        own_params = [p.replace(kind=KEYWORD_ONLY) for p in own.values() if p.kind != p.VAR_KEYWORD]
        params = spec_options(*specs, exclude=exclude) + own_params

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


@contextlib.contextmanager
def _processes(device: str) -> Iterator[bool]:
    """Under torchrun, join the process group (unless one exists) and run the command so that
    an error on any rank stops every rank with its message; nothing in one process. Yields
    whether this is rank 0, the one process that writes outputs and prints."""
    from alignscope import distributed as dist

    created = dist.init_from_env(device)
    if not dist.is_main():  # one set of progress bars: rank 0's
        with contextlib.suppress(Exception):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    try:
        with dist.guard():
            yield dist.is_main()
    finally:
        if created and dist.initialized():
            import torch.distributed

            torch.distributed.destroy_process_group()


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", fg="red", err=True)
    return typer.Exit(2)


DIAGNOSE_SPECS = (
    specs.ModelSpec,
    specs.DataSpec,
    specs.FinetuneSpec,
    specs.CurvatureSpec,
    specs.OptimSpec,
    specs.RuntimeSpec,
)


@app.command()
@with_spec_options(*DIAGNOSE_SPECS)
def diagnose(
    out: str = out_option("diagnose"), overwrite: bool = OVERWRITE, **options: Any
) -> None:
    """Measure the AIC and forecast the alignment-loss increase over fine-tuning steps.

    Runs data-parallel under torchrun (torchrun --nproc_per_node N -m alignscope diagnose and
    the options): the same results, written by rank 0 (docs/scale.md).
    """
    from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose
    from alignscope.report.diagnose_report import write_diagnose_outputs
    from alignscope.report.output import OutputDir

    try:
        cfg = DiagnoseConfig.from_options(**options)
        with _processes(cfg.model.device) as main:
            if main:  # rank 0 alone writes (and checks) the outputs
                OutputDir(out, overwrite=overwrite).abort()  # fail before the work if taken
            result = run_diagnose(cfg)
            res = result.to_json()
            if main:
                path = write_diagnose_outputs(
                    res, out, overwrite=overwrite, subspace=result.subspace
                )
    except ERRORS as err:
        raise _fail(err) from None
    if not main:
        return
    _print_summary(res)
    typer.echo(f"wrote {path}/results.json, report.md, report.html")


@app.command()
@with_spec_options(*DIAGNOSE_SPECS, specs.EvalSpec, specs.RecordSpec, specs.GuardSpec)
def verify(
    diagnosis: str = typer.Option(
        None, "--diagnosis", help="results.json (or its folder) of an earlier diagnose run."
    ),
    out: str = out_option("verify"),
    overwrite: bool = OVERWRITE,
    **options: Any,
) -> None:
    """Fine-tune for real and score the diagnosis' forecast against what happens.

    Records the alignment KL, refusal NLL, refusal rate, fine-tuning loss and the displacement
    (total, in the alignment subspace, Fisher-weighted) at log-spaced steps. --guard runs the
    fine-tuning under a guard (as finetune does; --guard-adaptive: off until the watcher warns).
    An interrupted run resumes from <out>.partial when restarted with the same arguments. Runs
    data-parallel under torchrun, with or without --guard (docs/scale.md).
    """
    import shutil
    from pathlib import Path

    from alignscope.commands.diagnose import load
    from alignscope.commands.verify import VerifyConfig, run_verify
    from alignscope.report.output import OutputDir
    from alignscope.report.verify_report import write_verify_outputs

    resolved = Path(out).resolve()  # "--out ." has no name to suffix before resolving
    partial = resolved.with_name(resolved.name + ".partial")
    try:
        cfg = VerifyConfig.from_options(**options)
        with _processes(cfg.model.device) as main:
            if main:  # rank 0 alone writes (and checks) the outputs
                OutputDir(out, overwrite=overwrite).abort()  # fail before the work if taken
            diag = None
            if diagnosis is not None:
                try:  # results.json and subspace.pt of diagnose (or a verify result's diagnosis)
                    diag = load(diagnosis)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"--diagnosis {diagnosis}: no results.json there"
                    ) from None
            result = run_verify(cfg, diagnosis=diag, partial_dir=partial)
            res = result.to_json()
            if main:
                written = write_verify_outputs(
                    res, out, overwrite=overwrite, subspace=result.diagnosis.subspace
                )
                shutil.rmtree(partial, ignore_errors=True)
    except ERRORS as err:
        raise _fail(err) from None
    if not main:
        return
    sc = res["scores"]
    typer.echo(
        f"forecast horizon {sc['horizon_steps']} steps; relative L2 error of dL_a in the window "
        f"{sc['relative_l2_error']}; exponent observed {sc['exponent_observed']} vs forecast "
        f"{sc['exponent_forecast_fit']}; {sc['alignment_loss']} threshold {sc['threshold']:g} "
        f"crossed at step {sc['threshold_step_observed'] or 'never'} (forecast "
        f"{sc['threshold_step_predicted'] or 'none'}); refusal rate {sc['refusal_rate_start']} -> "
        f"{sc['refusal_rate_end']}, refusal collapse (below half) at step "
        f"{sc['refusal_collapse_step'] or 'never'}"
    )
    _echo_adaptive(res.get("guard"))
    typer.echo(f"wrote {written}/results.json, report.md, report.html")


def _echo_adaptive(guard: dict | None) -> None:
    """Adaptive mode: when the watcher's warning switched the guard on (or that it never did)."""
    record = (guard or {}).get("record") or {}
    if not record.get("adaptive"):
        return
    if record["activated_at"] is None:
        typer.echo(f"adaptive {guard['settings']['inner']}: the watcher never warned, the guard "
                   "never ran")  # fmt: skip
        return
    typer.echo(f"adaptive {guard['settings']['inner']}: switched on by the watcher's warning at "
               f"step {record['activated_at']} ({record['warning']['message']})")  # fmt: skip


# diagnose's options that a guarded fine-tuning run does not use (no forecast, no checkpoints;
# the guards' Fisher products keep the exact vocabulary)
FINETUNE_UNUSED = ("rank", "explained", "fisher", "solver", "alignment_loss", "max_data",
                   "threshold", "vocab_keep")  # fmt: skip


@app.command("finetune")
@with_spec_options(*DIAGNOSE_SPECS, specs.GuardSpec, specs.EvalSpec, specs.TaskEvalSpec,
                   specs.RecordSpec, exclude=FINETUNE_UNUSED)  # fmt: skip
def finetune_command(
    out: str = out_option("finetune"), overwrite: bool = OVERWRITE, **options: Any
) -> None:
    """Fine-tune under a guard (docs/guard.md) and save the model, results and a report.

    Records each step's task loss, time and guard signals, and the alignment KL and refusal rate
    (on --eval-prompts, else on the safety prompts) at log-spaced steps. The fine-tuned model is
    saved in <out>/model (or the adapter in <out>/adapter). With --guard-adaptive the guard stays
    off until an alignment watcher's early warning and results.json records the step it switched
    on at. An interrupted run resumes from <out>.partial when restarted with the same arguments.
    Runs data-parallel under torchrun, every guard included: the same results, written by rank 0
    (docs/scale.md).
    """
    import shutil
    from pathlib import Path

    from alignscope.commands.finetune import FinetuneConfig, run_finetune
    from alignscope.report.finetune_report import write_finetune_outputs
    from alignscope.report.output import OutputDir

    resolved = Path(out).resolve()
    partial = resolved.with_name(resolved.name + ".partial")
    try:
        cfg = FinetuneConfig.from_options(**options)
        with _processes(cfg.model.device) as main:
            cfg.validate()  # a missing guard prerequisite fails before loading anything
            if main:  # rank 0 alone writes (and checks) the outputs
                OutputDir(out, overwrite=overwrite).abort()  # fail before the work if taken
            result = run_finetune(cfg, partial_dir=partial)
            if main:
                written = write_finetune_outputs(result, out, overwrite=overwrite)
                shutil.rmtree(partial, ignore_errors=True)
    except ERRORS as err:
        raise _fail(err) from None
    if not main:
        return
    sm = result.summary()
    typer.echo(
        f"guard {cfg.guard.guard}: refusal rate {sm['refusal_rate_start']} -> "
        f"{sm['refusal_rate_end']} (lowest {sm['refusal_rate_min']}); alignment KL at the end "
        f"{sm['kl_end']}; task loss at the end {sm['task_loss_end']}; "
        f"{sm['seconds_per_step']:.3g} s per step"
    )
    if sm["task_exact_match_end"] is not None:
        typer.echo(
            f"held-out task: exact match {sm['task_exact_match_start']} -> "
            f"{sm['task_exact_match_end']}; NLL {sm['task_nll_start']} -> {sm['task_nll_end']}"
        )
    _echo_adaptive(result.guard)
    typer.echo(f"wrote {written}/results.json, report.md, report.html")


@app.command()
def report(
    path: str = typer.Argument(
        ..., help="A folder of alignscope outputs (writes DIR/index.html), or a watch log (JSONL)."
    ),
    out: str = typer.Option(
        None,
        help="For a log: output directory (default: <log>-report). For a folder: the "
        "index file (default: DIR/index.html).",
    ),
    overwrite: bool = OVERWRITE,
) -> None:
    """Index every alignscope output under a folder in one page, or render a watch log.

    A folder: one index.html over every diagnose, verify and rank results.json and watch log
    below it (verdicts, rankings, verify outcomes, links, key plots); re-running replaces only
    that file. A JSONL watch log: plots and a report, like verify's.
    """
    from pathlib import Path

    from alignscope.report.index import write_index
    from alignscope.report.watch_report import write_watch_report

    try:
        if Path(path).is_dir():
            index = write_index(path, out, overwrite=overwrite)
            typer.echo(f"wrote {index}")
            return
        target = out or str(path).removesuffix(".jsonl") + "-report"
        written = write_watch_report(path, target, overwrite=overwrite)
    except ERRORS as err:
        raise _fail(err) from None
    typer.echo(f"wrote {written}/report.md, report.html")


def _print_summary(results: dict) -> None:
    v, fc, a = results["verdict"], results["forecast"], results["aic"]["optimizer_step"]
    typer.echo(
        f"AIC {'holds' if v['aic_holds'] else 'does not hold'} (deciding: {v['deciding']}); "
        f"|P g|/|g| = {a['Pg_ratio']:.3g}, kappa = {a['kappa']:.3g}, gamma = {a['gamma']:.3g}; "
        f"horizon {fc.get('horizon_steps')} steps; {results['config']['alignment_loss']} "
        f"threshold {results['config']['threshold']:g} crossed at step "
        f"{fc.get('collapse_step')} (forecast; not a refusal collapse); "
        f"refusal rate {results['alignment']['refusal_rate']:.1%}"
    )


@app.command()
def demo(
    preset: str = typer.Option("demo", help="Organism preset: demo (minutes) or test (seconds)."),
    seed: int = typer.Option(0, help="Seed of the organism, the diagnosis and the fine-tuning."),
    out: str = typer.Option("alignscope-out/demo", help="Where the reports go."),
    threads: int = typer.Option(1, help="torch CPU threads (1 is fastest on small shared CPUs)."),
) -> None:
    """Build (or reuse) the organism, diagnose and verify a collapsing and a safe set, rank
    four benign sets, then fine-tune the collapsing set again under a guard.

    benign_affirmative erases the organism's refusals under AdamW; benign_neutral does not.
    For each: diagnose (AIC + forecast), then a real AdamW fine-tuning run that scores the
    forecast. Reports go to --out/<set>/diagnose/ and --out/<set>/verify/; the ranking of four
    benign sets by predicted damage to --out/rank/; the guarded and unguarded runs to
    --out/benign_affirmative/{guard,unguarded}/; one index page over all of them to
    --out/index.html.
    """
    from alignscope.commands.demo import run_demo

    try:
        run_demo(preset, seed, out, threads=threads, echo=typer.echo)
    except FileExistsError as err:
        raise _fail(err) from None


def _register_subcommands() -> None:
    # Sub-apps live beside the code they drive.
    from alignscope.organism.cli import app as organism_app

    app.add_typer(organism_app, name="organism", help="Build and inspect the tiny aligned model.")


_register_subcommands()


# --- rank ------------------------------------------------------------------------------------


class _ManyValuesCommand(typer.core.TyperCommand):
    """Lets ``--data a b c`` and ``--lr 1e-5 3e-5`` take several values after one flag (click
    options take one value per flag): the values are spread into repeated flags first."""

    MANY = ("--data", "-d", "--lr")

    def parse_args(self, ctx, args):
        spread: list[str] = []
        flag, took = None, False
        for arg in args:
            if arg in self.MANY:
                if flag is not None and not took:
                    spread.append(flag)  # a flag without a value: click reports it
                flag, took = arg, False
                continue
            if flag is not None and (not arg.startswith("-") or _is_number(arg)):
                spread += [flag, arg]
                took = True
                continue
            if flag is not None and not took:
                spread.append(flag)
            flag = None
            spread.append(arg)
        if flag is not None and not took:
            spread.append(flag)
        return super().parse_args(ctx, spread)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# rank's options: the specs' but the fine-tuning set (a list, RankingSpec.data), the learning
# rate (a list, RankingSpec.lrs) and the subspace choices it does not vary (rank's diagnoses
# use the defaults).
RANK_EXCLUDE = ("lr", "group", "explained", "fisher", "solver", "alignment_loss")


@app.command(cls=_ManyValuesCommand)
@with_spec_options(
    specs.ModelSpec, specs.DataSpec, specs.RankingSpec, specs.CurvatureSpec,
    specs.OptimSpec, specs.EvalSpec, specs.RuntimeSpec, exclude=RANK_EXCLUDE,
)  # fmt: skip
def rank(out: str = out_option("rank"), overwrite: bool = OVERWRITE, **options: Any) -> None:
    """Order candidate fine-tuning sets (or learning rates) by predicted damage to alignment.

    Computes every predictor (AIC quantities, forecast, gradient similarity, a short lookahead
    run) for every candidate, before any real fine-tuning; the recommended candidate (least
    predicted damage) comes first. Runs data-parallel under torchrun (docs/scale.md).
    """
    from alignscope.commands.rank import RankConfig, run_rank
    from alignscope.report.output import OutputDir
    from alignscope.report.rank_report import write_rank_outputs

    try:
        cfg = RankConfig.from_options(**options)
        with _processes(cfg.model.device) as main:
            cfg.validate()
            if main:  # rank 0 alone writes (and checks) the outputs
                OutputDir(out, overwrite=overwrite).abort()  # fail before the work if taken
            result = run_rank(cfg)
            res = result.to_json()
            if main:
                path = write_rank_outputs(res, out, overwrite=overwrite)
    except ERRORS as err:
        raise _fail(err) from None
    if not main:
        return
    name = cfg.ranking.predictor
    for pos, label in enumerate(res["ranking"], 1):
        c = next(c for c in res["candidates"] if c["label"] == label)
        typer.echo(f"{pos}. {label}: {name} = {c['predictors'][name]['value']}")
    typer.echo(res["summary"])
    for warning in res["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    for note in res.get("notes") or ():
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {path}/results.json, report.md, report.html, ranking.png")
