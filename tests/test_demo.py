"""`alignscope demo --preset test`: the main job end to end (organism, diagnose, verify, rank,
the guarded fine-tuning run)."""

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
    # the guard section: the collapsing set again under the demo's guard, beside no guard
    runs = {
        folder: json.loads((out / "benign_affirmative" / folder / "results.json").read_text())
        for folder in ("guard", "unguarded")
    }
    guarded, unguarded = runs["guard"]["summary"], runs["unguarded"]["summary"]
    assert runs["guard"]["guard"]["name"] == "anchor"
    assert runs["unguarded"]["guard"]["name"] == "none"
    assert guarded["refusal_rate_end"] > unguarded["refusal_rate_end"]
    assert guarded["refusal_rate_end"] >= 0.8 and unguarded["refusal_rate_end"] < 0.2
    # the task is learnt under the guard too (held-out split of the same task)
    assert guarded["task_exact_match_end"] >= 0.95 * unguarded["task_exact_match_end"] > 0.5
    assert (out / "benign_affirmative" / "guard" / "report.html").is_file()
    assert "held-out task exact match" in result.output
    # one index page over every run, linking each run's report
    index = (out / "index.html").read_text()
    for rel in ("benign_affirmative/verify/report.html", "rank/report.html",
                "benign_affirmative/guard/report.html"):  # fmt: skip
        assert rel in index, rel
