"""The Fisher through the LM head with the vocabulary coarsened to the top-k tokens.

Dense float64 references on tiny random Llama and GPT-2 models with a vocabulary of 128 and
hidden size 16: the hidden-state Jacobian by ``jacrev``, the coarsened curvature ``M_c`` built
per position from ``W`` and ``q`` as docs/theory.md states it.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import jacrev

from _tiny import exact_float64, random_batch, tiny_llama, trained_lora
from alignscope.curvature import FisherOperator, FunctionalLM, HessianOperator
from alignscope.curvature.functional import EXACT_EAGER
from alignscope.curvature.head import ladder
from alignscope.curvature.hvp import HessianSum
from alignscope.curvature.losses import ResponsePositions
from alignscope.curvature.surrogate import HiddenNLLSurrogate
from alignscope.params import select_params

V, H = 128, 16
TOL = dict(rtol=1e-10, atol=1e-12)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_embd=H, n_layer=2, n_head=2, n_positions=16,
        attn_implementation=EXACT_EAGER,
    )  # fmt: skip
    model = exact_float64(GPT2LMHeadModel(config))  # tied head: wte is the LM head
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return model


def _llama_lora():
    """LoRA on every layer (from layer 0: no frozen prefix), trained so it is not B = 0."""
    return trained_lora(tiny_llama(hidden=H, vocab=V))


# name -> (model, selection, prefix cache)
CASES = {
    "llama_late_cached": (
        lambda: tiny_llama(hidden=H, vocab=V),
        ["model.layers.1.mlp.down_proj.*"],
        True,
    ),
    "llama_late_whole": (
        lambda: tiny_llama(hidden=H, vocab=V),
        ["model.layers.1.mlp.down_proj.*"],
        False,
    ),
    "llama_from_layer0": (
        lambda: tiny_llama(hidden=H, vocab=V),
        ["model.layers.0.self_attn.v_proj.*", "model.layers.1.mlp.up_proj.*", "model.norm.*"],
        True,
    ),
    "gpt2_tied": (_gpt2, ["transformer.h.1.mlp.c_proj.weight"], True),
    "llama_lora_every_layer": (_llama_lora, ["lora"], True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, spec, cache = CASES[request.param]
    model = build()
    flm = FunctionalLM(model, select_params(model, spec), prefix_cache=cache)
    assert flm.head is not None and not flm.head.selected
    assert (flm.prefix is not None) == (cache and "layer0" not in request.param
                                        and "every_layer" not in request.param)  # fmt: skip
    batch = random_batch(4, vocab=V)
    return flm, batch, _dense(flm, batch)


def _dense(flm: FunctionalLM, batch) -> dict:
    """J_h [N, H, P], the softmax q [N, V], W [V, H], position weights w [N]."""
    pos = ResponsePositions(batch, flm.dtype)
    theta = flm.theta0
    jac = jacrev(lambda t: flm.position_hidden(t, batch.input_ids, pos.mask))(theta)
    weight, bias = flm.head_params(theta)
    with torch.no_grad():
        h = flm.position_hidden(theta, batch.input_ids, pos.mask)
        z = h @ weight.T + (0 if bias is None else bias)
    return {"J": jac, "q": torch.softmax(z, -1), "W": weight.detach(), "w": pos.weights}


def _curv(q: torch.Tensor, W: torch.Tensor, k: int | None) -> torch.Tensor:
    """M (k None) or M_c for one position, written out as the theory states them."""
    m = W.T @ q
    if k is None:
        return W.T @ (torch.diag(q) - torch.outer(q, q)) @ W
    order = torch.argsort(q, descending=True)
    top, tail = order[:k], order[k:]
    out = sum(q[i] * torch.outer(W[i] - m, W[i] - m) for i in top)
    r = q[tail].sum()
    if len(tail) and r > 0:
        wt = (m - (q[top, None] * W[top]).sum(0)) / r
        out = out + r * torch.outer(wt - m, wt - m)
    return out


def _fisher(d: dict, k: int | None) -> torch.Tensor:
    J, q, W, w = d["J"], d["q"], d["W"], d["w"]
    return sum(w[n] * J[n].T @ _curv(q[n], W, k) @ J[n] for n in range(q.shape[0]))


def _trace_fraction(d: dict, k: int) -> float:
    q, W, w = d["q"], d["W"], d["w"]
    full = sum(w[n] * torch.trace(_curv(q[n], W, None)) for n in range(q.shape[0]))
    kept = sum(w[n] * torch.trace(_curv(q[n], W, k)) for n in range(q.shape[0]))
    return float(kept / full)


def _vecs(dim: int, m: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, m, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("k", [3, 8])
def test_coarsened_products_equal_the_dense_formula(case, k):
    flm, batch, d = case
    op = FisherOperator(flm, batch, vocab_k=k, chunk_size=3)
    assert op.vocabulary["mode"] == "coarsened" and op.vocabulary["k"] == k
    dense = _fisher(d, k)
    vs = _vecs(flm.dim, 3)
    torch.testing.assert_close(op.matvec(vs[:, 0]), dense @ vs[:, 0], **TOL)
    torch.testing.assert_close(op.matmat(vs), dense @ vs, **TOL)
    torch.testing.assert_close(op.gram(vs.T), vs.T @ dense @ vs, **TOL)
    torch.testing.assert_close(op.quad_diag(vs.T), torch.diag(vs.T @ dense @ vs), **TOL)
    quad = op.quad(vs[:, 0], vs[:, 1])
    torch.testing.assert_close(quad, vs[:, 0] @ dense @ vs[:, 1], **TOL)
    # a lower bound of the exact Fisher, and the kept trace is the dense ratio
    gap = torch.linalg.eigvalsh(_fisher(d, None) - dense)
    assert float(gap.min()) >= -1e-12 * float(gap.abs().max())
    assert float(gap.max()) > 1e-8  # coarsening lost something here: a real check
    assert op.vocabulary["kept_trace"] == pytest.approx(_trace_fraction(d, k), rel=1e-10)


def test_whole_vocabulary_factor_is_exact(case):
    flm, batch, d = case
    exact = FisherOperator(flm, batch, vocab_keep=1.0)
    full = FisherOperator(flm, batch, vocab_k=V, jvp_mode="reverse")
    assert exact.vocabulary["mode"] == "exact" and full.vocabulary["kept_trace"] == pytest.approx(1)
    vs = _vecs(flm.dim, 2, seed=1)
    ref = exact.matmat(vs)
    torch.testing.assert_close(ref, _fisher(d, None) @ vs, **TOL)
    torch.testing.assert_close(full.matmat(vs), ref, **TOL)
    torch.testing.assert_close(full.matvec(vs[:, 1]), ref[:, 1], **TOL)


def test_ladder_takes_the_smallest_k_that_keeps_enough(case):
    flm, batch, d = case
    steps = ladder(V)
    assert steps == [1, 2, 4, 8, 16]
    fracs = [_trace_fraction(d, k) for k in steps]
    assert all(a <= b + 1e-12 for a, b in zip(fracs, fracs[1:], strict=False))  # finer keeps more
    keep = (fracs[2] + fracs[3]) / 2  # between k=4 and k=8: k=8 is the answer
    assert fracs[2] < keep < fracs[3]
    op = FisherOperator(flm, batch, vocab_keep=keep)
    assert op.vocabulary == {"mode": "coarsened", "k": 8, "kept_trace": pytest.approx(fracs[3]),
                             "vocab": V}  # fmt: skip
    strict = FisherOperator(flm, batch, vocab_keep=min(1.0, fracs[-1] + 1e-6))
    assert strict.vocabulary["mode"] == "exact" and "no k" in strict.vocabulary["why"]


def test_positions_gathered_before_the_head_equal_the_whole_logits(case):
    flm, batch, _ = case
    pos = ResponsePositions(batch, flm.dtype)
    theta = flm.theta0 + 0.1 * _vecs(flm.dim, 1, seed=3)[:, 0]
    ref = flm.logits(theta, batch.input_ids)[:, :-1][pos.mask]
    torch.testing.assert_close(flm.position_logits(theta, batch.input_ids, pos.mask), ref, **TOL)


def test_exact_path_products_equal_the_old_gather_after_the_head(case):
    """The exact path (gather, then head) against F built from the full logits' Jacobian."""
    flm, batch, _ = case
    pos = ResponsePositions(batch, flm.dtype)
    jz = jacrev(lambda t: flm.logits(t, batch.input_ids)[:, :-1][pos.mask])(flm.theta0)
    with torch.no_grad():
        q = torch.softmax(flm.logits(flm.theta0, batch.input_ids)[:, :-1][pos.mask], -1)
    dense = sum(
        pos.weights[n] * jz[n].T @ (torch.diag(q[n]) - torch.outer(q[n], q[n])) @ jz[n]
        for n in range(q.shape[0])
    )
    op = FisherOperator(flm, batch, vocab_keep=1.0)
    vs = _vecs(flm.dim, 2, seed=4)
    torch.testing.assert_close(op.matmat(vs), dense @ vs, **TOL)


