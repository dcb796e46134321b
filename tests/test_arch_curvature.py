"""Curvature on the architectures with their own wiring, against dense float64 references.

Qwen2 ties the output head to the input embedding (one tensor on two paths), GPT-2's linear
layers are ``Conv1D`` (a transposed weight layout) and a LoRA selection analyses adapter weights
``A, B`` that enter the model only as the product ``B A``. On a tiny float64 version of each,
the operators the diagnosis uses (F v, g^T F g, H v, Lanczos' top eigenpairs, the AIC numbers)
must equal dense matrices built independently: by double backward through the model's own
``nn.Parameter`` objects (so a tie shares a gradient, as in training), not through
``FunctionalLM``'s flattened vector or ``AlignmentKL``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny import VOCAB, exact_float64, random_batch, tiny_llama
from alignscope.curvature import FisherOperator, FunctionalLM, HessianOperator, lanczos_eigs
from alignscope.curvature.functional import EXACT_EAGER
from alignscope.geometry import finetune_gradient, make_subspace, measure_direction
from alignscope.params import select_params

TOL = dict(rtol=1e-9, atol=1e-12)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True, attn_implementation=EXACT_EAGER,
    )  # fmt: skip
    return _peaked(exact_float64(Qwen2ForCausalLM(config)))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=4, n_layer=2, n_head=2, n_positions=16,
        attn_implementation=EXACT_EAGER,
    )  # fmt: skip
    return _peaked(exact_float64(GPT2LMHeadModel(config)))


def tiny_lora():
    """A tiny Llama with a *trained* LoRA adapter (B != 0; at B = 0 the A-directions are flat)."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    model = exact_float64(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=targets)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    return model


def _peaked(model):
    # as tiny_llama: HF's std-0.02 init gives near-uniform logits, so the curvature is trivial
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return model


CASES = {
    # the tied embedding is selected once and feeds both the input and the output head
    "qwen2_tied": (
        tiny_qwen2,
        ["model.embed_tokens.weight", "model.layers.1.self_attn.*", "model.norm.weight"],
    ),  # fmt: skip
    "gpt2_conv1d": (tiny_gpt2, ["transformer.h.1.*", "transformer.ln_f.*"]),
    "llama_lora": (tiny_lora, ["lora"]),
}


def _flat_grad(loss, params, create_graph=False, retain_graph=None):
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, retain_graph=retain_graph)
    return torch.cat([g.reshape(-1) for g in grads])


def _dense_hessian(loss_fn, params):
    """The dense Hessian of ``loss_fn()`` wrt ``params``: one double backward per coordinate."""
    g = _flat_grad(loss_fn(), params, create_graph=True)
    eye = torch.eye(g.numel(), dtype=g.dtype)
    rows = torch.autograd.grad(g, params, grad_outputs=eye, is_grads_batched=True)
    return torch.cat([r.reshape(g.numel(), -1) for r in rows], dim=1)


def _response_log_probs(model, batch):
    logits = model(input_ids=batch.input_ids, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits, dim=-1)


def _weights(batch):
    # each example's mean over its response tokens, then the mean over examples
    mask = batch.target_mask.double()
    return mask / mask.sum(1, keepdim=True) / batch.size


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    make, spec = CASES[request.param]
    model = make()
    selection = select_params(model, spec)
    flm = FunctionalLM(model, selection)
    safety, finetune = random_batch(4, seed=1), random_batch(5, seed=2)
    params = list(selection.tensors(model).values())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        ref = _response_log_probs(model, safety).exp()  # the aligned model's own predictions
    w = _weights(safety)

    def kl():  # the alignment KL: its Hessian at the reference is the Fisher (Gauss-Newton)
        logp = _response_log_probs(model, safety)
        per_position = (ref * (ref.log() - logp)).sum(-1)
        return (w * per_position).sum()

    def nll():  # the fine-tuning loss
        logp = _response_log_probs(model, finetune)
        picked = logp.gather(-1, finetune.targets[..., None]).squeeze(-1)
        return -(_weights(finetune) * picked).sum()

    dense_f, dense_h = _dense_hessian(kl, params), _dense_hessian(nll, params)
    g = _flat_grad(nll(), params).detach()
    return request.param, model, flm, safety, finetune, dense_f, dense_h, g


