"""Frozen-prefix caching in training: steps, guards and the tracker equal the whole network.

Each case fine-tunes two copies of the same float64 model on the same seeded stream, one with
:class:`~alignscope.train.prefix.PrefixForward` and one without, and compares the per-step
losses and every final weight; the stream runs over the set more than once, so later epochs
run the suffix only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from _tiny import exact_float64, random_batch, random_pairs, tiny_llama
from alignscope.data.encode import EncodedPair, collate
from alignscope.params import select_params
from alignscope.train.guards import AdaptiveGuard, AnchorGuard, ConstrainedSFTGuard
from alignscope.train.loop import finetune, make_optimizer
from alignscope.train.prefix import PrefixForward, lm_logits
from alignscope.train.stream import TrainingStream
from alignscope.train.tracker import AlignmentTracker
from test_prefix_cache import tiny_gpt2, tiny_lora_last

TOL = dict(rtol=1e-10, atol=1e-12)
# Adam divides each gradient by its own root mean square: a coordinate whose gradient is zero
# up to rounding (GPT-2's key bias: softmax ignores it) moves by rounding / eps per step on
# either path, about 1e-9 over these runs (measured: 1.1e-9 once the cached path's loss sums the
# response positions only)
WEIGHTS_TOL = dict(rtol=1e-10, atol=3e-9)
CASES = {
    "llama_last": (lambda: tiny_llama(layers=3), ["model.layers.2.*", "lm_head.weight"], 2),
    "llama_two": (lambda: tiny_llama(layers=3), ["model.layers.1.mlp.*", "model.layers.2.*"], 1),
    "llama_lora": (tiny_lora_last, ["lora"], 2),
    "gpt2_last": (lambda: _no_dropout(tiny_gpt2()), ["transformer.h.2.*"], 2),
}


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def examples(n: int = 6, seed: int = 2) -> list[EncodedPair]:
    """Pairs of different lengths (so batches are padded to different widths)."""
    return random_pairs(n, seed)


def _train(model, spec, *, cached: bool, steps: int = 6, guard=None, safety=None, budget=2**30):
    """Losses, final parameters and the prefix forward of one AdamW run."""
    sel = select_params(model, spec)
    sel.train_only(model)
    prefix = PrefixForward.build(model, memory_budget=budget) if cached else None
    if guard is not None:
        guard.setup(model, sel, safety)
    opt = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], 0.05)
    stream = TrainingStream(examples(), batch_size=3, seed=0)
    torch.manual_seed(0)
    losses = finetune(
        model, None, None, steps, stream=stream, optimizer=opt, lr=0.05,
        loss_weighting="example", guard=guard, prefix=prefix,
    )  # fmt: skip
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, prefix


def _assert_same_run(a, b):
    torch.testing.assert_close(torch.tensor(a[0]), torch.tensor(b[0]), **TOL)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **WEIGHTS_TOL, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_equal_the_whole_network(case):
    build, spec, start = CASES[case]
    model = build()
    whole = _train(copy.deepcopy(model), spec, cached=False)
    cached = _train(copy.deepcopy(model), spec, cached=True)
    prefix = cached[2]
    assert prefix is not None and prefix.cache.start == start
    _assert_same_run(cached, whole)
    # 6 steps of 3 over 6 examples: after the first epoch the batches come from the cache
    assert prefix.n_suffix >= 1 and prefix.n_prefix < 6 and prefix.n_whole == 0
    moved = [n for n in whole[1] if not torch.equal(whole[1][n], model.state_dict()[n])]
    assert moved and all(n in set(select_params(model, spec).names) for n in moved)


@pytest.mark.parametrize("guard", ["anchor", "constrained-sft", "adaptive-anchor"])
def test_guarded_steps_equal_the_whole_network(guard):
    build, spec, _ = CASES["llama_last"]
    model = build()
    safety = random_batch(5, seed=4)

    def make():
        if guard == "anchor":
            return AnchorGuard(beta=0.5, batch_size=3, seed=1)
        if guard == "constrained-sft":
            return ConstrainedSFTGuard(beta=0.5)
        inner = AnchorGuard(beta=0.5, batch_size=3, seed=1)
        return AdaptiveGuard(inner, lambda: True)

    whole = _train(copy.deepcopy(model), spec, cached=False, guard=make(), safety=safety)
    g = make()
    cached = _train(copy.deepcopy(model), spec, cached=True, guard=g, safety=safety)
    _assert_same_run(cached, whole)
    assert g.prefix is None  # the loop hands the cache back
    prefix = cached[2]
    if "anchor" in guard:  # anchor replay: 5 safety prompts drawn 3 at a time, 6 times
        assert prefix.n_suffix >= 3
    assert prefix.n_whole == 0


def test_dropout_in_the_prefix_falls_back_to_the_whole_network():
    model = tiny_gpt2()  # GPT-2's default dropout 0.1 in its embeddings and layers
    spec = ["transformer.h.2.*"]
    whole = _train(copy.deepcopy(model), spec, cached=False)
    cached = _train(copy.deepcopy(model), spec, cached=True)
    _assert_same_run(cached, whole)  # same random draws: the whole network ran
    prefix = cached[2]
    assert prefix.n_whole == 6 and prefix.n_prefix == prefix.n_suffix == 0
    # in eval mode dropout is off and the cache applies
    batch = random_batch(3)
    ref = model(input_ids=batch.input_ids).logits
    select_params(model, spec).train_only(model)
    logits = PrefixForward.build(model).logits(batch)
    torch.testing.assert_close(logits, ref, **TOL)


def _real(batch, logits):
    """Logits at each example's real positions only (padding differs by design)."""
    keep = torch.arange(batch.input_ids.shape[1])[None] < batch.lengths[:, None]
    return logits[keep]


