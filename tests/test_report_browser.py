"""Every kind of report, from the test organism, opened in headless Chromium.

Checked as a reader sees them: no script or console errors, every plot loaded, nothing wider
than the page, no Markdown leaking into the text, and the headline numbers equal to the ones in
results.json. Screenshots are kept under test-artifacts/screenshots/ (not committed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _chromium import Browser, find_chromium
from alignscope.cli import app

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (install the distribution's chromium package, e.g. "
    "apt-get install chromium, or set $CHROMIUM): the reports are not checked in a browser",
)
ARTIFACTS = Path(os.environ.get("ALIGNSCOPE_TEST_ARTIFACTS", Path(__file__).parents[1]
                                / "test-artifacts")) / "screenshots"  # fmt: skip
FAST = dict(max_safety=12, max_data=24, noise_examples=8, rank=4, threads=1)

# What the page shows, read in the browser: its text, its images, elements running past the
# body (clipped by a scrolling ancestor such as a table's wrapper counts as inside), and the
# values tagged with where they come from in results.json.
INSPECT = r"""(() => {
  const body = document.body.getBoundingClientRect();
  const wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (!r.width) continue;
    let left = r.left, right = r.right;
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== 'visible') {
        const c = a.getBoundingClientRect();
        left = Math.max(left, c.left); right = Math.min(right, c.right);
      }
    }
    if (left < body.left - 1 || right > body.right + 1) {
      wide.push(`${el.tagName}.${el.className} ${Math.round(left)}..${Math.round(right)}`);
    }
  }
  return {
    text: document.body.innerText,
    images: [...document.images].map(i => ({src: i.getAttribute('src').slice(0, 30),
      complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
    wide,
    page: [document.documentElement.scrollWidth, document.documentElement.clientWidth],
    body: [body.left, body.right],
    keyed: [...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key,
      e.innerText.trim()]),
  };
})()"""


@pytest.fixture(scope="module")
def outputs(organism_test, tmp_path_factory):
    """diagnose, verify, rank and watch outputs of the test organism under one folder, and
    its index page: ``{kind: report page}``."""
    from alignscope.commands.diagnose import run_diagnose
    from alignscope.commands.finetune import FinetuneConfig, run_finetune
    from alignscope.commands.rank import RankConfig, run_rank
    from alignscope.commands.verify import VerifyConfig, run_verify
    from alignscope.organism.corpus import task_match
    from alignscope.report.diagnose_report import write_diagnose_outputs
    from alignscope.report.finetune_report import write_finetune_outputs
    from alignscope.report.rank_report import write_rank_outputs
    from alignscope.report.verify_report import write_verify_outputs
    from alignscope.train.loop import finetune
    from alignscope.train.watch import AlignmentWatcher

    org, root = organism_test, tmp_path_factory.mktemp("reports")
    ds = org.datasets_path
    cfg = VerifyConfig.for_organism(
        org, "benign_affirmative", optimizer="adamw", lr=1e-3, batch_size=16, steps=12,
        eval_prompts=str(ds / "harmful_eval.jsonl"), max_eval=8, seed=0, **FAST,
    )  # fmt: skip
    diagnosis = run_diagnose(cfg.diagnose_config())
    sub = diagnosis.subspace
    write_diagnose_outputs(diagnosis.to_json(), root / "affirmative" / "diagnose", subspace=sub)
    verified = run_verify(cfg, diagnosis=diagnosis)
    write_verify_outputs(verified.to_json(), root / "affirmative" / "verify")
    ranked = run_rank(
        RankConfig.from_options(
            model=cfg.model.model, safety=cfg.datasets.safety, lrs=[1e-3], optimizer="adamw",
            data=[str(ds / "benign_neutral.jsonl"), cfg.finetune.data], batch_size=16,
            steps=100, lookahead_steps=4, seed=0, **FAST),
        subspace=diagnosis.subspace, quiet=True,
    )  # fmt: skip
    write_rank_outputs(ranked.to_json(), root / "rank")
    # a guarded fine-tuning run: adaptive (floor 1: on from the first measurement), a tracking
    # guard (its re-estimations table), the held-out task split (the task headline)
    tuned = run_finetune(
        FinetuneConfig.for_organism(
            org, "benign_affirmative", optimizer="adamw", lr=1e-3, batch_size=16, steps=6,
            eval_prompts=str(ds / "harmful_eval.jsonl"), max_eval=8, max_safety=12, threads=1,
            guard="project-tracking", guard_rank=4, track_every=2, guard_adaptive=True,
            adaptive_floor=1.0, adaptive_every=2, max_task_eval=8,
        ),
        task_rows=org.heldout("benign_affirmative"), task_match=task_match, quiet=True,
    )  # fmt: skip
    write_finetune_outputs(tuned, root / "affirmative" / "finetune")
    # a real watch log: measurements around a few fine-tuning steps
    model, tok = org.aligned_model(), org.tokenizer()
    log = root / "watch" / "alignscope_watch.jsonl"
    watcher = AlignmentWatcher(model, tok, org.dataset("harmful_align")[:8], every=2,
                               generate_every=1, max_prompts=8, log_path=log)  # fmt: skip
    watcher.step(0)
    for step in (2, 4):
        finetune(model, tok, org.dataset("benign_affirmative"), 2, lr=1e-3, batch_size=8, seed=0)
        watcher.step(step, force=True)
    runner = CliRunner()
    for args in (["report", str(log)], ["report", str(root)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return root, {
        "diagnose": root / "affirmative" / "diagnose" / "report.html",
        "verify": root / "affirmative" / "verify" / "report.html",
        "finetune": root / "affirmative" / "finetune" / "report.html",
        "rank": root / "rank" / "report.html",
        "watch": root / "watch" / "alignscope_watch-report" / "report.html",
        "index": root / "index.html",
    }


@pytest.fixture(scope="module")
def browser():
    b = Browser(CHROMIUM)
    yield b
    b.close()


def _lookup(data, dotted: str):
    for part in dotted.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _same(shown: str, value) -> bool:
    """The page's text for a value equals the value (to the 4 digits pages show)."""
    if value is None:  # "n/a", "beyond the horizon (19 steps)", ...: never a number
        return _number(shown) is None
    if isinstance(value, bool):
        return shown == ("yes" if value else "no")
    if isinstance(value, int | float):
        x = _number(shown)
        return x is not None and math.isclose(x, value, rel_tol=5e-4, abs_tol=1e-12)
    return shown == str(value)


