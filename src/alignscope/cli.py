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


def _register_subcommands() -> None:
    # Sub-apps live beside the code they drive; importing them here keeps `alignscope --help` whole.
    try:
        from alignscope.organism.cli import app as organism_app
    except ImportError:  # organism package not built yet in this checkout
        return
    app.add_typer(organism_app, name="organism", help="Build and inspect the tiny aligned model.")


_register_subcommands()
