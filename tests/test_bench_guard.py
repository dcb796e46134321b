"""The analysis of bench/guard.py on synthetic rows: which unguarded run a guard's step time
and task are compared with, how seeds and organisms are pooled, when the target counts as
reached, and where a timing baseline is planned."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import guard as bench  # noqa: E402


def _row(guard="none", settings=None, *, kind="grid", organism="test", name="benign_affirmative",
         seed=0, process="A", sec=1.0, em=0.5, refusal_end=1.0, refusal_min=1.0):  # fmt: skip
    settings = settings or {}
    return {
        "kind": kind, "organism": organism, "set": name, "seed": seed, "guard": guard,
        "settings": settings, "label": bench.label(guard, settings), "process": process,
        "sec_per_step": sec, "task_em_end": em, "refusal_start": 1.0,
        "refusal_end": refusal_end, "refusal_min": refusal_min, "task_nll_end": 0.1,
    }  # fmt: skip


def test_step_cost_and_task_ratio_use_the_same_process_baseline():
    rows = bench.attach_baselines([
        _row(process="A", sec=1.0, em=0.5),
        _row(kind="baseline", process="B", sec=2.0, em=0.4),
        _row("anchor", {"anchor_beta": 1.0}, process="B", sec=3.0, em=0.5),
        _row("curvature", {"curvature_mu": 30.0}, process="C", sec=3.0, em=0.25),
    ])  # fmt: skip
    # the baseline row is a time base only, not a table row
    assert [r["guard"] for r in rows] == ["none", "anchor", "curvature"]
    none, anchor, curv = rows
    assert none["step_cost"] == 1.0 and none["same_process"]
    assert anchor["step_cost"] == pytest.approx(1.5) and anchor["same_process"]
    # against the baseline of its own process (same organism build): 0.5 / 0.4, not 0.5 / 0.5
    assert anchor["task_ratio"] == pytest.approx(1.25)
    assert curv["step_cost"] == pytest.approx(3.0) and not curv["same_process"]
    assert curv["task_ratio"] == pytest.approx(0.5)


def test_lora_rows_compare_with_the_lora_none():
    lora = {"lora_r": 8, "lr": 1e-2}
    rows = bench.attach_baselines([
        _row(em=0.5, sec=1.0),
        _row("none", lora, em=0.0, sec=2.0),
        _row("safe-lora", {**lora, "safe_lora_tau": 0.5}, em=0.2, sec=4.0),
    ])  # fmt: skip
    safe = rows[-1]
    assert safe["step_cost"] == pytest.approx(2.0)
    assert safe["task_ratio"] is None  # the LoRA none's exact match is 0: no ratio


def test_target_needs_every_seed_and_every_collapsing_set():
    g = ("curvature", {"curvature_mu": 30.0})
    runs = [_row(*g, name=n, seed=s) for n in bench.COLLAPSING for s in (0, 1, 2)]
    nones = [_row(name=n, seed=s) for n in bench.COLLAPSING for s in (0, 1, 2)]
    ok = bench.summarize(bench.attach_baselines(nones + runs))["curvature curvature_mu=30"]
    assert ok["reaches"] and ok["reached_runs"] == 9 and ok["seeds"] == [0, 1, 2]
    runs[4] = _row(*g, name=runs[4]["set"], seed=runs[4]["seed"], refusal_min=0.85)
    one_seed_dips = bench.summarize(bench.attach_baselines(nones + runs))
    s = one_seed_dips["curvature curvature_mu=30"]
    assert not s["reaches"] and s["reached_runs"] == 8 and s["refusal_min"] == 0.85
    # every run meets it, but benign_mix never ran: no verdict of "reached"
    partial = [r for r in runs if r["set"] != "benign_mix" and r["refusal_min"] == 1.0]
    s = bench.summarize(bench.attach_baselines(nones + partial))["curvature curvature_mu=30"]
    assert s["reached_runs"] == s["runs"] and not s["complete"] and not s["reaches"]


def test_pooling_weighs_cells_not_runs():
    # test organism: affirmative at seeds 0 (refusal 0) and 1 (refusal 1); demo: seed 0
    # (refusal 1). Mean over (organism, set) cells of the seed means: (0.5 + 1) / 2, not 2/3
    rows = [_row(seed=0), _row(seed=1), _row(organism="demo")]
    rows += [_row("project", {"guard_rank": 20}, seed=0, refusal_end=0.0),
             _row("project", {"guard_rank": 20}, seed=1, refusal_end=1.0),
             _row("project", {"guard_rank": 20}, organism="demo", refusal_end=1.0)]  # fmt: skip
    s = bench.summarize(bench.attach_baselines(rows))["project guard_rank=20"]
    assert s["refusal_end"] == pytest.approx(0.75)
    assert s["refusal_end_range"] == [0.0, 1.0]
    assert s["by_organism"]["test"]["refusal_end"] == pytest.approx(0.5)
    assert s["by_organism"]["demo"]["seeds"] == [0]


def test_baseline_planned_only_where_the_none_row_is_from_an_earlier_process():
    jobs = bench.plan({"test": [0]}, ["benign_affirmative"], "default",
                      ["none", "curvature", "safe-lora"], thesis=False)  # fmt: skip
    # nothing done: the plan's own none and LoRA none come first, no baseline
    assert [j[0] for j in bench.with_baselines(jobs, set(), 200, 32)] == ["grid"] * len(jobs)
    done = {("grid", "test", "benign_affirmative", 0, lab, 200, 32)
            for lab in ("none", "none lora_r=8 lr=0.01")}  # fmt: skip
    out = bench.with_baselines(jobs, done, 200, 32)
    kinds = [(j[0], bench.label(*j[4:])) for j in out]
    assert kinds.index(("baseline", "none")) < kinds.index(("grid", "curvature curvature_mu=30"))
    lora_base = kinds.index(("baseline", "none lora_r=8 lr=0.01"))
    assert lora_base < kinds.index(("grid", "safe-lora lora_r=8 lr=0.01 safe_lora_tau=0.5"))
    assert sum(k == "baseline" for k, _ in kinds) == 2


def test_best_guard_is_chosen_among_the_widest_coverage(tmp_path, capsys):
    import json

    rows = []
    for seed in (0, 1, 2):
        for n in bench.COLLAPSING:
            rows += [_row(name=n, seed=seed, refusal_end=0.0, refusal_min=0.0),
                     _row("anchor", {"anchor_beta": 1.0}, name=n, seed=seed)]  # fmt: skip
    # project-tracking ran on seed 0 only, with a better task ratio there
    rows += [_row("project-tracking", {"guard_rank": 20, "track_every": 10}, name=n, em=0.6)
             for n in bench.COLLAPSING]  # fmt: skip
    for r in rows:
        r.update(steps=200, optimizer="adamw", batch_size=16, lr=1e-3, max_eval=32, kl_end=0.0)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = bench.analyze(path, None, "partial")
    assert head["best_guard"] == "anchor anchor_beta=1"
    assert head["coverage"] == {"test": [0, 1, 2]}
    assert head["best_by_organism"]["test"]["reached_runs"] == 9
    assert set(head["target_reached_by"]) == {
        "anchor anchor_beta=1", "project-tracking guard_rank=20 track_every=10"}
    assert "project-tracking guard_rank=20 track_every=10 (test seed 0)" in capsys.readouterr().out


def test_thesis_answer_counts_only_sets_where_unguarded_training_moved_alignment():
    def pair(name, none_min, none_kl, proj_min):
        return [_row(kind="thesis", name=name, refusal_min=none_min) | {"kl_end": none_kl},
                _row("project", {"guard_rank": 20}, kind="thesis", name=name,
                     refusal_min=proj_min) | {"kl_end": 0.05}]  # fmt: skip

    rows = (pair("benign_affirmative", 0.0, 1.3, 0.0) + pair("benign_list", 0.5, 1.5, 1.0)
            + pair("benign_mix", 1.0, 0.01, 1.0))  # fmt: skip
    text = bench.thesis_answer(rows)
    assert "Not reliably: of the 2 thesis runs" in text
    assert "below 90% on 1: test affirmative" in text and "kept it on 1: test list" in text
    assert "mix" not in text  # unguarded, mix did not move: it tests nothing
    assert bench.thesis_answer(rows[:2]).split("? ")[1].startswith("No: of the 1")
    assert "Not tested" in bench.thesis_answer(pair("benign_mix", 1.0, 0.01, 1.0))


def test_grid_is_full_only_when_every_run_of_the_full_grid_is_there():
    jobs = bench.plan(bench.FULL["organisms"], list(bench.SETS), "all", list(bench.GRID),
                      thesis=False)  # fmt: skip
    rows = [_row(guard, settings, organism=preset, name=name, seed=seed)
            for _, preset, name, seed, guard, settings in jobs]  # fmt: skip
    assert bench.grid_coverage(rows) == "full"
    # every setting and every (organism, seed) and set present, one run missing: partial
    assert bench.grid_coverage(rows[:-1]) == "partial"
