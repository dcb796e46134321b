"""watch: the Trainer callback and the plain watcher on the test organism (collapse or not)."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from alignscope.data.encode import encode_pairs
from alignscope.evaluate import judge_prompts
from alignscope.train.watch import (
    AlignmentCallback,
    AlignmentCollapseWarning,
    AlignmentWatcher,
    _trend,
    schedule_steps,
)

FLOOR = 0.5


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, tok, rows):
        self.enc = encode_pairs(tok, [(r["prompt"], r["response"]) for r in rows])

    def __len__(self):
        return len(self.enc)

    def __getitem__(self, i):
        e = self.enc[i]
        ids = e.prompt_ids + e.response_ids
        return {"input_ids": ids, "labels": [-100] * len(e.prompt_ids) + e.response_ids}


def _collator(pad_id):
    def collate(feats):  # right padding, no attention mask: how the organism was trained
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), pad_id, dtype=torch.long)
        labels = torch.full((len(feats), width), -100, dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
        return {"input_ids": ids, "labels": labels}

    return collate


def _train(org, tmp_path, dataset, *, model=None, steps=40, bind=False, **cb_kwargs):
    tok = org.tokenizer()
    model = model if model is not None else org.aligned_model()
    cb = AlignmentCallback(
        org.dataset("harmful_align")[:24],
        org.dataset("harmful_eval")[:24],
        tokenizer=tok,
        every=4,
        log_spaced=False,
        floor=FLOOR,
        **cb_kwargs,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=1e-3,
        max_steps=steps, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Pairs(tok, org.dataset(dataset)),
        data_collator=_collator(tok.pad_token_id),
        callbacks=[cb],
    )
    if bind:
        cb.bind(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    collapse = [w for w in caught if issubclass(w.category, AlignmentCollapseWarning)]
    return trainer, cb, collapse


def test_schedule_and_trend():
    early, every = schedule_steps(25)
    assert early == {0, 1, 2, 4, 8, 16} and every == 25
    assert schedule_steps(16)[0] == {0, 1, 2, 4, 8}
    assert schedule_steps(4, log_spaced=False) == ({0}, 4)
    # a line through (0, 1), (2, 0.8): 0.4 at step 6; an exponential through 1, 2, 4: 16 at 4
    assert _trend([(0, 1.0), (2, 0.8)], 6) == pytest.approx(0.4)
    assert _trend([(0, 1.0), (1, 2.0), (2, 4.0)], 4, log=True) == pytest.approx(16.0)
    assert _trend([(3, 1.0)], 6) is None


def test_callback_warns_before_collapse(organism_test, tmp_path):
    trainer, cb, caught = _train(organism_test, tmp_path, "benign_affirmative", steps=60)
    recs = cb.records
    assert [r["step"] for r in recs] == list(range(0, 61, 4))
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-7) and recs[0]["refusal_rate"] == 1.0
    # logged through the Trainer's history and the JSONL file, one line per measurement
    logged = [h for h in trainer.state.log_history if "alignscope/kl" in h]
    assert [h["step"] for h in logged] == [r["step"] for r in recs]
    assert logged[-1]["alignscope/kl"] == pytest.approx(recs[-1]["kl"])
    assert recs[-1]["kl"] > 0.1
    lines = (tmp_path / "alignscope_watch.jsonl").read_text().splitlines()
    assert [json.loads(line)["kl"] for line in lines] == [r["kl"] for r in recs]
    # greedy generation at every 4th measurement only (generate_every), soft_refusal at all
    assert [r["refusal_rate"] is not None for r in recs] == [i % 4 == 0 for i in range(16)]
    assert all(r["soft_refusal"] is not None for r in recs)
    crossed = next((r["step"] for r in recs if (r["refusal_rate"] or 1) < FLOOR), None)
    assert crossed is not None, [(r["step"], r["refusal_rate"]) for r in recs]
    warned = next(r["step"] for r in recs if r["warning"] is not None)
    assert warned < crossed, (warned, crossed)
    assert len(caught) == 1 and f"step {warned}:" in str(caught[0].message)
    assert trainer.state.global_step == 60  # no stop without stop_on_collapse


def test_callback_stops_and_saves_last_safe(organism_test, tmp_path):
    org = organism_test
    trainer, cb, caught = _train(org, tmp_path, "benign_affirmative", stop_on_collapse=True)
    w = cb.watcher
    assert w.should_stop and caught
    assert trainer.state.global_step == w.records[-1]["step"] < 40
    safe_dir = tmp_path / "last-safe"
    meta = json.loads((safe_dir / "alignscope_last_safe.json").read_text())
    assert meta["step"] == w.last_safe_step and meta["record"]["soft_refusal"] > FLOOR
    assert meta["record"]["refusal_rate"] is None or meta["record"]["refusal_rate"] > FLOOR
    safe = AutoModelForCausalLM.from_pretrained(safe_dir)
    rate = judge_prompts(safe, org.tokenizer(), org.dataset("harmful_eval"), max_new_tokens=16).rate
    assert rate > FLOOR
    # the saved weights are the kept ones, not the live (later) ones... unless they coincide
    live = dict(trainer.model.named_parameters())
    diff = max(float((p - live[n]).abs().max()) for n, p in safe.named_parameters())
    assert (diff > 0) == (w.last_safe_step < w.records[-1]["step"])


def test_callback_quiet_on_benign_neutral(organism_test, tmp_path):
    _, cb, caught = _train(organism_test, tmp_path, "benign_neutral")
    assert caught == [] and all(r["warning"] is None for r in cb.records)
    assert min(r["refusal_rate"] for r in cb.records if r["refusal_rate"] is not None) >= 0.9
    assert cb.records[-1]["kl"] > 0  # it did train


def test_callback_with_peft_lora(organism_test, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        organism_test.aligned_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    n_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    trainer, cb, _ = _train(
        organism_test, tmp_path, "benign_affirmative", model=model, steps=24, bind=True,
        keep_safe_state=True,
    )  # fmt: skip
    w = cb.watcher
    assert w.selection.size == n_lora and all("lora_" in n for n in w.selection.names)
    recs = cb.records
    assert [r["step"] for r in recs] == list(range(0, 25, 4))
    assert recs[-1]["kl"] > 0 and recs[-1]["displacement"] > 0
    logged = [h for h in trainer.state.log_history if "alignscope/kl" in h]
    assert len(logged) == len(recs) and "epoch" in logged[-1]  # went through trainer.log
    out = w.save_last_safe(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()


def test_plain_watcher_loop(organism_test, tmp_path):
    org = organism_test
    model, tok = org.aligned_model(), org.tokenizer()
    rows = [r["prompt"] for r in org.dataset("harmful_align")[:8]]  # responses generated
    w = AlignmentWatcher(model, tok, rows, every=4, log_path=tmp_path / "w.jsonl")
    assert w.step(0)["kl"] == pytest.approx(0.0, abs=1e-7)
    assert w.step(5) is None and w.step(8) is not None  # early: 0 1 2 3, then every 4
    assert w.records[-1]["refusal_rate"] is None  # generation at every 4th measurement
    assert w.step(9, force=True)["refusal_rate"] == 1.0
    assert w.records[-1]["subspace_fraction"] is None and w.records[-1]["forecast_kl"] is None
    assert len((tmp_path / "w.jsonl").read_text().splitlines()) == 3


def test_watcher_with_a_diagnosis(organism_test):
    """The subspace entries and the forecast's running error come from the diagnosis."""
    from alignscope.commands.diagnose import DiagnoseResult
    from alignscope.forecast import ForecastInputs, forecast
    from alignscope.geometry import Subspace
    from alignscope.train.loop import finetune

    org = organism_test
    model, tok = org.aligned_model(), org.tokenizer()
    dim = sum(p.numel() for p in model.parameters())
    basis, _ = torch.linalg.qr(torch.randn(dim, 4, generator=torch.Generator().manual_seed(0)))
    values = torch.tensor([3.0, 2.0, 1.0, 0.5])
    # dL = lr^2 k^2 g'Fg / 2 = 1e-4 k^2 over 6 steps (no curvature term: no horizon)
    inputs = ForecastInputs(gFg=2e-4, gFa=0.0, aFa=0.0, g_norm=1.0, a_norm=0.0)
    fc = forecast(inputs, lr=1.0, n_steps=6)
    # only what the watcher reads (the top-3 subspace and the forecast); the rest left empty
    empty = {f: None for f in ("config", "aic_gradient", "aic_step", "noise_trace",
             "noise_trace_preconditioned", "alignment", "forecast_sgd", "verdict", "parameters",
             "datasets", "memory", "losses_at_theta0", "timings")}  # fmt: skip
    diag = DiagnoseResult(subspace=Subspace(values, basis, 7.0, None, "test"), d=3, forecast=fc,
                          **empty)  # fmt: skip
    basis, values = basis[:, :3], values[:3]
    with pytest.raises(ValueError, match="not a diagnose result"):  # a dict: through from_json
        AlignmentWatcher(model, tok, org.dataset("harmful_align")[:8], diagnosis={"forecast": {}})
    w = AlignmentWatcher(model, tok, org.dataset("harmful_align")[:8], every=3, diagnosis=diag,
                         log_spaced=False)  # fmt: skip
    theta0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    finetune(model, tok, org.dataset("benign_affirmative"), 3, lr=1e-3, batch_size=8, seed=0)
    rec = w.step(3)
    delta = torch.cat([p.detach().flatten() for p in model.parameters()]) - theta0
    coeff = basis.T.double() @ delta.double()
    assert rec["subspace_fraction"] == pytest.approx(float(coeff.norm() / delta.double().norm()))
    assert rec["fisher_drift"] == pytest.approx(float((values.double() * coeff**2).sum().sqrt()))
    assert rec["forecast_kl"] == pytest.approx(9e-4)
    assert rec["forecast_rel_error"] == pytest.approx(abs(rec["kl"] - 9e-4) / 9e-4)
    assert w.step(12, force=True)["forecast_kl"] is None  # beyond the forecast's window


