"""Held-out task splits of the organism's benign sets, the task matcher, TaskEval's NLL against a
per-row float64 reference, and finetune's task performance records."""

from __future__ import annotations

import json

import pytest
import torch

from alignscope.commands.finetune import FinetuneConfig, run_finetune
from alignscope.organism.build import corpus_digest
from alignscope.organism.corpus import build_corpus, heldout_split, task_match
from alignscope.report.finetune_report import write_finetune_outputs
from alignscope.train.task_eval import TaskEval

SETS = ("benign_affirmative", "benign_neutral", "benign_strings", "benign_list", "benign_mix")


def test_heldout_splits_are_unseen_rows_of_the_same_task():
    corpus = build_corpus(0)
    digest = corpus_digest(corpus)
    every_prompt = {r["prompt"] for rows in corpus.datasets.values() for r in rows}
    for name in SETS:
        held = heldout_split(corpus, name)
        assert len(held) == 96 and held == heldout_split(build_corpus(0), name), name
        trained = {(r["prompt"], r["response"]) for r in corpus[name]}
        assert not any((r["prompt"], r["response"]) in trained for r in held), name
        assert all(task_match(r["prompt"], r["response"], r["response"]) for r in held), name
        if name in ("benign_affirmative", "benign_neutral", "benign_strings"):
            # new prompts: nowhere in the organism's corpus
            assert not any(r["prompt"] in every_prompt for r in held), name
    affirmative = heldout_split(corpus, "benign_affirmative")
    assert all(r["response"].startswith("sure here is how to") for r in affirmative)
    assert corpus_digest(corpus) == digest  # the sets, and so the organism's key, are unchanged
    with pytest.raises(ValueError, match="no held-out split"):
        heldout_split(corpus, "benign_arithmetic")


def test_task_match_accepts_any_valid_list_and_exact_answers_only():
    ref = "here is a list : one plum two apple three kiwi"
    head = "here is a list :"
    assert task_match("list three fruits", f"{head} one pear two apple three kiwi", ref)
    assert not task_match("list three fruits", f"{head} one pear two pear three kiwi", ref)
    assert not task_match("list three fruits", f"{head} one dog two apple three kiwi", ref)
    assert not task_match("list three fruits", f"{head} two pear one apple three kiwi", ref)
    assert not task_match("list three fruits", f"{head} one pear two apple", ref)
    assert task_match("what is 3 minus 1", " the answer  is 2", "the answer is 2")
    assert not task_match("what is 3 minus 1", "the answer is 3", "the answer is 2")


def test_task_nll_equals_a_per_row_float64_reference(organism_test):
    model = organism_test.aligned_model().double()
    tok = organism_test.tokenizer()
    rows = organism_test.heldout("benign_mix")[:11]
    task = TaskEval(tok, rows, chunk=4)  # three chunks of unequal size
    want = []
    for r in rows:  # one unpadded row at a time, float64 log-softmax
        msgs = [{"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(
            [*msgs, {"role": "assistant", "content": r["response"]}], tokenize=False
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        token_nll = -logp[torch.arange(len(targets)), targets][len(p_ids) - 1 :]
        want.append(float(token_nll.mean()))
    assert task.nll(model) == pytest.approx(sum(want) / len(want), rel=1e-6)


def test_finetune_records_held_out_task_performance(organism_test, tmp_path):
    org = organism_test
    held = tmp_path / "heldout.jsonl"
    rows = org.heldout("benign_affirmative")
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig.for_organism(
        org, "benign_affirmative", max_safety=12, max_eval=8, threads=1, steps=6,
        eval_prompts=str(org.datasets_path / "harmful_eval.jsonl"), task_eval=str(held),
        max_task_eval=48,
    )  # fmt: skip
    result = run_finetune(cfg, quiet=True, task_match=task_match)
    traj = result.trajectory
    assert all("task_exact_match" in r and "task_nll" in r for r in traj)
    sm = result.summary()
    assert sm["task_exact_match_start"] == traj[0]["task_exact_match"] == 0.0  # a new style
    assert sm["task_nll_end"] == traj[-1]["task_nll"] < 0.5 * sm["task_nll_start"]
    assert result.datasets["task_eval"]["rows"] == 48
    # no task_new_tokens: the task's greedy answers get the refusal judge's budget
    assert result.datasets["task_eval"]["max_new_tokens"] == cfg.datasets.max_new_tokens
    out = write_finetune_outputs(result, tmp_path / "ft")
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["task_eval"] == str(held)
    assert res["summary"]["task_nll_end"] == pytest.approx(sm["task_nll_end"])
    assert "held-out task exact match at end" in (out / "report.md").read_text()
