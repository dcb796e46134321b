"""The config specs: each validates its own fields, defaults are stated once, configs read and
write flat (the results.json config block)."""

import dataclasses

import pytest

from alignscope.commands.diagnose import DiagnoseConfig
from alignscope.commands.rank import RankConfig
from alignscope.commands.verify import VerifyConfig
from alignscope.config import (
    DEFAULT_LR,
    DEFAULT_RANK,
    EXPLAINED_MAX_RANK,
    SPECS,
    CurvatureSpec,
    DataSpec,
    EvalSpec,
    GuardSpec,
    ModelSpec,
    OptimSpec,
    RankingSpec,
    RecordSpec,
    RuntimeSpec,
)

BASE = dict(model="m", safety="s", data="d")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("m", adapter="a", lora_r=4), "either --adapter"),
        (ModelSpec("m", lora_alpha=8.0), "need --lora-r"),
        (DataSpec("s", data_format="csv"), "--data-format 'csv'"),
        (DataSpec("s", noise_examples=1), "noise_examples"),
        (CurvatureSpec(rank=0), "--rank"),
        (CurvatureSpec(explained=1.5), "--explained"),
        (CurvatureSpec(fisher="empirical", group="layer"), "block-wise"),
        (CurvatureSpec(solver="qr"), "--solver"),
        (CurvatureSpec(memory_budget_gb=0), "--memory-gb"),
        (OptimSpec(optimizer="lion"), "--optimizer"),
        (OptimSpec(lr=0.0), "--lr"),
        (OptimSpec(steps=0), "--steps"),
        (EvalSpec(max_eval=0), "--max-eval"),
        (RecordSpec(eval_every="often"), "--eval-every"),
        (RecordSpec(checkpoint_every=-1), "--checkpoint-every"),
        (RecordSpec(refusal_every=0), "--refusal-every"),
        (RankingSpec(["a", "a"]), "given twice"),
        (RankingSpec(["a"], lrs=[1e-5, 1e-5]), "repeat"),
        (RankingSpec(["a"], lrs=[-1.0]), "positive"),
        (RuntimeSpec(threads=0), "--threads"),
        (RuntimeSpec(prefix_cache_gb=-1), "--prefix-cache-gb"),
        (GuardSpec(guard_adaptive=True), "--guard-adaptive needs a guard"),
        (GuardSpec("curvature", adaptive_floor=1.5), "--adaptive-floor"),
        (GuardSpec("curvature", adaptive_every=0), "--adaptive-every"),
        (GuardSpec("project-tracking", track_every=0), "--track-drift"),
        (GuardSpec("project-tracking", track_drift=0.0), "--track-drift must be positive"),
        (GuardSpec("fisher", fisher_rank=-1), "--fisher-rank"),
    ],
)
def test_each_spec_rejects_its_bad_fields(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.validate()


def test_defaults_are_valid_and_field_names_unique():
    names = [f.name for spec in SPECS for f in dataclasses.fields(spec)]
    assert len(names) - len(set(names)) == 1  # only "data": one path, or rank's list of them
    cfg = DiagnoseConfig.from_options(**BASE)
    cfg.validate()
    assert cfg.curvature.rank == DEFAULT_RANK and cfg.optim.lr == DEFAULT_LR
    explained = CurvatureSpec(explained=0.9)  # --explained chooses d from the computed pairs
    assert explained.rank is None and explained.eigenpairs == EXPLAINED_MAX_RANK


def test_flat_round_trip_and_unknown_options():
    cfg = VerifyConfig.from_options(**BASE, lr=1e-3, rank=4, eval_prompts="e", lora_r=2)
    flat = cfg.flat()
    assert flat["lr"] == 1e-3 and flat["rank"] == 4 and flat["eval_prompts"] == "e"
    assert VerifyConfig.from_options(**flat) == cfg
    assert cfg.with_options(rank=3).curvature.rank == 3 and cfg.curvature.rank == 4
    assert cfg.param_spec() == ["lora"]  # --params all with an adapter: the adapter weights
    diag = cfg.diagnose_config()
    assert set(diag.flat()) < set(flat) and all(flat[k] == v for k, v in diag.flat().items())
    with pytest.raises(TypeError, match="unknown options lrs"):
        DiagnoseConfig.from_options(**BASE, lrs=[1e-3])


def test_rank_config_lists_and_its_own_checks():
    cfg = RankConfig.from_options(model="m", safety="s", data=["a", "b"])
    assert cfg.ranking.lrs == [DEFAULT_LR] and cfg.flat()["data"] == ["a", "b"]
    assert cfg.model_config().finetune.data == "a"
    with pytest.raises(ValueError, match="lookahead-steps"):
        RankConfig.from_options(model="m", safety="s", data=["a", "b"], steps=10,
                                lookahead_steps=11).validate()  # fmt: skip
    with pytest.raises(ValueError, match="--predictor 'x'"):
        RankConfig.from_options(model="m", safety="s", data=["a", "b"], predictor="x").validate()
