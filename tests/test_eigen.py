"""Eigensolvers and trace estimators against numpy/torch eigh of dense float64 matrices."""

import numpy as np
import pytest
import torch

from _tiny import random_batch, tiny_llama
from alignscope.curvature import (
    DenseOperator,
    FisherOperator,
    FunctionalLM,
    block_gram_eigs,
    block_lanczos_eigs,
    fisher_eigs,
    gram_eigs,
    hutchinson,
    hutchpp,
    lanczos_eigs,
    plan_spectrum,
)
from alignscope.params import ParamSelection, select_params
from test_fisher import dense_fisher


def _spiked(dim=60, rank=40, seed=0):
    """A PSD matrix with a concentrated spectrum (like the alignment Fisher) and its factor."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.tensor([50.0, 20.0, 9.0, 4.0, 2.0]), 0.3 ** torch.arange(rank - 5)])
    factor = (q[:, :rank] * values.sqrt()).T  # [rank, dim], factor^T factor = A
    return factor.T @ factor, factor, values


def _subspace_sine(a, b):
    """Largest principal-angle sine between the column spans of a and b."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    s = torch.linalg.svdvals(qa.T @ qb)
    return float(torch.sqrt(torch.clamp(1 - s.min() ** 2, min=0)))


def test_lanczos_warns_when_it_stops_unconverged():
    dense, _, _ = _spiked(dim=200, rank=150)
    with pytest.warns(UserWarning, match="without reaching tol"):
        res = lanczos_eigs(DenseOperator(dense), 10, max_iter=12, tol=1e-12)
    assert not res.converged


def test_lanczos_matches_eigh_on_a_low_rank_matrix():
    dense, _, values = _spiked()
    res = lanczos_eigs(DenseOperator(dense), 8)
    ref_vals, ref_vecs = np.linalg.eigh(dense.numpy())
    ref_vals, ref_vecs = ref_vals[::-1][:8], ref_vecs[:, ::-1][:, :8]
    np.testing.assert_allclose(res.values.numpy(), ref_vals, rtol=1e-8)
    assert _subspace_sine(res.vectors[:, :5], torch.from_numpy(ref_vecs[:, :5].copy())) < 1e-6
    assert res.n_products < dense.shape[0]  # it did not need the whole space


def test_lanczos_on_a_float32_operator_keeps_float32_accuracy():
    dense, _, _ = _spiked()
    d32 = dense.float()
    res = lanczos_eigs(DenseOperator(d32), 5, tol=1e-6)
    assert res.vectors.dtype == torch.float32
    ref = np.linalg.eigvalsh(dense.numpy())[::-1][:5]
    np.testing.assert_allclose(res.values.numpy(), ref, rtol=1e-5)


def test_lanczos_finds_both_copies_of_a_repeated_eigenvalue():
    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=torch.float64))
    vals = torch.zeros(50, dtype=torch.float64)
    vals[:3] = torch.tensor([5.0, 5.0, 1.0])
    dense = q @ torch.diag(vals) @ q.T
    res = lanczos_eigs(DenseOperator(dense), 2)
    np.testing.assert_allclose(res.values.numpy(), [5.0, 5.0], rtol=1e-8)
    assert res.converged


def test_lanczos_handles_rank_deficiency_past_the_rank():
    dense, _, _ = _spiked(dim=30, rank=6)
    res = lanczos_eigs(DenseOperator(dense), 10, max_iter=30)
    np.testing.assert_allclose(
        res.values[:6].numpy(), np.linalg.eigvalsh(dense)[::-1][:6], rtol=1e-8
    )
    assert float(res.values[6:].abs().max()) < 1e-10
    gram = res.vectors.T @ res.vectors
    torch.testing.assert_close(gram, torch.eye(10, dtype=torch.float64), atol=1e-8, rtol=0)


def test_gram_route_matches_eigh_and_lifts_unit_eigenvectors():
    dense, factor, _ = _spiked()
    res = gram_eigs(factor, 6)
    np.testing.assert_allclose(res.values.numpy(), np.linalg.eigvalsh(dense)[::-1][:6], rtol=1e-10)
    torch.testing.assert_close(dense @ res.vectors, res.vectors * res.values, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="only 40 factor rows"):
        gram_eigs(factor, 41)