def test_cached_rows_in_new_batches_and_widths():
    model = tiny_llama(layers=3)
    sel = select_params(model, "model.layers.2.*")
    sel.train_only(model)
    prefix = PrefixForward.build(model, sel)
    ex = examples(6)
    order = sorted(range(6), key=lambda i: -ex[i].length)
    wide = collate([ex[i] for i in order[:3]])
    narrow = collate([ex[i] for i in (order[2], order[1], order[2])])  # cached, narrower
    shuffled = collate([ex[i] for i in (order[1], order[0], order[2])])  # cached, same width
    mixed = collate([ex[i] for i in (order[0], order[3], order[4])])  # two new examples
    for batch in (wide, narrow, shuffled, mixed):
        ref = model(input_ids=batch.input_ids).logits
        torch.testing.assert_close(_real(batch, prefix.logits(batch)), _real(batch, ref), **TOL)
    assert narrow.input_ids.shape[1] < wide.input_ids.shape[1]
    assert prefix.n_prefix == 2 and prefix.n_suffix == 2  # wide, and mixed's new rows
    # theta0 of the selection swapped in (a guard's reference) equals a functional call
    theta = {n: p.detach() + 0.1 for n, p in sel.tensors(model).items()}
    with torch.no_grad():
        ref = lm_logits(model, mixed, None, theta)
        torch.testing.assert_close(_real(mixed, lm_logits(model, mixed, prefix, theta)),
                                   _real(mixed, ref), **TOL)  # fmt: skip
    # a tensor outside the suffix cannot be swapped into the cache
    embed = {"model.embed_tokens.weight": model.model.embed_tokens.weight}
    assert prefix.logits(mixed, embed) is None and prefix.n_whole == 1


def test_budget_and_frozen_changes():
    model = tiny_llama(layers=3)
    sel = select_params(model, "model.layers.2.*")
    sel.train_only(model)
    assert PrefixForward.build(model, sel, memory_budget=0) is None
    tight = PrefixForward.build(model, sel, memory_budget=1)
    batch = random_batch(4)
    ref = model(input_ids=batch.input_ids).logits
    for _ in range(2):  # nothing fits: every call recomputes the prefix
        torch.testing.assert_close(_real(batch, tight.logits(batch)), _real(batch, ref), **TOL)
    assert tight.nbytes == 0 and tight.n_prefix == 2
    prefix = PrefixForward.build(model, sel)
    prefix.logits(batch)
    assert 0 < prefix.nbytes <= prefix.memory_budget
    with torch.no_grad():  # an optimizer touching a frozen tensor: the cache is dropped
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    ref = model(input_ids=batch.input_ids).logits
    torch.testing.assert_close(_real(batch, prefix.logits(batch)), _real(batch, ref), **TOL)
    assert prefix.n_prefix == 2
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # now trained: no cache
    assert prefix.logits(batch) is None


def test_no_frozen_prefix_means_no_cache():
    model = tiny_llama(layers=3)
    select_params(model, "model.layers.0.*").train_only(model)
    assert PrefixForward.build(model) is None
    late = tiny_llama(layers=3)
    select_params(late, "model.layers.2.*").train_only(late)
    assert PrefixForward.build(late) is not None
    # rotary tables that change with the sequence length: activations depend on the batch
    late.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    assert PrefixForward.build(late) is None
    with pytest.raises(ValueError, match="another model"):
        finetune(model, None, None, 1, stream=TrainingStream(examples(), 3, 0),
                 prefix=PrefixForward.build(tiny_llama(layers=3), select_params(
                     tiny_llama(layers=3), "model.layers.2.*")))  # fmt: skip


