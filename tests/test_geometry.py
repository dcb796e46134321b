"""AIC quantities against dense float64 computations on a tiny Llama."""

import numpy as np
import pytest
import torch
from torch.autograd.functional import hessian

from _tiny import random_batch, tiny_llama
from alignscope.curvature import (
    FisherOperator,
    FunctionalLM,
    HessianOperator,
    lanczos_eigs,
    per_sample_grads,
    response_weights,
)
from alignscope.geometry import (
    finetune_gradient,
    make_subspace,
    measure_direction,
    measure_directions,
    noise_trace,
    noise_traces,
)
from alignscope.params import select_params
from test_fisher import dense_fisher


@pytest.fixture(scope="module")
def problem():
    model = tiny_llama()
    names = ["model.layers.1.self_attn.*", "*.1.input_layernorm.weight", "lm_head.weight"]
    flm = FunctionalLM(model, select_params(model, names))
    safety, finetune = random_batch(4, seed=1), random_batch(5, seed=2)
    dense_f = dense_fisher(flm, safety, flm.theta0)
    dense_h = hessian(lambda t: flm.mean_nll(t, finetune), flm.theta0, vectorize=True)
    return flm, safety, finetune, dense_f, dense_h


def test_aic_quantities_equal_dense_computations(problem):
    flm, safety, finetune, dense_f, dense_h = problem
    fisher = FisherOperator(flm, safety)
    eig = lanczos_eigs(fisher, 6, tol=1e-12)
    trace = float(torch.trace(dense_f))
    sub = make_subspace(eig, trace, None)
    d = 3
    g = finetune_gradient(flm, finetune)
    aic = measure_direction(
        fisher, HessianOperator(lambda t: flm.mean_nll(t, finetune), flm.theta0), sub, g, d
    )

    vals, vecs = np.linalg.eigh(dense_f.numpy())
    vals, vecs = vals[::-1], vecs[:, ::-1]
    v = torch.from_numpy(vecs[:, :d].copy())
    proj = v @ v.T
    a = dense_h @ g
    f_half_p = v @ torch.diag(torch.from_numpy(vals[:d].copy()).sqrt()) @ v.T
    expected = {
        "Pg_norm": float((proj @ g).norm()),
        "Pg_ratio": float((proj @ g).norm() / g.norm()),
        "F_half_g": float(torch.sqrt(g @ dense_f @ g)),
        "a_norm": float(a.norm()),
        "gamma": float((f_half_p @ a).norm()),
        "kappa": float((a @ dense_f @ a / a.norm() ** 2) / (g @ dense_f @ g / g.norm() ** 2)),
        "gFg": float(g @ dense_f @ g),
        "gFa": float(g @ dense_f @ a),
        "aFa": float(a @ dense_f @ a),
        "Ha_norm": float((dense_h @ a).norm()),
        "gFa3": float(g @ dense_f @ dense_h @ a),
        "aFa3": float(a @ dense_f @ dense_h @ a),
        "lambda_d": float(vals[d - 1]),
        "tail_mass": float(trace - vals[:d].sum()),
    }
    got = aic.to_dict()
    for key, value in expected.items():
        assert abs(value) > 1e-8, key  # the check is not against zero
        assert got[key] == pytest.approx(value, rel=1e-7), key
    assert got["aFa_sub"] == pytest.approx(got["gamma"] ** 2, rel=1e-12)


def test_subspace_rank_for_explained_fraction(problem):
    flm, safety, *_ = problem
    fisher = FisherOperator(flm, safety)
    eig = lanczos_eigs(fisher, 6, tol=1e-12)
    total = float(eig.values.sum())
    sub = make_subspace(eig, total, None)
    cum = np.cumsum(eig.values.numpy()) / total
    for target in (0.5, 0.9, 0.99):
        d = sub.rank_for(target)
        assert cum[d - 1] >= target and (d == 1 or cum[d - 2] < target)
    with pytest.raises(ValueError, match="outside"):
        sub.basis(7)


def test_noise_trace_equals_dense_trace_of_f_sigma(problem):
    flm, safety, finetune, dense_f, _ = problem
    fisher = FisherOperator(flm, safety)
    rows = per_sample_grads(
        flm.example_nll, flm.theta0, (finetune.input_ids, response_weights(finetune, torch.float64))
    )
    sigma = torch.cov(rows.T)  # unbiased, [P, P]
    expected = float(torch.trace(dense_f @ sigma))
    assert expected > 1e-8
    assert noise_trace(fisher, rows) == pytest.approx(expected, rel=1e-8)


def test_preconditioned_direction_uses_d_g_and_d_h_d_g(problem):
    flm, safety, finetune, dense_f, dense_h = problem
    fisher = FisherOperator(flm, safety)
    sub = make_subspace(lanczos_eigs(fisher, 3, tol=1e-12), 1.0, None)
    g = finetune_gradient(flm, finetune)
    diag = 1.0 / (g.abs() + 1e-3)
    hess = HessianOperator(lambda t: flm.mean_nll(t, finetune), flm.theta0)
    aic = measure_direction(fisher, hess, sub, g, 2, diag=diag)
    u = diag * g
    a = diag * (dense_h @ u)
    assert aic.g_norm == pytest.approx(float(u.norm()), rel=1e-10)
    assert aic.a_norm == pytest.approx(float(a.norm()), rel=1e-8)
    assert aic.aFa == pytest.approx(float(a @ dense_f @ a), rel=1e-7)
    assert aic.Ha_norm == pytest.approx(float((diag * (dense_h @ a)).norm()), rel=1e-8)


def test_batched_directions_and_noise_traces_equal_one_at_a_time(problem):
    flm, safety, finetune, _, _ = problem
    fisher = FisherOperator(flm, safety)
    sub = make_subspace(lanczos_eigs(fisher, 3, tol=1e-12), 1.0, None)
    g = finetune_gradient(flm, finetune)
    diag = 1.0 / (g.abs() + 1e-3)

    def loss(t):
        return flm.mean_nll(t, finetune)

    one = [
        measure_direction(fisher, HessianOperator(loss, flm.theta0), sub, g, 2, diag=dg)
        for dg in (None, diag)
    ]
    hess = HessianOperator(loss, flm.theta0, cache_graph=True)
    both = measure_directions(fisher, hess, sub, g, 2, [None, diag])
    assert hess.n_products == 4  # H [g, Dg], then H [a, a'], through one gradient graph
    for a, b in zip(one, both, strict=True):
        for key, value in a.to_dict().items():
            assert b.to_dict()[key] == pytest.approx(value, rel=1e-9, abs=1e-14), key
    assert one[0].a_norm != pytest.approx(one[1].a_norm, rel=1e-3)  # two different directions
    rows = per_sample_grads(
        flm.example_nll, flm.theta0, (finetune.input_ids, response_weights(finetune, flm.dtype))
    )
    traces = noise_traces(fisher, rows, [None, diag])
    assert traces[0] == pytest.approx(noise_trace(fisher, rows), rel=1e-10)
    assert traces[1] == pytest.approx(noise_trace(fisher, rows * diag), rel=1e-10)
