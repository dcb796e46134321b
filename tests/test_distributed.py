"""Data parallel over torch.distributed: the shards' weighted sums equal the whole batch's (in
one process, float64), and two gloo processes give the single-process diagnose, verify, rank and
guarded finetune, with rank 0 alone writing and a failure on one rank ending both with its
message."""

from __future__ import annotations

import json

import pytest
import torch

from alignscope import distributed as dist
from alignscope.curvature import FisherOperator, FunctionalLM
from alignscope.data.encode import batch_rows
from alignscope.geometry import finetune_gradient
from alignscope.params import select_params
from alignscope.train.loop import response_nll, shard_nll

SMALL = dict(max_safety=8, max_data=16, rank=4, threads=1, dtype="float64")


def _options(org, **kw):
    return dict(
        model=str(org.aligned_path), safety=str(org.datasets_path / "harmful_align.jsonl"),
        data=str(org.datasets_path / "benign_affirmative.jsonl"), lr=1e-3, batch_size=8,
        **SMALL, **kw,
    )  # fmt: skip


def _as_rank(monkeypatch, r: int, size: int) -> None:
    monkeypatch.setattr(dist, "rank", lambda: r)
    monkeypatch.setattr(dist, "world_size", lambda: size)


def test_shards_partition_the_examples(monkeypatch):
    parts = []
    for r in range(3):
        _as_rank(monkeypatch, r, 3)
        parts.append(list(dist.shard_range(8)))
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="2 safety prompts cannot be shared by 3 processes"):
        dist.shard_range(2, "safety prompts")


def test_helpers_are_the_identity_in_one_process():
    t = torch.arange(4.0)
    assert not dist.active() and dist.is_main() and dist.world_size() == 1
    assert dist.all_reduce_sum(t) is t and dist.all_gather_rows(t) is t
    assert dist.sharded_map(list(range(5)), lambda xs: [x * 2 for x in xs], 2) == [0, 2, 4, 6, 8]
    with dist.guard():
        pass


@pytest.fixture(scope="module")
def tiny(organism_test):
    model = organism_test.aligned_model().double()
    tok = organism_test.tokenizer()
    batch, _ = batch_rows(tok, organism_test.dataset("harmful_align")[:5], 64, "safety")
    flm = FunctionalLM(model, select_params(model, ["*layers.1.mlp.*"]))
    return model, flm, batch


def test_shard_weights_sum_to_the_whole_batch(tiny, monkeypatch):
    """What each rank computes on its shard, with the whole batch's weights, sums to the whole
    batch's Fisher products and forms, loss and gradient (float64)."""
    model, flm, batch = tiny
    n = batch.size
    shards = [batch.select(slice(0, 3)), batch.select(slice(3, 5))]
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(flm.dim, 3, generator=gen, dtype=torch.float64)
    whole = FisherOperator(flm, batch)
    parts = [FisherOperator(flm, s, n_total=n) for s in shards]
    torch.testing.assert_close(sum(p.matmat(v) for p in parts), whole.matmat(v), rtol=1e-10, atol=0)
    torch.testing.assert_close(sum(p.gram(v.T) for p in parts), whole.gram(v.T), rtol=1e-10, atol=0)
    rows = torch.cat([p.empirical_factor_rows() for p in parts])
    torch.testing.assert_close(rows, whole.empirical_factor_rows(), rtol=1e-10, atol=1e-14)
    loss = sum(flm.mean_nll(flm.theta0, s, n) for s in shards)
    torch.testing.assert_close(loss, flm.mean_nll(flm.theta0, batch), rtol=1e-12, atol=0)
    g = sum(finetune_gradient(flm, s, n) for s in shards)
    torch.testing.assert_close(g, finetune_gradient(flm, batch), rtol=1e-10, atol=1e-14)
    # a training step's loss: example and token weighting
    for weighting in ("example", "token"):
        shares = []
        for r in range(2):
            _as_rank(monkeypatch, r, 2)
            shares.append(shard_nll(model, batch, weighting))
        monkeypatch.undo()
        torch.testing.assert_close(sum(shares), response_nll(model, batch, weighting))


def test_sharded_parameters_are_refused():
    class FlatParameter(torch.nn.Parameter):
        pass

    layer = torch.nn.Linear(2, 2)
    layer.weight = FlatParameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="FSDP FlatParameter.*LoRA"):
        dist.check_unsharded(layer)
    layer = torch.nn.Linear(2, 2)
    layer.weight.ds_id = 3  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):
        dist.check_unsharded(layer)


