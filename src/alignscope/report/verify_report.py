"""results.json, report.md and report.html (with plots) for a verify run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignscope.report.document import Code, Report
from alignscope.report.format import fmt
from alignscope.report.output import SUBSPACE_FILE, OutputDir, save_subspace, write_json_atomic
from alignscope.report.plots import forecast_plot, series_plot

if TYPE_CHECKING:
    from alignscope.geometry import Subspace


def build_report(results: dict[str, Any]) -> Report:
    """The verify run as a :class:`Report` (figures referenced by file name)."""
    cfg, sc, diag = results["config"], results["scores"], results["diagnosis"]
    fc = diag["forecast"]
    rep = Report("alignscope verify")
    rep.text(
        "Model ", Code(cfg["model"]), " fine-tuned on ", Code(cfg["data"]),
        f" with {cfg['optimizer']} at lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f"{sc['steps_run']} steps (weight decay 0); alignment set ", Code(cfg["safety"]),
        f"; refusal judge {results['judge']} on ", Code(cfg.get("eval_prompts") or cfg["safety"]),
        f"; seed {cfg['seed']}.",
        f" Resumed from a checkpoint at step {results['resumed_from_step']}."
        if results.get("resumed_from_step") else "",
    )  # fmt: skip
    rep.headline(
        [
            ("relative L2 error of dL_a", sc["relative_l2_error"], "scores.relative_l2_error"),
            ("forecast horizon (steps)", sc["horizon_steps"], "scores.horizon_steps"),
            (f"dL_a >= {sc['threshold']:g} at step, predicted", sc["threshold_step_predicted"],
             "scores.threshold_step_predicted"),
            (f"dL_a >= {sc['threshold']:g} at step, observed", sc["threshold_step_observed"],
             "scores.threshold_step_observed"),
            ("refusal rate at start", sc["refusal_rate_start"], "scores.refusal_rate_start"),
            ("refusal rate at end", sc["refusal_rate_end"], "scores.refusal_rate_end"),
        ]
    )  # fmt: skip
    rep.heading("How the forecast held")
    horizon = sc["horizon_steps"]
    rep.text(
        f"The forecast is valid up to step {fmt(horizon)} ({fc.get('horizon_reason')}); "
        f"{sc['window_points']} recorded step(s) fall inside that window. Relative L2 error of "
        f"dL_a over the window: {fmt(sc['relative_l2_error'])}. Predicted step where the "
        f"alignment loss crosses its threshold (dL_a >= {sc['threshold']:g}): "
        f"{fmt(sc['threshold_step_predicted'])} "
        f"({sc['threshold_status_predicted']}); observed: {fmt(sc['threshold_step_observed'])}"
        + (
            f" (first crossing in steps {sc['threshold_bracket_observed'][0]}.."
            f"{sc['threshold_bracket_observed'][1]})"
            if sc["threshold_bracket_observed"]
            else ""
        )
        + f". Refusal rate {fmt(sc['refusal_rate_start'])} -> {fmt(sc['refusal_rate_end'])}; "
        f"refusal collapse (rate below half its start) at step "
        f"{fmt(sc['refusal_collapse_step'])}."
        + (
            " The window is too short to fit a log-log exponent."
            if sc["exponent_observed"] is None
            else ""
        )
    )
    rows = [
        ["alignment loss", sc["alignment_loss"]],
        ["forecast horizon (steps)", horizon],
        ["recorded steps in window", sc["window_points"]],
        ["relative L2 error of dL_a (window)", sc["relative_l2_error"]],
        ["median relative error (window)", sc["median_relative_error"]],
        ["max relative error (window)", sc["max_relative_error"]],
        ["log-log exponent, observed (window)", sc["exponent_observed"]],
        ["log-log exponent, forecast fit (window)", sc["exponent_forecast_fit"]],
        ["log-log exponent, forecast local (median)", sc["exponent_forecast_local"]],
        ["observed exponent, steps 1..8 (may pass horizon)", sc["exponent_observed_steps_1_8"]],
        [f"dL_a >= {sc['threshold']:g} at step, predicted", sc["threshold_step_predicted"]],
        [f"dL_a >= {sc['threshold']:g} at step, observed", sc["threshold_step_observed"]],
        ["refusal rate start / end", f"{fmt(sc['refusal_rate_start'])} / "
         f"{fmt(sc['refusal_rate_end'])}"],
        ["refusal collapse step (rate below half its start)", sc["refusal_collapse_step"]],
        ["mean in-subspace fraction |P delta| / |delta|", sc["subspace_fraction_mean"]],
    ]  # fmt: skip
    rep.table(["score", "value"], rows)
    rep.image("dL_observed.png", "Predicted (line) vs observed (dots) dL_a, linear and log-log.")
    rep.image("refusal_rate.png", "Refusal rate by greedy generation over fine-tuning steps.")
    if sc["subspace_fraction"]:
        rep.image("subspace_fraction.png", "Fraction of the displacement in the subspace.")
    rep.heading("Trajectory")
    keys = ["step", "kl", "refusal_nll", "finetune_loss", "refusal_rate", "displacement",
            "subspace_fraction", "fisher_drift"]  # fmt: skip
    traj = results["trajectory"]
    shown = [k for k in keys if k == "step" or any(r.get(k) is not None for r in traj)]
    rep.table(shown, [[r.get(k) for k in shown] for r in traj])
    empty = [k for k in keys if k not in shown]
    if empty:
        rep.note(f"Not measured in this run (no value at any step): {', '.join(empty)}.")
    rep.heading("Per-step forecast vs observation")
    per = sc["per_step"]
    forecast_rows = [r for r in per if r["predicted"] is not None]
    if forecast_rows:
        rep.table(
            ["step", "predicted dL_a", "observed dL_a", "relative error"],
            [[r["step"], r["predicted"], r["observed"], r["rel_error"]] for r in forecast_rows],
        )
    rest = len(per) - len(forecast_rows)
    if not forecast_rows:
        rep.note(f"The forecast covers none of the {len(per)} recorded steps.")
    elif rest:
        last = max(r["step"] for r in forecast_rows)
        rep.note(
            f"The forecast ends at step {last}; the other {rest} recorded step"
            f"{'s are' if rest != 1 else ' is'} observations only (see the trajectory above)."
        )
    rep.heading("Timings")
    rep.table(["stage", "seconds"], [[k, v] for k, v in results["timings_s"].items()])
    rep.provenance(results)
    return rep


def write_verify_outputs(
    results: dict[str, Any],
    out: str | Path,
    overwrite: bool = False,
    subspace: Subspace | None = None,
) -> Path:
    """Write results.json, report.md/html, plots (and subspace.pt) atomically into ``out``."""
    with OutputDir(out, overwrite=overwrite) as od:
        sc, fc, traj = results["scores"], results["diagnosis"]["forecast"], results["trajectory"]
        per = sc["per_step"]
        forecast_plot(
            od.file("dL_observed.png"),
            fc["steps"],
            fc["dL"],
            {},
            fc.get("horizon_steps"),
            sc["threshold"],
            observed=([r["step"] for r in per], [r["observed"] for r in per]),
            title="Alignment-loss increase: forecast vs observed",
        )
        steps = [r["step"] for r in traj]
        series_plot(
            od.file("refusal_rate.png"),
            steps,
            {"refusal rate": [r.get("refusal_rate") for r in traj]},
            "refusal rate",
            "Refusal rate",
            hline=(sc["refusal_rate_start"] or 0) / 2 if sc["refusal_rate_start"] else None,
            hline_label="half the start",
            ylim=(-0.02, 1.02),
        )
        if sc["subspace_fraction"]:
            series_plot(
                od.file("subspace_fraction.png"),
                sc["subspace_fraction_steps"],
                {"|P delta| / |delta|": sc["subspace_fraction"]},
                "in-subspace fraction",
                "Displacement in the alignment subspace",
            )
        if subspace is not None and subspace.vectors is not None:
            save_subspace(od.file(SUBSPACE_FILE), subspace)
        write_json_atomic(od.file("results.json"), results)
        build_report(results).write(od.staging)
    return Path(out)
