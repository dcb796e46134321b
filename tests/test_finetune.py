"""finetune: a guarded run end to end (outputs reload), prerequisite errors, verify --guard."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from alignscope.cli import app
from alignscope.commands.finetune import FinetuneConfig, run_finetune
from alignscope.commands.verify import VerifyConfig, run_verify
from alignscope.config import GUARD_NAMES
from alignscope.report.finetune_report import write_finetune_outputs
from alignscope.train.guards import GUARDS

FAST = dict(max_safety=12, max_eval=8, threads=1, optimizer="adamw", lr=1e-3, batch_size=16)


def _cfg(org, **kw) -> FinetuneConfig:
    options = dict(FAST, eval_prompts=str(org.datasets_path / "harmful_eval.jsonl"), steps=6)
    return FinetuneConfig.for_organism(org, "benign_affirmative", **{**options, **kw})


def test_the_config_names_every_guard():
    assert tuple(GUARDS) == GUARD_NAMES


def test_finetune_outputs_reload_with_transformers(organism_test, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(organism_test, guard="curvature", guard_examples=8)
    result = run_finetune(cfg, quiet=True)
    out = write_finetune_outputs(result, tmp_path / "ft")
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "alignscope.finetune/1" and res["saved"] == "model"
    assert res["guard"]["name"] == "curvature" and res["guard"]["settings"]["mu"] == 30.0
    assert res["config"]["guard"] == "curvature" and res["config"]["seed"] == 0
    assert [s["step"] for s in res["steps"]] == [1, 2, 3, 4, 5, 6]
    assert all(s["seconds"] > 0 and "quad" in s for s in res["steps"])
    # the process' CPU time per step beside the wall time, and its mean in the summary
    cpu = [s["cpu_seconds"] for s in res["steps"]]
    assert all(c > 0 for c in cpu)
    assert res["summary"]["cpu_seconds_per_step"] == pytest.approx(sum(cpu) / len(cpu))
    assert res["steps"][0]["quad"] == 0.0 < res["steps"][-1]["quad"]  # delta^T F delta / 2
    traj = res["trajectory"]
    assert traj[0]["step"] == 0 and traj[-1]["step"] == 6 and traj[0]["refusal_rate"] == 1.0
    assert res["summary"]["refusal_rate_end"] == traj[-1]["refusal_rate"]
    assert (out / "report.html").is_file() and (out / "alignment.png").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    for name, p in result.model.named_parameters():
        assert torch.equal(dict(reloaded.named_parameters())[name], p.detach()), name


def test_refusal_every_generates_at_every_nth_record_and_the_last(organism_test):
    from alignscope.commands.verify import refusal_steps

    assert refusal_steps([0, 1, 2, 3, 4, 6, 8], 3) == {0, 3, 8}
    assert refusal_steps({5, 0, 10}, 1) == {0, 5, 10}
    every = run_finetune(_cfg(organism_test, steps=6), quiet=True)
    sparse = run_finetune(_cfg(organism_test, steps=6, refusal_every=2), quiet=True)
    assert [r["step"] for r in sparse.trajectory] == [0, 1, 2, 3, 4, 6]
    rates = {r["step"]: r["refusal_rate"] for r in sparse.trajectory}
    assert rates[1] is None and rates[3] is None
    full = {r["step"]: r for r in every.trajectory}
    for r in sparse.trajectory:  # generation changes no training state: the same run
        assert r["kl"] == pytest.approx(full[r["step"]]["kl"], rel=1e-6), r["step"]
        if r["step"] in (0, 2, 4, 6):
            assert r["refusal_rate"] == full[r["step"]]["refusal_rate"], r["step"]
    assert sparse.summary()["refusal_rate_end"] == every.trajectory[-1]["refusal_rate"]


def test_safe_lora_run_saves_the_projected_adapter(organism_test, tmp_path):
    from peft import PeftModel

    org = organism_test
    cfg = _cfg(org, guard="safe-lora", base=str(org.base_path), lora_r=4, safe_lora_tau=1.0)
    result = run_finetune(cfg, quiet=True)
    layers = result.finalize["layers"]
    assert layers and all(r["projected"] for r in layers)  # tau = 1 projects every layer
    assert result.trajectory[-1]["after_finalize"]
    out = write_finetune_outputs(result, tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(org.aligned_model(), out / "adapter")
    got = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    want = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n].detach()) for n in want)
    assert result.finalize["projected"] == len(layers)


def test_prerequisites_fail_before_training(organism_test, tmp_path):
    org = organism_test
    with pytest.raises(ValueError, match="--base"):
        _cfg(org, guard="safe-lora").validate()
    with pytest.raises(ValueError, match="LoRA adapter"):
        _cfg(org, guard="safe-lora", base=str(org.base_path)).validate()
    with pytest.raises(ValueError, match="--guard"):
        _cfg(org, guard="orthogonal").validate()
    with pytest.raises(ValueError, match="--curvature-space weights needs a LoRA adapter"):
        _cfg(org, guard="curvature", curvature_space="weights").validate()
    with pytest.raises(ValueError, match="--curvature-space must be"):
        _cfg(org, guard="curvature", curvature_space="merged").validate()
    with pytest.raises(MemoryError, match="subspace"):
        run_finetune(_cfg(org, guard="project", memory_budget_gb=1e-4), quiet=True)
    runner = CliRunner()
    data = org.datasets_path
    args = ["finetune", "-m", str(org.aligned_path), "-s", str(data / "harmful_align.jsonl"),
            "-d", str(data / "benign_affirmative.jsonl"), "--guard", "safe-lora",
            "--base", str(org.base_path), "--out", str(tmp_path / "x")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "LoRA adapter" in result.output
    assert not (tmp_path / "x").exists()


def test_verify_runs_the_same_guarded_loop(organism_test):
    org = organism_test
    fast = dict(max_safety=12, max_data=24, noise_examples=8, rank=4, threads=1, max_eval=8)
    cfg = VerifyConfig.for_organism(org, "benign_affirmative", optimizer="adamw", lr=1e-3,
                                    batch_size=16, steps=4, guard="project", guard_rank=4,
                                    **fast)  # fmt: skip
    result = run_verify(cfg, quiet=True)
    assert result.to_json()["config"]["guard"] == "project"
    # the guard took the diagnosis' subspace: the displacement has no component in it
    assert result.trajectory[-1]["displacement"] > 0
    assert (
        result.trajectory[-1]["subspace_displacement"]
        <= 1e-5 * result.trajectory[-1]["displacement"]
    )


def test_resume_matches_an_uninterrupted_run(organism_test, tmp_path):
    from alignscope.evaluate import KeywordRefusalJudge

    # anchor draws its safety minibatches from a generator: its state is part of the checkpoint
    cfg = _cfg(organism_test, guard="anchor", guard_examples=4, steps=12, checkpoint_every=2)
    full = run_finetune(cfg, quiet=True)

    class Crash(RuntimeError):
        pass

    class CrashingJudge(KeywordRefusalJudge):
        n = 0

        def __call__(self, responses):
            CrashingJudge.n += 1
            if CrashingJudge.n == 7:  # while measuring the 7th recorded step
                raise Crash
            return super().__call__(responses)

    partial = tmp_path / "run.partial"
    with pytest.raises(Crash):
        run_finetune(cfg, judge=CrashingJudge(), partial_dir=partial, quiet=True)
    resumed = run_finetune(cfg, partial_dir=partial, quiet=True)
    # recorded steps 0 1 2 3 4 6 8 11 12, a checkpoint at every 2nd (steps 1, 3, 6); the crash
    # comes while measuring step 8
    assert resumed.resumed_from == 6
    assert [s["step"] for s in resumed.steps] == [s["step"] for s in full.steps]
    for a, b in zip(resumed.steps, full.steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["anchor_kl"] == pytest.approx(b["anchor_kl"], rel=1e-4, abs=1e-9), a["step"]
    assert [r["step"] for r in resumed.trajectory] == [r["step"] for r in full.trajectory]
    assert resumed.trajectory[-1]["kl"] == pytest.approx(full.trajectory[-1]["kl"], rel=1e-4)
    with pytest.raises(ValueError, match="other arguments"):
        run_finetune(cfg.with_options(lr=2e-3), partial_dir=partial, quiet=True)


def _cli_args(org, out, *extra) -> list[str]:
    data = org.datasets_path
    return ["finetune", "-m", str(org.aligned_path), "-s", str(data / "harmful_align.jsonl"),
            "-d", str(data / "benign_affirmative.jsonl"), "-e", str(data / "harmful_eval.jsonl"),
            "--max-eval", "8", "--max-safety", "12", "--threads", "1", "--optimizer", "adamw",
            "--lr", "1e-3", "--batch-size", "16", "--out", str(out), *extra]  # fmt: skip


def test_adaptive_mode_from_the_cli_switches_the_guard_on_at_the_warning(organism_test, tmp_path):
    # unguarded, benign_affirmative erases refusal between steps 10 and 20: the watcher's
    # first-token refusal trend warns before that (measured: at step 12, greedy refusal 100 %)
    out = tmp_path / "adaptive"
    args = _cli_args(organism_test, out, "--steps", "16", "--guard", "curvature",
                     "--guard-adaptive", "--adaptive-every", "2")  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    record = res["guard"]["record"]
    assert res["config"]["guard_adaptive"] is True and res["guard"]["name"] == "adaptive-curvature"
    warned = [r["step"] for r in record["watcher"]["records"] if r["warning"] is not None]
    assert warned, "the watcher never warned in 16 steps"
    on = record["activated_at"]
    assert on == warned[0] == record["warning"]["step"] and 0 < on < 16
    assert res["summary"]["guard_activated_at"] == on
    assert f"switched on by the watcher's warning at step {on}" in result.output
    # per-step rows (1-based: row k is update k - 1): off up to the warning, on after it
    for s in res["steps"]:
        assert s["active"] == (s["step"] > on), s
        assert ("quad" in s) == s["active"]  # the curvature guard's own signal only when on
    assert record["watcher"]["records"][0]["warning"] is None  # it did not warn at theta0
    html = (out / "report.html").read_text()
    assert "Adaptive mode" in html and "guard.record.activated_at" in html


def test_adaptive_mode_needs_a_guard_that_runs_during_training(organism_test, tmp_path):
    org = organism_test
    with pytest.raises(ValueError, match="--guard-adaptive needs a guard"):
        _cfg(org, guard_adaptive=True).validate()
    with pytest.raises(ValueError, match="safe-lora acts once after training"):
        _cfg(org, guard="safe-lora", base=str(org.base_path), lora_r=4,
             guard_adaptive=True).validate()  # fmt: skip


def test_verify_runs_a_guard_in_adaptive_mode(organism_test):
    org = organism_test
    fast = dict(max_safety=12, max_data=24, noise_examples=8, rank=4, threads=1, max_eval=8)
    # floor 1: the first-token refusal probability (< 1) is below it at the first measurement
    cfg = VerifyConfig.for_organism(org, "benign_affirmative", optimizer="adamw", lr=1e-3,
                                    batch_size=16, steps=3, guard="project", guard_rank=4,
                                    guard_adaptive=True, adaptive_floor=1.0,
                                    **fast)  # fmt: skip
    result = run_verify(cfg, quiet=True)
    guard = result.to_json()["guard"]
    assert guard["name"] == "adaptive-project" and guard["record"]["activated_at"] == 0
    last = result.trajectory[-1]
    assert last["subspace_displacement"] <= 1e-5 * last["displacement"]  # on from update 0


def test_adaptive_mode_resumes_with_the_watcher_state(organism_test, tmp_path, monkeypatch):
    from alignscope.train.watch import AlignmentWatcher

    cfg = _cfg(organism_test, guard="curvature", guard_adaptive=True, adaptive_every=2, steps=14,
               checkpoint_every=1)  # fmt: skip
    full = run_finetune(cfg, quiet=True)
    on = full.guard["record"]["activated_at"]
    assert on is not None and 8 < on < 14  # measured: the warning comes at step 12

    class Crash(RuntimeError):
        pass

    original = AlignmentWatcher.step

    def crashing(self, step, loss=None, **kw):
        if step == 9:  # after the checkpoint at recorded step 8, before the warning
            raise Crash
        return original(self, step, loss, **kw)

    partial = tmp_path / "run.partial"
    monkeypatch.setattr(AlignmentWatcher, "step", crashing)
    with pytest.raises(Crash):
        run_finetune(cfg, partial_dir=partial, quiet=True)
    monkeypatch.setattr(AlignmentWatcher, "step", original)
    resumed = run_finetune(cfg, partial_dir=partial, quiet=True)
    assert resumed.resumed_from == 8
    record = resumed.guard["record"]
    assert record["activated_at"] == on
    # the watcher's measurements before the crash came back from the checkpoint
    assert [r["step"] for r in record["watcher"]["records"]] == [
        r["step"] for r in full.guard["record"]["watcher"]["records"]
    ]
    assert [s["active"] for s in resumed.steps] == [s["active"] for s in full.steps]
    for a, b in zip(resumed.steps, full.steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
