"""`alignscope organism ...`: build, show and stress the tiny aligned model."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console(soft_wrap=True)

PRESET = typer.Option("demo", "--preset", "-p", help="Recipe preset: demo (minutes) or test (CI).")
SEED = typer.Option(0, "--seed", help="Seed of corpus splits, initialisation and data order.")
OUT = typer.Option(
    None,
    "--out",
    help="Build directory (default: $ALIGNSCOPE_CACHE/organism/<preset>-seed<seed>, "
    "ALIGNSCOPE_CACHE defaulting to ~/.cache/alignscope).",
)
THREADS = typer.Option(1, "--threads", help="torch threads (1 is fastest on small shared CPUs).")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@app.command()
def build(
    preset: str = PRESET,
    seed: int = SEED,
    out: Path | None = OUT,
    force: bool = typer.Option(False, "--force", help="Replace a different build at --out."),
    threads: int = THREADS,
) -> None:
    """Generate the corpus, train the base model, align it, save both (cached by recipe+seed)."""
    from alignscope.organism.build import build as do_build
    from alignscope.organism.build import read_manifest

    try:
        path = do_build(preset, seed, out, force=force, threads=threads, log=_log)
    except (FileExistsError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    m = read_manifest(path) or {}
    a, b = m["metrics"]["aligned"], m["metrics"]["base"]
    t = m["times"]
    console.print(
        f"organism [bold]{m['preset']}[/bold] seed {m['seed']} at {path}\n"
        f"  built in {t['total_s']:.1f} s on {m['threads']} thread(s) "
        f"(base {t['base_s']:.1f} s, align {t['align_s']:.1f} s, eval {t['eval_s']:.1f} s)\n"
        f"  held-out refusal: base {b['refusal_eval']:.1%} -> aligned {a['refusal_eval']:.1%}; "
        f"benign accuracy: base {b['benign_accuracy']:.1%}, aligned {a['benign_accuracy']:.1%}"
    )


@app.command()
def show(
    preset: str = PRESET,
    seed: int = SEED,
    out: Path | None = OUT,
    n: int = typer.Option(4, "--n", help="Examples of each kind to show."),
    threads: int = THREADS,
) -> None:
    """Greedy generations of base and aligned model; refusal rate and benign accuracy.

    With --out, the build in that directory (whatever its preset and seed, as its manifest.json
    says) is shown; nothing is built or replaced there.
    """
    import torch

    from alignscope.organism import load_organism
    from alignscope.organism.show import show_organism

    torch.set_num_threads(threads)
    try:
        # a named directory is read, never built into: its manifest says preset and seed
        org = load_organism(preset, seed, out, threads=threads, build_if_missing=out is None)
    except FileNotFoundError:
        console.print(
            f"[red]error:[/red] {out} holds no organism build (no manifest.json); build one with "
            "`alignscope organism build --out DIR` or pass the directory of an existing build"
        )
        raise typer.Exit(2) from None
    show_organism(org, n, console)


@app.command()
def collapse(
    preset: str = PRESET,
    seed: int = SEED,
    out: Path | None = OUT,
    sets: str = typer.Option(
        "", "--sets", help="Comma-separated benign sets (default: all fine-tuning sets)."
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="AdamW learning rate (default: the recipe's)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Batch size (default: the recipe's)."
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Optimizer steps (default: the recipe's)."
    ),
    ft_seed: int = typer.Option(0, "--ft-seed", help="Seed of the fine-tuning data order."),
    threads: int = THREADS,
) -> None:
    """Fine-tune the aligned organism on each benign set; print held-out refusal over steps."""
    import torch

    from alignscope.organism import FINETUNE_SETS, load_organism
    from alignscope.organism.measure import collapse_curve

    torch.set_num_threads(threads)
    org = load_organism(preset, seed, out, threads=threads)
    proto = org.finetune_protocol
    changes = {"lr": lr, "batch_size": batch_size, "steps": steps}
    proto = replace(proto, **{k: v for k, v in changes.items() if v is not None})
    if steps is not None:
        proto = replace(proto, eval_steps=tuple(s for s in proto.eval_steps if s <= steps))
    names = [s for s in sets.split(",") if s] or list(FINETUNE_SETS)
    tok, model = org.tokenizer(), org.aligned_model()
    table = Table(
        title=f"held-out refusal at step k of {proto.optimizer} lr {proto.lr:g}, "
        f"batch {proto.batch_size} ({org.preset} seed {org.seed})"
    )
    table.add_column("benign set", no_wrap=True)
    for s in proto.eval_steps:
        table.add_column(str(s), justify="right")
    table.add_column("< 20% at", justify="right")
    t0 = time.perf_counter()
    for name in names:
        curve = collapse_curve(
            model, tok, org.dataset(name), org.dataset("harmful_eval"), proto, ft_seed, name
        )
        below = curve.first_step_below(0.2)
        table.add_row(
            name,
            *(f"{curve.refusal[s]:.0%}" for s in proto.eval_steps),
            "-" if below is None else str(below),
        )
        _log(f"  {name}: done in {curve.seconds:.1f} s")
    console.print(table)
    console.print(f"total {time.perf_counter() - t0:.1f} s")
