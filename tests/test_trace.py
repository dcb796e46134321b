"""tr A deflated by an eigensolver's Krylov basis, against dense float64 traces."""

import warnings

import numpy as np
import pytest
import torch

from _tiny import random_batch, tiny_llama
from alignscope.curvature import (
    DenseOperator,
    FisherOperator,
    FunctionalLM,
    block_krylov_eigs,
    block_lanczos_eigs,
    deflated_trace,
    fisher_eigs,
    gram_eigs,
    hutchinson,
    lanczos_eigs,
    subspace_trace,
)
from alignscope.curvature.trace import DEFLATED_PROBES, TRACE_PRODUCTS
from alignscope.params import ParamSelection, select_params


def _psd(values, dim, seed=0):
    """A dense PSD matrix with the given eigenvalues (the rest zero) in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    values = torch.as_tensor(values, dtype=torch.float64)
    return (q[:, : values.numel()] * values) @ q[:, : values.numel()].T


def _concentrated(dim=200):
    """Like the alignment Fisher: a power-law spectrum ``50 j^-1.5``, its top five ~60% of the
    trace and a long tail (~15% past the 30th) that no small basis captures."""
    return _psd(50.0 * torch.arange(1, dim + 1, dtype=torch.float64) ** -1.5, dim, seed=1)


@pytest.mark.parametrize("solver", ["lanczos", "block-krylov"])
def test_exact_part_is_the_projected_trace_of_the_kept_basis(solver):
    dense = _concentrated()
    op = DenseOperator(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short run below stops unconverged, by design
        for max_iter in (None, 8):
            kw = dict(max_iter=max_iter, tol=1e-10 if max_iter is None else 1e-14, keep_basis=True)
            if solver == "lanczos":
                eig = lanczos_eigs(op, 5, **kw)
            else:
                eig = block_krylov_eigs(op, 5, block_size=4, **kw)
            q = eig.basis
            assert q.shape == (eig.n_products, 200)
            torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12,
                                       rtol=0)  # fmt: skip
            # tr(Q^T A Q) from the solver's own projections, converged or not
            assert eig.basis_trace == pytest.approx(float(torch.trace(q @ dense @ q.T)), rel=1e-12)
            assert eig.converged == (max_iter is None)
    assert lanczos_eigs(op, 5).basis is None  # kept only when asked for


def test_exact_part_holds_to_the_basis_precision_on_a_float32_operator():
    """The identity rests on the basis's orthogonality: a float32 basis (the default for a
    float32 operator) keeps it to float32 rounding, and the deflated estimate stays unbiased."""
    dense = _concentrated()
    op = DenseOperator(dense.float())
    eig = lanczos_eigs(op, 5, tol=1e-6, keep_basis=True)
    q = eig.basis.double()
    assert eig.basis.dtype == torch.float32
    assert float((q @ q.T - torch.eye(q.shape[0], dtype=torch.float64)).abs().max()) < 1e-5
    assert eig.basis_trace == pytest.approx(float(torch.trace(q @ dense @ q.T)), rel=1e-5)
    exact = float(torch.trace(dense))
    est = deflated_trace(op, eig.basis, eig.basis_trace, 10, seed=0)
    assert abs(est.value - exact) < 4 * est.stderr


def test_exact_when_the_range_lies_in_the_basis():
    dense = _psd([7.0, 3.0, 1.0, 0.5, 0.25, 0.1], 80)
    op = DenseOperator(dense)
    exact = float(torch.trace(dense))
    # the Krylov basis of a rank-6 operator reaches its whole range (at its breakdown; the
    # restarts past it break down at once, so Lanczos never declares k = rank pairs converged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eig = lanczos_eigs(op, 6, max_iter=10, keep_basis=True)
    est = deflated_trace(op, eig.basis, eig.basis_trace, 4, seed=0)
    assert est.value == pytest.approx(exact, rel=1e-9) and est.stderr < 1e-9 * exact
    # any orthonormal basis spanning the range, with its projected trace
    vals, vecs = torch.linalg.eigh(dense)
    q = vecs[:, -10:].T.contiguous()
    est = deflated_trace(op, q, float(vals[-10:].sum()), 3, seed=5)
    assert est.value == pytest.approx(exact, rel=1e-12)
    # an incomplete basis leaves a remainder to sample: no longer exact
    est = deflated_trace(op, q[-3:], float(vals[-3:].sum()), 3, seed=5)
    assert abs(est.value - exact) > 1e-3 and est.stderr > 1e-3


def test_deflated_beats_hutchinson_on_a_concentrated_spectrum():
    dense = _concentrated()
    op = DenseOperator(dense)
    exact = float(torch.trace(dense))
    eig = lanczos_eigs(op, 5, keep_basis=True)
    n = DEFLATED_PROBES
    products = eig.n_products + n  # what Hutchinson gets instead: every product a probe
    errors, hutch = [], []
    for seed in range(10):
        est = deflated_trace(op, eig.basis, eig.basis_trace, n, seed=seed)
        assert est.n_products == n and est.method == "deflated"
        assert est.value >= eig.basis_trace  # PSD: every remainder sample is >= 0
        # within a few of its own standard errors, which are not vanishing
        assert 0 < est.stderr < 0.05 * exact
        assert abs(est.value - exact) < 4 * est.stderr, seed
        errors.append(est.value - exact)
        hutch.append(hutchinson(op, products, seed=seed).value - exact)
    rms = float(np.sqrt(np.mean(np.square(errors))))
    rms_hutch = float(np.sqrt(np.mean(np.square(hutch))))
    assert rms < rms_hutch / 5, (rms, rms_hutch)  # 13x with these seeds


def test_top_ritz_vectors_deflate_too_but_the_whole_basis_more():
    """The top-k Ritz vectors with their Ritz values are also a valid (Q, tr Q^T A Q): unbiased,
    but the remainder outside k vectors is larger than outside the whole Krylov basis."""
    dense = _concentrated()
    op = DenseOperator(dense)
    exact = float(torch.trace(dense))
    eig = lanczos_eigs(op, 5, keep_basis=True)
    ritz = eig.vectors.T.contiguous()
    assert float(eig.values.sum()) == pytest.approx(float(torch.trace(ritz @ dense @ ritz.T)),
                                                    rel=1e-10)  # fmt: skip
    whole, top = [], []
    for seed in range(10):
        whole.append(deflated_trace(op, eig.basis, eig.basis_trace, 10, seed=seed))
        top.append(deflated_trace(op, ritz, float(eig.values.sum()), 10, seed=seed))
    assert all(abs(e.value - exact) < 4 * e.stderr for e in top)
    assert np.mean([e.stderr for e in whole]) < np.mean([e.stderr for e in top]) / 2


def test_subspace_trace_deflates_only_with_a_kept_krylov_basis():
    dense = _concentrated(60)
    op = DenseOperator(dense)
    sel = ParamSelection(["a", "b"], [torch.Size([30]), torch.Size([30])], {"a": [0], "b": [1]})
    kept = lanczos_eigs(op, 4, keep_basis=True)
    est = subspace_trace(op, kept, seed=0)
    assert (est.method, est.n_products) == ("deflated", DEFLATED_PROBES)
    # no basis: the Gram route, the block-diagonal solver, a solver not asked to keep it
    factor = torch.linalg.cholesky(dense + 1e-9 * torch.eye(60, dtype=torch.float64)).T
    for eig in (gram_eigs(factor, 4), block_lanczos_eigs(op, sel, 4, keep=4), lanczos_eigs(op, 4)):
        est = subspace_trace(op, eig, seed=0)
        assert (est.method, est.n_products) == ("hutch++", TRACE_PRODUCTS)


@pytest.mark.parametrize(("method", "blocks", "kept"), [
    ("lanczos", False, True), ("lanczos", True, False), ("gram", False, False)
])  # fmt: skip
def test_fisher_eigs_keeps_the_basis_where_the_plan_says(method, blocks, kept):
    model = tiny_llama()
    sel = select_params(model, ["model.layers.1.mlp.*"], group="tensor")
    flm = FunctionalLM(model, sel)
    op = FisherOperator(flm, random_batch(4))
    eig, plan = fisher_eigs(op, 3, method=method, samples_per_example=8,
                            blocks=sel if blocks else None, keep_basis=True)  # fmt: skip
    assert plan.keeps_basis == kept and (eig.basis is not None) == kept


def test_bad_input_is_a_clear_error():
    op = DenseOperator(_concentrated(20))
    with pytest.raises(ValueError, match="at least 2 probe"):
        deflated_trace(op, torch.eye(20, dtype=torch.float64)[:3], 1.0, 1)
    with pytest.raises(ValueError, match=r"basis must be \[m, 20\]"):
        deflated_trace(op, torch.eye(21, dtype=torch.float64)[:3], 1.0, 4)
