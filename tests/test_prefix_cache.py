"""Frozen-prefix caching: the suffix-only path equals the whole network in float64.

Each case builds the same ``FunctionalLM`` twice, with and without the prefix cache, and
compares every product the diagnosis uses: logits, F v (both J v modes), batched F V, H v, the
gradient and per-sample gradients (empirical and Monte-Carlo factor rows).
"""

from __future__ import annotations

import pytest
import torch

from _tiny import VOCAB, TinyMLPLM, exact_float64, random_batch, tiny_llama, trained_lora
from alignscope.curvature import FisherOperator, FunctionalLM, HessianOperator
from alignscope.curvature.functional import EXACT_EAGER, response_weights
from alignscope.curvature.per_sample import per_sample_grads
from alignscope.params import select_params

TOL = dict(rtol=1e-10, atol=1e-12)


def _peaked(model):
    # HF's std-0.02 init gives near-uniform logits and a trivial curvature
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return model


def tiny_gpt2(layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=4, n_layer=layers, n_head=2, n_positions=16,
        attn_implementation=EXACT_EAGER,
    )  # fmt: skip
    return _peaked(exact_float64(GPT2LMHeadModel(config)))


def tiny_lora_last():
    """A tiny 3-layer Llama with a trained LoRA adapter on its last layer only."""
    return trained_lora(tiny_llama(layers=3), layers=[2])


