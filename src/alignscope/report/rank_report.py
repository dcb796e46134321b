"""results.json, report.md and report.html (with a bar chart) for ``rank``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alignscope.report.document import Code, Report, code_spans
from alignscope.report.format import fmt
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
    """The ranking as a :class:`Report` (the chart referenced by file name)."""
    cfg = results["config"]
    name = results["predictor"]
    rep = Report("alignscope rank")
    rep.text(
        "Model ", Code(cfg["model"]), ", safety set ", Code(cfg["safety"]),
        f"; {len(results['candidates'])} candidates ({results['mode']}); optimizer "
        f"{cfg['optimizer']}, batch {cfg['batch_size']}, {cfg['steps']} planned steps; seed "
        f"{cfg['seed']}. Ordered by ", Code(name),
        f" ({results['predictor_descriptions'][name]}).",
    )  # fmt: skip
    ranking = results["ranking"]
    rep.headline(
        [
            ("recommended (least predicted damage)", ranking[0], "ranking.0"),
            ("most predicted damage", ranking[-1], f"ranking.{len(ranking) - 1}"),
            ("ranked by", name, "predictor"),
            ("candidates", len(results["candidates"]), None),
        ]
    )
    params = results.get("parameters")
    if params:
        adapter = params.get("adapter")
        what = f"the {adapter['type']} adapter weights" if adapter else "the selected weights"
        rep.text(
            f"Analysed: {what}, {fmt(params['n_params'])} parameters in "
            f"{len(params.get('modules', []))} modules (",
            Code("--params " + " ".join(params["spec"])), ").",
        )  # fmt: skip
    for warning in results.get("warnings") or ():
        rep.text(*code_spans("Warning: " + warning))
    for note in results.get("notes") or ():
        rep.text(*code_spans("Note: " + note))
    rep.heading("Summary")
    rep.text(*code_spans(results["summary"]))
    rep.image(CHART, f"{name} per candidate, recommended first")
    rep.heading("Every predictor, side by side")
    names = list(results["predictor_descriptions"])
    by_label = {c["label"]: c for c in results["candidates"]}
    rows = []
    for pos, label in enumerate(ranking, 1):
        c = by_label[label]
        rows.append([pos, label, *[c["predictors"][n]["value"] for n in names]])
    rep.table(["#", "candidate", *names], rows)
    rep.note(
        "Values as measured: collapse steps are optimizer steps (n/a: not predicted within the "
        "forecast's horizon or the budget); lookahead_kl_measured is the alignment KL "
        "(nats/token) measured after the short trial run; lookahead_kl is its trend "
        "extrapolated to the budget (a ranking score, not a calibrated KL)."
    )
    rep.heading("Refusal on held-out prompts")
    source = results.get("refusal") or {}
    if source.get("prompts"):
        rep.text(
            f"Refusal rate of {source['n_prompts']} prompts of ", Code(source["prompts"]),
            f" (--eval-prompts, {source['judge']}), {source['measured']}.",
        )  # fmt: skip
        rep.table(
            ["#", "candidate", "refusal at start", "after the trial run", "change"],
            [
                [
                    pos,
                    label,
                    r["start"],
                    r["after_trial"],
                    None
                    if r["start"] is None or r["after_trial"] is None
                    else r["after_trial"] - r["start"],
                ]  # fmt: skip
                for pos, label in enumerate(ranking, 1)
                if (r := by_label[label].get("refusal")) is not None
            ],
        )
    else:
        rep.text(
            "Not measured: the candidates' trial runs measured the alignment KL on the safety "
            "prompts only. Pass ", Code("--eval-prompts FILE"), " (held-out harmful prompts in "
            "any format of --safety-format) to measure the refusal rate before and after each "
            "trial run.",
        )  # fmt: skip
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
    shared = ", ".join(f"{k} {fmt(v)} s" for k, v in results["shared_timings_s"].items())
    rep.text(f"One-off work per model: {shared or 'none'}.")
    rep.provenance(results)
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
        build_report(results).write(od.staging)
    return Path(out)