def test_two_processes_equal_one(organism_test, tmp_path):
    """diagnose (command line), verify and rank (Python API) in two gloo processes: the
    single-process numbers, the same result on both ranks, files from rank 0 only."""
    from _ddp_commands import parity_worker, rank_summary, spawn, verify_summary
    from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose
    from alignscope.commands.rank import RankConfig, run_rank
    from alignscope.commands.verify import VerifyConfig, run_verify

    org = organism_test
    diag_opts = _options(org, optimizer="sgd", steps=60)
    verify_opts = _options(org, optimizer="adamw", steps=6, max_eval=4, checkpoint_every=1)
    sets = [str(org.datasets_path / f"{d}.jsonl") for d in ("benign_neutral", "benign_affirmative")]
    rank_opts = {**_options(org, steps=60, lookahead_steps=4), "data": sets}
    argv = ["diagnose", "--dtype", "float64", "--optimizer", "sgd", "--lr", "1e-3"]
    argv += ["--batch-size", "8", "--steps", "60", "--rank", "4", "--max-safety", "8"]
    argv += ["--max-data", "16", "--threads", "1"]
    argv += ["--model", diag_opts["model"], "--safety", diag_opts["safety"]]
    argv += ["--data", diag_opts["data"], "--out", str(tmp_path / "run{rank}")]
    spawn(parity_worker, argv, verify_opts, rank_opts, str(tmp_path))

    one = run_diagnose(DiagnoseConfig.from_options(**diag_opts), quiet=True)
    cli = [json.loads((tmp_path / f"cli{r}.json").read_text()) for r in (0, 1)]
    assert cli[0]["exit_code"] == 0 and cli[1]["exit_code"] == 0, cli
    assert "wrote" in cli[0]["output"] and "wrote" not in cli[1]["output"]
    assert not (tmp_path / "run1").exists()  # rank 1 writes nothing
    res = json.loads((tmp_path / "run0" / "results.json").read_text())
    assert res["environment"]["world_size"] == "2"
    torch.testing.assert_close(
        torch.tensor(res["subspace"]["eigenvalues"], dtype=torch.float64),
        one.subspace.values,
        rtol=1e-6,
        atol=0,
    )
    fc = one.forecast.to_dict()
    for got, want in zip(res["forecast"]["dL"], fc["dL"], strict=True):
        assert (got is None) == (want is None)
        assert got is None or got == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert res["aic"]["gradient"]["kappa"] == pytest.approx(one.aic_gradient.kappa, rel=1e-6)
    assert res["aic"]["noise_trace_F_Sigma"] == pytest.approx(one.noise_trace, rel=1e-6)
    assert res["alignment"]["responses"] == one.alignment.to_json()["responses"]

    ver = [json.loads((tmp_path / f"verify{r}.json").read_text()) for r in (0, 1)]
    assert ver[0] == ver[1]  # every rank returns the same result
    # the rerun on the partial folder resumed from its last checkpoint, with the same record
    assert ver[0]["resumed_from"] == 6 and (tmp_path / "partial" / "checkpoint.pt").is_file()
    assert ver[0]["again"]["trajectory"] == ver[0]["trajectory"]
    want = verify_summary(run_verify(VerifyConfig.from_options(**verify_opts), quiet=True))
    assert [r["step"] for r in ver[0]["trajectory"]] == [r["step"] for r in want["trajectory"]]
    for got, ref in zip(ver[0]["trajectory"], want["trajectory"], strict=True):
        for key, value in ref.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
            else:
                assert got[key] == value, key

    ranked = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranked[0] == ranked[1]
    want = rank_summary(run_rank(RankConfig.from_options(**rank_opts), quiet=True))
    assert ranked[0]["ranking"] == want["ranking"]
    for label, preds in want["values"].items():
        for name, value in preds.items():
            got = ranked[0]["values"][label][name]
            assert got == (pytest.approx(value, rel=1e-6, abs=1e-12) if value else value), name