CASES = {
    "llama_last": (lambda: tiny_llama(layers=3), ["model.layers.2.*", "lm_head.weight"], 2),
    "llama_two": (lambda: tiny_llama(layers=3), ["model.layers.1.mlp.*", "model.layers.2.*"], 1),
    "llama_lora": (tiny_lora_last, ["lora"], 2),
    "gpt2_last": (tiny_gpt2, ["transformer.h.2.*", "transformer.ln_f.*"], 2),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    build, spec, start = CASES[request.param]
    model = build()
    sel = select_params(model, spec)
    whole = FunctionalLM(model, sel, prefix_cache=False)
    cached = FunctionalLM(model, sel)
    assert whole.prefix is None
    assert cached.prefix is not None and cached.prefix.start == start
    return whole, cached


def _vec(dim, seed):
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_logits_and_losses_equal_the_whole_network(pair):
    whole, cached = pair
    batch = random_batch(4)
    theta = whole.theta0 + 0.1 * _vec(whole.dim, 0)
    ref = whole.logits(theta, batch.input_ids)
    torch.testing.assert_close(cached.logits(theta, batch.input_ids), ref, **TOL)
    torch.testing.assert_close(cached.logits(theta, batch.input_ids[1]), ref[1], **TOL)
    torch.testing.assert_close(cached.mean_nll(theta, batch), whole.mean_nll(theta, batch), **TOL)


@pytest.mark.parametrize("jvp_mode", ["forward", "reverse"])
def test_fisher_products_equal_the_whole_network(pair, jvp_mode):
    whole, cached = pair
    batch = random_batch(4)
    before = cached.prefix.n_computed
    ops = [FisherOperator(f, batch, jvp_mode=jvp_mode, chunk_size=3) for f in (whole, cached)]
    u, w = _vec(whole.dim, 1), _vec(whole.dim, 2)
    ops[1].matvec(w)  # the first product computes the prefix
    assert 1 <= cached.prefix.n_computed - before <= 2  # one prefix pass per chunk, at most
    vs = torch.stack([u, w, u - w], dim=1)
    # the cached products never run the prefix: count calls of the first decoder layer
    calls = []
    handle = cached.prefix.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        got = [ops[1].matvec(u), ops[1].matmat(vs), ops[1].gram(vs.T)]
    finally:
        handle.remove()
    assert not calls
    torch.testing.assert_close(got[0], ops[0].matvec(u), **TOL)
    torch.testing.assert_close(got[1], ops[0].matmat(vs), **TOL)
    torch.testing.assert_close(got[2], ops[0].gram(vs.T), **TOL)
    assert float(got[0].abs().max()) > 1e-4  # not a trivially zero curvature


def test_hessian_and_gradient_equal_the_whole_network(pair):
    whole, cached = pair
    batch = random_batch(4, seed=3)
    theta = whole.theta0 + 0.05 * _vec(whole.dim, 4)
    hs = [HessianOperator(lambda t, f=f: f.mean_nll(t, batch), theta) for f in (whole, cached)]
    v = _vec(whole.dim, 5)
    torch.testing.assert_close(hs[1].matvec(v), hs[0].matvec(v), **TOL)
    vs = torch.stack([v, _vec(whole.dim, 6)], dim=1)
    torch.testing.assert_close(hs[1].matmat(vs), hs[0].matmat(vs), **TOL)
    torch.testing.assert_close(hs[1].gradient(), hs[0].gradient(), **TOL)
    assert float(hs[0].gradient().abs().max()) > 1e-4


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_per_sample_gradients_equal_the_whole_network(pair, method):
    whole, cached = pair
    batch = random_batch(4, seed=7)
    w = response_weights(batch, whole.dtype)
    extra = cached.example_extra(batch.input_ids)
    assert len(extra) == 1 and extra[0].shape[:2] == batch.input_ids.shape
    ref = per_sample_grads(whole.example_nll, whole.theta0, (batch.input_ids, w), method=method)
    got = per_sample_grads(
        cached.example_nll, cached.theta0, (batch.input_ids, w, *extra), method=method
    )
    torch.testing.assert_close(got, ref, **TOL)
    ops = [FisherOperator(f, batch) for f in (whole, cached)]
    torch.testing.assert_close(
        ops[1].empirical_factor_rows(), ops[0].empirical_factor_rows(), **TOL
    )
    rows = [op.mc_factor_rows(2, generator=torch.Generator().manual_seed(0)) for op in ops]
    torch.testing.assert_close(rows[1], rows[0], **TOL)


def test_memory_budget_recomputes_beyond_it():
    model = tiny_llama(layers=3)
    sel = select_params(model, "model.layers.2.*")
    whole = FunctionalLM(model, sel, prefix_cache=False)
    tight = FunctionalLM(model, sel, prefix_memory_budget=1)
    batch = random_batch(4)
    v = _vec(whole.dim, 0)
    ref = FisherOperator(whole, batch).matvec(v)
    torch.testing.assert_close(FisherOperator(tight, batch).matvec(v), ref, **TOL)
    assert not tight.prefix._states  # nothing kept: every call ran the whole network
    assert tight.example_extra(batch.input_ids) == ()
    # a budget for one batch keeps the latest batch only
    one = FunctionalLM(model, sel)
    one.logits(one.theta0, batch.input_ids)
    one.prefix.memory_budget = next(iter(one.prefix._states.values())).nbytes
    other = random_batch(4, seed=9)
    torch.testing.assert_close(
        one.logits(one.theta0, other.input_ids), whole.logits(whole.theta0, other.input_ids), **TOL
    )
    assert len(one.prefix._states) == 1


def test_changing_a_prefix_parameter_invalidates_the_cache():
    model = tiny_llama(layers=3)
    sel = select_params(model, "model.layers.2.*")
    cached = FunctionalLM(model, sel)
    batch = random_batch(3)
    cached.logits(cached.theta0, batch.input_ids)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    whole = FunctionalLM(model, sel, prefix_cache=False)
    torch.testing.assert_close(
        cached.logits(cached.theta0, batch.input_ids),
        whole.logits(whole.theta0, batch.input_ids),
        **TOL,
    )


@pytest.mark.parametrize(
    "build, spec",
    [
        (lambda: tiny_llama(layers=3), ["model.embed_tokens.weight", "model.layers.2.*"]),
        (lambda: tiny_llama(layers=3), ["model.layers.0.mlp.*"]),  # nothing to skip
        (lambda: tiny_llama(layers=3), ["lm_head.weight"]),  # no decoder layer selected
        (tiny_gpt2, ["transformer.h.2.*", "transformer.wte.weight"]),  # the tied LM head
        (TinyMLPLM, "all"),  # not a recognised decoder
    ],
)
def test_falls_back_to_the_whole_network(build, spec):
    model = build()
    assert FunctionalLM(model, select_params(model, spec)).prefix is None


def test_the_model_keeps_its_own_parameters(pair):
    # functional_call swaps tensors in and out of the model: after cached products every
    # parameter must be the model's own leaf again (an optimizer is built on them next)
    whole, cached = pair
    before = {n: p for n, p in cached.model.named_parameters()}
    batch = random_batch(4)
    FisherOperator(cached, batch).matvec(_vec(cached.dim, 0))
    after = dict(cached.model.named_parameters())
    assert all(after[n] is p and p.is_leaf for n, p in before.items())
