"""rank: predictors, ordering, the CLI's results and its errors (test organism, one thread)."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _tiny import random_batch, tiny_llama
from alignscope.cli import app
from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose
from alignscope.commands.predictors import (
    DEFAULT_PREDICTOR,
    PREDICTORS,
    extrapolate_trend,
    gradient_cosine,
    order,
)
from alignscope.curvature.functional import FunctionalLM
from alignscope.params import select_params


def _args(org, *data, lrs=("1e-3",), extra=()):
    ds = org.datasets_path
    args = ["rank", "--model", str(org.aligned_path), "--safety", str(ds / "harmful_align.jsonl")]
    args += ["--data", *[str(ds / f"{d}.jsonl") for d in data], "--lr", *lrs]
    args += ["--batch-size", "16", "--steps", "100", "--rank", "4", "--max-safety", "12"]
    args += ["--max-data", "24", "--lookahead-steps", "8", "--threads", "1", *extra]
    return args


@pytest.fixture(scope="module")
def ranked(organism_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("rank") / "run"
    comply = organism_test.datasets_path / "harmful_train_compliant.jsonl"
    args = _args(organism_test, "benign_neutral", "benign_affirmative")
    evals = organism_test.datasets_path / "harmful_eval.jsonl"
    args += ["--compliance", str(comply), "--eval-prompts", str(evals), "--max-eval", "4"]
    args += ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text()), result.output


def test_cli_writes_every_predictor_for_every_candidate(ranked):
    out, res, printed = ranked
    for name in ("results.json", "report.md", "report.html", "ranking.png"):
        assert (out / name).stat().st_size > 0, name
    assert res["schema"] == "alignscope.rank/1" and res["seed"] == 0
    assert {"torch", "transformers", "alignscope"} <= set(res["environment"])
    assert res["predictor"] == DEFAULT_PREDICTOR
    # the trial run's seed: one the planned run (--seed 0) does not use
    assert res["lookahead_order"] == "independent" and res["trial_seed"] == 7919
    assert res["config"]["lookahead_order"] == "independent"
    assert {c["details"]["lookahead"]["seed"] for c in res["candidates"]} == {7919}
    assert len(res["candidates"]) == 2
    for cand in res["candidates"]:
        assert set(cand["predictors"]) == set(PREDICTORS)
        for name, p in cand["predictors"].items():
            assert set(p) == {"value", "score", "seconds"}, name
            assert p["seconds"] is not None and p["seconds"] >= 0, name
        assert cand["predictors"]["gradient_similarity"]["value"] is not None
        assert -1 <= cand["predictors"]["gradient_similarity"]["value"] <= 1
        # --eval-prompts: the lookahead's refusal rate at its first and last step (8)
        refusal = cand["details"]["lookahead"]["refusal_rate"]
        assert set(refusal) == {"0", "8"} and all(0 <= r <= 1 for r in refusal.values())
        # ... and the candidate's refusal block reads those two rates
        assert cand["refusal"] == {
            "start": refusal["0"], "after_trial": refusal["8"], "trial_steps": 8
        }  # fmt: skip
    assert res["config"]["eval_prompts"].endswith("harmful_eval.jsonl")
    assert res["refusal"]["prompts"].endswith("harmful_eval.jsonl")
    assert res["refusal"]["n_prompts"] == 4 and res["refusal"]["judge"] == "KeywordRefusalJudge"
    # an 8-step trial of 100 AdamW steps ends after the study's median damage onset (5.5 %)
    # but before three quarters of it (16 %): a note, not a warning
    assert res["warnings"] == []
    assert len(res["notes"]) == 1 and "covers 8 of 100 planned steps" in res["notes"][0]
    assert "--lookahead-steps 16" in res["notes"][0]
    assert "subspace" in res["shared_timings_s"]
    md = (out / "report.md").read_text()
    assert "predicted to damage alignment most" in md and "ranking.png" in md
    assert "Note: the trial run covers 8 of 100 planned steps" in md
    assert "note: the trial run covers 8 of 100 planned steps" in printed
    assert "Refusal on held-out prompts" in md and "after the trial run" in md


def test_trial_warning_and_note_follow_the_study_onsets():
    from alignscope.commands.rank import RankConfig, trial_notes, trial_warnings
    from alignscope.config import DAMAGE_ONSET_FRACTION, DAMAGE_ONSET_MEDIAN

    # tests/test_study_stats.py recomputes both from the committed study rows
    assert DAMAGE_ONSET_FRACTION["adamw"] == 0.16 and DAMAGE_ONSET_MEDIAN["adamw"] == 0.055
    # rank's default trial (a tenth) ends after the AdamW median onset, before its 3/4: a note
    assert trial_warnings("adamw", 20, 200) == []
    (n,) = trial_notes("adamw", 20, 200)
    assert "covers 20 of 200 planned steps (10%)" in n and "--lookahead-steps 32" in n
    assert "a quarter of the adamw runs" in n and "16.0%" in n
    # exactly the organism's 3/4 onset: covered there, and past the real study's lower bound
    # (the earliest between 11 % and 16 %): nothing to say
    assert trial_notes("adamw", 32, 200) == []
    # shorter than the median onset: a warning (and no note besides)
    (w,) = trial_warnings("adamw", 10, 200)
    assert "half of the adamw runs" in w and "5.5%" in w and "--lookahead-steps 32" in w
    assert trial_notes("adamw", 10, 200) == []
    assert trial_warnings("adamw", 11, 200) == [] and trial_notes("adamw", 11, 200) != []
    assert trial_notes("adam", 31, 200) != []  # Adam is taken as AdamW
    assert trial_warnings("sgd", 20, 200) == trial_notes("sgd", 20, 200) == []  # SGD: by 1 %
    assert trial_notes("sgd", 12, 2000) != [] and trial_warnings("sgd", 9, 2000) != []
    cfg = RankConfig.from_options(model="m", safety="s", data=["a", "b"], steps=200)
    assert cfg.trial_notes() == trial_notes("adamw", 20, 200) and cfg.trial_warnings() == []
    # the real-model study's damage began after 11 % of the budget: the default tenth is told
    assert "the 18 of its 42 AdamW runs whose KL reached 0.1 all reached it after 11%" in n
    assert "(the earliest by 16%, half by 45%)" in n
    assert "real-model study" not in trial_notes("sgd", 12, 2000)[0]
    longer = RankConfig.from_options(
        model="m", safety="s", data=["a", "b"], steps=200, lookahead_steps=32
    )
    assert longer.trial_warnings() == [] and longer.trial_notes() == []
    # a new LoRA adapter: its own note until the trial covers a fifth
    lora = RankConfig.from_options(model="m", safety="s", data=["a", "b"], steps=200, lora_r=8)
    (*_, adapter) = lora.trial_notes()
    assert "B = 0" in adapter
    assert "--lookahead-steps 40 and read --predictor lookahead_kl" in adapter
    fifth = RankConfig.from_options(model="m", safety="s", data=["a", "b"], steps=200, lora_r=8,
                                    lookahead_steps=40)  # fmt: skip
    assert fifth.trial_notes() == []


def test_default_predictor_puts_affirmative_above_neutral(ranked):
    _, res, _ = ranked
    by = {c["label"]: c for c in res["candidates"]}
    score = {k: v["predictors"][DEFAULT_PREDICTOR]["score"] for k, v in by.items()}
    assert score["benign_affirmative"] > score["benign_neutral"]
    # the recommended (least damaging) candidate comes first
    assert res["ranking"] == ["benign_neutral", "benign_affirmative"]
    assert res["recommended"] == "benign_neutral"
    assert res["summary"].startswith("benign_affirmative is predicted to damage alignment most")


def test_gradient_cosine_matches_dense_float64():
    model = tiny_llama(seed=3)
    flm = FunctionalLM(model, select_params(model, ["all"]))
    batch, other = random_batch(4, seed=1), random_batch(5, seed=2)

    def dense_grad(b):
        params = dict(model.named_parameters())
        # L_f in float64 throughout: the mean over examples of each response's token-mean NLL
        logp = torch.log_softmax(model(input_ids=b.input_ids).logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, b.targets[..., None]).squeeze(-1)
        mask = b.target_mask.double()
        loss = ((nll * mask).sum(1) / mask.sum(1)).mean()
        grads = torch.autograd.grad(loss, [params[n] for n in flm.selection.names])
        return np.concatenate([g.detach().double().reshape(-1).numpy() for g in grads])

    g, r = dense_grad(batch), dense_grad(other)
    expected = float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r)))
    reference = torch.from_numpy(r)
    assert gradient_cosine(flm, batch, reference) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert abs(expected) > 1e-3  # a non-trivial comparison


def test_lookahead_extrapolation_on_a_synthetic_power_law():
    steps = list(range(13))
    values = [2e-4 * k**3 for k in steps]
    trend = extrapolate_trend(steps, values, target=200, threshold=10.0)
    assert trend.exponent == pytest.approx(3.0, rel=1e-9)
    assert trend.value_at_target == pytest.approx(2e-4 * 200**3, rel=1e-9)
    assert trend.crossing_step == math.ceil((10.0 / 2e-4) ** (1 / 3))  # 37
    # a threshold already crossed inside the measured run: the first measured step that did
    assert extrapolate_trend(steps, values, 200, threshold=0.1).crossing_step == 8
    # a falling trend never crosses; fewer than two positive points: carried forward
    falling = extrapolate_trend([0, 1, 2, 3, 4], [0.0, 4e-3, 2e-3, 1e-3, 5e-4], 200, 0.1)
    assert falling.exponent < 0 and falling.crossing_step is None
    flat = extrapolate_trend([0, 1], [0.0, 0.01], 200, 0.1)
    assert flat.exponent is None and flat.value_at_target == 0.01


def test_order_most_damaging_first_missing_last():
    cands = [{"predictors": {"x": {"score": s}}} for s in (0.5, None, 2.0, 1.0)]
    assert order(cands, "x") == [2, 3, 0, 1]


def test_cli_errors_one_candidate_and_bad_lr(organism_test, tmp_path):
    runner = CliRunner()
    out = ["--out", str(tmp_path / "r")]
    one = runner.invoke(app, _args(organism_test, "benign_neutral", extra=out))
    assert one.exit_code == 2 and "at least two candidates" in one.output
    for lrs, message in ((("1e-3", "-1"), "positive"), (("1e-3", "1e-3"), "repeat"),
                         (("1e-3", "fast"), "--lr")):  # fmt: skip
        bad = runner.invoke(app, _args(organism_test, "benign_neutral", lrs=lrs, extra=out))
        assert bad.exit_code == 2 and message in bad.output, (lrs, bad.output)
    assert not (tmp_path / "r").exists()


def test_reused_subspace_gives_the_same_diagnosis(organism_test, monkeypatch):
    import alignscope.commands.diagnose as diagnose
    from alignscope.curvature import FisherOperator

    # A spy on every exact F-product and on the three solvers of the subspace stage (eigenpairs,
    # Gram rows, the trace): products made inside a solver are the eigensolver's.
    count = {"products": 0, "solver_products": 0, "solver_calls": 0}
    inside = [False]
    matvec = FisherOperator.matvec

    def counted_matvec(self, v):
        count["products"] += 1
        count["solver_products"] += inside[0]
        return matvec(self, v)

    def spy(fn):
        def wrapped(*args, **kwargs):
            count["solver_calls"] += 1
            inside[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] = False

        return wrapped

    monkeypatch.setattr(FisherOperator, "matvec", counted_matvec)
    monkeypatch.setattr(FisherOperator, "__call__", counted_matvec)
    for name in ("fisher_eigs", "gram_eigs", "subspace_trace"):
        monkeypatch.setattr(diagnose, name, spy(getattr(diagnose, name)))

    fast = dict(max_safety=12, max_data=16, noise_examples=4, rank=4, steps=20, threads=1)
    cfg = DiagnoseConfig.for_organism(organism_test, "benign_neutral", **fast)
    model, tok = organism_test.aligned_model(), organism_test.tokenizer()
    first = run_diagnose(cfg, model=model, tokenizer=tok, quiet=True)
    spent = dict(count)
    assert spent["solver_calls"] == 2 and spent["solver_products"] > 0  # eigenpairs, trace
    count.update(products=0, solver_products=0, solver_calls=0)
    again = run_diagnose(cfg, model=model, tokenizer=tok, quiet=True, subspace=first.subspace)
    assert again.subspace.plan == "reused" and again.subspace.converged is None
    assert first.subspace.plan != "reused"
    # the reuse skips the eigensolver and the trace estimate entirely, and only them
    assert count["solver_calls"] == 0 and count["solver_products"] == 0
    assert count["products"] == spent["products"] - spent["solver_products"]
    for key in ("aic_gradient", "aic_step"):
        for name in ("Pg_ratio", "gamma", "kappa"):
            assert getattr(getattr(again, key), name) == pytest.approx(
                getattr(getattr(first, key), name), rel=1e-6
            ), (key, name)
    assert torch.equal(again.top.vectors, first.top.vectors)


def test_candidates_and_labels():
    from alignscope.commands.rank import RankConfig, _label

    lrs = RankConfig.from_options(model="m", safety="s", data=["x/a.jsonl"], lrs=[1e-5, 3e-5])
    lrs.validate()
    assert lrs.candidates() == [("x/a.jsonl", 1e-5), ("x/a.jsonl", 3e-5)]
    assert _label("x/a.jsonl", 3e-5, lrs) == "lr 3e-05"
    sets = RankConfig.from_options(model="m", safety="s", data=["x/a.jsonl", "y/b.jsonl"])
    assert _label("y/b.jsonl", 2e-5, sets) == "b"
    with pytest.raises(ValueError, match="--lookahead-order 'sideways'"):
        RankConfig.from_options(
            model="m", safety="s", data=["a", "b"], lookahead_order="sideways"
        ).validate()
    assert sets.ranking.trial_seed(4) == 4 + 7919
    same = RankConfig.from_options(model="m", safety="s", data=["a", "b"], lookahead_order="same")
    assert same.ranking.trial_seed(4) == 4
    with pytest.raises(ValueError, match="gradient_similarity needs --compliance"):
        RankConfig.from_options(
            model="m", safety="s", data=["a", "b"], predictor="gradient_similarity"
        ).validate()


def test_lookahead_length_defaults_to_a_tenth_of_the_plan():
    from alignscope.commands.rank import RankConfig

    def n(**kw):
        return RankConfig.from_options(model="m", safety="s", data=["a", "b"], **kw).n_lookahead

    assert n(steps=200) == 20 and n(steps=1000) == 100
    assert n(steps=50) == 12 and n(steps=8) == 8  # at least 12, never beyond the plan
    assert n(steps=200, lookahead_steps=5) == 5


def test_trial_run_order_is_independent_by_default_and_same_on_request(organism_test):
    """The trial run draws another batch order than the planned run (seed + TRIAL_SEED_OFFSET),
    so its KL is not verify's; ``same`` replays verify's first steps bit for bit."""
    from alignscope.commands.predictors import RankState
    from alignscope.commands.verify import VerifyConfig, run_verify
    from alignscope.config import TRIAL_SEED_OFFSET
    from alignscope.train.stream import batch_indices

    org = organism_test
    fast = dict(max_safety=12, max_data=16, noise_examples=4, rank=4, threads=1, max_eval=4)
    vcfg = VerifyConfig.for_organism(
        org, "benign_affirmative", lr=1e-3, batch_size=16, steps=6, seed=3, **fast
    )
    model, tok = org.aligned_model(), org.tokenizer()
    state = RankState(vcfg.diagnose_config(), lookahead_steps=6, model=model, tokenizer=tok)
    assert state.lookahead_order == "independent"
    assert state.trial_seed() == 3 + TRIAL_SEED_OFFSET and state.trial_seed(order="same") == 3
    geo = state.geometry(vcfg.finetune.data)
    n = len(geo.rows)
    planned = batch_indices(n, 16, 3)
    trial = batch_indices(n, 16, state.trial_seed())
    assert [next(trial) for _ in range(6)] != [next(planned) for _ in range(6)]

    ver = run_verify(vcfg, diagnosis=geo.diagnosis, model=model, tokenizer=tok, quiet=True)
    verify_kl = {r["step"]: r["kl"] for r in ver.trajectory}
    assert sorted(verify_kl) == [0, 1, 2, 3, 4, 6]
    for how, same in (("independent", False), ("same", True)):
        ks, kls, _, _ = state.lookahead(geo, "adamw", 1e-3, order=how)
        trial_kl = dict(zip(ks, kls, strict=True))
        assert trial_kl[0] == verify_kl[0] == 0.0
        for k in (1, 2, 3, 4, 6):
            if same:
                assert trial_kl[k] == verify_kl[k], (how, k)  # bit-identical
            else:
                assert trial_kl[k] != pytest.approx(verify_kl[k], rel=1e-3), (how, k)
    with pytest.raises(ValueError, match="lookahead order"):
        RankState(vcfg.diagnose_config(), lookahead_steps=6, lookahead_order="shuffled",
                  model=model, tokenizer=tok)  # fmt: skip