def test_a_failure_on_one_rank_stops_both_with_its_message(organism_test, tmp_path):
    from _ddp_commands import cli_worker, spawn

    opts = _options(organism_test)
    argv = ["diagnose", "--model", opts["model"], "--safety", opts["safety"]]
    argv += ["--data", opts["data"], "--max-safety", "4", "--max-data", "4", "--rank", "2"]
    argv += ["--threads", "1", "--out", str(tmp_path / "run{rank}")]
    argv += ["--optimizer", "sgd", "--lr", "1e-3", "--batch-size", "4", "--steps", "10"]
    spawn(cli_worker, argv, str(tmp_path), 1, timeout=300)  # no hang: both end
    cli = [json.loads((tmp_path / f"cli{r}.json").read_text()) for r in (0, 1)]
    for info in cli:
        assert info["exit_code"] == 2, info
        assert "injected failure on rank 1" in info["output"], info
    assert "rank 1 failed: ValueError" in cli[0]["output"]
    assert not (tmp_path / "run0").exists() and not (tmp_path / "run1").exists()


def _guard_shares(guard, model, selection, batch, ranks: int, monkeypatch):
    """``(loss, task, gradient)`` of one guarded step summed over ``ranks`` simulated ranks
    (each rank's share, the collectives the identity: the parent sums)."""
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t)
    monkeypatch.setattr(dist, "all_reduce_float", lambda x: x)
    gen = getattr(guard, "gen", None)
    state = gen.get_state() if gen is not None else None
    total = [0.0, 0.0, torch.zeros(selection.size, dtype=torch.float64)]
    for r in range(ranks):
        _as_rank(monkeypatch, r, ranks)
        guard.shard_over_ranks(True)
        if gen is not None:
            gen.set_state(state)  # every rank draws the same anchor minibatch
        loss, task = guard.step_loss(model, batch, 1, "example")
        params = list(selection.tensors(model).values())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ])  # fmt: skip
        total = [total[0] + float(loss.detach()), total[1] + float(task.detach()), total[2] + flat]
    monkeypatch.undo()
    guard.shard_over_ranks(False)
    return total


