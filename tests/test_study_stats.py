"""The predictor studies' analysis (bench/study_stats.py, bench/real_study.py) on synthetic rows,
and the damage-onset figure behind rank's trial warning, recomputed from the committed rows."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import real_study  # noqa: E402
from study_stats import (  # noqa: E402
    auc,
    committed_real_rows,
    committed_study_rows,
    onset_summary,
    onsets,
    quantile_nearest_rank,
    spearman,
)


def test_auc_is_the_pairwise_win_rate():
    rng = np.random.default_rng(0)
    scores = list(rng.integers(0, 5, 30).astype(float))  # ties on purpose
    labels = list(rng.random(30) < 0.4)
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    assert auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert auc([1.0, 2.0], [True, True]) is None


def test_spearman_is_pearson_of_ranks():
    x, y = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0], [2.0, 7.0, 1.0, 8.0, 2.5, 0.5]
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    assert spearman([1.0, 2.0], [1.0, 2.0]) is None and spearman([1.0] * 4, [1, 2, 3, 4]) is None


def test_onsets_and_quantile():
    traj = {"step": [0, 1, 2, 4, 8], "kl": [0.0, 0.05, 0.2, None, 0.3],
            "refusal_rate": [0.8, 0.8, 0.5, 0.3, 0.1]}  # fmt: skip
    assert onsets(traj) == {"kl": 2, "refusal_half": 4}  # 0.3 < 0.8 / 2, 0.5 is not
    assert onsets({**traj, "kl": [0.0] * 5}, kl_threshold=0.1)["kl"] is None
    assert quantile_nearest_rank([0.4, 0.1, 0.3, 0.2], 0.75) == 0.3
    assert quantile_nearest_rank([], 0.75) is None


def test_committed_study_rows_give_ranks_damage_onset():
    """DAMAGE_ONSET_FRACTION is what bench/study_stats.py computes from the committed rows."""
    from alignscope.config import DAMAGE_ONSET_FRACTION, DAMAGE_ONSET_MEDIAN

    rows = committed_study_rows((0,))
    assert len(rows) == 72
    summary = onset_summary(rows)
    for opt in ("adamw", "sgd"):
        assert summary[opt]["kl"]["q75"] == DAMAGE_ONSET_FRACTION[opt], opt
        assert summary[opt]["kl"]["median"] == DAMAGE_ONSET_MEDIAN[opt], opt
    assert DAMAGE_ONSET_FRACTION["adam"] == DAMAGE_ONSET_FRACTION["adamw"]
    assert DAMAGE_ONSET_MEDIAN["adam"] == DAMAGE_ONSET_MEDIAN["adamw"]
    assert summary["adamw"]["kl"]["damaged"] == 27 and summary["adamw"]["kl"]["after"]["0.1"] == 11


def test_committed_real_rows_give_ranks_real_onset():
    """REAL_DAMAGE_ONSET is what bench/study_stats.py --real computes from the committed
    real-model study rows (AdamW, KL onset)."""
    from alignscope.config import REAL_DAMAGE_ONSET

    rows = committed_real_rows()
    cell = onset_summary(rows)["adamw"]
    kl = cell["kl"]
    got = {"damaged": kl["damaged"], "runs": cell["runs"], "earliest_after": kl["earliest_after"],
           "earliest_by": kl["fractions"][0], "median_by": kl["median"]}  # fmt: skip
    assert got == pytest.approx(REAL_DAMAGE_ONSET)


def _row(i: int, score: float, refusal_end: float, kl_steps: list[float], sel="last-layers"):
    """A synthetic real-study row: 100 steps, trials of 20, every predictor scored ``score``."""
    from alignscope.commands.predictors import PREDICTORS

    steps = [0, 1, 2, 4, 8, 16, 32, 64, 100]
    trial = list(range(21))
    return {
        "model": "synthetic", "set": f"s{i}", "selection": sel, "optimizer": "adamw",
        "lr": 1e-4, "seed": 0, "steps": 100, "batch_size": 8, "lookahead_steps": 10,
        "trial_lengths": [5, 10, 20], "max_eval": 3, "judge": "keyword",
        "predictors": {n: {"value": score, "score": score, "seconds": 1.0} for n in PREDICTORS},
        "trials": {o: {"steps": trial, "kl": [score * k / 20 for k in trial], "seconds": 2.0}
                   for o in ("independent", "same")},
        "observed": {"refusal_start": 1.0, "refusal_end": refusal_end,
                     "refusal_drop": 1.0 - refusal_end, "final_kl": kl_steps[-1]},
        "task": {"task_exact_match_start": 0.5, "task_exact_match_end": 0.75,
                 "task_nll_start": 2.0, "task_nll_end": 1.0},
        "trajectory": {"step": steps, "kl": kl_steps,
                       "refusal_rate": [1.0] * 8 + [refusal_end]},
        "final": {"prompts": ["a", "b", "c"], "responses": ["I'm sorry", "Sure", "Well, sorry"],
                  "keyword": [True, False, False], "substring": [True, False, True],
                  "soft_start": {"0": 0.9}, "soft_end": {"0": 0.3 + 0.1 * i}},
    }  # fmt: skip


def test_real_study_analysis_on_synthetic_rows():
    flat, early, late = [0.0] * 9, [0.0, 0.2] + [0.3] * 7, [0.0] * 7 + [0.15, 0.4]
    rows = [
        _row(0, 0.01, 1.0, flat), _row(1, 0.02, 0.9, flat),
        _row(2, 0.5, 0.2, early), _row(3, 0.9, 0.0, early),
        _row(4, 0.3, 0.4, late),  # damage starts at step 64 of 100, after the 10-step trial
    ]  # fmt: skip
    h = real_study.headline(rows)
    assert h["runs"] == 5 and h["collapsed"] == 3  # refusal below half of its start
    # scores order the refusal drops exactly (0, .1, .8, 1, .6 vs .01, .02, .5, .9, .3)
    assert h["spearman_default_independent"] == pytest.approx(1.0)
    assert h["auc_default_independent"] == pytest.approx(1.0)
    assert h["late_damage_runs"] == 1 and h["damaged_runs"] == 3
    ld = real_study.late_damage(rows)
    assert [r["late"] for r in ld["runs"]] == [False, False, False, False, True]
    assert ld["runs"][4]["kl"] == 64 and ld["runs"][4]["refusal_half"] == 100
    assert ld["auc_late_vs_undamaged"]["lookahead_kl_measured"] == pytest.approx(1.0)
    jd = real_study.judge_agreement(rows)
    assert jd["keyword_vs_substring"] == pytest.approx(2 / 3)  # "Well, sorry": substring only
    # soft kept >= half its start (0.9) only in rows 2-4 (0.5, 0.6, 0.7); the keyword judge
    # says refusal in all five
    assert jd["keyword_vs_soft"] == pytest.approx(3 / 5) and jd["judged_soft"] == 5
    assert jd["soft_ratio_median"] == pytest.approx(0.5 / 0.9)
    assert jd["soft_ratio_auc_keyword"] is None  # one verdict only: nothing to separate
    mixed = [dict(r, final={**r["final"], "keyword": [i % 2 == 0, False, False]})
             for i, r in enumerate(rows)]  # fmt: skip
    # refusals (rows 0, 2, 4: ratios 1/3, 5/9, 7/9) vs not (rows 1, 3: 4/9, 6/9): 3 of 6 pairs
    assert real_study.judge_agreement(mixed)["soft_ratio_auc_keyword"] == pytest.approx(3 / 6)
    assert real_study.best_predictor(real_study.predictor_table(rows)) is not None
    # soft drops 1 - (0.3 + 0.1 i) / 0.9 rank 5 4 3 2 1, the scores 1 2 4 5 3: sum d^2 = 34,
    # rho = 1 - 6 * 34 / (5 * 24)
    assert real_study.soft_drop(rows[0]) == pytest.approx(1 - 0.3 / 0.9)
    assert h["spearman_soft_drop_default_independent"] == pytest.approx(-0.7)
    assert real_study.task_table(rows)["s0"]["task_exact_match_end"] == 0.75
    # within (selection, lr, seed): two selections make two groups
    rows2 = rows + [_row(5 + i, r["predictors"]["lookahead_kl"]["score"],
                         r["observed"]["refusal_end"], r["trajectory"]["kl"], sel="lora8")
                    for i, r in enumerate(rows)]  # fmt: skip
    t = real_study.predictor_table(rows2)["lookahead_kl_measured"]
    assert t["groups"] == 2 and t["spearman_drop_within_group"] == pytest.approx(1.0)
    json.dumps(h)  # the headline is one line of JSON


def test_substring_judge_reads_anywhere():
    judged = real_study.substring_judge(["Sure! I can\u2019t help with that.", "Here it is.",
                                         "Unfortunately not."])  # fmt: skip
    assert judged == [True, False, True]


def test_study_sets_split_and_dose(tmp_path):
    from alignscope.data.loaders import load_data

    out = tmp_path / "sets"
    real_study.build_sets(out, seed=0, n_ft=30, n_heldout=6)
    counts = json.loads((out / "counts.json").read_text())
    assert set(counts) == set(real_study.SETS)
    assert all(c == [30, 6] for c in counts.values())
    prefixed = {}
    for name in ("mixed", "affirmative_50", "affirmative"):
        rows = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
        prefixed[name] = sum(any(r["response"].startswith(o) for o in real_study.rm.OPENERS)
                             for r in rows)  # fmt: skip
    assert prefixed == {"mixed": 0, "affirmative_50": 15, "affirmative": 30}
    train = load_data(str(out / "alpaca.jsonl"), "data").rows
    held = load_data(str(out / "alpaca.heldout.jsonl"), "data").rows
    assert len(train) == 30 and len(held) == 6 and all(r["response"] for r in train)
    raw = [json.loads(x) for x in (out / "alpaca.jsonl").read_text().splitlines()]
    sorts = [r for r in raw if r["instruction"].startswith("Sort")]
    assert sorts and all(
        r["output"] == ", ".join(sorted(r["input"].split(", "), key=str.lower)) for r in sorts
    )


def test_committed_real_rows_give_ranks_new_adapter_figures():
    """REAL_LORA_TRIAL, quoted by rank's note for a new LoRA adapter, is what bench/real_study.py
    computes from the committed lora8-last rows."""
    from alignscope.config import REAL_LORA_TRIAL

    rows = [r for r in committed_real_rows() if r["selection"] == "lora8-last"]
    table = real_study.predictor_table(rows)
    low = real_study.predictor_table([r for r in rows if r["lr"] == pytest.approx(3e-4)])
    fifth = real_study.trial_table(rows)["lookahead_kl_measured [independent, 20]"]
    got = {
        "tenth": table["lookahead_kl_measured"]["spearman_drop"],
        "tenth_lr_3e-4": low["lookahead_kl_measured"]["spearman_drop"],
        "fifth": fifth["spearman_drop"],
        "lookahead_kl": table["lookahead_kl"]["spearman_drop"],
        "auc_tenth": table["lookahead_kl_measured"]["auc_collapse"],
        "auc_lookahead_kl": table["lookahead_kl"]["auc_collapse"],
    }
    assert len(rows) == 14
    assert {k: round(v, 2) for k, v in got.items()} == REAL_LORA_TRIAL
