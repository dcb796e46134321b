"""The index page over a folder of results: guarded runs get their own table."""

import json

from alignscope.report.index import build_index


def _write(path, data):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(data))


def test_guarded_runs_are_listed_apart_from_the_forecast_table(tmp_path):
    cfg = {"model": "org/aligned", "data": "sets/benign_affirmative.jsonl", "optimizer": "adamw",
           "lr": 1e-3, "seed": 0}  # fmt: skip
    _write(tmp_path / "ft", {
        "schema": "alignscope.finetune/1", "config": {**cfg, "guard": "anchor"},
        "summary": {"refusal_rate_start": 1.0, "refusal_rate_end": 0.875,
                    "refusal_rate_min": 0.8125, "kl_end": 0.0123, "task_loss_end": 0.25},
    })  # fmt: skip
    _write(tmp_path / "ver", {
        "schema": "alignscope.verify/2", "config": {**cfg, "guard": "project"},
        "scores": {"refusal_rate_start": 1.0, "refusal_rate_end": 0.0625},
        "trajectory": [{"step": 0, "refusal_rate": 1.0, "kl": 0.0, "finetune_loss": 2.0},
                       {"step": 200, "refusal_rate": 0.0625, "kl": 0.5, "finetune_loss": 0.5}],
    })  # fmt: skip
    html = build_index(tmp_path).html()
    assert "Guarded fine-tuning" in html
    assert "anchor" in html and "project" in html
    for number in ("0.875", "0.8125", "0.0123", "0.0625"):
        assert number in html
    # a guarded verify run is not the unguarded outcome the forecast table scores
    assert "Per model and fine-tuning set" not in html
