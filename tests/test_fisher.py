"""The KL alignment loss and the Fisher operator against dense float64 references."""

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from _tiny import TinyMLPLM, random_batch, tiny_llama
from alignscope.curvature import AlignmentKL, FisherOperator, FunctionalLM
from alignscope.params import select_params


@pytest.fixture(scope="module", params=["llama", "mlp"])
def setup(request):
    if request.param == "llama":
        model = tiny_llama()
        sel = select_params(model, ["model.layers.1.*", "lm_head.weight"])
    else:
        model = TinyMLPLM()
        sel = select_params(model)
    flm = FunctionalLM(model, sel)
    batch = random_batch(4)
    return flm, batch, dense_fisher(flm, batch, flm.theta0)


def dense_fisher(flm, batch, theta):
    """sum_n w_n J_n^T (diag q_n - q_n q_n^T) J_n, J by autograd.functional.jacobian."""
    kl = AlignmentKL(flm, batch)
    jac = jacobian(kl.position_logits, theta)  # [N, V, P]
    q = torch.softmax(kl.position_logits(theta), dim=-1)
    lam = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    return torch.einsum("n,nvp,nvw,nwq->pq", kl.positions.weights, jac, lam, jac)


def _vec(dim, seed):
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_kl_is_zero_with_zero_gradient_and_fisher_hessian_at_reference(setup):
    flm, batch, dense = setup
    kl = AlignmentKL(flm, batch)
    theta = flm.theta0.clone().requires_grad_(True)
    value = kl(theta)
    (g,) = torch.autograd.grad(value, theta)
    assert abs(value.item()) < 1e-14
    assert float(g.abs().max()) < 1e-12
    h = hessian(kl, flm.theta0)
    assert float(dense.abs().max()) > 1e-3
    torch.testing.assert_close(h, dense, rtol=1e-9, atol=1e-12)
    # away from the reference the KL is positive and its per-example means average to it
    moved = flm.theta0 + 0.05 * _vec(flm.dim, 3)
    assert float(kl(moved)) > 0
    torch.testing.assert_close(kl.per_example(moved).mean(), kl(moved))
    # one forward for both: the same KL and the NLL that mean_nll computes separately
    both = kl.with_nll(moved)
    torch.testing.assert_close(both[0], kl(moved), rtol=1e-12, atol=0)
    torch.testing.assert_close(both[1], flm.mean_nll(moved, batch), rtol=1e-12, atol=0)


# auto (and reverse with the cache): J v through the cached graph's transpose; reverse without
# the cache: the double-vjp trick recomputed per product; forward: forward-mode AD
ROUTES = [("auto", True), ("forward", True), ("reverse", True), ("reverse", False)]


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize(("jvp_mode", "cache_vjp"), ROUTES)
def test_fisher_products_and_quadratic_forms_match_dense(setup, chunk_size, jvp_mode, cache_vjp):
    flm, batch, dense = setup
    op = FisherOperator(flm, batch, chunk_size=chunk_size, jvp_mode=jvp_mode, cache_vjp=cache_vjp)
    u, w = _vec(flm.dim, 0), _vec(flm.dim, 1)
    torch.testing.assert_close(op.matvec(u), dense @ u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.matvec(u), dense @ u, rtol=1e-9, atol=1e-12)  # cached vjp
    torch.testing.assert_close(op.quad(u, w), u @ dense @ w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.quad(u), u @ dense @ u, rtol=1e-9, atol=1e-12)
    vs = torch.stack([u, w, u + 2 * w])
    torch.testing.assert_close(op.gram(vs), vs @ dense @ vs.T, rtol=1e-9, atol=1e-12)
    expected = torch.einsum("mp,pq,mq->m", vs, dense, vs)
    torch.testing.assert_close(op.quad_diag(vs), expected, rtol=1e-9, atol=1e-12)
    # blocks of one tangent at a time give the same numbers
    torch.testing.assert_close(op.quad_diag(vs, memory_budget=1), expected, rtol=1e-9, atol=1e-12)


def test_fisher_away_from_reference_is_the_gauss_newton_there(setup):
    flm, batch, _ = setup
    theta = flm.theta0 + 0.1 * _vec(flm.dim, 5)
    op = FisherOperator(flm, batch, theta=theta)
    v = _vec(flm.dim, 6)
    torch.testing.assert_close(
        op.matvec(v), dense_fisher(flm, batch, theta) @ v, rtol=1e-9, atol=1e-12
    )


def test_monte_carlo_factor_rows_converge_to_exact_fisher(setup):
    flm, batch, dense = setup
    op = FisherOperator(flm, batch)
    errors = []
    for samples in (4, 64, 1024):
        rows = op.mc_factor_rows(samples, generator=torch.Generator().manual_seed(0))
        assert rows.shape == (batch.size * samples, flm.dim)
        errors.append(float((rows.T @ rows - dense).norm() / dense.norm()))
    # Monte-Carlo error shrinks like 1/sqrt(S): 256x the samples, ~16x smaller error
    assert errors[2] < errors[0] / 6
    assert errors[2] < 0.08