def test_lanczos_on_the_exact_fisher_of_a_tiny_llama():
    model = tiny_llama()
    flm = FunctionalLM(model, select_params(model, ["model.layers.1.*", "lm_head.weight"]))
    batch = random_batch(4)
    dense = dense_fisher(flm, batch, flm.theta0)
    op = FisherOperator(flm, batch)
    res = lanczos_eigs(op, 5, tol=1e-12)
    ref_vals, ref_vecs = np.linalg.eigh(dense.numpy())
    np.testing.assert_allclose(res.values.numpy(), ref_vals[::-1][:5], rtol=1e-8)
    ref_top = torch.from_numpy(ref_vecs[:, ::-1][:, :3].copy())
    assert _subspace_sine(res.vectors[:, :3], ref_top) < 1e-6


def test_block_variants_match_dense_block_diagonal():
    dense, factor, _ = _spiked(dim=12, rank=10)
    sel = ParamSelection(["a", "b"], [torch.Size([5]), torch.Size([7])], {"a": [0], "b": [1]})
    blockdiag = torch.zeros_like(dense)
    blockdiag[:5, :5], blockdiag[5:, 5:] = dense[:5, :5], dense[5:, 5:]
    expected = np.sort(np.linalg.eigvalsh(blockdiag))[::-1]
    lz = block_lanczos_eigs(DenseOperator(dense), sel, 3)
    gr = block_gram_eigs(factor, sel, 3)
    for res in (lz, gr):
        assert res.k == 6 and set(res.blocks) == {"a", "b"}
        np.testing.assert_allclose(res.values[:2].numpy(), expected[:2], rtol=1e-8)
        # each vector lives in its own block and is an eigenvector of the block-diagonal matrix
        for col in res.blocks["a"]:
            assert float(res.vectors[5:, col].abs().max()) == 0.0
        torch.testing.assert_close(
            blockdiag @ res.vectors, res.vectors * res.values, rtol=1e-7, atol=1e-8
        )


def test_trace_estimators_within_their_expected_error():
    dense, _, values = _spiked(dim=200, rank=40)
    exact = float(values.sum())
    op = DenseOperator(dense)
    h = hutchinson(op, 60, seed=0)
    # Hutchinson's variance for Rademacher probes is 2 (||A||_F^2 - sum diag^2) / n
    sd = float(torch.sqrt(2 * (dense.norm() ** 2 - (dense.diagonal() ** 2).sum()) / 60))
    assert abs(h.value - exact) < 4 * sd
    assert 0.3 * sd < h.stderr < 3 * sd  # its own error estimate is the right size
    hpp = hutchpp(op, 60, seed=0)
    # the spiked top is captured exactly by the sketch: far more accurate than Hutchinson
    assert abs(hpp.value - exact) < 0.01 * exact
    assert abs(hpp.value - exact) < sd / 5


def test_plan_prefers_exact_lanczos_and_falls_back_to_gram():
    plan = plan_spectrum(10_000, 20, 100, memory_budget=2**30)
    assert plan.method == "lanczos" and plan.iterations == 120
    # a 121 x 3e6 float32 basis (1.35 GiB) does not fit 1 GiB; 30 float32 rows (+ a copy) do
    assert plan_spectrum(3_000_000, 20, 30, memory_budget=2**30, itemsize=4).method == "gram"
    with pytest.raises(MemoryError, match="block-wise"):
        plan_spectrum(10**9, 20, 400, memory_budget=2**30)


@pytest.mark.parametrize("method", ["gram", "lanczos"])
def test_fisher_eigs_routes_agree_with_dense(method):
    model = tiny_llama()
    flm = FunctionalLM(model, select_params(model, ["model.layers.1.*", "lm_head.weight"]))
    batch = random_batch(4)
    dense = dense_fisher(flm, batch, flm.theta0)
    op = FisherOperator(flm, batch)
    res, plan = fisher_eigs(op, 3, method=method, samples_per_example=512, seed=0)
    assert plan.method == method and res.method == method
    ref = np.linalg.eigvalsh(dense.numpy())[::-1][:3]
    rtol = 1e-8 if method == "lanczos" else 0.1  # Monte-Carlo rows: sampling error
    np.testing.assert_allclose(res.values.numpy(), ref, rtol=rtol)


def test_fisher_eigs_gram_rank_above_sample_count_is_an_error():
    model = tiny_llama()
    flm = FunctionalLM(model, select_params(model, "lm_head.weight"))
    op = FisherOperator(flm, random_batch(2))
    with pytest.raises(ValueError, match="only 2 factor rows"):
        fisher_eigs(op, 5, method="gram", samples_per_example=1)
