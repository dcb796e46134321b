"""results.json, report.md and report.html (with a bar chart) for ``rank``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alignscope.report.document import Report
from alignscope.report.output import OutputDir, write_json_atomic
from alignscope.report.plots import plt

CHART = "ranking.png"


def rank_chart(path: Path, results: dict[str, Any]) -> Path:
    """Horizontal bars of the ranking predictor's damage score, recommended candidate on top."""
    name = results["predictor"]
    by_label = {c["label"]: c for c in results["candidates"]}
    labels = results["ranking"]
    scores = [by_label[lb]["predictors"][name]["score"] for lb in labels]
    vals = [0.0 if s is None or not math.isfinite(s) else float(s) for s in scores]
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(labels) + 1.6))
    colors = ["C2"] + ["C0"] * (len(labels) - 2) + ["C3"] if len(labels) > 1 else ["C2"]
    ax.barh(range(len(labels)), vals, color=colors)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()  # the recommended candidate on top
    positive = [v for v in vals if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.set_xlabel(f"{name} damage score (higher = more predicted damage)")
    ax.set_title("Predicted damage (green: recommended, red: most damaging)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(results: dict[str, Any]) -> Report:
    cfg = results["config"]
    name = results["predictor"]
    rep = Report("alignscope rank")
    rep.text(
        f"Model `{cfg['model']}`, safety set `{cfg['safety']}`; {len(results['candidates'])} "
        f"candidates ({results['mode']}); optimizer {cfg['optimizer']}, batch "
        f"{cfg['batch_size']}, {cfg['steps']} planned steps; seed {cfg['seed']}. Ordered by "
        f"`{name}` ({results['predictor_descriptions'][name]})."
    )
    params = results.get("parameters")
    if params:
        adapter = params.get("adapter")
        what = f"the {adapter['type']} adapter weights" if adapter else "the selected weights"
        rep.text(
            f"Analysed: {what}, {params['n_params']:,} parameters in "
            f"{len(params.get('modules', []))} modules (`--params {' '.join(params['spec'])}`)."
        )
    rep.heading("Summary")
    rep.text(results["summary"])
    rep.image(CHART, f"{name} per candidate, recommended first")
    rep.heading("Every predictor, side by side")
    names = list(results["predictor_descriptions"])
    by_label = {c["label"]: c for c in results["candidates"]}
    rows = []
    for pos, label in enumerate(results["ranking"], 1):
        c = by_label[label]
        rows.append([pos, label, *[c["predictors"][n]["value"] for n in names]])
    rep.table(["#", "candidate", *names], rows)
    rep.text(
        "Values as measured: collapse steps are optimizer steps (none: not predicted within the "
        "forecast's horizon or the budget); lookahead_kl_measured is the alignment KL "
        "(nats/token) measured after the short trial run; lookahead_kl is its trend "
        "extrapolated to the budget (a ranking score, not a calibrated KL)."
    )
    rep.heading("Predictors")
    rep.table(
        ["predictor", "what", "median cost per candidate (s)"],
        [
            [
                n,
                results["predictor_descriptions"][n],
                _median([c["predictors"][n]["seconds"] for c in results["candidates"]]),
            ]
            for n in names
        ],
    )
    shared = ", ".join(f"{k} {v:.1f} s" for k, v in results["shared_timings_s"].items())
    rep.text(f"One-off work per model: {shared or 'none'}.")
    return rep


def _median(values: list[Any]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def write_rank_outputs(results: dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write results.json, report.md, report.html and the chart atomically (never overwriting
    unless ``overwrite``)."""
    with OutputDir(out, overwrite=overwrite) as od:
        rank_chart(od.file(CHART), results)
        write_json_atomic(od.file("results.json"), results)
        rep = build_report(results)
        od.file("report.md").write_text(rep.markdown(), encoding="utf-8")
        od.file("report.html").write_text(rep.html(), encoding="utf-8")
    return Path(out)
