"""diagnose end to end on the test organism, and its errors on bad input."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from alignscope.cli import app
from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose

FAST = dict(max_safety=12, max_data=24, noise_examples=8, rank=4, steps=60, threads=1)


def _cfg(org, **kw):
    return DiagnoseConfig.for_organism(
        org, "benign_affirmative", **{"optimizer": "sgd", "lr": 1e-3, "batch_size": 8, **FAST, **kw}
    )


@pytest.fixture(scope="module")
def diagnosis(organism_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "run"
    cfg = _cfg(organism_test)
    args = [
        "diagnose",
        "--model",
        cfg.model.model,
        "--safety",
        cfg.datasets.safety,
        "--data",
        cfg.finetune.data,
    ]
    args += ["--optimizer", "sgd", "--lr", "1e-3", "--batch-size", "8", "--steps", "60"]
    args += ["--rank", "4", "--max-safety", "12", "--max-data", "24", "--threads", "1"]
    args += ["--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # the forecast's crossing of the loss threshold is named as such, never a "collapse step"
    assert "kl threshold 0.1 crossed at step" in result.output
    assert "collapse step" not in result.output
    report = (out / "report.md").read_text()
    assert "collapse step" not in report.lower() and "Forecast threshold step" in report
    return out, json.loads((out / "results.json").read_text())


def test_cli_writes_results_report_and_plots(diagnosis):
    out, res = diagnosis
    for name in ("results.json", "report.md", "report.html", "spectrum.png", "forecast.png"):
        assert (out / name).stat().st_size > 0, name
    assert res["schema"] == "alignscope.diagnose/1"
    assert res["seed"] == 0 and res["config"]["rank"] == 4
    assert {"torch", "transformers", "alignscope"} <= set(res["environment"])
    assert "Verdict" in (out / "report.md").read_text()
    safety, data = res["datasets"]["safety"], res["datasets"]["finetune"]
    assert (safety["format"], data["format"]) == ("plain", "plain")
    assert (safety["examples"], safety["dropped"], data["examples"]) == (12, 0, 24)
    assert res["config"]["safety_format"] == "auto" and data["truncated"] == 0


def test_results_are_self_consistent(diagnosis):
    _, res = diagnosis
    sub, aic = res["subspace"], res["aic"]["gradient"]
    vals = sub["eigenvalues"]
    assert vals == sorted(vals, reverse=True) and len(vals) == 4
    assert sub["explained"] == pytest.approx(sum(vals[: sub["d"]]) / sub["trace"])
    assert sub["tail_mass"] == pytest.approx(sub["trace"] - sum(vals[: sub["d"]]))
    assert 0 <= aic["Pg_ratio"] <= 1
    assert aic["gamma"] == pytest.approx(math.sqrt(aic["aFa_sub"]))
    # every parameter is analysed, the LM head too: the exact vocabulary
    fisher = sub["vocabulary"]["fisher"]
    assert fisher["mode"] == "exact" and "selection" in fisher["why"] and fisher["vocab"] == 211
    assert aic["F_half_g"] == pytest.approx(math.sqrt(aic["gFg"]))
    kappa = (aic["aFa"] / aic["a_norm"] ** 2) / (aic["gFg"] / aic["g_norm"] ** 2)
    assert aic["kappa"] == pytest.approx(kappa)
    checks = res["verdict"]["checks"]
    assert res["verdict"]["aic_holds"] == all(c["holds"] for c in checks.values())
    # the aligned organism refuses its alignment prompts, and the KL reference is its own output
    assert res["alignment"]["refusal_rate"] >= 0.9
    fc = res["forecast"]
    assert len(fc["steps"]) == 60
    valid = [x for x in fc["dL"] if x is not None]
    assert len(valid) == min(60, fc["horizon_steps"] or 60)
    if fc["collapse_step"] is not None:
        assert fc["dL"][fc["collapse_step"] - 1] >= res["config"]["threshold"]


def test_existing_output_is_never_overwritten(diagnosis):
    out, _ = diagnosis
    before = (out / "results.json").read_text()
    result = CliRunner().invoke(
        app, ["diagnose", "-m", "x", "-s", "y", "-d", "z", "--out", str(out)]
    )
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "results.json").read_text() == before


def test_empty_safety_set_is_a_clear_error(organism_test, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run_diagnose(_cfg(organism_test, safety=str(empty)), quiet=True)


def test_data_without_responses_is_a_clear_error(organism_test, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "add one and two"}\n')
    with pytest.raises(ValueError, match="no response"):
        run_diagnose(_cfg(organism_test, data=str(prompts)), quiet=True)


def test_prompts_that_fill_the_context_are_an_error_only_when_all_are_dropped(organism_test):
    # Over-long prompts are dropped and counted (tests/test_loaders.py); none left is an error.
    with pytest.raises(ValueError, match="safety set .* all 12 prompts .* no room for a response"):
        run_diagnose(_cfg(organism_test, max_length=3), quiet=True)


def test_rank_above_sample_count_is_a_clear_error(organism_test):
    cfg = _cfg(organism_test, rank=30, max_safety=4, samples_per_prompt=2, solver="gram")
    with pytest.raises(ValueError, match="only 8 factor rows"):
        run_diagnose(cfg, quiet=True)


def test_nan_model_is_a_clear_error(organism_test):
    model, tok = organism_test.aligned_model(), organism_test.tokenizer()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        run_diagnose(_cfg(organism_test), model=model, tokenizer=tok, quiet=True)


def test_adam_preconditioner_uses_the_minibatch_second_moment():
    from alignscope.commands.diagnose import adam_preconditioner

    g = torch.tensor([2.0, -0.5, 0.0], dtype=torch.float64)
    # no gradient noise: the first Adam step is sign(g) (up to eps)
    d = adam_preconditioner(g, torch.zeros(3, dtype=torch.float64), 8, 0.0)
    torch.testing.assert_close((d * g)[:2], torch.tensor([1.0, -1.0], dtype=torch.float64))
    # a zero-mean coordinate is bounded by its minibatch noise, sqrt(b) / sigma, not 1 / eps
    d = adam_preconditioner(g, torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64), 16, 1e-8)
    assert float(d[2]) == pytest.approx(16**0.5 / 2.0, rel=1e-6)


def test_a_one_step_forecast_is_drawn_and_says_where_it_ends(tmp_path, monkeypatch):
    """Validity horizon 1: the forecast is one point, which a line cannot show; the plot marks it
    and says the forecast ends there (legend and a note on each panel)."""
    from alignscope.report import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.forecast_plot(tmp_path / "f.png", [1], [2e-3], {"drift": [2e-3]}, 1, 0.1,
                        observed=([1, 2], [1e-3, 4e-3]))  # fmt: skip
    (fig,) = figures
    for ax in fig.axes:
        (forecast,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("forecast dL_a")]
        assert forecast.get_label() == "forecast dL_a (ends at step 1: validity horizon)"
        assert forecast.get_marker() == "D" and forecast.get_markersize() >= 6
        assert "forecast ends at step 1 (validity horizon)" in [t.get_text() for t in ax.texts]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "forecast dL_a (ends at step 1: validity horizon)" in legend
    figures.clear()
    plots.forecast_plot(tmp_path / "g.png", [1, 2, 3], [1e-3, 2e-3, 3e-3], {}, 3, 0.1)
    (fig,) = figures
    assert [ln.get_label() for ln in fig.axes[0].get_lines()][0] == "forecast dL_a"
    assert not fig.axes[0].texts


def test_results_read_back_into_the_same_diagnosis(diagnosis):
    """results.json + subspace.pt -> DiagnoseResult -> results.json is the identity."""
    from alignscope.commands.diagnose import DiagnoseResult, load
    from alignscope.report.output import jsonable

    out, res = diagnosis
    loaded = load(out)
    assert jsonable(loaded.to_json()) == res
    again = DiagnoseResult.from_json(json.loads(json.dumps(jsonable(loaded.to_json()))))
    assert jsonable(again.to_json()) == res
    # the typed fields carry what results.json says
    assert loaded.d == 4 and loaded.subspace.k == 4 and loaded.top.vectors.shape[1] == 4
    assert loaded.subspace.plan == res["subspace"]["plan"] and loaded.subspace.converged
    assert loaded.parameters.n_params == loaded.subspace.dim == res["parameters"]["n_params"]
    assert loaded.alignment.n_prompts == 12 and loaded.aic_step is not None
    assert loaded.forecast.collapse_step == res["forecast"]["collapse_step"]
    assert again.subspace.vectors is None  # without subspace.pt: the spectrum only
    with pytest.raises(ValueError, match="spectrum only"):
        again.top.basis(4)
    with pytest.raises(ValueError, match="not a diagnose result"):
        DiagnoseResult.from_json({"config": res["config"]})


def test_block_lanczos_gives_the_same_subspace(organism_test):
    """--lanczos-block 4 (block Lanczos, four Fisher vectors per pass) finds the eigenpairs of
    single-vector Lanczos on the organism, in float64, and records the choice in the plan."""
    one = run_diagnose(_cfg(organism_test, dtype="float64", solver="lanczos"), quiet=True)
    four = run_diagnose(
        _cfg(organism_test, dtype="float64", solver="lanczos", lanczos_block=4), quiet=True
    )
    torch.testing.assert_close(four.subspace.values, one.subspace.values, rtol=1e-6, atol=0)
    overlap = torch.linalg.svdvals(one.subspace.vectors.T @ four.subspace.vectors)
    assert float(overlap.min()) > 1 - 1e-6
    assert "block Lanczos (4/pass)" in four.to_json()["subspace"]["plan"]


@pytest.mark.parametrize(("group", "method", "products"), [
    (None, "deflated", 10), ("layer", "hutch++", 30)
])  # fmt: skip
def test_recorded_trace_matches_the_dense_fisher_trace(organism_test, monkeypatch, group, method,
                                                       products):  # fmt: skip
    """tr F in results.json against the trace of the Fisher diagnose built, made dense (float64,
    320 parameters): deflated by Lanczos's Krylov basis on the whole selection, Hutch++ where
    the eigensolver keeps none (block-wise by layer)."""
    import alignscope.commands.diagnose as diagnose

    seen = {}
    real = diagnose.subspace_trace

    def spy(op, eig, **kwargs):
        seen["op"] = op
        return real(op, eig, **kwargs)

    monkeypatch.setattr(diagnose, "subspace_trace", spy)
    params = ["model.layers.*.input_layernorm.weight",
              "model.layers.*.post_attention_layernorm.weight", "model.norm.weight"]  # fmt: skip
    cfg = _cfg(organism_test, dtype="float64", solver="lanczos", params=params, group=group)
    sub = run_diagnose(cfg, quiet=True).to_json()["subspace"]
    op = seen["op"]
    assert op.shape[0] == 320
    exact = float(torch.trace(op.matmat(torch.eye(320, dtype=torch.float64))))
    assert (sub["trace_method"], sub["trace_products"]) == (method, products)
    assert 0 < sub["trace_stderr"] < 0.1 * exact
    assert abs(sub["trace"] - exact) < 4 * sub["trace_stderr"], (sub["trace"], exact)
