"""results.json, report.md and report.html (with plots) for a diagnosis."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignscope.report.document import Code, Report
from alignscope.report.format import fmt, fmt_percent
from alignscope.report.output import SUBSPACE_FILE, OutputDir, save_subspace, write_json_atomic
from alignscope.report.plots import forecast_plot, spectrum_plot

if TYPE_CHECKING:
    from alignscope.geometry import Subspace


def _fmt_step(value: Any, horizon: Any) -> str:
    if value is None:
        return f"beyond the horizon ({horizon} steps)" if horizon is not None else "not reached"
    return fmt(value)


def build_report(results: dict[str, Any]) -> Report:
    """The diagnosis as a :class:`Report` (figures referenced by file name)."""
    cfg = results["config"]
    sub, verdict, fc = results["subspace"], results["verdict"], results["forecast"]
    aic = results["aic"]["optimizer_step"]
    rep = Report("alignscope diagnose")
    rep.text(
        "Model ", Code(cfg["model"]), ", safety set ", Code(cfg["safety"]),
        ", fine-tuning set ", Code(cfg["data"]),
        f"; optimizer {cfg['optimizer']} at lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f"{cfg['steps']} steps; {results['parameters']['n_params']:,} parameters analysed (",
        Code("--params " + " ".join(cfg["params"])), f"); seed {cfg['seed']}.",
    )  # fmt: skip
    rep.headline(
        [
            ("AIC holds", verdict["aic_holds"], "verdict.aic_holds"),
            ("deciding condition", verdict["deciding"], "verdict.deciding"),
            ("|P_d g| / |g| (optimizer step)", aic["Pg_ratio"], "aic.optimizer_step.Pg_ratio"),
            ("coupling ratio kappa", aic["kappa"], "aic.optimizer_step.kappa"),
            ("forecast horizon (steps)", fc.get("horizon_steps"), "forecast.horizon_steps"),
            (
                "forecast threshold step (dL_a > threshold)",
                _fmt_step(fc.get("collapse_step"), fc.get("horizon_steps")),
                "forecast.collapse_step",
            ),
        ]
    )
    rep.heading("Verdict")
    holds = "HOLDS" if verdict["aic_holds"] else "does not hold"
    rep.text(
        f"The Alignment Instability Condition {holds}"
        + (f" (fails: {', '.join(verdict['failed'])})" if verdict["failed"] else "")
        + f". Deciding condition: {verdict['deciding']}. "
        + f"Forecast threshold step (dL_a > {cfg['threshold']:g}; a loss threshold, not a "
        + "refusal collapse): "
        + _fmt_step(fc.get("collapse_step"), fc.get("horizon_steps"))
        + f"; steps the forecast can vouch for as safe: {fmt(fc.get('safe_steps'))}."
    )
    rep.table(
        ["condition", "measured", "threshold", "margin", "holds", "what"],
        [
            [name, c["value"], c["threshold"], c["margin"], c["holds"], c["what"]]
            for name, c in verdict["checks"].items()
        ],
    )
    rep.heading("Alignment")
    al = results["alignment"]
    rep.text(
        f"Reference: {al['reference']}; alignment loss: {al['loss']}; starting refusal rate "
        f"{fmt_percent(al['refusal_rate'])} on {al['n_prompts']} prompts. Refusal NLL at theta0: "
        f"{fmt(results['losses_at_theta0']['refusal_nll'])} nats/token."
    )
    rep.heading("Alignment subspace")
    rep.text(
        f"d = {sub['d']}: lambda_1 = {fmt(sub['lambda_1'])}, lambda_d = {fmt(sub['lambda_d'])}, "
        f"top-d explain {fmt_percent(sub['explained'])} of tr F = {fmt(sub['trace'])} "
        f"(tail mass {fmt(sub['tail_mass'])}); effective rank {fmt(sub['effective_rank'])}. "
        f"Solver: {sub['plan']}."
    )
    rep.image("spectrum.png", "Eigenvalues of the alignment Fisher; the dashed line marks d.")
    rep.heading("AIC quantities")
    grad = results["aic"]["gradient"]
    keys = [
        ("g_norm", "|g| (first-step direction)"),
        ("Pg_ratio", "|P_d g| / |g|"),
        ("random_Pg_ratio", "same for a random direction"),
        ("F_half_g", "|F^1/2 g|"),
        ("a_norm", "|a| = |H g|"),
        ("gamma", "gamma = |F^1/2 P_d a|"),
        ("kappa", "coupling ratio kappa"),
    ]
    step_label = "optimizer step" + (
        " (Adam: D g, approximate)" if cfg["optimizer"] != "sgd" else ""
    )
    rep.table(
        ["quantity", "gradient g", step_label],
        [[label, grad[k], aic[k]] for k, label in keys],
    )
    rep.heading("Forecast")
    rep.text(
        f"Validity horizon: {fmt(fc.get('horizon_steps'))} steps ({fc.get('horizon_reason')}). "
        "Threshold step (dL_a above the threshold): "
        f"{_fmt_step(fc.get('collapse_step'), fc.get('horizon_steps'))}. "
        + (
            "Adam/AdamW is modelled by a diagonal preconditioner (approximate). "
            if cfg["optimizer"] != "sgd"
            else ""
        )
        + "The curve is not extended beyond the horizon."
    )
    coeffs = fc.get("coefficients", {})
    if coeffs:
        rep.table(["coefficient", "value"], [[k, v] for k, v in coeffs.items()])
    rep.image("forecast.png", "Forecast alignment-loss increase over steps, with each term.")
    sgd = results.get("forecast_sgd")
    if sgd is not None:
        rep.text(
            "For comparison, plain SGD at the same learning rate: horizon "
            f"{fmt(sgd.get('horizon_steps'))} steps ({sgd.get('horizon_reason')}); threshold step "
            f"{_fmt_step(sgd.get('collapse_step'), sgd.get('horizon_steps'))}."
        )
        rep.image("forecast_sgd.png", "The same forecast for plain SGD (exact step mapping).")
    rep.heading("Timings")
    rep.table(["stage", "seconds"], [[k, v] for k, v in results["timings_s"].items()])
    rep.provenance(results)
    return rep


def write_diagnose_outputs(
    results: dict[str, Any],
    out: str | Path,
    overwrite: bool = False,
    subspace: Subspace | None = None,
) -> Path:
    """Write results.json, report.md/html, the plots and (given) subspace.pt atomically.

    ``subspace.pt`` holds the diagnosis' subspace (every computed eigenpair, trace and solver
    record) so ``verify --diagnosis`` can measure the drift into it without recomputing it.
    """
    with OutputDir(out, overwrite=overwrite) as od:
        if subspace is not None and subspace.vectors is not None:
            save_subspace(od.file(SUBSPACE_FILE), subspace)
        sub, fc = results["subspace"], results["forecast"]
        spectrum_plot(od.file("spectrum.png"), sub["eigenvalues"], sub["d"], sub["trace"])
        plots = [("forecast.png", fc, "")]
        if results.get("forecast_sgd") is not None:
            plots.append(("forecast_sgd.png", results["forecast_sgd"], "plain SGD"))
        for name, curve, label in plots:
            forecast_plot(
                od.file(name),
                curve["steps"],
                curve["dL"],
                curve.get("terms", {}),
                curve.get("horizon_steps"),
                results["config"]["threshold"],
                title="Alignment-loss forecast" + (f", {label}" if label else ""),
            )
        write_json_atomic(od.file("results.json"), results)
        build_report(results).write(od.staging)
    return Path(out)
