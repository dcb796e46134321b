"""The ``alignscope`` command line."""

from __future__ import annotations

import typer

from alignscope import __version__
from alignscope.errors import MissingExtraError

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


# Options shared by diagnose and verify (one place for their names, defaults and help).
MODEL = typer.Option(
    ..., "--model", "-m", help="Hugging Face model directory, hub id, or a local .gguf file."
)
SAFETY = typer.Option(
    ...,
    "--safety",
    "-s",
    help="Harmful prompts, optionally with aligned responses: JSONL, JSON, CSV, TXT or a "
    "datasets.save_to_disk folder (DIR::SPLIT picks a split); format detected, or --safety-format.",
)
DATA = typer.Option(
    ...,
    "--data",
    "-d",
    help="Fine-tuning set of prompt/response pairs, in the same file types; format detected, or "
    "--data-format.",
)
# Spelled out rather than read from data.loaders, which would import torch before --help;
# tests/test_loaders.py checks that it names every format.
FORMATS_HELP = (
    "auto | chat | advbench | harmbench | dolly | alpaca | qa | donotanswer | plain | lines | hf "
    "(docs/diagnose.md, Data formats)"
)
SAFETY_FORMAT = typer.Option(
    "auto", help=f"Format of --safety (and of --eval-prompts): {FORMATS_HELP}."
)
DATA_FORMAT = typer.Option("auto", help=f"Format of --data: {FORMATS_HELP}.")
PARAMS = typer.Option(
    ["all"],
    "--params",
    help="all (with --adapter/--lora-r: the adapter weights) | lora | glob over parameter names "
    "(repeatable).",
)
GROUP = typer.Option(
    None, "--group", help="Block-wise subspaces: layer | module (default: one block)."
)
OPTIMIZER = typer.Option("adamw", help="sgd | adam | adamw.")
LR = typer.Option(2e-5, help="Learning rate of the fine-tuning.")
BATCH_SIZE = typer.Option(8, help="Batch size of the fine-tuning.")
STEPS = typer.Option(1000, help="Optimizer steps to forecast (verify: to run).")
RANK = typer.Option(None, help="Subspace dimension d (default 20 unless --explained).")
EXPLAINED = typer.Option(None, help="Choose d to explain this fraction of tr F.")
THRESHOLD = typer.Option(0.1, help="dL_a (nats/token) that counts as collapse.")
FISHER = typer.Option("ggn", help="ggn (true Fisher) | empirical (not recommended).")
SOLVER = typer.Option("auto", help="auto | gram | lanczos.")
ALIGNMENT_LOSS = typer.Option("kl", help="kl (default) | nll (refusal NLL).")
MAX_SAFETY = typer.Option(64, help="Use at most this many safety prompts.")
MAX_DATA = typer.Option(256, help="Fine-tuning examples used for curvature and loss tracking.")
DTYPE = typer.Option(
    "float32",
    help="Weights dtype: float32 | bfloat16 | float16 | float64 (16-bit: math in float32).",
)
DEVICE = typer.Option("cpu", help="cpu | cuda | auto.")
MEMORY_GB = typer.Option(2.0, help="Memory budget for curvature work (GiB).")
THREADS = typer.Option(None, help="torch CPU threads (1 is best on a busy 2-core box).")
SEED = typer.Option(0, help="Random seed (recorded in results.json).")
OVERWRITE = typer.Option(False, help="Replace an existing output directory.")
ADAPTER = typer.Option(
    None, "--adapter", help="PEFT adapter directory to load on top of --model (trainable)."
)
LORA_R = typer.Option(None, "--lora-r", help="Add a new LoRA adapter of this rank (B = 0).")
LORA_ALPHA = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 2 x --lora-r).")
LORA_TARGETS = typer.Option(
    None,
    "--lora-targets",
    help="Module names to adapt (repeatable; default: all attention/MLP linear layers).",
)
ERRORS = (ValueError, FileNotFoundError, FileExistsError, MemoryError, FloatingPointError)
ERRORS += (MissingExtraError,)  # a missing optional package: how to install it


