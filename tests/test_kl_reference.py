"""The KL reference recomputed at theta0 against the stored table (issue 14 item 3).

Recomputing the reference distribution inside every call keeps nothing vocabulary-sized
resident; these tests hold it to the old stored table in float64: the KL value, its gradient,
its Hessian at theta0, and the Fisher products, forms and Monte-Carlo rows built on the softmax.
"""

import pytest
import torch
from torch.autograd.functional import hessian

from _tiny import TinyMLPLM, random_batch, tiny_llama
from alignscope.curvature import AlignmentKL, FisherOperator, FunctionalLM
from alignscope.params import select_params


@pytest.fixture(scope="module", params=["llama", "mlp"])
def flm(request):
    if request.param == "llama":
        model = tiny_llama()
        return FunctionalLM(model, select_params(model, ["model.layers.1.*", "lm_head.weight"]))
    return FunctionalLM(TinyMLPLM(), select_params(TinyMLPLM()))


def _vec(dim, seed):
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_recomputed_kl_equals_the_table_in_value_gradient_and_hessian(flm):
    batch = random_batch(4)
    new, old = AlignmentKL(flm, batch), AlignmentKL(flm, batch, reference="table")
    assert new.reference == "recompute" and new._table is None
    assert old._table.shape == (old.positions.count, 11)
    moved = flm.theta0 + 0.05 * _vec(flm.dim, 3)
    for theta in (flm.theta0, moved):
        values, grads = [], []
        for kl in (new, old):
            x = theta.clone().requires_grad_(True)
            value = kl(x)
            values.append(value)
            grads.append(torch.autograd.grad(value, x)[0])
        torch.testing.assert_close(values[0], values[1], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(new.per_example(theta), old.per_example(theta))
        for a, b in zip(new.with_nll(theta), old.with_nll(theta), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert float(new(moved)) > 1e-4  # away from theta0 the compared numbers are not all zero
    # the reference is a constant of the loss: its Hessian at theta0 is the same Fisher
    torch.testing.assert_close(hessian(new, flm.theta0), hessian(old, flm.theta0), rtol=1e-10,
                               atol=1e-13)  # fmt: skip


@pytest.mark.parametrize("jvp_mode", ["forward", "reverse"])
def test_recomputed_softmax_gives_the_same_fisher_products(flm, jvp_mode):
    batch = random_batch(4)
    kw = {"chunk_size": 3, "jvp_mode": jvp_mode}
    new, old = FisherOperator(flm, batch, **kw), FisherOperator(flm, batch, reference="table", **kw)
    assert all(c.table is None for c in new.chunks)
    assert all(c.table is not None for c in old.chunks)
    u, w = _vec(flm.dim, 0), _vec(flm.dim, 1)
    vs = torch.stack([u, w, u - 3 * w])

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    close(new.matvec(u), old.matvec(u))
    close(new.matmat(vs.T), old.matmat(vs.T))
    close(new.quad(u, w), old.quad(u, w))
    close(new.quad_diag(vs), old.quad_diag(vs))
    close(new.gram(vs), old.gram(vs))
    # and with the F v of the KL itself (its Hessian at theta0, the reference held constant)
    kl = AlignmentKL(flm, batch)
    x = flm.theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl(x), x, create_graph=True)
    (hv,) = torch.autograd.grad(g @ u, x)
    torch.testing.assert_close(new.matvec(u), hv, rtol=1e-9, atol=1e-12)
    # the Monte-Carlo rows draw from the same softmax with the same generator
    rows = [
        op.mc_factor_rows(2, generator=torch.Generator().manual_seed(0)) for op in (new, old)
    ]
    close(rows[0], rows[1])


def test_unknown_reference_is_refused(flm):
    batch = random_batch(2)
    with pytest.raises(ValueError, match="unknown KL reference"):
        AlignmentKL(flm, batch, reference="topk")
    with pytest.raises(ValueError, match="unknown reference"):
        FisherOperator(flm, batch, reference="topk")
