"""``alignscope report LOG.jsonl``: the verify-style plots and a table from a watch log."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from alignscope import __version__
from alignscope.report.document import Code, Report
from alignscope.report.output import OutputDir
from alignscope.report.plots import series_plot

# (record keys, plot file, y label, title, y limits) for the series a watch log may hold
_SERIES = (
    (("kl", "forecast_kl"), "kl.png", "KL alignment loss (nats/token)",
     "Alignment loss over steps", None),
    (("refusal_rate", "soft_refusal"), "refusal_rate.png", "refusal",
     "Refusal: greedy rate (judged) and soft refusal", (0.0, 1.05)),
    (("subspace_fraction",), "subspace_fraction.png", "|P delta| / |delta|",
     "Drift into the subspace", None),
)  # fmt: skip


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a watch JSONL log, in step order; a clear error for anything else."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such log file")
    records = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{i}: not JSON ({err.msg})") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{p}:{i}: not an alignscope watch record (no 'step')")
        records.append(rec)
    if not records:
        raise ValueError(f"{p}: the log is empty")
    return sorted(records, key=lambda r: r["step"])


def _message(rec: dict[str, Any]) -> str:
    w = rec.get("warning")
    return w.get("message", "") if isinstance(w, dict) else str(w or "")


def build_report(records: list[dict[str, Any]], log: str | Path) -> Report:
    """The watch log as a :class:`Report` (plots referenced by file name, made separately)."""
    steps = [r["step"] for r in records]
    warnings = [r for r in records if r.get("warning")]
    last = records[-1]
    rep = Report("alignscope watch")
    rep.text(
        f"{len(records)} measurements from ", Code(str(log)), f", steps {steps[0]}..{steps[-1]}."
    )
    rep.headline(
        [
            ("measurements", len(records), None),
            ("first early warning at step", warnings[0]["step"] if warnings else "none", None),
            (f"KL at step {last['step']}", last.get("kl"), None),
            (f"refusal rate at step {last['step']}", last.get("refusal_rate"), None),
        ]
    )
    if warnings:
        first = warnings[0]
        rep.text(f"First early warning at step {first['step']}: {_message(first)}.")
    else:
        rep.text("No early warning was raised.")
    for keys, name, _, title, _ in _SERIES:
        if any(r.get(k) is not None for r in records for k in keys):
            rep.image(name, title)
    cols = [c for c in ("kl", "forecast_kl", "refusal_rate", "soft_refusal", "subspace_fraction")
            if any(r.get(c) is not None for r in records)]  # fmt: skip
    rep.heading("Measurements")
    rep.table(
        ["step", *cols, "warning"],
        [[r["step"], *(r.get(c) for c in cols), _message(r)] for r in records],
    )
    rep.heading("How this was made")
    rep.text("Rendered from the log ", Code(str(log)), " by:")
    rep.code(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    rep.table(["", "value"], [["alignscope", __version__]])
    rep.note("The watch log records measurements only; the training run's seed and versions "
             "are those of the script that ran alignscope.train.watch.")  # fmt: skip
    return rep


def write_watch_report(log: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Plots (KL, refusal rate, subspace drift), report.md and report.html from a watch log."""
    records = read_log(log)
    steps = [r["step"] for r in records]
    warnings = [r for r in records if r.get("warning")]
    with OutputDir(out, overwrite=overwrite) as od:
        for keys, name, ylabel, title, ylim in _SERIES:
            series = {k: [r.get(k) for r in records] for k in keys}
            series = {k: v for k, v in series.items() if any(x is not None for x in v)}
            if not series:
                continue
            series_plot(od.file(name), steps, series, ylabel, title, ylim=ylim,
                        vline=warnings[0]["step"] if warnings else None,
                        vline_label="first warning")  # fmt: skip
        build_report(records, log).write(od.staging)
    return Path(out)
