"""Atomic result directories: never half-written, never silently lost."""

import json
import os

import pytest
import torch

from alignscope.report.output import OutputDir, load_subspace, save_subspace, write_json_atomic


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


def _subspace(**kw):
    from alignscope.geometry import Subspace

    gen = torch.Generator().manual_seed(0)
    vectors, _ = torch.linalg.qr(torch.randn(50, 5, generator=gen, dtype=torch.float64))
    values = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    return Subspace(values, vectors, 12.5, 0.25, "lanczos", **kw)


def test_subspace_file_reads_back_into_an_equal_subspace(tmp_path):
    sub = _subspace(plan="lanczos, 40 iterations", converged=True, max_residual=1e-9)
    save_subspace(tmp_path / "subspace.pt", sub)
    back = load_subspace(tmp_path / "subspace.pt")
    assert back == sub and back.vectors.dtype == torch.float64
    assert back != _subspace(plan="reused")  # the solver record is part of the subspace
    top = back.top(2)
    assert top.k == 2 and torch.equal(top.vectors, sub.vectors[:, :2]) and top.trace == 12.5


def test_subspace_file_of_the_earlier_layout_still_reads(tmp_path):
    sub = _subspace()
    torch.save({"basis": sub.vectors[:, :3], "values": sub.values[:3]}, tmp_path / "old.pt")
    back = load_subspace(tmp_path / "old.pt")
    assert torch.equal(back.basis(3), sub.vectors[:, :3]) and back.k == 3
    assert back.trace == pytest.approx(10.0) and back.plan is None
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a subspace file"):
        load_subspace(tmp_path / "other.pt")


def test_environment_records_the_tf32_setting():
    from alignscope.report.output import environment

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert environment()["tf32_matmul"] == str(flag)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert environment()["cuda"] == (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    )
