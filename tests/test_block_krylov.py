"""Block Lanczos (block_krylov_eigs): b vectors per matmat, against dense float64 eigh."""

import numpy as np
import pytest
import torch

from _tiny import random_batch, tiny_llama
from alignscope.config import CurvatureSpec
from alignscope.curvature import (
    DenseOperator,
    FisherOperator,
    FunctionalLM,
    block_krylov_default_iter,
    block_krylov_eigs,
    block_lanczos_eigs,
    fisher_eigs,
    lanczos_eigs,
    plan_spectrum,
)
from alignscope.params import ParamSelection, select_params
from test_fisher import dense_fisher


def _psd(values, seed=0):
    """``Q diag(values) Q^T`` with a random orthogonal ``Q`` (float64) and its eigh reference."""
    values = torch.as_tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(values), len(values), generator=gen, dtype=torch.float64)
    )
    dense = (q * values) @ q.T
    ref_vals, ref_vecs = np.linalg.eigh(dense.numpy())
    return dense, ref_vals[::-1].copy(), torch.from_numpy(ref_vecs[:, ::-1].copy())


def _sine(vectors, ref):
    """Largest principal-angle sine between span(vectors) and span(ref) (orthonormal columns)."""
    return float(torch.linalg.matrix_norm(vectors - ref @ (ref.T @ vectors), ord=2))