# Keys the headline of each page must show (so a page without them cannot pass).
HEADLINES = {
    "diagnose": {"verdict.aic_holds", "aic.optimizer_step.Pg_ratio", "forecast.collapse_step"},
    "verify": {"scores.relative_l2_error", "scores.threshold_step_observed",
               "scores.refusal_rate_end"},
    "rank": {"ranking.0", "predictor"},
    "finetune": {"summary.refusal_rate_end", "summary.kl_end", "summary.task_exact_match_end",
                 "guard.record.activated_at"},
    "index": {"affirmative/diagnose/results.json#verdict.aic_holds",
              "affirmative/verify/results.json#scores.relative_l2_error",
              "rank/results.json#ranking.0"},
}  # fmt: skip
MIN_IMAGES = {"diagnose": 2, "verify": 2, "rank": 1, "watch": 2, "index": 5, "finetune": 2}


@pytest.mark.parametrize("kind", ["diagnose", "verify", "rank", "watch", "index", "finetune"])
def test_report_reads_well_in_a_browser(outputs, browser, kind):
    root, pages = outputs
    page = browser.open(pages[kind])
    seen = page.evaluate(INSPECT)
    page.screenshot(ARTIFACTS / f"{kind}.png")
    assert page.errors() == []
    images = seen["images"]
    assert len(images) >= MIN_IMAGES[kind]
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    if kind != "index":  # a report travels alone: its plots are inside it
        assert all(i["src"].startswith("data:image/png;base64,") for i in images)
        assert "plots are embedded in this page" in seen["text"]
    assert seen["wide"] == [], seen["wide"]
    assert seen["page"][0] <= seen["page"][1]  # no horizontal scroll of the page itself
    text = seen["text"]
    for marker in ("`", "\\|", "**", "]("):
        assert marker not in text, f"raw Markdown {marker!r} in the {kind} page"
    keyed = dict(seen["keyed"])
    assert HEADLINES.get(kind, set()) <= set(keyed), sorted(keyed)
    for key, shown in seen["keyed"]:
        file, _, dotted = key.rpartition("#")
        results = pages[kind].parent / (file or "results.json")
        value = _lookup(json.loads(results.read_text()), dotted)
        assert _same(shown, value), (key, shown, value)
    if kind in ("diagnose", "verify", "rank", "finetune"):
        assert "Command line:" in text and "seed" in text and "torch" in text
    if kind == "finetune":  # adaptive mode and the tracking guard's re-estimations, stated
        res = json.loads((pages[kind].parent / "results.json").read_text())
        assert res["guard"]["record"]["activated_at"] == 0
        assert "Adaptive mode: the guard stayed off until the watcher's early warning" in text
        steps = [e["step"] for e in res["guard"]["record"]["reestimations"]]
        assert steps == [2, 4] and "Subspace re-estimations" in text
    if kind == "watch":
        records = [json.loads(line) for line in (root / "watch" / "alignscope_watch.jsonl")
                   .read_text().splitlines()]  # fmt: skip
        assert f"{len(records)} measurements" in text


def test_verify_page_summarises_steps_without_a_forecast(outputs):
    root, pages = outputs
    res = json.loads((pages["verify"].parent / "results.json").read_text())
    per = res["scores"]["per_step"]
    with_forecast = [r for r in per if r["predicted"] is not None]
    assert 0 < len(with_forecast) < len(per)  # the AdamW forecast covers the first steps only
    md = (pages["verify"].parent / "report.md").read_text()
    table = md.split("## Per-step forecast vs observation")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(with_forecast)
    last = max(r["step"] for r in with_forecast)
    rest = len(per) - len(with_forecast)
    assert f"The forecast ends at step {last}; the other {rest} recorded step" in table


def test_index_is_rerun_safe_and_keeps_foreign_pages(outputs, tmp_path):
    root, pages = outputs
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    result = CliRunner().invoke(app, ["report", str(root)])
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # only index.html
    foreign = tmp_path / "index.html"
    foreign.write_text("<html>someone else's page</html>")
    refused = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert foreign.read_text() == "<html>someone else's page</html>"