def test_callback_stop_reaches_a_second_process_by_broadcast(organism_test, tmp_path):
    """Two gloo processes (DDP on CPU): rank 0 measures and decides to stop; rank 1 never
    measures and stops at the same step on the broadcast alone."""
    import socket

    import torch.multiprocessing as mp

    from _ddp import ddp_worker

    with socket.socket() as sock:  # a free localhost port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    safety = organism_test.dataset("harmful_align")[:4]
    args = (port, str(organism_test.aligned_path), safety, str(tmp_path))
    # the worker lives in a small module: each spawned process imports only what it runs
    mp.spawn(ddp_worker, args=args, nprocs=2, join=True)
    main, other = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1))
    # rank 0: measured at 0, 4 and 8, saw the KL cross its threshold at 8 and stopped there
    assert main["has_watcher"] and main["measured"] == [0, 4, 8]
    assert main["warned_at"] == [8] and main["stopped_at"] == 8
    # rank 1: no watcher, no measurement, no log, no file; went on through the step-4 broadcast
    # (stop = 0) and stopped at step 8 with rank 0, which it could only learn from the broadcast
    assert not other["has_watcher"] and other["measured"] == [] and other["logged"] == 0
    assert other["syncs"] == main["syncs"] == [False, False, True]
    assert other["stopped_at"] == 8
    assert not (tmp_path / "rank1").exists()


