"""diagnose and verify through the CLI on tiny real architectures (Llama, Qwen2, GPT-2) and a
GGUF file, full fine-tuning and LoRA; the model loading (GGUF, adapters, dtype) on its own."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from typer.testing import CliRunner

import alignscope.commands.verify as verify_mod
from _hf_models import ARCHS, make_datasets, save_model, write_llama_gguf
from alignscope.cli import app
from alignscope.errors import MissingExtraError
from alignscope.models import LoraSpec, load_model

# Monte-Carlo Gram subspace (the Lanczos route is tested on the organism); tr F by Hutch++ still
# takes exact F-products (forward-mode AD) through each architecture.
FAST = [
    "--rank",
    "4",
    "--max-safety",
    "8",
    "--max-data",
    "16",
    "--threads",
    "1",
    "--solver",
    "gram",
]
FAST += ["--optimizer", "sgd", "--lr", "1e-2", "--steps", "20"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{arch: model dir}`` and the safety/data sets, built once (the GGUF file: ``gguf``)."""
    root = tmp_path_factory.mktemp("hf")
    paths = {arch: save_model(arch, root) for arch in ARCHS}
    safety, data = make_datasets(root / "data")
    return paths, safety, data


@pytest.fixture(scope="module")
def gguf(models):
    """Adds ``"gguf"``, the tiny Llama as a GGUF file, to ``models``; skips (only the tests that
    use it) where the optional ``gguf`` package is missing."""
    pytest.importorskip("gguf")
    paths = models[0]
    if "gguf" not in paths:
        llama = paths["llama"]
        paths["gguf"] = write_llama_gguf(llama, llama.parent / "tiny-llama.gguf")
    return models


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    if str(path).endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(path)