def test_selected_head_or_small_vocabulary_stays_exact():
    model = tiny_llama(hidden=H, vocab=V)
    flm = FunctionalLM(model, select_params(model, ["model.layers.1.*", "lm_head.weight"]))
    op = FisherOperator(flm, random_batch(3, vocab=V), vocab_keep=0.5)
    assert op.vocabulary["mode"] == "exact" and "selection" in op.vocabulary["why"]
    small = tiny_llama()  # vocabulary 11 < 4 x hidden 8
    flm = FunctionalLM(small, select_params(small, ["model.layers.1.*"]))
    op = FisherOperator(flm, random_batch(3), vocab_keep=0.5)
    assert op.vocabulary["mode"] == "exact" and "cheap" in op.vocabulary["why"]
    with pytest.raises(ValueError, match="vocab_keep"):
        FisherOperator(flm, random_batch(3), vocab_keep=0.0)


@pytest.mark.parametrize("k", [5, V])
def test_nll_surrogate_gradient_is_exact_and_hessian_coarsens_only_the_softmax(case, k):
    flm, batch, d = case
    sur = HiddenNLLSurrogate(flm, batch, vocab_k=k)
    assert sur.vocabulary["mode"] == "coarsened" and sur.vocabulary["k"] == k
    exact_loss = lambda t: flm.mean_nll(t, batch)  # noqa: E731
    torch.testing.assert_close(
        HessianOperator(sur, flm.theta0).gradient(),
        HessianOperator(exact_loss, flm.theta0).gradient(),
        **TOL,
    )
    vs = _vecs(flm.dim, 2, seed=5)
    exact = HessianOperator(exact_loss, flm.theta0).matmat(vs)
    # H_c = H - J^T (M - M_c) J: only the softmax curvature is coarsened
    lost = _fisher(d, None) - _fisher(d, k)
    torch.testing.assert_close(
        HessianOperator(sur, flm.theta0).matmat(vs), exact - lost @ vs, **TOL
    )
    if k == V:
        assert float(lost.abs().max()) < 1e-12
    else:
        assert float((lost @ vs).abs().max()) > 1e-8
    # split over consecutive sub-batches, one graph per term: the same Hessian
    parts = [batch.select(slice(0, 1)), batch.select(slice(1, batch.size))]
    summed = HessianSum(sur.split(parts), flm.theta0).matmat(vs)
    torch.testing.assert_close(summed, exact - lost @ vs, **TOL)
    with pytest.raises(ValueError, match="cover"):
        sur.split(parts[:1])
        assert sur.vocabulary["kept_trace"] == pytest.approx(_trace_fraction(d, k), rel=1e-10)


def test_nll_surrogate_exact_when_the_vocabulary_is_not_coarsened(case):
    flm, batch, _ = case
    sur = HiddenNLLSurrogate(flm, batch, vocab_keep=1.0)
    assert sur.vocabulary["mode"] == "exact"
    theta = flm.theta0 + 0.01 * _vecs(flm.dim, 1, seed=6)[:, 0]
    torch.testing.assert_close(sur(theta), flm.mean_nll(theta, batch), **TOL)


def test_two_processes_choose_the_same_k_and_sum_to_one(tmp_path):
    """Data parallel: the ladder's traces are summed over the ranks, so both ranks coarsen
    alike and their summed products equal the one-process operator's."""
    from _ddp_commands import spawn
    from _ddp_vocab import products, vocab_worker

    spawn(vocab_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    one = products(None, 4)
    assert one["fisher"]["mode"] == "coarsened" and one["hessian"]["mode"] == "coarsened"
    for g in got:
        assert g["fisher"] == pytest.approx(one["fisher"]) and g["hessian"] == pytest.approx(
            one["hessian"]
        )
        torch.testing.assert_close(g["Fv"], one["Fv"], **TOL)
        torch.testing.assert_close(g["Hv"], one["Hv"], **TOL)
