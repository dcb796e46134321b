"""The linear-operator protocol and batched matmat against stacked matvecs and dense float64."""

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian

import alignscope.curvature.fisher as fisher_module
import alignscope.curvature.hvp as hvp_module
from _tiny import TinyMLPLM, random_batch, tiny_llama
from alignscope.curvature import (
    BlockOperator,
    CallableOperator,
    DenseOperator,
    FactorSource,
    FisherOperator,
    FunctionalLM,
    HessianOperator,
    LinearOperator,
    fisher_eigs,
    hutchinson,
    hutchpp,
    lanczos_eigs,
    stacked_matvecs,
)
from alignscope.curvature.hvp import HessianSum
from alignscope.params import ParamSelection, select_params
from test_fisher import dense_fisher


@pytest.fixture(scope="module", params=["llama", "mlp"])
def setup(request):
    if request.param == "llama":
        model = tiny_llama()
        sel = select_params(model, ["model.layers.1.*", "lm_head.weight"], group="tensor")
    else:
        model = TinyMLPLM()
        sel = select_params(model, group="tensor")
    flm = FunctionalLM(model, sel)
    batch = random_batch(4)
    return flm, batch, dense_fisher(flm, batch, flm.theta0)


def _mat(dim, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, k, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize(
    ("jvp_mode", "cache_vjp"), [("auto", True), ("forward", True), ("reverse", False)]
)
def test_fisher_matmat_equals_stacked_matvecs_and_dense(setup, chunk_size, jvp_mode, cache_vjp):
    flm, batch, dense = setup
    vs = _mat(flm.dim, 5, 0)
    for budget in (2**30, 1):  # all five vectors in one pass; one vector per pass
        op = FisherOperator(
            flm, batch, chunk_size=chunk_size, jvp_mode=jvp_mode, memory_budget=budget,
            cache_vjp=cache_vjp,
        )  # fmt: skip
        out = op.matmat(vs)
        assert out.shape == (flm.dim, 5) and op.n_products == 5
        torch.testing.assert_close(out, dense @ vs, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out, stacked_matvecs(op, vs), rtol=1e-12, atol=1e-14)
        # the pairwise forms, also split into blocks by the budget
        torch.testing.assert_close(op.gram(vs.T), vs.T @ dense @ vs, rtol=1e-9, atol=1e-12)
        assert op.vmap_ok


def test_hessian_matmat_equals_stacked_matvecs_and_dense(setup):
    flm, batch, _ = setup

    def f(theta):
        return flm.mean_nll(theta, batch)

    dense = hessian(f, flm.theta0, vectorize=True)
    vs = _mat(flm.dim, 4, 1)
    for mode in ("reverse", "forward"):
        for budget in (2**30, 1):
            op = HessianOperator(f, flm.theta0, mode=mode, memory_budget=budget)
            out = op.matmat(vs)
            assert op.n_products == 4 and op.mode == mode and op.vmap_ok
            torch.testing.assert_close(out, dense @ vs, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(out, stacked_matvecs(op, vs), rtol=1e-10, atol=1e-12)


def test_hessian_cached_graph_is_built_once_and_gives_the_same_products(setup):
    flm, batch, _ = setup
    calls = []

    def f(theta):
        calls.append(1)
        return flm.mean_nll(theta, batch)

    dense = hessian(lambda t: flm.mean_nll(t, batch), flm.theta0, vectorize=True)
    vs = _mat(flm.dim, 3, 2)
    op = HessianOperator(f, flm.theta0, cache_graph=True)
    torch.testing.assert_close(op.matvec(vs[:, 0]), dense @ vs[:, 0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.matmat(vs[:, 1:]), dense @ vs[:, 1:], rtol=1e-9, atol=1e-11)
    g = torch.autograd.functional.jacobian(lambda t: flm.mean_nll(t, batch), flm.theta0)
    torch.testing.assert_close(op.gradient(), g, rtol=1e-10, atol=1e-12)
    assert len(calls) == 1 and op.n_products == 6  # one graph for every product
    op.release()
    torch.testing.assert_close(op.matvec(vs[:, 2]), dense @ vs[:, 2], rtol=1e-9, atol=1e-11)
    assert len(calls) == 2  # released: built again


def test_hessian_sum_over_chunks_equals_the_whole_batch(setup):
    flm, batch, _ = setup
    dense = hessian(lambda t: flm.mean_nll(t, batch), flm.theta0, vectorize=True)
    parts = [batch.select(slice(0, 1)), batch.select(slice(1, 3)), batch.select(slice(3, 4))]
    op = HessianSum([lambda t, b=b: flm.mean_nll(t, b, batch.size) for b in parts], flm.theta0)
    vs = _mat(flm.dim, 3, 4)
    torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.matvec(vs[:, 0]), dense @ vs[:, 0], rtol=1e-9, atol=1e-11)
    assert op.n_products == 4 and isinstance(op, LinearOperator)


def test_operators_satisfy_the_protocol(setup):
    flm, batch, dense = setup
    fisher = FisherOperator(flm, batch)
    hess = HessianOperator(lambda t: flm.mean_nll(t, batch), flm.theta0)
    dense_op = DenseOperator(dense)
    ops = [
        fisher,
        hess,
        dense_op,
        CallableOperator(lambda v: dense @ v, flm.dim),
        BlockOperator(fisher, torch.arange(3)),
    ]
    for op in ops:
        assert isinstance(op, LinearOperator), type(op).__name__
        assert op.dtype == torch.float64 and op.device == torch.device("cpu")
    assert fisher.shape == hess.shape == dense_op.shape == (flm.dim, flm.dim)
    assert isinstance(fisher, FactorSource) and fisher.n_examples == batch.size
    assert not isinstance(hess, FactorSource)
    assert not isinstance(lambda v: v, LinearOperator)
    with pytest.raises(TypeError, match="LinearOperator"):
        lanczos_eigs(lambda v: dense @ v, 3)
    with pytest.raises(ValueError, match=r"\[P, k\]"):
        fisher.matmat(torch.zeros(flm.dim, dtype=torch.float64))


def test_block_operator_is_the_diagonal_block(setup):
    flm, batch, dense = setup
    index = torch.tensor([0, 2, 5, 7])
    block = BlockOperator(FisherOperator(flm, batch), index)
    vs = _mat(4, 3, 2)
    expected = dense[index][:, index] @ vs
    torch.testing.assert_close(block.matmat(vs), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(block.matvec(vs[:, 0]), expected[:, 0], rtol=1e-9, atol=1e-12)


def test_fisher_matmat_falls_back_to_one_vector_at_a_time(setup, monkeypatch):
    flm, batch, dense = setup
    op = FisherOperator(flm, batch, jvp_mode="forward")

    def broken_vmap(*args, **kwargs):
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setattr(fisher_module, "vmap", broken_vmap)
    vs = _mat(flm.dim, 3, 3)
    with pytest.warns(UserWarning, match="one vector at a time"):
        out = op.matmat(vs)
    assert not op.vmap_ok
    torch.testing.assert_close(out, dense @ vs, rtol=1e-9, atol=1e-12)


def test_fisher_matmat_batches_reverse_mode_when_forward_mode_fails(setup, monkeypatch):
    flm, batch, dense = setup
    op = FisherOperator(flm, batch, cache_vjp=False)  # auto's forward-mode route

    def broken_jvp(*args, **kwargs):
        raise NotImplementedError("forward AD not implemented for this kernel")

    monkeypatch.setattr(fisher_module, "jvp", broken_jvp)
    vs = _mat(flm.dim, 3, 4)
    with pytest.warns(UserWarning, match="double-vjp"):
        out = op.matmat(vs)
    assert op.jvp_mode == "reverse" and op.vmap_ok  # still batched, on the reverse route
    torch.testing.assert_close(out, dense @ vs, rtol=1e-9, atol=1e-12)


def test_hessian_matmat_falls_back_to_one_vector_at_a_time(setup, monkeypatch):
    flm, batch, _ = setup

    def f(theta):
        return flm.mean_nll(theta, batch)

    def broken(*args, **kwargs):
        raise RuntimeError("vmap: no batching rule")

    monkeypatch.setattr(hvp_module, "hvp_reverse_batched", broken)
    op = HessianOperator(f, flm.theta0)
    vs = _mat(flm.dim, 3, 5)
    with pytest.warns(UserWarning, match="one vector at a time"):
        out = op.matmat(vs)
    assert not op.vmap_ok and op.n_products == 3
    expected = hessian(f, flm.theta0, vectorize=True) @ vs
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)


class _CountingOperator(DenseOperator):
    """A dense operator that refuses single products, so estimators must batch."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.matmat_calls = 0

    def matvec(self, v):
        raise AssertionError("one vector at a time")

    def matmat(self, vectors):
        self.matmat_calls += 1
        return super().matmat(vectors)


def test_trace_estimators_use_batched_products(setup):
    flm, batch, dense = setup
    op = _CountingOperator(dense)
    est = hutchpp(op, 30, seed=0)
    assert op.matmat_calls == 3 and op.n_products == 30  # sketch, exact block, probes
    # through the Fisher operator itself: the same estimate as on its dense matrix
    torch.testing.assert_close(
        torch.tensor(hutchpp(FisherOperator(flm, batch), 30, seed=0).value),
        torch.tensor(est.value),
        rtol=1e-9,
        atol=0,
    )
    h = hutchinson(op, 12, seed=1)
    assert op.matmat_calls == 4 and h.n_products == 12


def test_fisher_eigs_takes_blocks_explicitly_and_any_operator(setup):
    flm, batch, dense = setup
    sel = flm.selection
    blockdiag = torch.zeros_like(dense)
    for name in sel.blocks:
        idx = sel.block_index(name)
        blockdiag[idx[:, None], idx] = dense[idx[:, None], idx]
    res, plan = fisher_eigs(FisherOperator(flm, batch), 3, method="lanczos", blocks=sel, tol=1e-12)
    assert plan.blockwise and res.method == "block-lanczos"
    expected = np.sort(np.linalg.eigvalsh(blockdiag.numpy()))[::-1][:3]
    np.testing.assert_allclose(res.values.numpy(), expected, rtol=1e-8)
    # a plain dense operator works with Lanczos but has no factor rows for the Gram route
    res, _ = fisher_eigs(DenseOperator(dense), 3, method="lanczos", tol=1e-12)
    np.testing.assert_allclose(
        res.values.numpy(), np.linalg.eigvalsh(dense.numpy())[::-1][:3], rtol=1e-8
    )
    with pytest.raises(TypeError, match="factor rows"):
        fisher_eigs(DenseOperator(dense), 3, method="gram")
    other = ParamSelection(["x"], [torch.Size([flm.dim + 1])])
    with pytest.raises(ValueError, match="selection has"):
        fisher_eigs(DenseOperator(dense), 3, blocks=other)
