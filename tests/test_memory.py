"""The memory estimate printed before a diagnosis, and the error that names what would fit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignscope.commands.diagnose import DiagnoseConfig
from alignscope.curvature import plan_spectrum
from alignscope.memory import _lora_size, estimate_memory
from alignscope.params import select_params


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _specs(cfg):
    return cfg.model, cfg.curvature, cfg.datasets


def _cfg(**kw):
    return DiagnoseConfig.from_options(model="m", safety="s", data="d", **kw)


def test_estimate_adds_what_stays_resident(model):
    cfg = _cfg(rank=4, max_new_tokens=10, memory_budget_gb=0.5)
    sel = select_params(model, ["all"])
    est = estimate_memory(*_specs(cfg), model, sel, n_safety=8, check_available=False)
    n = sum(p.numel() for p in model.parameters())
    assert est.weights == 4 * n
    assert est.kl_reference == 8 * 10 * 64 * 4  # prompts x tokens x vocabulary x float32
    iterations = min(n, max(6 * 4, 4 + 60))
    assert est.plan.method == "lanczos" and est.eigensolver == (iterations + 1) * n * 4
    # tr F deflated by the kept Krylov basis (counted in the eigensolver's part): 10 probes, three
    # float64 blocks of 10 vectors beside it
    assert est.trace == 3 * 10 * n * 8
    parts = est.weights + est.kl_reference + est.eigensolver + est.trace
    assert est.total == parts + int(0.5 * 2**30)
    assert "memory estimate" in est.describe() and est.to_json()["total"] == est.total
    # a reused subspace: no eigensolver, and a budget too small for one is no error
    reuse = _cfg(rank=4, max_new_tokens=10, memory_budget_gb=1e-6)
    est = estimate_memory(
        *_specs(reuse), model, sel, n_safety=8, check_available=False, eigensolver=False
    )
    assert est.eigensolver == 0 and est.plan is None
    # no Krylov basis to deflate by (the Gram route): Hutch++'s five float64 blocks of 10 vectors
    gram = _cfg(rank=4, max_new_tokens=10, memory_budget_gb=0.5, solver="gram")
    est = estimate_memory(*_specs(gram), model, sel, n_safety=8, check_available=False)
    assert est.plan.method == "gram" and est.trace == 5 * 10 * n * 8


def test_kl_reference_follows_the_fisher_reference_choice(model):
    """Recomputed (the default): one Fisher chunk's softmax at a time; a table: every position."""
    per_example = 8 * 10 * 64 * 4  # diagnose's Fisher chunk: 8 logit-sized tensors per example
    cfg = _cfg(rank=4, max_new_tokens=10, memory_budget_gb=3 * per_example / 2**30)
    sel = select_params(model, ["all"])

    def estimate(**kw):
        return estimate_memory(*_specs(cfg), model, sel, n_safety=8, check_available=False,
                               eigensolver=False, **kw)  # fmt: skip

    assert estimate().kl_reference == 3 * 10 * 64 * 4  # 3 of the 8 prompts at once
    assert estimate(kl_reference="table").kl_reference == 8 * 10 * 64 * 4


def test_blockwise_plan_holds_one_block_at_a_time():
    whole = plan_spectrum(10_000, 4, 32, method="lanczos")
    blocks = plan_spectrum(10_000, 4, 32, method="lanczos", blockwise=True,
                           block_dims=[2_500] * 4)  # fmt: skip
    assert whole.bytes_needed == 65 * 10_000 * 4
    # the largest block's basis, plus the blocks' eigenvectors and the merged top-k while merging
    assert blocks.bytes_needed == 65 * 2_500 * 4 + 2 * 4 * 10_000 * 4


def test_over_budget_names_the_options_that_fit(model):
    sel = select_params(model, ["all"])
    n = sel.size
    # a budget below the whole-selection Lanczos basis and the Gram rows, above a per-layer one
    budget = 0.5 * 61 * n * 4 / 2**30
    cfg = _cfg(rank=1, memory_budget_gb=budget, max_safety=64, samples_per_prompt=64)
    with pytest.raises(MemoryError) as err:
        estimate_memory(*_specs(cfg), model, sel, n_safety=64, check_available=False)
    msg = str(err.value)
    assert f"over {n:,} parameters" in msg and "--group layer (~" in msg
    assert "--lora-r 8 (~" in msg and "--memory-gb" in msg