def test_tracker_computes_the_prefix_once_per_prompt_set():
    model = tiny_llama(layers=3)
    sel = select_params(model, "model.layers.2.*")
    sel.train_only(model)
    safety, held, ft = random_batch(4, seed=5), random_batch(3, seed=6), random_batch(3, seed=7)
    kw = dict(eval_batch=held, finetune_batch=ft, generate_refusals=False)
    trackers = [
        AlignmentTracker(model, None, sel, safety, prefix_memory_budget=budget, **kw)
        for budget in (0, 2**30)
    ]
    assert trackers[0].flm.prefix is None and trackers[1].flm.prefix is not None
    opt = make_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], 0.5)
    for step in range(3):
        recs = [t.measure(step) for t in trackers]
        for key in ("kl", "refusal_nll", "eval_kl", "eval_nll", "finetune_loss"):
            assert recs[1][key] == pytest.approx(recs[0][key], rel=1e-10, abs=1e-13), key
        if step == 0:
            computed = trackers[1].flm.prefix.n_computed
        opt.zero_grad()
        model(input_ids=ft.input_ids).logits.square().mean().backward()
        opt.step()
    assert recs[1]["kl"] > 1e-6  # the weights moved
    assert trackers[1].flm.prefix.n_computed == computed  # later records: the suffix only


def test_organism_verify_steps_equal_the_whole_network(organism_test):
    """The test organism in float64, its last layer trained on its own benign set."""
    from alignscope.train.stream import training_stream

    model = exact_float64(organism_test.aligned_model())
    tok = organism_test.tokenizer()
    n = model.config.num_hidden_layers
    spec = [f"model.layers.{n - 1}.*"]
    rows = organism_test.dataset("benign_affirmative")[:12]
    runs = []
    for cached in (False, True):
        work = copy.deepcopy(model)
        sel = select_params(work, spec)
        sel.train_only(work)
        prefix = PrefixForward.build(work, sel) if cached else None
        stream = training_stream(tok, rows, batch_size=4, seed=0, max_length=64)
        opt = make_optimizer("adamw", [p for p in work.parameters() if p.requires_grad], 1e-3)
        torch.manual_seed(0)
        losses = finetune(work, tok, None, 6, stream=stream, optimizer=opt, lr=1e-3,
                          loss_weighting="example", prefix=prefix)  # fmt: skip
        runs.append((losses, {k: v.detach().clone() for k, v in work.named_parameters()}, prefix))
    _assert_same_run(runs[1], runs[0])
    assert runs[1][2].n_suffix >= 1


def test_finetune_command_equals_its_run_without_the_cache(organism_test, tmp_path, monkeypatch):
    """``alignscope finetune`` (anchor guard, last layer) with and without --prefix-cache-gb."""
    import json

    from alignscope.commands.finetune import FinetuneConfig, run_finetune
    from alignscope.config import RuntimeSpec

    org = organism_test
    rows = org.dataset("benign_affirmative")[:16]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    n = org.aligned_model().config.num_hidden_layers
    built = []
    original = PrefixForward.build.__func__

    def build(cls, *args, **kwargs):
        built.append(original(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(PrefixForward, "build", classmethod(build))
    results = []
    for gb in (0.0, RuntimeSpec().prefix_cache_gb):
        cfg = FinetuneConfig.for_organism(
            org, "benign_affirmative", data=str(data), params=[f"model.layers.{n - 1}.*"],
            guard="anchor", guard_examples=4, steps=6, batch_size=8, lr=1e-3, max_safety=8,
            max_eval=4, threads=1, prefix_cache_gb=gb,
        )  # fmt: skip
        results.append(run_finetune(cfg, quiet=True))
    assert built[0] is None and built[1] is not None
    assert built[1].n_suffix >= 4 and built[1].n_whole == 0  # epochs 2-3 and anchor replay
    whole, cached = results
    for a, b in zip(cached.steps, whole.steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert a["anchor_kl"] == pytest.approx(b["anchor_kl"], rel=1e-4, abs=1e-9), a["step"]
    for a, b in zip(cached.trajectory, whole.trajectory, strict=True):
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-9), a["step"]
        assert a["refusal_rate"] == b["refusal_rate"]