def _vec(dim, seed):
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_wiring_is_what_the_case_is_about(case):
    name, model, flm, *_ = case
    if name == "qwen2_tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert "lm_head.weight" not in flm.selection.names  # one tensor, selected once
    elif name == "gpt2_conv1d":
        from transformers.pytorch_utils import Conv1D

        assert isinstance(model.transformer.h[1].attn.c_attn, Conv1D)
    else:
        assert flm.selection.names and all("lora_" in n for n in flm.selection.names)
        assert any("lora_A" in n for n in flm.selection.names)


def test_fisher_products_and_gradient_match_dense(case):
    _, _, flm, safety, finetune, dense_f, _, g = case
    assert float(dense_f.abs().max()) > 1e-3  # a non-trivial matrix
    torch.testing.assert_close(dense_f, dense_f.T, **TOL)
    op = FisherOperator(flm, safety)
    u, w = _vec(flm.dim, 0), _vec(flm.dim, 1)
    torch.testing.assert_close(op.matvec(u), dense_f @ u, **TOL)
    torch.testing.assert_close(op.quad(u, w), u @ dense_f @ w, **TOL)
    # the fine-tuning gradient and g^T F g, the diagnosis' headline quadratic form
    torch.testing.assert_close(finetune_gradient(flm, finetune), g, **TOL)
    assert float(g @ dense_f @ g) > 1e-6
    torch.testing.assert_close(op.quad(g), g @ dense_f @ g, **TOL)


def test_hessian_vector_product_matches_dense(case):
    _, _, flm, _, finetune, _, dense_h, _ = case
    hess = HessianOperator(lambda t: flm.mean_nll(t, finetune), flm.theta0)
    v = _vec(flm.dim, 2)
    assert float((dense_h @ v).norm()) > 1e-3
    torch.testing.assert_close(hess.matvec(v), dense_h @ v, **TOL)


def test_top_eigenpairs_and_aic_match_dense(case):
    _, _, flm, safety, finetune, dense_f, dense_h, g = case
    op = FisherOperator(flm, safety)
    eig = lanczos_eigs(op, 4, tol=1e-12)
    vals, vecs = np.linalg.eigh(dense_f.numpy())
    vals, vecs = vals[::-1].copy(), vecs[:, ::-1].copy()
    np.testing.assert_allclose(eig.values.numpy(), vals[:4], rtol=1e-8)
    d = 2
    assert vals[d - 1] > 1.01 * vals[d]  # a gap: the top-d subspace is well defined
    ref = torch.from_numpy(vecs[:, :d])
    sines = torch.linalg.svdvals(ref.T @ eig.vectors[:, :d]).clamp(max=1).acos().sin()
    assert float(sines.max()) < 1e-6
    # the numbers the diagnosis reports for this architecture
    trace = float(torch.trace(dense_f))
    hess = HessianOperator(lambda t: flm.mean_nll(t, finetune), flm.theta0)
    aic = measure_direction(op, hess, make_subspace(eig, trace, None), g, d).to_dict()
    proj, a = ref @ ref.T, dense_h @ g
    f_half_p = ref @ torch.diag(torch.from_numpy(vals[:d]).sqrt()) @ ref.T
    expected = {
        "Pg_ratio": float((proj @ g).norm() / g.norm()),
        "gFg": float(g @ dense_f @ g),
        "gamma": float((f_half_p @ a).norm()),
        "kappa": float((a @ dense_f @ a / a.norm() ** 2) / (g @ dense_f @ g / g.norm() ** 2)),
    }
    for key, value in expected.items():
        assert abs(value) > 1e-8, key
        assert aic[key] == pytest.approx(value, rel=1e-7), key
