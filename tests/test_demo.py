"""`alignscope demo --preset test`: the main job end to end (organism, diagnose, verify, rank)."""

import json

from typer.testing import CliRunner

from alignscope.cli import app


def test_demo_end_to_end_on_the_test_organism(organism_test, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "organism").mkdir(parents=True)
    (cache / "organism" / "test-seed0").symlink_to(organism_test.path)  # reuse, do not rebuild
    monkeypatch.setenv("ALIGNSCOPE_CACHE", str(cache))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--preset", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("benign_affirmative", "benign_neutral"):
        for part in ("diagnose", "verify"):
            assert (out / name / part / "results.json").exists()
    ver = json.loads((out / "benign_affirmative" / "verify" / "results.json").read_text())
    assert ver["scores"]["refusal_rate_end"] < 0.5  # the collapsing set collapses
    ranked = json.loads((out / "rank" / "results.json").read_text())
    assert ranked["most_damaging"] == "benign_affirmative"
    assert ranked["recommended"] != "benign_affirmative"
    assert (out / "rank" / "ranking.png").stat().st_size > 0
    assert "rank by lookahead_kl_measured" in result.output
