"""Stage timing with a live spinner on stderr (rich), recorded for results files."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console


class Stages:
    """Times named stages; shows a spinner while each runs and a line when it ends.

    ``quiet`` keeps the timings but prints nothing (tests, library use).
    """

    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True, quiet=quiet)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        label = f"{name}{': ' + detail if detail else ''}"
        with self.console.status(f"[bold]{label}[/bold] ..."):
            yield
        elapsed = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + elapsed
        self.console.print(f"[green]done[/green] {label} [dim]({elapsed:.1f} s)[/dim]")

    def note(self, text: str) -> None:
        self.console.print(text)
