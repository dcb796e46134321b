"""The tracker's shortcuts change nothing it records: the kept KL reference table, and the
reference responses judged at theta0 instead of generated again."""

import pytest
import torch

from _tiny import random_batch, tiny_llama
from alignscope.data.encode import batch_rows
from alignscope.evaluate import KeywordRefusalJudge, generate
from alignscope.params import select_params
from alignscope.train import tracker as tracker_module
from alignscope.train.loop import make_optimizer
from alignscope.train.tracker import AlignmentTracker

KEYS = ("kl", "refusal_nll", "eval_kl", "eval_nll", "finetune_loss")


def test_kept_kl_table_equals_the_recomputed_reference(monkeypatch):
    model = tiny_llama(layers=3)
    sel = select_params(model, "model.layers.2.*")
    sel.train_only(model)
    safety, held, ft = random_batch(4, seed=5), random_batch(3, seed=6), random_batch(3, seed=7)
    kw = dict(eval_batch=held, finetune_batch=ft, generate_refusals=False)
    kept = AlignmentTracker(model, None, sel, safety, **kw)
    monkeypatch.setattr(tracker_module, "KL_TABLE_BUDGET", 0)
    recomputed = AlignmentTracker(model, None, sel, safety, **kw)
    assert kept.kl.reference == kept.eval_kl.reference == "table"
    assert recomputed.kl.reference == recomputed.eval_kl.reference == "recompute"
    opt = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], 0.05)
    for step in range(3):
        recs = [t.measure(step) for t in (kept, recomputed)]
        for key in KEYS:
            assert recs[0][key] == pytest.approx(recs[1][key], rel=1e-12, abs=1e-15), key
        opt.zero_grad()
        model(input_ids=ft.input_ids).logits.square().mean().backward()
        opt.step()
    assert recs[0]["kl"] > 1e-6  # the weights moved


def test_reference_responses_stand_in_for_generation_at_theta0_only(organism_test):
    org = organism_test
    model, tok = org.aligned_model(), org.tokenizer()
    safety, _ = batch_rows(tok, org.dataset("harmful_align")[:4], 64, "safety")
    sel = select_params(model, ["all"])
    prompts = [r["prompt"] for r in org.dataset("harmful_eval")[:5]]
    greedy = generate(model, tok, prompts, max_new_tokens=8)
    calls = []

    class SpyJudge(KeywordRefusalJudge):
        def __call__(self, responses):
            calls.append(list(responses))
            return super().__call__(responses)

    kw = dict(eval_prompts=prompts, judge=SpyJudge(), max_new_tokens=8)
    given = AlignmentTracker(model, tok, sel, safety, initial_responses=greedy, **kw)
    generating = AlignmentTracker(model, tok, sel, safety, **kw)
    assert given.measure(0)["refusal_rate"] == generating.measure(0)["refusal_rate"]
    assert calls[0] == calls[1] == greedy  # the same responses judged
    # away from theta0 the given responses are stale: it generates
    with torch.no_grad():
        next(p for p in model.parameters() if p.dim() > 1).add_(0.5)
    given.measure(1)
    assert calls[2] == generate(model, tok, prompts, max_new_tokens=8) != greedy
    with pytest.raises(ValueError, match="one greedy response per eval prompt"):
        AlignmentTracker(model, tok, sel, safety, initial_responses=greedy[:2], **kw)