def _config_fields(options: dict) -> dict:
    """DiagnoseConfig fields from the shared CLI options (names as the config spells them)."""
    fields = {k: options[k] for k in (
        "model", "safety", "data", "group", "optimizer", "lr", "batch_size", "steps", "rank",
        "explained", "threshold", "fisher", "solver", "alignment_loss", "max_safety",
        "max_data", "dtype", "device", "threads", "seed",
        "safety_format", "data_format")}  # fmt: skip
    fields["params"] = list(options["params"])
    fields["memory_budget_gb"] = options["memory_gb"]
    fields["adapter"], fields["lora_r"] = options.get("adapter"), options.get("lora_r")
    fields["lora_alpha"] = options.get("lora_alpha")
    fields["lora_targets"] = list(options.get("lora_targets") or []) or None
    if fields["rank"] is None and fields["explained"] is None:
        fields["rank"] = 20
    return fields


@app.command()
def diagnose(
    model: str = MODEL,
    safety: str = SAFETY,
    data: str = DATA,
    params: list[str] = PARAMS,
    group: str = GROUP,
    optimizer: str = OPTIMIZER,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    steps: int = STEPS,
    rank: int = RANK,
    explained: float = EXPLAINED,
    threshold: float = THRESHOLD,
    fisher: str = FISHER,
    solver: str = SOLVER,
    alignment_loss: str = ALIGNMENT_LOSS,
    max_safety: int = MAX_SAFETY,
    max_data: int = MAX_DATA,
    safety_format: str = SAFETY_FORMAT,
    data_format: str = DATA_FORMAT,
    dtype: str = DTYPE,
    device: str = DEVICE,
    memory_gb: float = MEMORY_GB,
    threads: int = THREADS,
    seed: int = SEED,
    adapter: str = ADAPTER,
    lora_r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    lora_targets: list[str] = LORA_TARGETS,
    out: str = typer.Option("alignscope-out/diagnose", help="Output directory."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Measure the AIC and forecast the alignment-loss increase over fine-tuning steps."""
    from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose
    from alignscope.report.diagnose_report import write_diagnose_outputs
    from alignscope.report.output import OutputDir

    cfg = DiagnoseConfig(**_config_fields(locals()))
    try:
        OutputDir(out, overwrite=overwrite).abort()  # fail before the work if --out is taken
        result = run_diagnose(cfg)
    except ERRORS as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    res = result.to_json()
    path = write_diagnose_outputs(
        res, out, overwrite=overwrite, subspace=(result.subspace_basis, result.subspace_values)
    )
    _print_summary(res)
    typer.echo(f"wrote {path}/results.json, report.md, report.html")


@app.command()
def verify(
    model: str = MODEL,
    safety: str = SAFETY,
    data: str = DATA,
    params: list[str] = PARAMS,
    group: str = GROUP,
    optimizer: str = OPTIMIZER,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    steps: int = STEPS,
    rank: int = RANK,
    explained: float = EXPLAINED,
    threshold: float = THRESHOLD,
    fisher: str = FISHER,
    solver: str = SOLVER,
    alignment_loss: str = ALIGNMENT_LOSS,
    max_safety: int = MAX_SAFETY,
    max_data: int = MAX_DATA,
    safety_format: str = SAFETY_FORMAT,
    data_format: str = DATA_FORMAT,
    dtype: str = DTYPE,
    device: str = DEVICE,
    memory_gb: float = MEMORY_GB,
    threads: int = THREADS,
    seed: int = SEED,
    adapter: str = ADAPTER,
    lora_r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    lora_targets: list[str] = LORA_TARGETS,
    eval_prompts: str = typer.Option(
        None, "--eval-prompts", "-e", help="Held-out harmful prompts for the refusal rate."
    ),
    max_eval: int = typer.Option(64, help="Use at most this many eval prompts."),
    eval_every: str = typer.Option("auto", help="auto (log-spaced steps) | N (every N steps)."),
    checkpoint_every: int = typer.Option(
        4, help="Checkpoint into <out>.partial every N recorded steps (0: never)."
    ),
    diagnosis: str = typer.Option(
        None, "--diagnosis", help="results.json (or its folder) of an earlier diagnose run."
    ),
    out: str = typer.Option("alignscope-out/verify", help="Output directory."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Fine-tune for real and score the diagnosis' forecast against what happens.

    Records the alignment KL, refusal NLL, refusal rate, fine-tuning loss and the displacement
    (total, in the alignment subspace, Fisher-weighted) at log-spaced steps. An interrupted run
    resumes from <out>.partial when restarted with the same arguments.
    """
    import json
    import shutil
    from pathlib import Path

    from alignscope.commands.verify import VerifyConfig, run_verify
    from alignscope.report.output import SUBSPACE_FILE, OutputDir, load_subspace
    from alignscope.report.verify_report import write_verify_outputs

    extra = {"eval_prompts": eval_prompts, "max_eval": max_eval, "eval_every": eval_every,
             "checkpoint_every": checkpoint_every}  # fmt: skip
    cfg = VerifyConfig(**_config_fields(locals()), **extra)
    resolved = Path(out).resolve()  # "--out ." has no name to suffix before resolving
    partial = resolved.with_name(resolved.name + ".partial")
    try:
        OutputDir(out, overwrite=overwrite).abort()  # fail before the work if --out is taken
        diag, basis, values = None, None, None
        if diagnosis is not None:
            path = Path(diagnosis)
            path = path / "results.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"--diagnosis {diagnosis}: no results.json there")
            diag = json.loads(path.read_text(encoding="utf-8"))
            diag = diag.get("diagnosis", diag)  # a verify result holds its diagnosis
            sub_file = path.parent / SUBSPACE_FILE
            if sub_file.is_file():
                basis, values = load_subspace(sub_file)
        result = run_verify(
            cfg,
            diagnosis=diag,
            subspace_basis=basis,
            subspace_values=values,
            partial_dir=partial,
        )
    except ERRORS as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    res = result.to_json()
    written = write_verify_outputs(
        res, out, overwrite=overwrite, subspace=(result.subspace_basis, result.subspace_values)
    )
    shutil.rmtree(partial, ignore_errors=True)
    sc = res["scores"]
    typer.echo(
        f"forecast horizon {sc['horizon_steps']} steps; relative L2 error of dL_a in the window "
        f"{sc['relative_l2_error']}; exponent observed {sc['exponent_observed']} vs forecast "
        f"{sc['exponent_forecast_fit']}; collapse step predicted {sc['collapse_step_predicted']}"
        f", observed {sc['collapse_step_observed']}; refusal rate {sc['refusal_rate_start']} -> "
        f"{sc['refusal_rate_end']} (below half at step {sc['refusal_collapse_step']})"
    )
    typer.echo(f"wrote {written}/results.json, report.md, report.html")


@app.command()
def report(
    log: str = typer.Argument(..., help="JSONL log written by alignscope.train.watch."),
    out: str = typer.Option(None, help="Output directory [default: <log>-report]."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Render a watch log (JSONL) as plots and a report, like verify's."""
    from alignscope.report.watch_report import write_watch_report

    target = out or str(log).removesuffix(".jsonl") + "-report"
    try:
        path = write_watch_report(log, target, overwrite=overwrite)
    except ERRORS as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}/report.md, report.html")


def _print_summary(results: dict) -> None:
    v, fc, a = results["verdict"], results["forecast"], results["aic"]["optimizer_step"]
    typer.echo(
        f"AIC {'holds' if v['aic_holds'] else 'does not hold'} (deciding: {v['deciding']}); "
        f"|P g|/|g| = {a['Pg_ratio']:.3g}, kappa = {a['kappa']:.3g}, gamma = {a['gamma']:.3g}; "
        f"horizon {fc.get('horizon_steps')} steps; collapse step {fc.get('collapse_step')}; "
        f"refusal rate {results['alignment']['refusal_rate']:.1%}"
    )


DEMO_SETS = ("benign_affirmative", "benign_neutral")
RANK_SETS = ("benign_affirmative", "benign_neutral", "benign_arithmetic", "benign_list")
DEMO_MARKER = ".alignscope-demo"


@app.command()
def demo(
    preset: str = typer.Option("demo", help="Organism preset: demo (minutes) or test (seconds)."),
    seed: int = typer.Option(0, help="Seed of the organism, the diagnosis and the fine-tuning."),
    out: str = typer.Option("alignscope-out/demo", help="Where the reports go."),
    threads: int = typer.Option(1, help="torch CPU threads (1 is fastest on small shared CPUs)."),
) -> None:
    """Build (or reuse) the organism, diagnose and verify a collapsing and a safe set, then rank
    four benign sets.

    benign_affirmative erases the organism's refusals under AdamW; benign_neutral does not.
    For each: diagnose (AIC + forecast), then a real AdamW fine-tuning run that scores the
    forecast. Reports go to --out/<set>/diagnose/ and --out/<set>/verify/; the ranking of four
    benign sets by predicted damage to --out/rank/.
    """
    from pathlib import Path

    import torch
    from rich.console import Console
    from rich.table import Table

    from alignscope.commands.diagnose import run_diagnose
    from alignscope.commands.rank import RankConfig, run_rank
    from alignscope.commands.verify import VerifyConfig, run_verify
    from alignscope.organism import load_organism
    from alignscope.organism.cli import show
    from alignscope.report.diagnose_report import write_diagnose_outputs
    from alignscope.report.rank_report import write_rank_outputs
    from alignscope.report.verify_report import write_verify_outputs

    root = Path(out)
    if root.exists() and any(root.iterdir()) and not (root / DEMO_MARKER).exists():
        typer.secho(f"error: {root} holds other results; choose another --out", fg="red", err=True)
        raise typer.Exit(2)
    torch.set_num_threads(threads)
    org = load_organism(preset, seed, threads=threads)
    show(preset=preset, seed=seed, out=org.path, n=3, threads=threads)
    proto = org.finetune_protocol
    summary = Table(title=f"AdamW lr {proto.lr:g}, batch {proto.batch_size}, {proto.steps} steps")
    cols = ("benign set", "|P g|/|g|", "kappa", "gamma", "horizon", "refusal", "KL>0.1 at")
    for col in cols:
        summary.add_column(col, no_wrap=True)
    written, first = [], None
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("written by `alignscope demo`; it replaces this folder\n")
    for name in DEMO_SETS:
        cfg = VerifyConfig.for_organism(
            org,
            name,
            rank=20,
            seed=seed,
            threads=threads,
            eval_prompts=str(org.datasets_path / "harmful_eval.jsonl"),
        )
        diagnosis = run_diagnose(cfg.diagnose_config())
        first = first or diagnosis
        res = diagnosis.to_json()
        sub = (diagnosis.subspace_basis, diagnosis.subspace_values)
        write_diagnose_outputs(res, root / name / "diagnose", overwrite=True, subspace=sub)
        verified = run_verify(cfg, diagnosis=diagnosis)
        ver = verified.to_json()
        path = write_verify_outputs(ver, root / name / "verify", overwrite=True, subspace=sub)
        a, fc, sc = res["aic"]["gradient"], res["forecast"], ver["scores"]
        summary.add_row(
            name.removeprefix("benign_"),
            f"{a['Pg_ratio']:.3f}",
            f"{a['kappa']:.3g}",
            f"{a['gamma']:.3g}",
            f"{fc['horizon_steps']} steps",
            f"{sc['refusal_rate_start']:.0%} -> {sc['refusal_rate_end']:.0%}",
            str(sc["collapse_step_observed"] or "never"),
        )
        written.append(root / name / "diagnose" / "report.html")
        written.append(path / "report.html")
    Console(width=max(100, Console().width)).print(summary)
    ranked = run_rank(
        RankConfig(
            model=str(org.aligned_path), safety=str(org.datasets_path / "harmful_align.jsonl"),
            data=[str(org.datasets_path / f"{n}.jsonl") for n in RANK_SETS], lrs=[proto.lr],
            optimizer="adamw", batch_size=proto.batch_size, steps=proto.steps, rank=20,
            compliance=str(org.datasets_path / "harmful_train_compliant.jsonl"), seed=seed,
            threads=threads,
        ),
        subspace=first.subspace,  # same model, safety prompts, seed and rank
    ).to_json()  # fmt: skip
    written.append(write_rank_outputs(ranked, root / "rank", overwrite=True) / "report.html")
    typer.echo(f"rank by {ranked['predictor']}: " + " < ".join(ranked["ranking"]))
    typer.echo(ranked["summary"])
    for path in written:
        typer.echo(f"report: {path}")


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


@app.command(cls=_ManyValuesCommand)
def rank(
    model: str = MODEL,
    safety: str = SAFETY,
    data: list[str] = typer.Option(
        ..., "--data", "-d", help="Candidate fine-tuning sets: --data A B C (two or more, or one "
        "with several --lr)."
    ),
    lr: list[float] = typer.Option(
        None, "--lr", help="Learning rate(s): several rank the learning rates for one set "
        "[default: 2e-5]."
    ),
    optimizer: str = OPTIMIZER,
    batch_size: int = BATCH_SIZE,
    steps: int = typer.Option(1000, help="Planned optimizer steps (the budget predictions use)."),
    compliance: str = typer.Option(
        None, "--compliance", help="Harmful prompts with compliant answers (prompt/response), for "
        "the gradient-similarity baseline; without it that predictor is skipped."
    ),
    predictor: str = typer.Option(
        None, help="Predictor to order by [default: the study's winner, see docs/rank.md]."
    ),
    lookahead_steps: int = typer.Option(
        None, help="Optimizer steps of the trial run (lookahead) [default: a tenth of --steps, "
        "at least 12]."
    ),
    params: list[str] = PARAMS,
    adapter: str = ADAPTER,
    lora_r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    lora_targets: list[str] = LORA_TARGETS,
    safety_format: str = SAFETY_FORMAT,
    data_format: str = DATA_FORMAT,
    rank: int = RANK,
    threshold: float = THRESHOLD,
    max_safety: int = MAX_SAFETY,
    max_data: int = MAX_DATA,
    dtype: str = DTYPE,
    device: str = DEVICE,
    memory_gb: float = MEMORY_GB,
    threads: int = THREADS,
    seed: int = SEED,
    out: str = typer.Option("alignscope-out/rank", help="Output directory."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Order candidate fine-tuning sets (or learning rates) by predicted damage to alignment.

    Computes every predictor (AIC quantities, forecast, gradient similarity, a short lookahead
    run) for every candidate, before any real fine-tuning; the recommended candidate (least
    predicted damage) comes first.
    """
    from alignscope.commands.predictors import DEFAULT_PREDICTOR
    from alignscope.commands.rank import RankConfig, run_rank
    from alignscope.report.output import OutputDir
    from alignscope.report.rank_report import write_rank_outputs

    cfg = RankConfig(
        model=model, safety=safety, data=list(data), lrs=list(lr) if lr else [2e-5],
        optimizer=optimizer, batch_size=batch_size, steps=steps, compliance=compliance,
        predictor=predictor or DEFAULT_PREDICTOR, lookahead_steps=lookahead_steps,
        params=list(params), rank=rank if rank is not None else 20, threshold=threshold,
        max_safety=max_safety, max_data=max_data, dtype=dtype, device=device,
        memory_budget_gb=memory_gb, threads=threads, seed=seed, adapter=adapter, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_targets=list(lora_targets or []),
        safety_format=safety_format, data_format=data_format,
    )  # fmt: skip
    try:
        cfg.validate()
        OutputDir(out, overwrite=overwrite).abort()  # fail before the work if --out is taken
        result = run_rank(cfg)
    except ERRORS as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    res = result.to_json()
    path = write_rank_outputs(res, out, overwrite=overwrite)
    for pos, label in enumerate(res["ranking"], 1):
        c = next(c for c in res["candidates"] if c["label"] == label)
        typer.echo(f"{pos}. {label}: {cfg.predictor} = {c['predictors'][cfg.predictor]['value']}")
    typer.echo(res["summary"])
    typer.echo(f"wrote {path}/results.json, report.md, report.html, ranking.png")