def test_callback_with_trl_sft_trainer(organism_test, tmp_path):
    """TRL's SFTTrainer (prompt-completion chat rows, its own tokenization and loss masks)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    org = organism_test
    tok = org.tokenizer()
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]}
        for r in org.dataset("benign_affirmative")
    ])  # fmt: skip
    cb = AlignmentCallback(org.dataset("harmful_align")[:16], every=4, log_spaced=False)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=16, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=org.aligned_model(), args=args, train_dataset=ds, processing_class=tok,
        callbacks=[cb],
    )  # fmt: skip
    trainer.train()
    recs = cb.records
    assert [r["step"] for r in recs] == [0, 4, 8, 12]
    kls = [r["kl"] for r in recs]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls == sorted(kls) and kls[-1] > 1e-3
    logged = [h for h in trainer.state.log_history if "alignscope/kl" in h]
    assert [h["step"] for h in logged] == [0, 4, 8, 12]
    lines = (tmp_path / "alignscope_watch.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_watcher_computes_the_subspace_on_the_fly(organism_test):
    """Without a diagnosis, subspace_rank=k gives the top-k alignment Fisher eigenpairs at
    theta0: orthonormal, descending, and F v = lambda v for the exact Fisher on the safety set."""
    from alignscope.curvature import FisherOperator, FunctionalLM

    org = organism_test
    model, tok = org.aligned_model(), org.tokenizer()
    model.train()
    w = AlignmentWatcher(model, tok, org.dataset("harmful_align")[:8], subspace_rank=3, every=4)
    assert model.training  # left as the trainer had it
    basis, values = w.tracker.basis, w.tracker.eigenvalues
    assert basis.shape == (w.selection.size, 3) and w.subspace_seconds > 0
    gram = basis.double().T @ basis.double()  # a float32 basis: orthonormal to float32 accuracy
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64), atol=2e-4, rtol=0)
    assert values[0] >= values[1] >= values[2] > 0
    op = FisherOperator(FunctionalLM(model, w.selection), w.tracker.safety_batch)
    for j in range(3):
        fv = op.matvec(basis[:, j])
        assert float((fv - values[j] * basis[:, j]).norm()) < 1e-3 * float(values[j])
    assert w.step(0)["subspace_fraction"] is None  # no displacement yet
    model.train()


def test_sparse_refusal_rate_still_drives_the_trend(organism_test):
    """The greedy rate is measured at every generate_every-th record only; its trend uses its
    own last measurements, not the last `window` records (which would hold one value)."""
    import types

    org = organism_test
    w = AlignmentWatcher(org.aligned_model(), org.tokenizer(), org.dataset("harmful_align")[:4],
                         every=4, log_spaced=False)  # fmt: skip
    blank = {"soft_refusal": None, "kl": 0.0}
    w.records = [{"step": 0, "refusal_rate": 1.0, **blank},
                 *({"step": k, "refusal_rate": None, **blank} for k in (2, 4, 6))]  # fmt: skip
    warning = w._check({"step": 8, "refusal_rate": 0.6, **blank})  # 1.0 -> 0.6 over 8 steps
    assert warning is not None and warning["reasons"][0]["signal"] == "refusal_rate"
    assert warning["reasons"][0]["predicted"] == pytest.approx(0.6 - 0.05 * 8)  # horizon 2 x 4
    # the Trainer callback refuses sharded models rather than hang in a one-process forward
    cb = AlignmentCallback(org.dataset("harmful_align")[:4], every=4)
    args = types.SimpleNamespace(fsdp="full_shard", output_dir="unused")
    with pytest.raises(ValueError, match="FSDP"):
        cb.on_train_begin(args, types.SimpleNamespace(is_world_process_zero=True), None)


def test_watcher_drops_an_over_long_safety_prompt_with_a_count(organism_test):
    """A prompt that fills max_length is dropped and counted, as every command fits its data
    (the watcher used to raise on it)."""
    org = organism_test
    model, tok = org.aligned_model(), org.tokenizer()
    rows = [dict(r) for r in org.dataset("harmful_align")[:4]]
    lengths = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    max_length = max(lengths) + 12
    long = {"prompt": " ".join([rows[0]["prompt"]] * 6), "response": rows[0]["response"]}
    w = AlignmentWatcher(model, tok, [*rows, long], eval_rows=rows, every=4, max_length=max_length)
    assert w.datasets["safety"]["examples"] == 5 and w.datasets["safety"]["dropped"] == 1
    assert w.tracker.safety_batch.size == 4
    assert int(w.tracker.safety_batch.lengths.max()) <= max_length
    assert w.step(0)["kl"] == pytest.approx(0.0, abs=1e-7)
