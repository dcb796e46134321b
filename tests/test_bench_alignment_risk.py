"""bench/alignment_risk.py's join of alignment-risk's rows with the study rows (no venv needed):
the real study's partial grid, its selection and seed filter; the organism's strict join."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import alignment_risk as ar  # noqa: E402  (bench/alignment_risk.py, not the PyPI package)


def _ar_row(name: str, lr: float, seed: int = 0, step: int | None = 50) -> dict:
    return {"set": name, "selection": "last-layers", "optimizer": "adamw", "lr": lr,
            "seed": seed, "steps": 100, "collapse_step": step,
            "forecast_loss_at_budget": 0.3, "overlap": 0.2, "gamma_hat": 4.0,
            "seconds": 30.0}  # fmt: skip


def _study_row(name: str, lr: float, seed: int = 0, selection: str = "last-layers",
               refusal_end: float = 0.2, tag: str = "") -> dict:  # fmt: skip
    steps = list(range(21))
    kl = [0.01 * k for k in steps]
    return {
        "set": name, "selection": selection, "optimizer": "adamw", "lr": lr, "seed": seed,
        "steps": 100, "lookahead_steps": 12, "tag": tag,
        "predictors": {"forecast_dL": {"value": 1.0, "score": 1.0, "seconds": 5.0}},
        "trials": {"independent": {"steps": steps, "kl": kl, "seconds": 20.0}},
        "observed": {"refusal_start": 0.8, "refusal_end": refusal_end,
                     "refusal_drop": 0.8 - refusal_end, "final_kl": 0.5},
        "trajectory": {"step": [0, 10, 100], "kl": [0.0, 0.05, 0.5],
                       "refusal_rate": [0.8, 0.7, refusal_end]},
    }  # fmt: skip


def test_real_join_matches_set_lr_seed_of_the_selection_and_skips_missing():
    study_rows = [
        _study_row("lists", 1e-4, refusal_end=0.2, tag="match"),
        _study_row("lists", 1e-4, selection="lora8", tag="other selection"),
        _study_row("lists", 1e-4, seed=1, tag="other seed"),
        _study_row("arithmetic", 3e-5, refusal_end=0.6, tag="match"),
        _study_row("alpaca", 1e-4, tag="no alignment-risk row"),
    ]
    ar_rows = [_ar_row("lists", 1e-4), _ar_row("arithmetic", 3e-5, step=None),
               _ar_row("mixed", 1e-4)]  # fmt: skip
    srows = ar.real_study_rows(study_rows, seed=0)
    assert sorted((r["set"], r["lr"]) for r in srows) == [
        ("alpaca", 1e-4),
        ("arithmetic", 3e-5),
        ("lists", 1e-4),
    ]
    rows = ar.joined(ar_rows, srows, key=ar.real_key, partial=True)
    # mixed has no study row yet: left out; lora8 and seed 1 never join
    assert [(r["set"], r["tag"]) for r in rows] == [("lists", "match"), ("arithmetic", "match")]
    lists, arith = rows
    # collapsed as the real study labels it: refusal at the end below half of its start
    assert lists["observed"]["collapsed"] and not arith["observed"]["collapsed"]
    assert lists["observed"]["collapse_step"] == 100  # first recorded step below half
    # alignment-risk's scores beside the study's own predictors, from the matching ar row
    assert lists["predictors"]["ar_collapse_step"]["score"] == pytest.approx(100 / 50)
    assert arith["predictors"]["ar_collapse_step"]["score"] == 0.0  # no step in its horizon
    assert lists["predictors"]["ar_gamma_lr"]["score"] == pytest.approx(1e-8 * 4.0)
    assert arith["predictors"]["ar_gamma_lr"]["score"] == pytest.approx(9e-10 * 4.0)
    assert lists["predictors"]["forecast_dL"]["score"] == 1.0
    # rank's trial predictor read at its default length (12 steps) of the independent trial
    assert lists["predictors"]["lookahead_kl_measured"]["value"] == pytest.approx(0.12)
    assert lists["ar"]["lr"] == 1e-4 and arith["ar"]["collapse_step"] is None


def test_organism_join_refuses_a_candidate_without_study_row():
    row = {"set": "benign_list", "optimizer": "sgd", "lr": 0.1, "seed": 0,
           "predictors": {}}  # fmt: skip
    a = {**_ar_row("benign_list", 0.1), "optimizer": "sgd"}
    assert ar.joined([a], [row])[0]["predictors"]["ar_overlap"]["score"] == 0.2
    with pytest.raises(SystemExit, match="no study row"):
        ar.joined([{**a, "lr": 0.3}], [row])