def test_empirical_fisher_rows_are_observed_token_gradients(setup):
    flm, batch, _ = setup
    op = FisherOperator(flm, batch)
    rows = op.empirical_factor_rows()
    grads = []
    for b in range(batch.size):
        theta = flm.theta0.clone().requires_grad_(True)
        loss = flm.per_example_nll(theta, batch.select([b]))[0]
        grads.append(torch.autograd.grad(loss, theta)[0])
    g = torch.stack(grads)
    torch.testing.assert_close(rows.T @ rows, g.T @ g / batch.size, rtol=1e-10, atol=1e-12)


def test_fisher_forward_mode_falls_back_when_attention_lacks_it():
    model = tiny_llama()
    flm = FunctionalLM(model, select_params(model, "lm_head.weight"))
    batch = random_batch(2)
    exact = FisherOperator(flm, batch, jvp_mode="reverse").matvec(_vec(flm.dim, 0))
    op = FisherOperator(flm, batch, cache_vjp=False)  # auto's forward-mode route

    def broken_jvp(*args, **kwargs):
        raise NotImplementedError("forward AD not implemented for this kernel")

    import alignscope.curvature.fisher as fisher_module

    original = fisher_module.jvp
    fisher_module.jvp = broken_jvp
    try:
        with pytest.warns(UserWarning, match="double-vjp"):
            out = op.matvec(_vec(flm.dim, 0))
    finally:
        fisher_module.jvp = original
    assert op.jvp_mode == "reverse"
    torch.testing.assert_close(out, exact)


def test_fisher_auto_mode_transposes_the_cached_graph_without_forward_mode(setup, monkeypatch):
    flm, batch, dense = setup
    op = FisherOperator(flm, batch, chunk_size=3)
    import alignscope.curvature.fisher as fisher_module

    def broken_jvp(*args, **kwargs):
        raise AssertionError("forward mode must not run")

    monkeypatch.setattr(fisher_module, "jvp", broken_jvp)
    u = _vec(flm.dim, 0)
    vs = torch.stack([u, _vec(flm.dim, 1)])
    torch.testing.assert_close(op.matvec(u), dense @ u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.matmat(vs.T), dense @ vs.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.gram(vs), vs @ dense @ vs.T, rtol=1e-9, atol=1e-12)
    # one transposed graph per chunk, built once and kept
    assert all(c.jvp_fn is not None for c in op.chunks) and op.jvp_mode == "auto"


def test_fisher_falls_back_to_forward_mode_when_the_transpose_fails(setup, monkeypatch):
    flm, batch, dense = setup
    op = FisherOperator(flm, batch)

    def broken(self, chunk):
        raise RuntimeError("double backward not implemented for this kernel")

    monkeypatch.setattr(FisherOperator, "_transposed", broken)
    u = _vec(flm.dim, 0)
    with pytest.warns(UserWarning, match="forward-mode AD"):
        out = op.matvec(u)
    assert not op.transpose_ok
    torch.testing.assert_close(out, dense @ u, rtol=1e-9, atol=1e-12)
    vs = torch.stack([u, _vec(flm.dim, 1)]).T
    torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="double backward"):  # reverse mode has no fallback
        FisherOperator(flm, batch, jvp_mode="reverse").matvec(u)


def test_fisher_switches_fused_attention_to_eager():
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    flm = FunctionalLM(model, select_params(model, "lm_head.weight"))
    op = FisherOperator(flm, random_batch(2))
    assert model.config._attn_implementation == "eager" and op.jvp_mode == "auto"


def test_new_lora_adapter_fisher_lives_in_the_b_coordinates():
    # A new adapter has B = 0, so the output does not depend on A at first order: the Fisher's
    # A rows and columns are exactly zero, and its eigenvectors lie in B's coordinates. The
    # products need nothing special for it (A's share of a pass is its rank-r matmuls); this
    # checks that they keep the structure exactly.
    from peft import LoraConfig, get_peft_model

    from _tiny import exact_float64
    from alignscope.curvature import lanczos_eigs

    model = exact_float64(
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    )
    sel = select_params(model, "lora")
    flm = FunctionalLM(model, sel)
    batch = random_batch(4)
    op = FisherOperator(flm, batch)
    pairs = zip(sel.names, sel.numels, strict=True)
    is_a = torch.cat([torch.full((n,), ".lora_A." in name) for name, n in pairs])
    assert 0 < int(is_a.sum()) < flm.dim
    dense = dense_fisher(flm, batch, flm.theta0)
    assert float(dense[is_a].abs().max()) == 0.0 and float(dense[~is_a].abs().max()) > 1e-6
    vs = torch.stack([_vec(flm.dim, 0), _vec(flm.dim, 1)], dim=1)
    out = op.matmat(vs)
    assert float(out[is_a].abs().max()) == 0.0  # exactly, not to rounding
    torch.testing.assert_close(out, dense @ vs, rtol=1e-9, atol=1e-12)
    eig = lanczos_eigs(op, 3, tol=1e-10)
    assert float(eig.values.min()) > 0
    assert float(eig.vectors[is_a].abs().max()) < 1e-10
