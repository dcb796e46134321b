"""The ``alignscope`` command line."""

from __future__ import annotations

import typer

from alignscope import __version__

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


@app.command()
def diagnose(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face model directory."),
    safety: str = typer.Option(
        ..., "--safety", "-s", help="Harmful prompts (JSONL/CSV/TXT), optionally with responses."
    ),
    data: str = typer.Option(..., "--data", "-d", help="Fine-tuning set with prompt/response."),
    params: list[str] = typer.Option(
        ["all"], "--params", help="all | lora | glob over parameter names (repeatable)."
    ),
    group: str = typer.Option(
        None, "--group", help="Block-wise subspaces: layer | module (default: one block)."
    ),
    optimizer: str = typer.Option("adamw", help="sgd | adam | adamw."),
    lr: float = typer.Option(2e-5, help="Learning rate of the planned fine-tuning."),
    batch_size: int = typer.Option(8, help="Batch size of the planned fine-tuning."),
    steps: int = typer.Option(1000, help="Steps to forecast."),
    rank: int = typer.Option(None, help="Subspace dimension d (default 20 unless --explained)."),
    explained: float = typer.Option(None, help="Choose d to explain this fraction of tr F."),
    threshold: float = typer.Option(0.1, help="dL_a (nats/token) that counts as collapse."),
    fisher: str = typer.Option("ggn", help="ggn (true Fisher) | empirical (not recommended)."),
    solver: str = typer.Option("auto", help="auto | gram | lanczos."),
    alignment_loss: str = typer.Option("kl", help="kl (default) | nll (refusal NLL)."),
    max_safety: int = typer.Option(64, help="Use at most this many safety prompts."),
    max_data: int = typer.Option(256, help="Use at most this many fine-tuning examples."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 | float64."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto."),
    memory_gb: float = typer.Option(2.0, help="Memory budget for curvature work (GiB)."),
    threads: int = typer.Option(None, help="torch CPU threads (1 is best on a busy 2-core box)."),
    seed: int = typer.Option(0, help="Random seed (recorded in results.json)."),
    out: str = typer.Option("alignscope-out/diagnose", help="Output directory."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Measure the AIC and forecast the alignment-loss increase over fine-tuning steps."""
    from alignscope.diagnose import DiagnoseConfig, run_diagnose
    from alignscope.report.diagnose_report import write_diagnose_outputs
    from alignscope.report.output import OutputDir

    if rank is None and explained is None:
        rank = 20
    cfg = DiagnoseConfig(
        model=model,
        safety=safety,
        data=data,
        params=list(params),
        group=group,
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
        steps=steps,
        rank=rank,
        explained=explained,
        threshold=threshold,
        seed=seed,
        fisher=fisher,
        solver=solver,
        alignment_loss=alignment_loss,
        max_safety=max_safety,
        max_data=max_data,
        dtype=dtype,
        device=device,
        memory_budget_gb=memory_gb,
    )
    try:
        OutputDir(out, overwrite=overwrite).abort()  # fail before the work if --out is taken
        result = run_diagnose(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, MemoryError, FloatingPointError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    path = write_diagnose_outputs(result.to_json(), out, overwrite=overwrite)
    _print_summary(result.to_json())
    typer.echo(f"wrote {path}/results.json, report.md, report.html")


def _print_summary(results: dict) -> None:
    v, fc, a = results["verdict"], results["forecast"], results["aic"]["optimizer_step"]
    typer.echo(
        f"AIC {'holds' if v['aic_holds'] else 'does not hold'} (deciding: {v['deciding']}); "
        f"|P g|/|g| = {a['Pg_ratio']:.3g}, kappa = {a['kappa']:.3g}, gamma = {a['gamma']:.3g}; "
        f"horizon {fc.get('horizon_steps')} steps; collapse step {fc.get('collapse_step')}; "
        f"refusal rate {results['alignment']['refusal_rate']:.1%}"
    )


def _register_subcommands() -> None:
    # Sub-apps live beside the code they drive; importing them here keeps `alignscope --help` whole.
    try:
        from alignscope.organism.cli import app as organism_app
    except ImportError:  # organism package not built yet in this checkout
        return
    app.add_typer(organism_app, name="organism", help="Build and inspect the tiny aligned model.")


_register_subcommands()
