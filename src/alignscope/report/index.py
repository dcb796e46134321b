"""``alignscope report DIR``: one index page over every alignscope output found under a folder.

Per model, fine-tuning set, optimizer and learning rate: the diagnosis's verdict, the verify
outcome and the set's place in each ranking, with links to each report and the key plots side
by side; then every ranking and every watch log. Links and plots are relative to the index, so
the page travels with its folder. It is written atomically and replaces only its own file.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignscope import __version__
from alignscope.report.document import Code, Figure, Keyed, Link, Report
from alignscope.report.output import write_text_atomic
from alignscope.report.watch_report import read_log

INDEX = "index.html"
_GENERATOR = '<meta name="generator" content="alignscope">'


@dataclass
class Result:
    """One results.json written by an alignscope command."""

    kind: str  # diagnose | verify | rank | ... (the schema's command name)
    path: Path  # the results.json
    data: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent


@dataclass
class WatchLog:
    path: Path
    records: list[dict[str, Any]]


@dataclass
class Found:
    results: list[Result] = field(default_factory=list)
    logs: list[WatchLog] = field(default_factory=list)

    def of(self, kind: str) -> list[Result]:
        return [r for r in self.results if r.kind == kind]


def _kind(schema: Any) -> str | None:
    # "alignscope.commands.diagnose/1" -> "diagnose"; anything not alignscope's -> None
    if not isinstance(schema, str) or not schema.startswith("alignscope"):
        return None
    return schema.split("/", 1)[0].rsplit(".", 1)[-1]


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root``, skipping hidden folders (OutputDir's staging and backup folders)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _is_watch_log(path: Path) -> bool:
    # The first record decides: data sets are JSONL too, and can be large.
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(rec, dict) and "step" in rec and "kl" in rec
    return False


def find_outputs(root: str | Path) -> Found:
    """Every alignscope results.json and watch log under ``root``, in path order."""
    found = Found()
    for path in _walk(Path(root)):
        if path.name == "results.json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            kind = _kind(data.get("schema")) if isinstance(data, dict) else None
            if kind is not None:
                found.results.append(Result(kind, path, data))
        elif path.suffix == ".jsonl" and _is_watch_log(path):
            try:
                found.logs.append(WatchLog(path, read_log(path)))
            except ValueError:
                continue
    return found


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _norm(name: Any) -> Any:
    # the same path written two ways ("runs/../d.jsonl", "d.jsonl/") is one data set
    return os.path.normpath(name) if isinstance(name, str) and name else name


def _short(path: Any) -> str:
    # the last two parts of a model's path ("org-test/aligned"); the full one is in each report
    return "/".join(Path(str(path)).parts[-2:])


def _run_key(cfg: dict[str, Any], data: str | None = None, lr: Any = None) -> tuple:
    lr = cfg.get("lr") if lr is None else lr
    return (_norm(cfg.get("model")), _norm(data or cfg.get("data")), cfg.get("optimizer"), lr)


def _guard(r: Result) -> str:
    return str(r.data.get("config", {}).get("guard") or "none")


def _guard_outcome(r: Result) -> list[tuple[str | None, Any]]:
    """(results.json key or None, value) of refusal start/end/min, KL and task loss at the end."""
    if r.kind == "finetune":
        s = r.data.get("summary", {})
        return [
            (f"summary.{k}", s.get(k))
            for k in ("refusal_rate_start", "refusal_rate_end", "refusal_rate_min", "kl_end",
                      "task_loss_end")
        ]  # fmt: skip
    s, traj = r.data.get("scores", {}), r.data.get("trajectory", [])
    rates = [t["refusal_rate"] for t in traj if t.get("refusal_rate") is not None]
    last = traj[-1] if traj else {}
    return [
        ("scores.refusal_rate_start", s.get("refusal_rate_start")),
        ("scores.refusal_rate_end", s.get("refusal_rate_end")),
        (None, min(rates) if rates else None),
        (None, last.get("kl")),
        (None, last.get("finetune_loss")),
    ]


def build_index(root: str | Path, index: str | Path | None = None) -> Report:
    """The index page for the outputs under ``root`` (links relative to ``index``'s folder)."""
    root = Path(root)
    base = Path(index).parent if index is not None else root
    found = find_outputs(root)
    rep = Report(f"alignscope results in {root.resolve().name or root}")
    rep.text("Every alignscope output found under ", Code(str(root)), ".")
    kinds = ("diagnose", "verify", "rank", "finetune")
    rep.headline(
        [(f"{k} runs", len(found.of(k)), None) for k in kinds]
        + [("watch logs", len(found.logs), None)]
    )

    def link(r: Result, text: str | None = None) -> Any:
        page = r.folder / "report.html"
        target = page if page.is_file() else r.path
        return Link(text or r.kind, _rel(target, base))

    def keyed(r: Result, dotted: str, value: Any) -> Keyed:
        return Keyed(value, f"{_rel(r.path, base)}#{dotted}")

    runs: dict[tuple, dict[str, list[Result]]] = {}
    guarded = [r for r in found.of("verify") if _guard(r) != "none"] + found.of("finetune")
    for r in found.of("diagnose") + found.of("verify"):
        if _guard(r) == "none":  # a guarded run is not the outcome the forecast is scored on
            runs.setdefault(_run_key(r.data["config"]), {}).setdefault(r.kind, []).append(r)
    places: dict[tuple, list[tuple[Result, int, int]]] = {}
    for r in found.of("rank"):
        cfg, ranking = r.data["config"], r.data["ranking"]
        for c in r.data["candidates"]:
            key = _run_key({**cfg, "lr": c.get("lr")}, c.get("data"), c.get("lr"))
            runs.setdefault(key, {})
            places.setdefault(key, []).append((r, ranking.index(c["label"]) + 1, len(ranking)))

    if runs:
        rep.heading("Per model and fine-tuning set")
        rows = []
        for key in sorted(runs, key=lambda k: tuple(str(x) for x in k)):
            model, data, optimizer, lr = key
            diag = runs[key].get("diagnose", [])
            ver = runs[key].get("verify", [])
            verdict = collapse = observed = err = refusal = "no run"
            if diag:
                d, fc = diag[-1], diag[-1].data["forecast"]
                verdict = keyed(d, "verdict.aic_holds", d.data["verdict"]["aic_holds"])
                step = fc["collapse_step"]
                if step is None:
                    step = f"beyond the horizon ({fc.get('horizon_steps')} steps)"
                collapse = keyed(d, "forecast.collapse_step", step)
            if ver:
                s = ver[-1].data["scores"]
                step = s["threshold_step_observed"]
                if step is None:
                    step = f"none in {s['steps_run']} steps"
                observed = keyed(ver[-1], "scores.threshold_step_observed", step)
                err = keyed(ver[-1], "scores.relative_l2_error", s["relative_l2_error"])
                refusal = keyed(ver[-1], "scores.refusal_rate_end", s["refusal_rate_end"])
            place = "; ".join(f"{pos} of {n} ({r.data['predictor']})"
                              for r, pos, n in places.get(key, []))  # fmt: skip
            links: list[Any] = []
            for r in diag + ver + [r for r, _, _ in places.get(key, [])]:
                links += [link(r), " "]
            rows.append([
                Code(_short(model)), Path(str(data)).stem,
                f"{optimizer} {lr:g}" if lr else optimizer,
                verdict, collapse, observed, err, refusal, place or "n/a", links[:-1] or "n/a",
            ])  # fmt: skip
        rep.table(
            ["model", "fine-tuning set", "optimizer, lr", "AIC holds", "forecast threshold step",
             "observed threshold step", "rel. L2 error of dL_a", "refusal rate at end",
             "place in ranking (1 = least damage)", "reports"],
            rows,
        )  # fmt: skip
        rep.note(
            "AIC and forecast: the latest diagnose run; observed threshold step, error and "
            "refusal: the latest verify run. Forecast and observed threshold step: the alignment "
            "loss increase dL_a crossing the run's threshold (not the refusal collapse)."
        )
        for key in sorted(runs, key=lambda k: tuple(str(x) for x in k)):
            figs = []
            for r in runs[key].get("diagnose", [])[-1:] + runs[key].get("verify", [])[-1:]:
                for name, caption in (
                    ("spectrum.png", "alignment Fisher spectrum"),
                    ("forecast.png", "forecast dL_a"),
                    ("dL_observed.png", "forecast vs observed dL_a"),
                    ("refusal_rate.png", "refusal rate"),
                ):
                    if (r.folder / name).is_file():
                        figs.append(Figure(_rel(r.folder / name, base), f"{r.kind}: {caption}"))
            if figs:
                model, data, optimizer, lr = key
                lr_text = f" at lr {lr:g}" if lr else ""
                rep.heading(f"{Path(str(data)).stem}: {optimizer}{lr_text}", level=3)
                rep.text("Model ", Code(str(model)), ", fine-tuning set ", Code(str(data)), ".")
                rep.gallery(figs)

    if guarded:
        rep.heading("Guarded fine-tuning")
        rows = []
        for r in guarded:
            cfg, out = r.data["config"], _guard_outcome(r)
            rows.append([
                Code(_short(cfg.get("model"))), Path(str(cfg.get("data"))).stem,
                f"{cfg.get('optimizer')} {cfg.get('lr'):g}", Code(_guard(r)), r.kind,
                *(keyed(r, key, value) if key else value for key, value in out),
                link(r, "report"),
            ])  # fmt: skip
        rep.table(
            ["model", "fine-tuning set", "optimizer, lr", "guard", "run", "refusal at start",
             "refusal at end", "lowest refusal", "KL at end", "task loss at end", "report"],
            rows,
        )  # fmt: skip
        rep.note(
            "Refusal: greedy refusal rate on the run's held-out harmful prompts; KL: the alignment "
            "KL (nats/token). A verify run with a guard is listed here, not beside its forecast."
        )

    if found.of("rank"):
        rep.heading("Rankings")
        for r in found.of("rank"):
            cfg = r.data["config"]
            order = [keyed(r, f"ranking.{i}", lb) for i, lb in enumerate(r.data["ranking"])]
            parts: list[Any] = ["Model ", Code(str(cfg["model"])), f", by {r.data['predictor']}: "]
            for i, part in enumerate(order):
                parts += [f"{i + 1}. ", part, ", " if i < len(order) - 1 else ""]
            rep.text(*parts, " (", link(r, "report"), ").")
            if (r.folder / "ranking.png").is_file():
                rep.gallery([Figure(_rel(r.folder / "ranking.png", base), "ranking")])

    if found.logs:
        rep.heading("Watch logs")
        rows = []
        for log in found.logs:
            recs = log.records
            warned = [r["step"] for r in recs if r.get("warning")]
            page = log.path.with_name(log.path.stem + "-report") / "report.html"
            rows.append([
                Link(_rel(log.path, root), _rel(log.path, base)), len(recs),
                f"{recs[0]['step']}..{recs[-1]['step']}", warned[0] if warned else "none",
                recs[-1].get("kl"),
                Link("report", _rel(page, base)) if page.is_file() else "n/a (render with "
                "alignscope report LOG)",
            ])  # fmt: skip
        rep.table(["log", "measurements", "steps", "first warning at step", "last KL", "report"],
                  rows)  # fmt: skip

    others = [r for r in found.results if r.kind not in kinds]
    if others:
        rep.heading("Other alignscope results")
        rep.table(["kind", "schema", "results"],
                  [[r.kind, Code(r.data["schema"]), link(r, _rel(r.path, root))]
                   for r in others])  # fmt: skip
    if not found.results and not found.logs:
        rep.note("No alignscope results.json or watch log was found here.")

    rep.heading("How this was made")
    rep.code(shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    rep.note(
        f"alignscope {__version__}. Each run's command line, seed and versions are in its own "
        "report. Links and plots are relative to this page: keep it in its folder."
    )
    return rep


def write_index(root: str | Path, index: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the index page atomically (default ``root/index.html``); a re-run replaces it.

    An existing file there that alignscope did not write is kept unless ``overwrite``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    target = Path(index) if index is not None else root / INDEX
    if target.exists() and not overwrite:
        head = target.read_text(encoding="utf-8", errors="replace")[:2000]
        if _GENERATOR not in head:
            raise FileExistsError(
                f"{target} exists and was not written by alignscope; pass --overwrite or --out"
            )
    write_text_atomic(target, build_index(root, target).html())
    return target
