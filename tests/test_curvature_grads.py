"""Per-sample gradients and Hessian-vector products against dense float64 references."""

import pytest
import torch
from torch.autograd.functional import hessian

from _tiny import TinyMLPLM, random_batch, tiny_llama
from alignscope.curvature import (
    FunctionalLM,
    HessianOperator,
    hvp_forward,
    hvp_reverse,
    per_sample_grads,
    response_weights,
)
from alignscope.params import select_params


@pytest.fixture(params=["llama", "mlp"])
def flm(request):
    if request.param == "llama":
        model = tiny_llama()
        names = ["model.layers.1.self_attn.*", "*.1.input_layernorm.weight", "lm_head.weight"]
        return FunctionalLM(model, select_params(model, names))
    model = TinyMLPLM()
    return FunctionalLM(model, select_params(model))


def _one_at_a_time(flm, batch):
    rows = []
    for b in range(batch.size):
        theta = flm.theta0.clone().requires_grad_(True)
        loss = flm.per_example_nll(theta, batch.select([b]))[0]
        rows.append(torch.autograd.grad(loss, theta)[0])
    return torch.stack(rows)


def test_per_sample_grads_vmap_loop_and_autograd_agree(flm):
    batch = random_batch(5)
    weights = response_weights(batch, torch.float64)
    ref = _one_at_a_time(flm, batch)
    inputs = (batch.input_ids, weights)
    vm = per_sample_grads(flm.example_nll, flm.theta0, inputs, method="vmap", chunk_size=2)
    lp = per_sample_grads(flm.example_nll, flm.theta0, inputs, method="loop")
    assert ref.abs().max() > 1e-3  # the reference is not trivially zero
    torch.testing.assert_close(vm, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp, ref, rtol=1e-10, atol=1e-12)
    # the mean of per-sample gradients is the gradient of the mean loss
    theta = flm.theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(flm.mean_nll(theta, batch), theta)
    torch.testing.assert_close(vm.mean(0), g, rtol=1e-10, atol=1e-12)


def test_per_sample_grads_falls_back_to_loop_and_says_why():
    def not_vmappable(theta, x):
        if float(x.sum()) > 0:  # data-dependent control flow: vmap cannot run it
            return (theta * x).sum() ** 2
        return theta.sum()

    theta = torch.arange(3, dtype=torch.float64)
    xs = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    with pytest.warns(UserWarning, match="falling back"):
        out = per_sample_grads(not_vmappable, theta, (xs,))
    torch.testing.assert_close(out[0], 2 * (theta @ xs[0]) * xs[0])
    torch.testing.assert_close(out[1], torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        per_sample_grads(not_vmappable, theta, (xs,), method="vmap")


def test_per_sample_grads_rejects_empty_input():
    with pytest.raises(ValueError, match="empty"):
        per_sample_grads(lambda t, x: t.sum(), torch.zeros(2), (torch.zeros(0, 2),))


def test_hvp_modes_match_dense_hessian(flm):
    batch = random_batch(4)

    def f(theta):
        return flm.mean_nll(theta, batch)

    dense = hessian(f, flm.theta0, vectorize=True)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(flm.dim, generator=gen, dtype=torch.float64)
    expected = dense @ v
    assert expected.norm() > 1e-3
    torch.testing.assert_close(hvp_reverse(f, flm.theta0, v), expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(hvp_forward(f, flm.theta0, v), expected, rtol=1e-9, atol=1e-11)
    for mode, used in (("auto", "reverse"), ("forward", "forward"), ("reverse", "reverse")):
        op = HessianOperator(f, flm.theta0, mode=mode)
        torch.testing.assert_close(op(v), expected, rtol=1e-9, atol=1e-11)
        assert op.mode == used


def test_hessian_operator_falls_back_to_double_backward():
    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x**2 * g

    def f(theta):
        return NoForwardAD.apply(theta).sum()

    theta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    op = HessianOperator(f, theta, mode="forward")
    with pytest.warns(UserWarning, match="double backward"):
        out = op(torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out, 6 * theta)
    assert op.mode == "reverse"


@pytest.mark.parametrize("names", ["all", ["model.layers.1.mlp.*"]])  # a cached prefix
def test_nll_gathered_before_the_head_equals_every_position(names):
    model = tiny_llama()
    flm = FunctionalLM(model, select_params(model, names))
    assert flm.head is not None and (names == "all" or flm.prefix is not None)
    batch = random_batch(4)
    weights = response_weights(batch, flm.dtype)

    def every(theta):  # the head over every position, non-response ones weighted zero
        return flm.example_nll(theta, batch.input_ids, weights).mean()

    def gathered(theta):
        return flm.mean_nll(theta, batch)

    theta = flm.theta0 + 0.01 * torch.randn(
        flm.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    torch.testing.assert_close(
        flm.per_example_nll(theta, batch),
        flm.example_nll(theta, batch.input_ids, weights),
        rtol=1e-12,
        atol=0,
    )
    g1 = torch.func.grad(every)(theta)
    g2 = torch.func.grad(gathered)(theta)
    assert float(g1.norm()) > 1e-3
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-13)
    v = torch.randn(flm.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(
        hvp_reverse(gathered, theta, v), hvp_reverse(every, theta, v), rtol=1e-9, atol=1e-12
    )
