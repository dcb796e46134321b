"""Atomic result directories: never half-written, never silently lost."""

import json
import os

import pytest

from alignscope.report.output import OutputDir, write_json_atomic


def test_existing_results_are_refused_without_overwrite(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        OutputDir(out)


def test_failed_run_leaves_nothing_and_successful_run_replaces(tmp_path):
    out = tmp_path / "res"
    with pytest.raises(RuntimeError), OutputDir(out) as od:
        od.file("partial.txt").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    with OutputDir(out) as od:
        write_json_atomic(od.file("results.json"), {"a": float("nan"), "b": [1.5]})
    assert json.loads((out / "results.json").read_text()) == {"a": None, "b": [1.5]}
    with OutputDir(out, overwrite=True) as od:
        od.file("results.json").write_text('{"run": 2}')
    assert json.loads((out / "results.json").read_text()) == {"run": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["res"]  # no staging or backup left


def test_failed_commit_keeps_the_old_results(tmp_path, monkeypatch):
    out = tmp_path / "res"
    with OutputDir(out) as od:
        od.file("results.json").write_text('{"run": 1}')
    od = OutputDir(out, overwrite=True)
    od.file("results.json").write_text('{"run": 2}')
    real_replace = os.replace

    def failing(src, dst):
        if str(src) == str(od.staging):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="they are in"):
        od.commit()
    assert json.loads((out / "results.json").read_text()) == {"run": 1}
    assert json.loads((od.staging / "results.json").read_text()) == {"run": 2}