def test_lora_size_counts_every_linear_but_the_head(model):
    h, i, kv = 32, 64, 16  # hidden, MLP, key/value width (2 of 4 heads)
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + 3 * (h + i)
    assert _lora_size(model, 2) == 2 * 4 * per_layer


def test_more_than_the_machine_has_available_is_an_error(model, monkeypatch):
    cfg, sel = _cfg(rank=4, memory_budget_gb=0.5), select_params(model, ["all"])
    need = estimate_memory(*_specs(cfg), model, sel, n_safety=8, check_available=False).still_needed
    # the loaded weights are already out of what is available: only the rest must fit
    monkeypatch.setattr("alignscope.memory.available_memory", lambda device: need)
    estimate_memory(*_specs(cfg), model, sel, n_safety=8)
    monkeypatch.setattr("alignscope.memory.available_memory", lambda device: need - 1)
    with pytest.raises(MemoryError, match="more than the .* still available"):
        estimate_memory(*_specs(cfg), model, sel, n_safety=8)


def test_vocab_size_reads_config_text_config_or_head(model):
    from types import SimpleNamespace

    from alignscope.commands.diagnose import _fisher_chunk
    from alignscope.data.encode import EncodedPair, collate
    from alignscope.models import DEFAULT_VOCAB_SIZE, vocab_size

    assert vocab_size(model) == 64

    class Head(torch.nn.Module):  # no config: the output embeddings say it
        def __init__(self, config=None):
            super().__init__()
            self.config, self.head = config, torch.nn.Linear(4, 37)

        def get_output_embeddings(self):
            return self.head

    assert vocab_size(Head()) == 37
    # a multimodal config keeps the vocabulary in its text config
    text = SimpleNamespace(vocab_size=1000)
    nested = SimpleNamespace(vocab_size=None, get_text_config=lambda: text)
    assert vocab_size(Head(nested)) == 1000
    assert vocab_size(torch.nn.Linear(2, 2)) == DEFAULT_VOCAB_SIZE
    # diagnose's Fisher chunk is sized with the same vocabulary: 8 x T x V float32 per example
    batch = collate([EncodedPair([1, 2], [3])] * 5)
    assert _fisher_chunk(Head(nested), batch, budget=2 * 8 * 3 * 1000 * 4) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_estimate_against_the_measured_peak_of_a_small_diagnosis(tmp_path):
    """The estimate a diagnosis prints against the peak resident memory it adds, measured.

    A fresh process (tests/_memory_probe.py) warms up on a far smaller model, then diagnoses a
    0.23 M-parameter Llama (Lanczos; a 0.03 GiB budget for the gradient chunks) and reports the
    growth of its peak RSS (VmHWM, reset after the warm-up) over its RSS before the diagnosis.
    The two must agree within a factor of 2 either way. Why 2: the measured growth was 1.5-2.2x
    the estimate before the estimate counted Hutch++'s float64 blocks for tr F (the largest
    single stage here), and 1.0-1.1x after; the spread between runs is the allocator's. 2 fails
    on a missing or double-counted term the size of the basis or the trace blocks, or a wrong
    item size or unit.
    """
    probe = Path(__file__).parent / "_memory_probe.py"
    run = subprocess.run(
        [sys.executable, str(probe), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    estimate, measured = got["estimate_still_needed"], got["measured_growth"]
    assert got["memory"]["plan"].startswith("matrix-free Lanczos")
    assert estimate > 50 * 2**20  # the basis and the budget dominate, not allocator noise
    assert estimate / 2 <= measured <= 2 * estimate, (measured / estimate, got)


def test_auto_does_not_fall_back_to_a_gram_route_too_small_for_the_rank():
    lanczos = 65 * 10_000 * 4
    budget = lanczos - 1  # Lanczos's basis does not fit; 8 Gram rows do
    assert plan_spectrum(10_000, 4, 8, memory_budget=budget).method == "gram"
    with pytest.raises(MemoryError, match="finds at most 8 eigenpairs"):
        plan_spectrum(10_000, 12, 8, memory_budget=budget)
    # block-wise, each block gives up to 8 eigenpairs: four blocks deliver 12
    blocks = plan_spectrum(10_000, 12, 8, memory_budget=1_000_000, blockwise=True,
                           block_dims=[2_500] * 4)  # fmt: skip
    assert blocks.method == "gram"