def _invoke(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


_runs: dict = {}


def _diagnose(models, tmp_path_factory, arch, extra=()):
    """Run (once per module) ``alignscope diagnose`` on ``arch``; return its results.json."""
    key = (arch, tuple(extra))
    if key not in _runs:
        paths, safety, data = models
        out = tmp_path_factory.mktemp("diag") / "run"
        args = ["diagnose", "-m", str(paths[arch]), "-s", str(safety), "-d", str(data)]
        _invoke([*args, *FAST, *extra, "--out", str(out)])
        _runs[key] = json.loads((out / "results.json").read_text())
    return _runs[key]


def _linear_modules(model) -> dict[str, int]:
    """Every nn.Linear / Conv1D but the output head, with in + out features."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {
        name: sum(mod.weight.shape)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear | Conv1D) and mod is not head
    }


@pytest.mark.parametrize("arch", [*ARCHS, "gguf"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_diagnose_cli(models, tmp_path_factory, request, arch, lora):
    if arch == "gguf":
        request.getfixturevalue("gguf")
    res = _diagnose(models, tmp_path_factory, arch, ["--lora-r", "2"] if lora else [])
    base = _hf_model(models[0][arch])
    par = res["parameters"]
    if lora:
        linear = _linear_modules(base)
        # the default targets: every attention/MLP linear layer (GPT-2: Conv1D c_attn, c_fc...)
        assert par["modules"] == sorted(f"base_model.model.{n}" for n in linear)
        assert par["n_params"] == 2 * sum(linear.values())  # r (in + out) per adapted layer
        assert par["spec"] == ["lora"] and "adapter weights only" in par["note"]
        assert par["adapter"]["r"] == 2 and par["adapter"]["alpha"] == 4.0
        assert par["adapter"]["target_modules"] == "all-linear"
        assert par["adapter"]["n_adapter_params"] == par["n_params"]
    else:
        assert par["n_params"] == sum(p.numel() for p in base.parameters())
        assert par["adapter"] is None and par["spec"] == ["all"]
        assert par["modules"] == sorted({n.rpartition(".")[0] for n, _ in base.named_parameters()})
    assert res["config"]["lora_r"] == (2 if lora else None)
    aic = res["aic"]["gradient"]
    assert all(math.isfinite(aic[k]) for k in ("Pg_ratio", "kappa", "gamma", "gFg"))
    assert aic["gFg"] > 0 and len(res["subspace"]["eigenvalues"]) == 4


def test_gguf_diagnosis_equals_the_source_models(gguf, tmp_path_factory):
    from_gguf = _diagnose(gguf, tmp_path_factory, "gguf")
    src = _diagnose(gguf, tmp_path_factory, "llama")
    for k in ("Pg_ratio", "kappa", "gamma", "gFg"):
        assert from_gguf["aic"]["gradient"][k] == pytest.approx(src["aic"]["gradient"][k], rel=1e-4)


def test_gguf_model_and_tokenizer_match_the_source(gguf):
    paths = gguf[0]
    model, tok = load_model(paths["gguf"])
    ref, ref_tok = load_model(paths["llama"])
    text = "explain topic zeta, then describe method omega"
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.chat_template == ref_tok.chat_template  # carried in tokenizer.chat_template
    assert tok.eos_token == ref_tok.eos_token
    ids = torch.tensor([ref_tok(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_gguf_model_saves_as_a_plain_model(gguf, tmp_path):
    """A dequantised GGUF model saves with save_pretrained (watch's last-safe checkpoint needs
    it) and loads back to the same logits."""
    model, tok = load_model(gguf[0]["gguf"])
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again, _ = load_model(tmp_path / "saved")
    ids = torch.tensor([tok("explain topic zeta").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


def test_missing_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    # runs with or without the package: the check comes before the file is read
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'alignscope\[gguf\]'"):
        load_model(path)


def test_new_lora_adapter_is_seeded_and_starts_at_the_base_model(models):
    path = models[0]["qwen2"]
    base, tok = load_model(path)
    a, _ = load_model(path, lora=LoraSpec(2), seed=0)
    b, _ = load_model(path, lora=LoraSpec(2), seed=0)
    c, _ = load_model(path, lora=LoraSpec(2), seed=1)
    la = {n: p for n, p in a.named_parameters() if "lora_A" in n}
    lb = dict(b.named_parameters())
    lc = dict(c.named_parameters())
    assert la and all(torch.equal(p, lb[n]) for n, p in la.items())
    assert not all(torch.equal(p, lc[n]) for n, p in la.items())
    assert all(float(p.abs().max()) == 0 for n, p in a.named_parameters() if "lora_B" in n)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in a.named_parameters() if "lora_" in n}
    ids = torch.tensor([tok("describe method theta sure here is").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, base(ids).logits)
    # the LoRA geometry at theta0: B = 0, so the loss gradient wrt A is exactly zero
    a(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in a.named_parameters() if "lora_" in n}
    assert all(float(g.abs().max()) == 0 for n, g in grads.items() if "lora_A" in n)
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_B" in n)


def test_existing_adapter_is_loaded_trainable_and_analysed(models, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    paths = models[0]
    model, _ = load_model(paths["llama"])
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # a trained adapter: B != 0
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    adapter = tmp_path_factory.mktemp("adapter") / "llama-lora"
    peft.save_pretrained(adapter)
    n_lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    res = _diagnose(models, tmp_path_factory, "llama", ["--adapter", str(adapter)])
    par = res["parameters"]
    assert par["n_params"] == n_lora and par["spec"] == ["lora"]
    assert par["adapter"]["source"] == str(adapter) and par["adapter"]["r"] == 3
    assert {m.rsplit(".", 1)[-1] for m in par["modules"]} == {"q_proj", "v_proj"}
    assert len(par["modules"]) == 4  # 2 layers x (q, v)


def test_bfloat16_diagnosis_is_close_to_float32(models, tmp_path_factory):
    f32 = _diagnose(models, tmp_path_factory, "llama")
    bf16 = _diagnose(models, tmp_path_factory, "llama", ["--dtype", "bfloat16"])
    assert bf16["parameters"]["dtype"] == {"weights": "bfloat16", "compute": "float32"}
    # exact quantities (the subspace is Monte-Carlo: its samples may differ)
    for k in ("g_norm", "gFg", "a_norm", "kappa"):
        a, b = bf16["aic"]["gradient"][k], f32["aic"]["gradient"][k]
        assert a == pytest.approx(b, rel=0.1), k  # only the weights were rounded to bf16
    assert bf16["losses_at_theta0"]["finetune_nll"] == pytest.approx(
        f32["losses_at_theta0"]["finetune_nll"], rel=0.02
    )


def test_params_lora_without_adapter_is_a_clear_error(models, tmp_path):
    paths, safety, data = models
    args = ["diagnose", "-m", str(paths["gpt2"]), "-s", str(safety), "-d", str(data)]
    result = CliRunner().invoke(app, [*args, *FAST, "--params", "lora", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--lora-r" in result.output
    result = CliRunner().invoke(
        app, [*args, "--adapter", str(tmp_path), "--lora-r", "2", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "either --adapter" in result.output


@pytest.mark.parametrize(("arch", "lora"), [("llama", False), ("qwen2", True), ("gpt2", True)])
def test_verify_cli_trains_only_the_selected_parameters(models, tmp_path, monkeypatch, arch, lora):
    paths, safety, data = models
    trained = {}

    def spy(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        trained.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return out

    real = verify_mod.finetune
    monkeypatch.setattr(verify_mod, "finetune", spy)
    extra = ["--lora-r", "2"] if lora else []
    args = ["verify", "-m", str(paths[arch]), "-s", str(safety), "-d", str(data), *extra]
    args += ["--steps", "3", "--max-safety", "8", "--max-data", "16", "--rank", "4"]
    args += ["--solver", "gram"]
    args += ["--lr", "1e-3", "--batch-size", "4", "--threads", "1", "--out", str(tmp_path / "v")]
    _invoke(args)
    res = json.loads((tmp_path / "v" / "results.json").read_text())
    assert [r["step"] for r in res["trajectory"]] == [0, 1, 2, 3]
    assert res["scores"]["steps_run"] == 3
    before, _ = load_model(paths[arch], lora=LoraSpec(2) if lora else None, seed=0)
    changed = {n for n, p in before.named_parameters() if not torch.equal(p, trained[n])}
    if lora:
        n_lora = sum(p.numel() for n, p in before.named_parameters() if "lora_" in n)
        assert res["diagnosis"]["parameters"]["n_params"] == n_lora
        assert changed and all("lora_" in n for n in changed)  # the base model is untouched
        assert any("lora_B" in n for n in changed)
    else:
        assert res["diagnosis"]["parameters"]["n_params"] == sum(
            p.numel() for p in before.parameters()
        )
        assert len(changed) > len(trained) // 2


def test_lora_targets_pick_the_adapted_modules(models):
    from alignscope.models import adapter_modules

    model, _ = load_model(models[0]["gpt2"], lora=LoraSpec(2, 8.0, ("c_attn",)))
    assert adapter_modules(model) == [
        f"base_model.model.transformer.h.{i}.attn.c_attn" for i in (0, 1)
    ]
    assert model.peft_config["default"].lora_alpha == 8.0
    with pytest.raises(ValueError, match="--lora-targets"):
        load_model(models[0]["gpt2"], lora=LoraSpec(2, targets=("no_such_module",)))


def test_rank_cli_learning_rates_with_a_new_lora_adapter(models, tmp_path):
    """rank --lr a b on one set, through a new LoRA adapter: only adapter weights are analysed,
    and the lookahead (rank's default) puts the larger learning rate as the more damaging."""
    paths, safety, data = models
    out = tmp_path / "rank"
    args = ["rank", "-m", str(paths["qwen2"]), "-s", str(safety), "--data", str(data),
            "--lr", "1e-4", "3e-2", "--optimizer", "sgd", "--steps", "20", "--lora-r", "2",
            "--rank", "4", "--max-safety", "8", "--max-data", "16", "--threads", "1",
            "--lookahead-steps", "4", "--out", str(out)]  # fmt: skip
    _invoke(args)
    res = json.loads((out / "results.json").read_text())
    model, _ = load_model(paths["qwen2"], lora=LoraSpec(2))
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert res["config"]["lora_r"] == 2
    assert [c["lr"] for c in res["candidates"]] == [1e-4, 3e-2]
    assert res["parameters"]["n_params"] == n_lora and res["parameters"]["adapter"]["r"] == 2
    assert all(c["details"]["n_params"] == n_lora for c in res["candidates"])
    assert res["ranking"] == ["lr 0.0001", "lr 0.03"]  # the larger rate damages more
