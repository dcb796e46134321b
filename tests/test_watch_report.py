"""alignscope report LOG.jsonl: plots and a table from a watch log."""

import json

from typer.testing import CliRunner

from alignscope.cli import app


def _log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_renders_a_watch_log(tmp_path):
    log = tmp_path / "alignscope_watch.jsonl"
    recs = [
        {"step": 8, "kl": 0.2, "refusal_rate": 0.25, "subspace_fraction": None,
         "warning": {"step": 8, "reasons": [], "message": "refusal_rate projected below 0.5"}},
        {"step": 0, "kl": 0.0, "refusal_rate": 1.0, "subspace_fraction": None, "warning": None},
        {"step": 4, "kl": 0.01, "refusal_rate": 0.9, "subspace_fraction": None, "warning": None},
    ]  # fmt: skip
    _log(log, recs)
    result = CliRunner().invoke(app, ["report", str(log)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "alignscope_watch-report"
    assert (out / "kl.png").stat().st_size > 0 and (out / "refusal_rate.png").exists()
    assert not (out / "subspace_fraction.png").exists()  # no subspace in this log
    md = (out / "report.md").read_text()
    assert "First early warning at step 8: refusal_rate projected below 0.5" in md
    assert "reasons" not in md  # the message, not the record's dict
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "4", "8"]  # sorted by step
    again = CliRunner().invoke(app, ["report", str(log)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_report_rejects_logs_that_are_not_watch_logs(tmp_path):
    empty, garbled = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("")
    garbled.write_text('{"kl": 1}\n')
    for path, message in ((empty, "empty"), (garbled, "no 'step'")):
        result = CliRunner().invoke(app, ["report", str(path)])
        assert result.exit_code == 2 and message in result.output