class CountingOperator(DenseOperator):
    """A dense operator that records the width of every matmat and refuses matvec."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.widths = []

    def matvec(self, v):
        raise AssertionError("block Lanczos must use matmat")

    def matmat(self, vectors):
        self.widths.append(vectors.shape[1])
        return super().matmat(vectors)


SEPARATED = np.r_[[40.0, 20.0, 10.0, 6.0, 4.0, 3.0], 1.5 / np.arange(1, 195) ** 1.2]
# a triple, a pair and a near-pair (1e-6 apart) on top, then a gap and a decaying tail
CLUSTERED = np.r_[[8.0, 8.0, 8.0, 5.0, 5.0, 3.0 + 1e-6, 3.0], 1.0 / np.arange(1, 194)]


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_block_lanczos_matches_eigh_on_a_separated_spectrum(block):
    dense, ref_vals, ref_vecs = _psd(SEPARATED)
    op = DenseOperator(dense)
    res = block_krylov_eigs(op, 6, block_size=block, tol=1e-12)
    assert res.converged and res.method == "block-krylov"
    np.testing.assert_allclose(res.values.numpy(), ref_vals[:6], rtol=1e-8, atol=0)
    for j in range(6):  # each eigenvector separately: the eigenvalues are separated
        assert _sine(res.vectors[:, j : j + 1], ref_vecs[:, j : j + 1]) < 1e-8
    torch.testing.assert_close(
        res.vectors.T @ res.vectors, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # residuals are the true ||A x - l x||
    true_res = (dense @ res.vectors - res.vectors * res.values).norm(dim=0)
    assert float(true_res.max()) <= 1e-12 * ref_vals[0] * 10
    np.testing.assert_allclose(res.residuals.numpy(), true_res.numpy(), atol=1e-12 * ref_vals[0])
    # n_products counts vectors, one matmat of b columns per pass
    assert res.n_products == op.n_products and res.n_products % block == 0
    assert res.n_products < dense.shape[0]


@pytest.mark.parametrize("block", [4, 8])
def test_block_lanczos_finds_repeated_and_clustered_eigenvalues(block):
    dense, ref_vals, ref_vecs = _psd(CLUSTERED, seed=1)
    res = block_krylov_eigs(DenseOperator(dense), 7, block_size=block, tol=1e-12)
    assert res.converged
    np.testing.assert_allclose(res.values.numpy(), ref_vals[:7], rtol=1e-8, atol=0)
    # the top-7 subspace, and each whole cluster's subspace, to 1e-8
    assert _sine(res.vectors, ref_vecs[:, :7]) < 1e-8
    assert _sine(res.vectors[:, :3], ref_vecs[:, :3]) < 1e-8  # the triple 8.0
    assert _sine(res.vectors[:, 3:5], ref_vecs[:, 3:5]) < 1e-8  # the pair 5.0
    assert _sine(res.vectors[:, 5:7], ref_vecs[:, 5:7]) < 1e-8  # 3 and 3 + 1e-6


def test_block_size_one_is_lanczos():
    dense, ref_vals, _ = _psd(SEPARATED, seed=2)
    old = lanczos_eigs(DenseOperator(dense), 8, tol=1e-10, seed=3)
    new = block_krylov_eigs(DenseOperator(dense), 8, block_size=1, tol=1e-10, seed=3)
    assert new.n_products == old.n_products  # same start vector, same checks, same stop
    np.testing.assert_allclose(new.values.numpy(), old.values.numpy(), rtol=1e-12)
    assert _sine(new.vectors, old.vectors) < 1e-9
    assert block_krylov_default_iter(8, 1) == max(6 * 8, 8 + 60)


def test_block_lanczos_passes_whole_blocks_and_is_deterministic():
    dense, _, _ = _psd(SEPARATED, seed=4)
    op = CountingOperator(dense)
    res = block_krylov_eigs(op, 5, block_size=4, tol=1e-10, seed=7)
    assert set(op.widths) == {4} and sum(op.widths) == res.n_products
    again = block_krylov_eigs(DenseOperator(dense), 5, block_size=4, tol=1e-10, seed=7)
    assert torch.equal(again.values, res.values) and torch.equal(again.vectors, res.vectors)


def test_block_lanczos_caps_products_and_warns():
    dense, _, _ = _psd(np.r_[1.0 / np.arange(1, 301) ** 0.5], seed=5)
    with pytest.warns(UserWarning, match="without reaching tol"):
        res = block_krylov_eigs(DenseOperator(dense), 10, block_size=4, max_iter=18, tol=1e-12)
    assert not res.converged and res.n_products == 20  # 18 rounded up to whole blocks of 4
    assert float(res.residuals.max()) > 1e-12


def test_block_lanczos_on_a_small_space_is_exact():
    dense, ref_vals, _ = _psd(SEPARATED[:10], seed=6)
    res = block_krylov_eigs(DenseOperator(dense), 4, block_size=4, tol=1e-14, max_iter=40)
    assert res.converged and res.n_products == 10  # the last block is cut to the space left
    np.testing.assert_allclose(res.values.numpy(), ref_vals[:4], rtol=1e-12)


def test_block_lanczos_past_the_rank_returns_zero_pairs():
    values = np.r_[[5.0, 4.0, 3.0, 2.0, 1.0, 0.5], np.zeros(24)]
    dense, ref_vals, _ = _psd(values, seed=8)
    with pytest.warns(UserWarning):  # a null space never 'converges' by the restart rule
        res = block_krylov_eigs(DenseOperator(dense), 10, block_size=4, max_iter=24)
    np.testing.assert_allclose(res.values[:6].numpy(), ref_vals[:6], rtol=1e-8)
    assert float(res.values[6:].abs().max()) < 1e-10
    torch.testing.assert_close(
        res.vectors.T @ res.vectors, torch.eye(10, dtype=torch.float64), atol=1e-8, rtol=0
    )


def test_block_lanczos_rejects_bad_arguments():
    dense, _, _ = _psd(SEPARATED[:20])
    with pytest.raises(ValueError, match="block_size"):
        block_krylov_eigs(DenseOperator(dense), 3, block_size=0)
    with pytest.raises(ValueError, match="k must be"):
        block_krylov_eigs(DenseOperator(dense), 21, block_size=2)
    with pytest.raises(TypeError, match="LinearOperator"):
        block_krylov_eigs(dense, 3)


@pytest.mark.parametrize("block", [1, 4])
def test_block_lanczos_on_the_exact_fisher_of_a_tiny_llama(block):
    model = tiny_llama()
    flm = FunctionalLM(model, select_params(model, ["model.layers.1.*", "lm_head.weight"]))
    batch = random_batch(4)
    dense = dense_fisher(flm, batch, flm.theta0)
    op = FisherOperator(flm, batch)
    res = block_krylov_eigs(op, 5, block_size=block, tol=1e-12)
    ref_vals, ref_vecs = np.linalg.eigh(dense.numpy())
    ref_vals, ref_vecs = ref_vals[::-1], torch.from_numpy(ref_vecs[:, ::-1].copy())
    assert res.converged and res.n_products % block == 0
    np.testing.assert_allclose(res.values.numpy(), ref_vals[:5], rtol=1e-8)
    gaps = np.abs(np.diff(ref_vals[:6])) / ref_vals[0]
    for j in range(5):  # separated pairs one by one, to the accuracy their gap allows
        if min(gaps[j], gaps[j - 1] if j else 1.0) > 1e-3:
            assert _sine(res.vectors[:, j : j + 1], ref_vecs[:, j : j + 1]) < 1e-8
    assert _sine(res.vectors, ref_vecs[:, :5]) < 1e-8 if gaps[4] > 1e-3 else True


def test_fisher_eigs_and_the_plan_take_the_block_size():
    dense, ref_vals, _ = _psd(SEPARATED, seed=9)
    eig, plan = fisher_eigs(DenseOperator(dense), 6, method="lanczos", block_size=4, tol=1e-10)
    assert eig.method == "block-krylov" and plan.block_size == 4
    assert "block Lanczos (4/pass)" in plan.describe()
    np.testing.assert_allclose(eig.values.numpy(), ref_vals[:6], rtol=1e-8)
    one = plan_spectrum(10_000, 10, 32, method="lanczos")
    four = plan_spectrum(10_000, 10, 32, method="lanczos", block_size=4)
    assert one.bytes_needed == (70 + 1) * 10_000 * 4
    cap = block_krylov_default_iter(10, 4)  # 70 + 24 = 94, 96 in whole blocks
    assert four.iterations == 96 and four.bytes_needed == (96 + 4) * 10_000 * 4 and cap == 94
    with pytest.raises(ValueError, match="block size"):
        plan_spectrum(10_000, 10, 32, block_size=0)


def test_block_diagonal_solver_takes_the_block_size():
    dense, _, _ = _psd(SEPARATED[:12], seed=10)
    sel = ParamSelection(["a", "b"], [torch.Size([5]), torch.Size([7])], {"a": [0], "b": [1]})
    blockdiag = torch.zeros_like(dense)
    blockdiag[:5, :5], blockdiag[5:, 5:] = dense[:5, :5], dense[5:, 5:]
    expected = np.sort(np.linalg.eigvalsh(blockdiag))[::-1][:3]
    res = block_lanczos_eigs(DenseOperator(dense), sel, 3, keep=3, block_size=2, tol=1e-12)
    assert res.method == "block-lanczos"
    np.testing.assert_allclose(res.values.numpy(), expected, rtol=1e-10)


def test_curvature_spec_checks_the_lanczos_block():
    CurvatureSpec(lanczos_block=4).validate()
    with pytest.raises(ValueError, match="--lanczos-block 0"):
        CurvatureSpec(lanczos_block=0).validate()


def test_two_processes_build_the_same_basis_and_equal_one(tmp_path):
    """Under torch.distributed the products are all-reduced inside the operator: every rank
    starts from the same seed-drawn block, so both ranks return the one-process result."""
    from _ddp_commands import spawn
    from _ddp_eigs import eigs_worker, shards

    spawn(eigs_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert torch.equal(got[0]["values"], got[1]["values"])
    assert torch.equal(got[0]["vectors"], got[1]["vectors"])
    whole = sum(shards())
    one = block_krylov_eigs(DenseOperator(whole), 6, block_size=4, tol=1e-12, seed=3)
    assert got[0]["n"] == one.n_products
    torch.testing.assert_close(got[0]["values"], one.values, rtol=1e-10, atol=0)
    assert _sine(got[0]["vectors"], one.vectors) < 1e-8


def test_the_memory_estimate_follows_the_lanczos_block():
    from alignscope.memory import estimate_memory
    from test_memory import _cfg, _specs

    model = tiny_llama()
    sel = select_params(model, ["all"])
    n = sel.size
    sizes = {}
    for block in (1, 4):
        cfg = _cfg(rank=4, max_new_tokens=10, memory_budget_gb=0.5, lanczos_block=block)
        est = estimate_memory(*_specs(cfg), model, sel, n_safety=8, check_available=False)
        assert est.plan.block_size == block
        sizes[block] = (est.plan.iterations, est.eigensolver)
    assert sizes[1] == (64, 65 * n * 4)  # Lanczos: 64 + 1 float32 basis vectors
    its = -(-block_krylov_default_iter(4, 4) // 4) * 4  # 64 + 24 = 88 vectors, whole blocks
    assert sizes[4] == (its, (its + 4) * n * 4)  # and one block of products