def test_guard_shares_sum_to_the_single_process_step(monkeypatch):
    """Each guard's share of a step on each rank sums to its single-process loss and gradient
    (float64): the task loss and constrained-sft's token weights sharded with the batch, the
    anchor's safety minibatch sharded, the fisher penalty counted once; the curvature guard's
    and the project guards' Fisher products summed over the ranks."""
    from tests._tiny import random_batch, tiny_llama

    from alignscope.train.guards import (
        AnchorGuard,
        ConstrainedSFTGuard,
        FisherGuard,
        read_theta,
        write_theta,
    )
    from alignscope.train.guards.base import safety_fisher
    from alignscope.train.guards.curvature import FrozenFisher

    model = tiny_llama(0)
    selection = select_params(model, ["model.layers.1.mlp.*"])
    selection.train_only(model)
    safety, batch = random_batch(6, seed=3), random_batch(5, seed=4)
    theta0 = read_theta(model, selection)
    gen = torch.Generator().manual_seed(1)
    moved = theta0 + 0.05 * torch.randn(selection.size, generator=gen, dtype=torch.float64)
    guards = [AnchorGuard(beta=2.0, batch_size=5), FisherGuard(lam=3.0, method="exact"),
              ConstrainedSFTGuard(beta=0.5)]  # fmt: skip
    for guard in guards:
        write_theta(model, selection, theta0)
        guard.setup(model, selection, safety)
        write_theta(model, selection, moved)
        state = guard.gen.get_state() if isinstance(guard, AnchorGuard) else None
        loss, task = guard.step_loss(model, batch, 1, "example")
        params = list(selection.tensors(model).values())
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        if state is not None:
            guard.gen.set_state(state)
        for ranks in (2, 3):
            got = _guard_shares(guard, model, selection, batch, ranks, monkeypatch)
            assert got[0] == pytest.approx(float(loss.detach()), rel=1e-12), guard.name
            assert got[1] == pytest.approx(float(task.detach()), rel=1e-12), guard.name
            torch.testing.assert_close(got[2], grad, rtol=1e-10, atol=1e-14)
            if state is not None:
                guard.gen.set_state(state)
    # Fisher products of the curvature guard and of the project guards, summed over the ranks
    flm = FunctionalLM(model, selection)
    v = torch.randn(selection.size, generator=gen, dtype=torch.float64)
    whole = [FrozenFisher(flm, safety).matvec(v), safety_fisher(flm, safety).matvec(v)]
    monkeypatch.setattr(dist, "all_reduce_sum", lambda t: t)
    parts = [0.0, 0.0]
    for r in range(2):
        _as_rank(monkeypatch, r, 2)
        parts[0] = parts[0] + FrozenFisher(flm, safety, sharded=True).matvec(v)
        parts[1] = parts[1] + safety_fisher(flm, safety, sharded=True).matvec(v)
    monkeypatch.undo()
    for got, want in zip(parts, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_two_processes_finetune_as_one(organism_test, tmp_path):
    """A guarded finetune in two gloo processes: the anchor guard on the command line (rank 0
    alone writes) and the project guard from the Python API (its subspace from summed Fisher
    products) equal the single-process runs in float64: per-step losses and guard signals,
    the tracked KL, the final weights."""
    from _ddp_commands import finetune_summary, finetune_worker, spawn
    from alignscope.commands.finetune import FinetuneConfig, run_finetune
    from alignscope.config import STEP_CLOCKS

    org = organism_test
    common = dict(
        model=str(org.aligned_path), safety=str(org.datasets_path / "harmful_align.jsonl"),
        data=str(org.datasets_path / "benign_affirmative.jsonl"), optimizer="adamw", lr=1e-3,
        batch_size=8, steps=4, max_safety=8, max_eval=4, threads=1, dtype="float64",
        params=["*layers.1.mlp.*"],
    )  # fmt: skip
    anchor = dict(common, guard="anchor", guard_examples=4)
    project = dict(common, guard="project", guard_rank=4)
    # adaptive mode: the watcher warns at its first measurement past theta0 (the KL's threshold
    # is tiny) and switches the curvature guard on from update 1 (its F delta summed over ranks)
    adaptive = dict(common, guard="curvature", guard_examples=4, guard_adaptive=True,
                    adaptive_every=2, adaptive_floor=0.0, adaptive_kl=1e-12)  # fmt: skip
    argv = ["finetune", "--model", common["model"], "--safety", common["safety"]]
    argv += ["--data", common["data"], "--optimizer", "adamw", "--lr", "1e-3"]
    argv += ["--batch-size", "8", "--steps", "4", "--max-safety", "8", "--max-eval", "4"]
    argv += ["--threads", "1", "--dtype", "float64", "--params", "*layers.1.mlp.*"]
    argv += ["--guard", "anchor", "--guard-examples", "4", "--out", str(tmp_path / "run{rank}")]
    spawn(finetune_worker, argv, [project, adaptive], str(tmp_path))

    cli = [json.loads((tmp_path / f"cli{r}.json").read_text()) for r in (0, 1)]
    assert cli[0]["exit_code"] == 0 and cli[1]["exit_code"] == 0, cli
    assert "wrote" in cli[0]["output"] and "wrote" not in cli[1]["output"]
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run1.partial").exists()
    assert not (tmp_path / "run0.partial").exists()
    res = json.loads((tmp_path / "run0" / "results.json").read_text())
    assert res["environment"]["world_size"] == "2"

    def close(got, want, what):
        if isinstance(want, dict):
            assert set(got) == set(want), what
            for k in want:
                close(got[k], want[k], f"{what}.{k}")
        elif isinstance(want, list):
            assert len(got) == len(want), what
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                close(a, b, f"{what}[{i}]")
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-10, abs=1e-12), what
        else:
            assert got == want, what

    one = run_finetune(FinetuneConfig.from_options(**anchor), quiet=True)
    want = finetune_summary(one)
    got = {"steps": [{k: v for k, v in s.items() if k not in STEP_CLOCKS} for s in res["steps"]],
           "trajectory": [{k: r.get(k) for k in want["trajectory"][0]} for r in res["trajectory"]],
           "record": res["guard"]["record"]}  # fmt: skip
    close(got, {k: want[k] for k in got}, "anchor")
    assert all(s["anchor_kl"] > 0 for s in want["steps"][1:])
    from transformers import AutoModelForCausalLM

    saved = dict(
        AutoModelForCausalLM.from_pretrained(tmp_path / "run0" / "model").named_parameters()
    )
    for name, values in want["weights"].items():
        torch.testing.assert_close(saved[name].detach().reshape(-1), torch.tensor(values,
                                   dtype=torch.float64), rtol=1e-10, atol=1e-12)  # fmt: skip

    for i, (name, options) in enumerate((("project", project), ("adaptive", adaptive))):
        ft = [json.loads((tmp_path / f"finetune{r}_{i}.json").read_text()) for r in (0, 1)]
        assert ft[0] == ft[1], name  # every rank returns the same result
        want = finetune_summary(run_finetune(FinetuneConfig.from_options(**options), quiet=True))
        close(ft[0], want, name)
        if name == "project":
            assert all(s["removed_fraction"] > 0 for s in want["steps"])
        else:
            assert want["record"]["activated_at"] == 1 and want["steps"][-1]["quad"] > 0
