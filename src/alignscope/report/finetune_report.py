"""The ``finetune`` report and output directory (model, results.json, report, plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignscope.config import STEP_CLOCKS
from alignscope.report.document import Code, Report
from alignscope.report.output import OutputDir, jsonable, write_json_atomic
from alignscope.report.plots import series_plot


def build_report(results: dict[str, Any]) -> Report:
    """The guarded fine-tuning run as a :class:`Report` (figures referenced by file name)."""
    cfg, sm, guard = results["config"], results["summary"], results["guard"]
    rep = Report("alignscope finetune")
    settings = ", ".join(f"{k} {v}" for k, v in guard["settings"].items()) or "no settings"
    rep.text(
        "Model ", Code(cfg["model"]), " fine-tuned on ", Code(cfg["data"]),
        f" with {cfg['optimizer']} at lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f"{sm['steps_run']} steps, under the guard ", Code(guard["name"]), f" ({settings}); "
        "alignment set ", Code(cfg["safety"]), f"; refusal judged on the {guard['eval_prompts']}"
        f" ({results['judge']}); seed {cfg['seed']}. The model is saved in ",
        Code(results.get("saved", "model") + "/"), ".",
    )  # fmt: skip
    heads = [
        ("refusal rate at start", sm["refusal_rate_start"], "summary.refusal_rate_start"),
        ("refusal rate at end", sm["refusal_rate_end"], "summary.refusal_rate_end"),
        ("lowest refusal rate", sm["refusal_rate_min"], "summary.refusal_rate_min"),
        ("alignment KL at end", sm["kl_end"], "summary.kl_end"),
        ("task loss at end", sm["task_loss_end"], "summary.task_loss_end"),
    ]
    has_task = sm.get("task_exact_match_end") is not None
    if has_task:
        heads += [
            ("held-out task exact match at start", sm["task_exact_match_start"],
             "summary.task_exact_match_start"),
            ("held-out task exact match at end", sm["task_exact_match_end"],
             "summary.task_exact_match_end"),
            ("held-out task NLL at end", sm["task_nll_end"], "summary.task_nll_end"),
        ]  # fmt: skip
    record = guard.get("record") or {}
    if record.get("adaptive"):
        heads.append(("guard switched on at step", record["activated_at"],
                      "guard.record.activated_at"))  # fmt: skip
    heads.append(("seconds per step", sm["seconds_per_step"], "summary.seconds_per_step"))
    rep.headline(heads)
    if record.get("adaptive"):
        warning = record.get("warning")
        rep.note(
            "Adaptive mode: the guard stayed off until the watcher's early warning ("
            + (f"step {record['activated_at']}: {warning['message']}); it ran from the next "
               "update on." if warning else "none came); it never ran.")
        )  # fmt: skip
    estimates = record.get("reestimations")
    if estimates:
        rep.heading("Subspace re-estimations")
        rep.table(
            ["before update", "reason", "rotation", "moved (|theta - theta_last| / |theta0|)",
             "Fisher products"],
            [[e["step"], e["reason"], e["rotation"], e["moved"], e["products"]]
             for e in estimates],
        )  # fmt: skip
    rep.image("loss.png", "Task loss (the minibatch's response NLL, without the guard's term)")
    rep.image("alignment.png", "Alignment KL on the safety set and refusal rate")
    rep.heading("Trajectory")
    cols = ["step", "alignment KL", "refusal NLL", "refusal rate", "displacement"]
    keys = ["kl", "refusal_nll", "refusal_rate", "displacement"]
    if has_task:  # the held-out split of the fine-tuning task
        cols += ["task exact match", "task NLL"]
        keys += ["task_exact_match", "task_nll"]
    rep.table(cols, [[r["step"], *(r.get(k) for k in keys)] for r in results["trajectory"]])
    recorded = {r["step"] for r in results["trajectory"]}
    signal_rows = [s for s in results["steps"] if s["step"] in recorded]
    first = signal_rows[0] if signal_rows else {}
    keys = [k for k in first if k not in ("step", "loss", *STEP_CLOCKS)]
    if keys:
        rep.heading("Guard signals")
        rep.table(["step", *keys], [[s["step"], *(s.get(k) for k in keys)] for s in signal_rows])
    if results.get("finalize"):
        rep.note(
            "The guard changed the weights after training (post hoc); the last trajectory row "
            "measures the saved model."
        )
    rep.heading("Timings")
    rep.table(["stage", "seconds"], [[k, v] for k, v in results["timings_s"].items()])
    rep.provenance(results)
    return rep


def write_finetune_outputs(result, out: str | Path, overwrite: bool = False) -> Path:
    """Write the fine-tuned model, results.json, report.md/html and plots atomically."""
    from alignscope.commands.finetune import save_model

    with OutputDir(out, overwrite=overwrite) as od:
        saved = save_model(result.model, result.tokenizer, od.staging)
        results = jsonable({**result.to_json(), "saved": saved})
        steps = results["steps"]
        series_plot(
            od.file("loss.png"), [s["step"] for s in steps],
            {"task loss": [s["loss"] for s in steps]}, "response NLL", "Task loss",
        )  # fmt: skip
        traj = [r for r in results["trajectory"] if not r.get("after_finalize")]
        series_plot(
            od.file("alignment.png"), [r["step"] for r in traj],
            {"alignment KL": [r["kl"] for r in traj],
             "refusal rate": [r.get("refusal_rate") for r in traj]},
            "KL (nats/token) / rate", "Alignment during fine-tuning",
        )  # fmt: skip
        write_json_atomic(od.file("results.json"), results)
        build_report(results).write(od.staging)
    return Path(out)
