"""The forecast against exact float64 problems: integrated gradient flow, simulated SGD/Adam.

The problem: ``L_a(theta) = g_a.x + x^T F x / 2`` (``x = theta - theta0``) with a planted rank-3
PSD ``F``, and a non-quadratic fine-tuning loss ``L_f(x) = g.x + x^T H0 x/2 + sum_j s_j
(u_j.x)^3/6 + q |x|^4/24`` whose Hessian varies along the path and whose third derivative at
``theta0`` is non-zero, so every third-order trajectory term is exercised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from alignscope.forecast import (
    Forecast,
    ForecastInputs,
    OptimizerModel,
    coefficients,
    coupling_ratio,
    flow_horizon,
    forecast,
    forecast_from_aic,
)

N, D, J = 30, 3, 4
LAMBDAS = np.array([10.0, 5.0, 2.0])


@dataclass
class Problem:
    F: np.ndarray
    H0: np.ndarray
    U: np.ndarray  # cubic directions (J, N)
    s: np.ndarray  # cubic strengths (J,)
    q: float  # quartic strength
    g: np.ndarray
    ga: np.ndarray

    def grad_f(self, x: np.ndarray) -> np.ndarray:
        """grad L_f at theta0 + x; x of shape (..., N)."""
        ux = x @ self.U.T
        r2 = np.sum(x * x, axis=-1, keepdims=True)
        return self.g + x @ self.H0 + 0.5 * (self.s * ux**2) @ self.U + self.q / 6.0 * r2 * x

    def dla(self, x: np.ndarray) -> np.ndarray:
        return x @ self.ga + 0.5 * np.einsum("...i,ij,...j->...", x, self.F, x)

    @property
    def a(self) -> np.ndarray:
        return self.H0 @ self.g

    @property
    def a3(self) -> np.ndarray:
        # H a + T[g, g]; the quartic term has zero third derivative at theta0.
        return self.H0 @ self.a + (self.s * (self.U @ self.g) ** 2) @ self.U

    def inputs(self, **extra: float) -> ForecastInputs:
        g, a, a3, F, ga = self.g, self.a, self.a3, self.F, self.ga
        return ForecastInputs(
            gFg=g @ F @ g,
            gFa=g @ F @ a,
            aFa=a @ F @ a,
            g_norm=float(np.linalg.norm(g)),
            a_norm=float(np.linalg.norm(a)),
            ga_g=ga @ g,
            ga_a=ga @ a,
            aFa_sub=a @ F @ a,
            a3_norm=float(np.linalg.norm(a3)),
            gFa3=g @ F @ a3,
            ga_a3=ga @ a3,
            aFa3=a @ F @ a3,
            **extra,
        )

    def flow_taylor(self, order: int) -> list[np.ndarray]:
        """Exact Taylor coefficients x_n of the flow x' = -grad L_f(x), x(0) = 0 (x_0 .. x_order).

        Cauchy products of the polynomial right-hand side: (n+1) x_{n+1} = -[grad L_f(x)]_n.
        """
        xs = [np.zeros(N)]
        ps = [np.zeros(J)]  # U x_n
        rs: list[float] = []  # |x|^2 series
        for n in range(order):
            rs.append(sum(float(xs[i] @ xs[n - i]) for i in range(n + 1)))
            grad = self.H0 @ xs[n] + (self.g if n == 0 else 0.0)
            sq = sum(ps[i] * ps[n - i] for i in range(n + 1))
            grad = grad + 0.5 * (self.s * sq) @ self.U
            grad = grad + self.q / 6.0 * sum(rs[i] * xs[n - i] for i in range(n + 1))
            xs.append(-grad / (n + 1))
            ps.append(self.U @ xs[-1])
        return xs

    def dla_taylor(self, order: int) -> np.ndarray:
        xs = self.flow_taylor(order)
        return np.array(
            [
                self.ga @ xs[n] + 0.5 * sum(xs[i] @ self.F @ xs[n - i] for i in range(n + 1))
                for n in range(order + 1)
            ]
        )

    def integrate(self, t_eval: np.ndarray) -> np.ndarray:
        """x(t) by DOP853 at rtol 1e-12; the state is x itself so small x keeps its digits."""
        sol = solve_ivp(
            lambda _t, x: -self.grad_f(x),
            (0.0, float(t_eval[-1])),
            np.zeros(N),
            method="DOP853",
            t_eval=t_eval,
            rtol=1e-12,
            atol=1e-16,
        )
        assert sol.success
        return sol.y.T


def _orthonormal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q


def make_problem(orthogonal: bool, with_ga: bool = False, seed: int = 0) -> Problem:
    """(a) orthogonal: g in the null space of F, H0 g not; (b) g generic."""
    rng = np.random.default_rng(seed)
    q = _orthonormal(rng, N)
    F = (q[:, :D] * LAMBDAS) @ q[:, :D].T
    b = rng.normal(size=(N, N))
    H0 = b @ b.T / N + 0.5 * np.eye(N)
    U = rng.normal(size=(J, N)) / math.sqrt(N)
    s = np.array([0.8, -0.5, 0.6, 0.4])
    g = q[:, D:] @ rng.normal(size=N - D) if orthogonal else rng.normal(size=N)
    g /= np.linalg.norm(g)
    ga = 0.3 * rng.normal(size=N) if with_ga else np.zeros(N)
    return Problem(F=F, H0=H0, U=U, s=s, q=0.3, g=g, ga=ga)


# ----------------------------------------------------------------------------- flow coefficients


@pytest.mark.parametrize("orthogonal", [True, False])
def test_taylor_reference_matches_integrated_flow(orthogonal):
    # The exact Taylor recursion is the reference for the coefficient tests; check it against
    # an independent high-accuracy integrator first.
    prob = make_problem(orthogonal)
    e = prob.dla_taylor(14)
    t = np.array([0.005, 0.01, 0.02, 0.04])
    observed = prob.dla(prob.integrate(t))
    series = np.polynomial.polynomial.polyval(t, e)
    np.testing.assert_allclose(series, observed, rtol=1e-9)


def test_coefficients_exact_when_orthogonal_and_stationary():
    # (a) F g = 0, g_a = 0: dL_a = c4 t^4 + O(t^5) with the simple c4 = a^T F a / 8, exactly.
    prob = make_problem(orthogonal=True)
    e = prob.dla_taylor(6)
    c = coefficients(prob.inputs())
    assert c.c3_exact and c.c4_exact
    assert np.max(np.abs(e[1:4])) < 1e-13 * e[4]
    assert np.max(np.abs(np.array(c.as_tuple()[:3]))) < 1e-13 * e[4]
    design_c4 = prob.inputs().aFa / 8
    assert design_c4 == pytest.approx(e[4], rel=1e-10)
    assert c.c4 == pytest.approx(e[4], rel=1e-10)
    assert c.c4_sub == pytest.approx(e[4], rel=1e-10)  # F has rank d: P_d is its whole range


def test_coefficients_general_direction_need_third_order_correction():
    # (b) g not orthogonal, g_a = 0: c1..c3 exact; the simple c4 = aFa/8 misses g^T F a3 / 6.
    prob = make_problem(orthogonal=False)
    e = prob.dla_taylor(6)
    full = prob.inputs()
    c = coefficients(full)
    assert c.c1 == 0.0 and abs(e[1]) < 1e-15
    assert c.c2 == pytest.approx(e[2], rel=1e-12)
    assert c.c3 == pytest.approx(e[3], rel=1e-10)
    assert c.c4 == pytest.approx(e[4], rel=1e-10)
    design = coefficients(
        ForecastInputs(
            gFg=full.gFg, gFa=full.gFa, aFa=full.aFa, g_norm=full.g_norm, a_norm=full.a_norm
        )
    )
    assert design.c3 == pytest.approx(e[3], rel=1e-10)  # exact because g_a = 0
    assert not design.c4_exact
    assert abs(design.c4 - e[4]) > 0.05 * abs(e[4])  # the correction is not small here
    assert design.c4 - e[4] == pytest.approx(-full.gFa3 / 6, rel=1e-9)


def test_coefficients_with_alignment_gradient():
    # g_a != 0 (the refusal NLL): c1, c2 exact; c3 exact with g_a.a3; c4 misses g_a.x_4 only.
    prob = make_problem(orthogonal=False, with_ga=True)
    xs = prob.flow_taylor(6)
    e = prob.dla_taylor(6)
    c = coefficients(prob.inputs())
    assert c.c1 == pytest.approx(e[1], rel=1e-12)
    assert c.c2 == pytest.approx(e[2], rel=1e-12)
    assert c.c3_exact and c.c3 == pytest.approx(e[3], rel=1e-10)
    assert not c.c4_exact
    assert e[4] - c.c4 == pytest.approx(prob.ga @ xs[4], rel=1e-9)


@pytest.mark.parametrize(("orthogonal", "expected"), [(True, 4.0), (False, 2.0)])
def test_observed_loglog_exponent(orthogonal, expected):
    prob = make_problem(orthogonal)
    t = np.geomspace(1e-3, 1e-2, 12)
    dl = prob.dla(prob.integrate(t))
    slope = np.polyfit(np.log(t), np.log(dl), 1)[0]
    assert slope == pytest.approx(expected, abs=0.1)
    # The forecast's own local exponent agrees at the window's geometric middle (t ~ 3e-3).
    lr = 1e-5
    fc = forecast(prob.inputs(), lr=lr, n_steps=1000, optimizer="sgd")
    k_mid = 316
    assert fc.loglog_exponent[k_mid - 1] == pytest.approx(expected, abs=0.1)
    assert fc.dominant[k_mid - 1] == (4 if orthogonal else 2)


def test_flow_helpers():
    prob = make_problem(orthogonal=False)
    x = prob.inputs()
    t_h = flow_horizon(x, rho=0.5)
    assert t_h == pytest.approx(min(x.g_norm / x.a_norm, 1.5 * x.a_norm / x.a3_norm))
    kappa = coupling_ratio(x)
    g, a = prob.g, prob.a
    assert kappa == pytest.approx((a @ prob.F @ a / (a @ a)) / (g @ prob.F @ g / (g @ g)))
    # g orthogonal to the range of F: g^T F g is pure round-off (5e-19 with one BLAS, smaller with
    # another), so kappa is huge but its size is platform-dependent; a generic g gives O(1-100).
    assert coupling_ratio(make_problem(orthogonal=True).inputs()) > 1e12


# ------------------------------------------------------------------------------- discrete SGD


def _simulate_gd(prob: Problem, lr: float, k_max: int) -> np.ndarray:
    x = np.zeros(N)
    out = np.empty(k_max)
    for k in range(k_max):
        x = x - lr * prob.grad_f(x)
        out[k] = prob.dla(x)
    return out


@pytest.mark.parametrize("orthogonal", [True, False])
def test_sgd_step_mapping_matches_simulated_descent(orthogonal):
    prob = make_problem(orthogonal)
    ks = np.array([3, 10, 30])
    errors = []
    for lr in (2e-3, 1e-3):
        sim = _simulate_gd(prob, lr, int(ks[-1]))[ks - 1]
        fc = forecast(prob.inputs(), lr=lr, n_steps=int(ks[-1]), optimizer="sgd")
        assert fc.horizon_steps is not None and fc.horizon_steps > ks[-1]
        pred = fc.dL[ks - 1]
        errors.append(np.abs(pred / sim - 1))
        # Plain flow with t = lr k is much worse at small k (k^4 versus k^2 (k-1)^2).
        flow = fc.coefficients(lr * ks)
        if orthogonal:
            assert abs(flow[0] / sim[0] - 1) > 0.5
    coarse, fine = errors
    # The residual is the neglected t^5 term: relative error ~ (2/3) t aFa3/aFa = 3.3 t in (a)
    # (t = lr k; 0.10 at k = 30, lr = 1e-3), O(t^3) in (b). It halves with lr at fixed k.
    for lr, err in zip((2e-3, 1e-3), errors, strict=True):
        assert np.all(err < 4.0 * lr * ks)
    assert np.all(coarse / fine > 1.8)


# ----------------------------------------------------------------------------- minibatch noise


def test_noise_term_matches_minibatch_sgd_mean():
    rng = np.random.default_rng(7)
    m, n, b, k, lr, runs = 64, N, 4, 10, 1e-4, 20000
    X = rng.normal(size=(m, n)) / math.sqrt(n) * 1.5
    y = rng.normal(size=m)
    q = _orthonormal(rng, n)
    F = (q[:, :D] * LAMBDAS) @ q[:, :D].T
    # L_f = mean_m (x_m.theta - y_m)^2 / 2 at theta0 = 0: per-sample gradients h_m = -x_m y_m.
    h = -X * y[:, None]
    g = h.mean(0)
    H = X.T @ X / m
    a = H @ g
    centred = h - g
    tr_f_sigma = float(np.einsum("mi,ij,mj->", centred, F, centred) / m)  # population 1/M
    inputs = ForecastInputs(
        gFg=g @ F @ g,
        gFa=g @ F @ a,
        aFa=a @ F @ a,
        g_norm=float(np.linalg.norm(g)),
        a_norm=float(np.linalg.norm(a)),
        trFSigma=tr_f_sigma,
    )
    fc = forecast(inputs, lr=lr, n_steps=k, batch_size=b)
    pred = fc.dL[-1]
    pred_no_noise = pred - fc.terms["noise"][-1]
    assert fc.terms["noise"][-1] == pytest.approx(lr**2 * k * tr_f_sigma / (2 * b))

    theta = np.zeros((runs, n))
    for _ in range(k):
        idx = rng.integers(0, m, size=(runs, b))  # with replacement
        xb = X[idx]
        resid = np.einsum("rbi,ri->rb", xb, theta) - y[idx]
        theta -= lr * np.einsum("rb,rbi->ri", resid, xb) / b
    dl = 0.5 * np.einsum("ri,ij,rj->r", theta, F, theta)
    mean, se = dl.mean(), dl.std(ddof=1) / math.sqrt(runs)
    z = (pred - mean) / se
    z_without = (pred_no_noise - mean) / se
    assert abs(z) < 3.0, (z, pred, mean, se)
    assert abs(z_without) > 10.0  # the noise term is needed to explain the mean
    assert fc.dominant[-1] == "noise"


# ------------------------------------------------------------------------------------- Adam

BETAS = (0.9, 0.999)


def make_adam_problem(orthogonal_to_sign: bool, seed: int = 3):
    """Quadratic L_f with gradient coordinates bounded away from 0 (|g_i| >= 0.5).

    ``orthogonal_to_sign``: F's range is orthogonal to sign(g), Adam's first step, so the
    forecast rests entirely on the (approximate) curvature bend, the hard case.
    """
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(N, N))
    H = b @ b.T / N + 0.5 * np.eye(N)
    g = rng.normal(size=N)
    g = np.sign(g) * (0.5 + np.abs(g))
    sign = np.sign(g)
    if orthogonal_to_sign:
        q = _orthonormal(rng, N)
        q[:, 0] = sign / np.linalg.norm(sign)
        q, _ = np.linalg.qr(q)
        basis = q[:, 1 : D + 1]
    else:
        basis = _orthonormal(rng, N)[:, :D]
    F = (basis * LAMBDAS) @ basis.T
    return H, g, F


def _simulate_adam(H, g, lr: float, k_max: int) -> np.ndarray:
    theta = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr, betas=BETAS, eps=0.0)
    h, g_t = torch.from_numpy(H), torch.from_numpy(g)
    out = np.empty((k_max, N))
    for k in range(k_max):
        opt.zero_grad()
        theta.grad = g_t + h @ theta.detach()
        opt.step()
        out[k] = theta.detach().numpy()
    return out


def _adam_inputs(H, g, F) -> tuple[ForecastInputs, np.ndarray, np.ndarray]:
    u = g / np.abs(g)  # D g, D = 1/|g| (bias-corrected v at step 1, eps -> 0)
    w = (H @ u) / np.abs(g)  # D H D g
    inputs = ForecastInputs(
        gFg=u @ F @ u,
        gFa=u @ F @ w,
        aFa=w @ F @ w,
        g_norm=float(np.linalg.norm(u)),
        a_norm=float(np.linalg.norm(w)),
        a_inf=float(np.max(np.abs(w))),
    )
    return inputs, u, w


def test_adam_first_step_is_minus_lr_sign_g():
    H, g, F = make_adam_problem(orthogonal_to_sign=False)
    lr = 1e-3
    step1 = _simulate_adam(H, g, lr, 1)[0]
    np.testing.assert_allclose(step1, -lr * np.sign(g), rtol=1e-12, atol=0)
    _, u, w = _adam_inputs(H, g, F)
    p1, p2, p3 = OptimizerModel.parse("adamw").step_polynomials(np.array([1]))
    assert p3 is None
    np.testing.assert_allclose(-lr * p1[0] * u + lr**2 * p2[0] * w, step1, rtol=1e-12, atol=0)


def test_adam_displacement_bend_momentum_lag_versus_frozen_preconditioner():
    # The curvature bend of Adam's path: delta_k + lr k sign(g). The momentum-lag polynomial
    # A_k tracks it; the frozen preconditioner (C(k,2)) overstates it 38x at k = 2.
    H, g, F = make_adam_problem(orthogonal_to_sign=False)
    ks = np.arange(2, 31)
    _, u, w = _adam_inputs(H, g, F)
    lag = OptimizerModel("adam", BETAS)
    frozen = OptimizerModel("adam", BETAS, momentum_lag=False)
    errors = {}
    for lr in (1e-3, 1e-4):
        bend = _simulate_adam(H, g, lr, int(ks[-1]))[ks - 1] + lr * ks[:, None] * u
        for name, model in (("lag", lag), ("frozen", frozen)):
            _, p2, _ = model.step_polynomials(ks)
            pred = lr**2 * p2[:, None] * w
            rel = np.linalg.norm(pred - bend, axis=1) / np.linalg.norm(bend, axis=1)
            errors[name, lr] = rel
    # Measured: 1.7% at k = 2 growing to 4.9% at k = 30 (lr = 1e-3; the horizon is 104 steps);
    # the residual is the second-order term in the gradient change, O(lr k a_inf).
    assert np.all(errors["lag", 1e-3] < 0.06)
    assert np.all(errors["lag", 1e-3] / errors["lag", 1e-4] > 8)
    assert np.all(errors["frozen", 1e-3] > 3.0)


@pytest.mark.parametrize("orthogonal_to_sign", [True, False])
def test_adam_forecast_tracks_simulated_adam(orthogonal_to_sign):
    H, g, F = make_adam_problem(orthogonal_to_sign)
    lr = 1e-3
    inputs, _, _ = _adam_inputs(H, g, F)
    fc = forecast(inputs, lr=lr, n_steps=200, optimizer="adam")
    assert fc.approximate and "approximate" in fc.optimizer and fc.notes
    k_end = fc.window_end
    assert 10 < k_end < 200
    ks = np.arange(2, k_end + 1)
    deltas = _simulate_adam(H, g, lr, k_end)[ks - 1]
    sim = 0.5 * np.einsum("ki,ij,kj->k", deltas, F, deltas)
    rel = np.abs(fc.dL[ks - 1] / sim - 1)
    frozen = forecast(
        inputs, lr=lr, n_steps=200, optimizer=OptimizerModel("adam", BETAS, momentum_lag=False)
    )
    rel_frozen = np.abs(frozen.dL[ks - 1] / sim - 1)
    if orthogonal_to_sign:
        # dL_a rests on the bend alone: measured 5.7% at k = 2, 8.7% at k = 10, 33% at the
        # horizon (k = 104), always an underestimate. The frozen preconditioner is 4.7x to 1400x
        # too large.
        assert np.all(rel[ks <= 10] < 0.1)
        assert np.all(rel < 0.4)
        assert np.all(sim > fc.dL[ks - 1])
        assert np.all(rel_frozen > 4.0)
    else:
        # The first-order term sign(g)^T F sign(g) dominates: measured <= 1.3% up to the horizon.
        assert np.all(rel < 0.02)


# ------------------------------------------------------------------ horizon, collapse, output


def test_curve_stops_at_horizon_and_collapse_step():
    prob = make_problem(orthogonal=True)
    inputs = replace(prob.inputs(), aFa3=None)  # the trajectory criteria only
    lr = 4e-3
    fc = forecast(inputs, lr=lr, n_steps=300)
    # |a| / |g| binds: k_h = floor(1 + 2 rho |g| / (lr |a|)).
    expected_h = math.floor(1 + 2 * 0.5 * inputs.g_norm / (lr * inputs.a_norm))
    assert fc.horizon_steps == expected_h < 300
    assert fc.horizon_reason == "second-order vs first-order"
    assert fc.window_end == expected_h
    valid = fc.steps <= expected_h
    assert np.all(np.isfinite(fc.dL[valid])) and np.all(np.isnan(fc.dL[~valid]))
    assert all(np.all(np.isnan(v[~valid])) for v in fc.terms.values())
    assert all(d is None for d, ok in zip(fc.dominant, valid, strict=True) if not ok)

    # A threshold above everything inside the horizon: no collapse claimed beyond it.
    top = np.nanmax(fc.dL)
    high = forecast(inputs, lr=lr, n_steps=300, threshold=2 * top)
    assert high.collapse_step is None and high.collapse_status == "beyond_horizon"
    assert high.safe_steps == expected_h
    short = forecast(inputs, lr=lr, n_steps=20, threshold=2 * top)
    assert short.collapse_step is None and short.collapse_status == "beyond_n_steps"
    assert short.safe_steps == 20

    # A threshold the simulated descent crosses at step 12 (inside the horizon; the forecast is
    # 14% low there while dL_a grows 44% per step): the forecast must say 12.
    sim = _simulate_gd(prob, lr, 20)
    threshold = math.sqrt(sim[10] * sim[11])
    hit = forecast(inputs, lr=lr, n_steps=300, threshold=threshold)
    assert hit.collapse_status == "reached"
    assert hit.collapse_step == 12 and hit.safe_steps == 11
    assert hit.dL[10] < threshold <= hit.dL[11]


def test_fifth_order_horizon_bounds_the_error_of_dl():
    # In the AIC case F weights a3 more than a (|F^1/2 a3|/|F^1/2 a| = 5.0 vs |a3|/|a| = 3.8):
    # at the trajectory horizon the forecast is 3x off. With a^T F a3 the horizon is where the
    # first neglected term of dL_a, lr^5 C(k,2) C(k,3) aFa3, reaches rho of the quartic term.
    prob = make_problem(orthogonal=True)
    lr = 1e-3
    trajectory = forecast(replace(prob.inputs(), aFa3=None), lr=lr, n_steps=1000)
    fc = forecast(prob.inputs(), lr=lr, n_steps=1000)
    x = prob.inputs()
    assert fc.horizon_reason == "fifth-order term of dL_a vs kept terms"
    # Only the quartic term is kept here (g_a = 0, F g = 0): k <= 2 + 1.5 rho aFa / (lr aFa3).
    assert fc.horizon_steps == math.floor(2 + 0.75 * x.aFa / (lr * x.aFa3))
    sim = _simulate_gd(prob, lr, trajectory.horizon_steps)
    err = np.abs(fc.dL[: fc.horizon_steps] / sim[: fc.horizon_steps] - 1)
    err_traj = abs(trajectory.dL[trajectory.horizon_steps - 1] / sim[-1] - 1)
    # Measured: 62% at the new horizon (k = 153), 28% at half of it, 208% at the trajectory
    # horizon (k = 375).
    assert err[-1] < 0.8 and err[fc.horizon_steps // 2] < 0.35
    assert err_traj > 1.5
    # Case (b): the quadratic term dominates and the fifth-order term does not bind.
    fc_b = forecast(make_problem(orthogonal=False).inputs(), lr=lr, n_steps=1000)
    assert fc_b.horizon_reason == "third-order vs second-order"


def test_unbounded_horizon_and_single_step():
    # a = 0 (no curvature supplied): the expansion has no measured limit; horizon None.
    fc = forecast(
        ForecastInputs(gFg=2.0, gFa=0.0, aFa=0.0, g_norm=1.0, a_norm=0.0), lr=0.1, n_steps=1
    )
    assert fc.horizon_steps is None and fc.window_end == 1
    assert fc.dL[0] == pytest.approx(0.5 * 0.1**2 * 2.0)
    assert fc.dominant == [2] and np.isnan(fc.loglog_exponent[0])


def test_to_dict_is_json_ready():
    prob = make_problem(orthogonal=True)
    fc = forecast(prob.inputs(trFSigma=3.0), lr=4e-3, n_steps=150, batch_size=8, threshold=1e-6)
    out = json.loads(json.dumps(fc.to_dict(), allow_nan=False))
    assert out["horizon_steps"] == fc.horizon_steps
    assert len(out["dL"]) == 150 and out["dL"][-1] is None
    assert out["terms"]["noise"][0] == pytest.approx(4e-3**2 * 3.0 / 16)
    assert out["dominant"][0] == "noise" and out["dominant"][-1] is None
    assert out["coefficients"]["c4"] == pytest.approx(fc.coefficients.c4)
    assert out["collapse_status"] in ("reached", "beyond_horizon")


_GOOD = {"gFg": 1.0, "gFa": 0.1, "aFa": 2.0, "g_norm": 1.0, "a_norm": 1.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gFg": float("nan")}, "gFg must be finite"),
        ({"aFa": float("inf")}, "aFa must be finite"),
        ({"a_norm": -1.0}, "a_norm must be >= 0"),
        ({"gFg": -0.5}, "gFg must be >= 0"),
        ({"trFSigma": -1.0}, "trFSigma must be >= 0"),
        ({"ga_g": "1"}, "ga_g must be a real number"),
    ],
)
def test_bad_inputs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        ForecastInputs(**{**_GOOD, **change})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"n_steps": 0}, "n_steps must be in"),
        ({"n_steps": 2.5}, "n_steps must be an integer"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"rho": 0.0}, "rho must be in"),
        ({"optimizer": "lion"}, "unknown optimizer"),
    ],
)
def test_bad_forecast_arguments_raise(kwargs, message):
    args = {"lr": 1e-3, "n_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        forecast(ForecastInputs(**_GOOD), **args)


def test_roundoff_negative_forms_are_clipped():
    x = ForecastInputs(**{**_GOOD, "gFg": -1e-17})
    assert x.gFg == 0.0
    with pytest.raises(ValueError, match="betas"):
        OptimizerModel("adam", (0.9, 1.0))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_forecast_reads_back_from_its_dict(optimizer):
    """results.json holds ``to_dict()``; ``from_dict`` gives the same forecast back (NaN beyond
    the horizon included), so a diagnosis read from disk forecasts what the written one did."""
    inputs = ForecastInputs(gFg=1e-3, gFa=-2e-2, aFa=0.5, g_norm=1.0, a_norm=3.0, aFa_sub=0.4,
                            a3_norm=5.0, gFa3=0.1, aFa3=0.2, trFSigma=0.3, a_inf=1.0)  # fmt: skip
    fc = forecast(inputs, lr=0.05, n_steps=40, optimizer=optimizer, batch_size=4, threshold=0.1)
    assert fc.horizon_steps is not None and fc.horizon_steps < 40  # NaN tail exercised
    d = json.loads(json.dumps(fc.to_dict()))
    back = Forecast.from_dict(d)
    assert back.to_dict() == d
    np.testing.assert_array_equal(back.dL, fc.dL)  # NaN == NaN here
    assert back.inputs == fc.inputs and back.coefficients == fc.coefficients


def test_forecast_from_aic_feeds_the_optimizers_terms():
    """sgd takes the third-order forms and no a_inf; Adam the coordinate horizon and no a3."""
    from alignscope.geometry import AIC

    aic = AIC(d=2, g_norm=1.0, Pg_norm=0.1, Pg_ratio=0.1, F_half_g=0.03, a_norm=3.0, a_inf=0.5,
              gamma=0.6, kappa=50.0, gFg=1e-3, gFa=-2e-2, aFa=0.5, aFa_sub=0.36, Ha_norm=5.0,
              gFa3=0.1, aFa3=0.2, lambda_d=1.0, tail_mass=0.1, random_Pg_ratio=0.01)  # fmt: skip
    kw = dict(lr=0.05, n_steps=30, batch_size=4, threshold=0.1)
    sgd = forecast_from_aic(aic, 0.3, optimizer="sgd", **kw)
    assert (sgd.inputs.a3_norm, sgd.inputs.gFa3, sgd.inputs.aFa3) == (5.0, 0.1, 0.2)
    assert sgd.inputs.a_inf is None and sgd.inputs.trFSigma == 0.3
    adam = forecast_from_aic(aic, 0.3, optimizer="adamw", **kw)
    assert adam.inputs.a3_norm is None and adam.inputs.a_inf == 0.5 and adam.approximate
    # Adam's horizon: every gradient coordinate changes by <= rho: k <= 1 + rho / (lr a_inf)
    assert adam.horizon_steps == math.floor(1 + 0.5 / (0.05 * 0.5))
