"""The alignment-loss forecast: Taylor coefficients, optimizer step mapping, curve, collapse step.

Pure math on scalars measured elsewhere (``geometry``); no model code. Notation (docs/theory.md):
``g = grad L_f(theta0)``, ``H`` its Hessian, ``a = H g``, ``F`` the curvature of the alignment
loss ``L_a`` (its Hessian; the Fisher for the KL loss), ``g_a = grad L_a(theta0)`` (zero for the
KL loss), ``a3 = H a + T[g, g]`` the third-order trajectory vector (``T`` the third derivative
of ``L_f``; pass ``H H g`` when ``T`` is not available).

Gradient flow ``theta' = -grad L_f`` has the exact Taylor series
``delta(t) = -t g + (t^2/2) a - (t^3/6) a3 + t^4 d4 + ...`` and, for ``L_a`` quadratic around
``theta0`` (``L_a = g_a.delta + delta^T F delta / 2``),

    dL_a(t) = c1 t + c2 t^2 + c3 t^3 + c4 t^4 + O(t^5)
    c1 = -g_a.g                                   (exact)
    c2 = (g_a.a)/2 + (g^T F g)/2                  (exact)
    c3 = -(g^T F a)/2 - (g_a.a3)/6                (the simple form drops the last term)
    c4 = (a^T F a)/8 + (g^T F a3)/6 + g_a.d4      (the simple form keeps only the first term)

So the simple ``c3`` is exact when ``g_a = 0`` (the KL default) and its ``c4`` is exact when
also ``F g = 0`` (``g`` orthogonal to the range of ``F``: the AIC case). This module adds the
``a3`` corrections when their quadratic forms are supplied; ``g_a.d4`` is never included.

Discrete optimizers map onto the same structure through step polynomials ``p1, p2, p3`` with
``delta_k = -lr p1(k) g + lr^2 p2(k) a - lr^3 p3(k) a3 + ...`` (see :class:`OptimizerModel`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # the geometry brings torch and the model code; this module is numpy only
    from alignscope.geometry import AIC

DEFAULT_RHO = 0.5
MAX_STEPS = 10_000_000
_ROUNDOFF = 1e-8  # relative size of negative round-off tolerated in PSD quadratic forms
TERM_NAMES = ("order1", "order2", "order3", "order4", "noise")


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class ForecastInputs:
    """Quadratic forms and norms measured at theta0 (for Adam: of ``D g`` and ``D H D g``).

    Required: ``gFg = g^T F g``, ``gFa = g^T F a``, ``aFa = a^T F a``, ``g_norm = |g|``,
    ``a_norm = |a|``. Optional: ``ga_g = g_a.g``, ``ga_a = g_a.a`` (zero for the KL loss),
    ``aFa_sub = a^T F P_d a = gamma^2``, ``a3_norm = |a3|`` (third-order horizon),
    ``gFa3 = g^T F a3`` and ``ga_a3 = g_a.a3`` (exact c4 / c3 corrections), ``trFSigma =
    tr(F Sigma)`` with ``Sigma`` the covariance of the per-example fine-tuning gradients
    (minibatch noise; :func:`alignscope.geometry.noise_trace` estimates it with the unbiased
    ``1/(M-1)`` sample covariance; for sampling without replacement multiply by ``(M-b)/(M-1)``),
    ``a_inf = max_i |a_i|`` (Adam's horizon; defaults to the conservative ``a_norm``),
    ``aFa3 = a^T F a3`` (sgd horizon from the first neglected term of dL_a itself).
    Round-off negatives of the PSD forms (above ``-1e-8 lambda |u|^2``, ``lambda`` the largest
    Rayleigh quotient the inputs imply) are clipped to 0; anything more negative raises.
    """

    gFg: float
    gFa: float
    aFa: float
    g_norm: float
    a_norm: float
    ga_g: float = 0.0
    ga_a: float = 0.0
    aFa_sub: float | None = None
    a3_norm: float | None = None
    gFa3: float | None = None
    ga_a3: float | None = None
    trFSigma: float | None = None
    a_inf: float | None = None
    aFa3: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
                raise ValueError(f"ForecastInputs.{f.name} must be a real number, got {value!r}")
            object.__setattr__(self, f.name, _finite(f"ForecastInputs.{f.name}", value))
        for name in ("g_norm", "a_norm", "a3_norm", "a_inf"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"ForecastInputs.{name} must be >= 0, got {value}")
        # F is PSD, so these forms are >= 0 up to round-off (eps ||F|| |u|^2): clip that, but a
        # clearly negative value is a bug upstream, not something to forecast from.
        lam = max(
            self.gFg / self.g_norm**2 if self.g_norm > 0 else 0.0,
            self.aFa / self.a_norm**2 if self.a_norm > 0 else 0.0,
            abs(self.gFa) / (self.g_norm * self.a_norm) if self.g_norm * self.a_norm > 0 else 0.0,
        )
        for name, size in (
            ("gFg", self.g_norm),
            ("aFa", self.a_norm),
            ("aFa_sub", self.a_norm),
            ("trFSigma", self.g_norm),
        ):
            value = getattr(self, name)
            if value is None or value >= 0:
                continue
            if value < -_ROUNDOFF * lam * size**2:
                raise ValueError(f"ForecastInputs.{name} must be >= 0 (F is PSD), got {value}")
            object.__setattr__(self, name, 0.0)


@dataclass(frozen=True)
class FlowCoefficients:
    """``dL_a(t) ~= c1 t + c2 t^2 + c3 t^3 + c4 t^4`` under gradient flow; ``c4_sub = gamma^2/8``.

    ``c3_exact`` / ``c4_exact`` say whether the supplied inputs make that coefficient the exact
    Taylor coefficient (assuming ``g_a = 0`` when ``ga_g = ga_a = 0``, see the module docstring).
    """

    c1: float
    c2: float
    c3: float
    c4: float
    c4_sub: float | None
    c3_exact: bool
    c4_exact: bool

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.c1, self.c2, self.c3, self.c4)

    def __call__(self, t: np.ndarray | float) -> np.ndarray:
        """The quartic polynomial at flow time(s) ``t``."""
        t = np.asarray(t, dtype=np.float64)
        return t * (self.c1 + t * (self.c2 + t * (self.c3 + t * self.c4)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def coefficients(inputs: ForecastInputs) -> FlowCoefficients:
    """Gradient-flow Taylor coefficients of ``dL_a(t)`` (module docstring: what is exact)."""
    ga_zero = inputs.ga_g == 0.0 and inputs.ga_a == 0.0
    c3 = -inputs.gFa / 2.0
    if inputs.ga_a3 is not None:
        c3 -= inputs.ga_a3 / 6.0
    c4 = inputs.aFa / 8.0
    if inputs.gFa3 is not None:
        c4 += inputs.gFa3 / 6.0
    # gFg = 0 with F PSD means F g = 0, so g^T F a3 vanishes without being measured.
    return FlowCoefficients(
        c1=-inputs.ga_g,
        c2=inputs.ga_a / 2.0 + inputs.gFg / 2.0,
        c3=c3,
        c4=c4,
        c4_sub=None if inputs.aFa_sub is None else inputs.aFa_sub / 8.0,
        c3_exact=ga_zero or inputs.ga_a3 is not None,
        c4_exact=ga_zero and (inputs.gFa3 is not None or inputs.gFg == 0.0),
    )


def coupling_ratio(inputs: ForecastInputs) -> float:
    """``kappa = (a^T F a/|a|^2) / (g^T F g/|g|^2)``; ``inf`` when ``g^T F g = 0 < a^T F a``."""
    if inputs.a_norm == 0.0 or inputs.g_norm == 0.0:
        return float("nan")
    num = inputs.aFa / inputs.a_norm**2
    den = inputs.gFg / inputs.g_norm**2
    if den == 0.0:
        return float("inf") if num > 0 else float("nan")
    return num / den


def flow_horizon(inputs: ForecastInputs, rho: float = DEFAULT_RHO) -> float:
    """Flow time where a neglected trajectory term reaches ``rho`` times the last kept one.

    Trajectory criteria only; :func:`forecast` also bounds the neglected term of ``dL_a``.

    ``(t^2/2)|a| = rho t |g|`` gives ``t = 2 rho |g|/|a|``; with ``a3_norm``,
    ``(t^3/6)|a3| = rho (t^2/2)|a|`` gives ``t = 3 rho |a|/|a3|``. ``inf`` if neither binds.
    """
    rho = _check_rho(rho)
    t = math.inf
    if inputs.a_norm > 0:
        t = min(t, 2.0 * rho * inputs.g_norm / inputs.a_norm)
    if inputs.a3_norm is not None and inputs.a3_norm > 0:
        if inputs.a_norm > 0:
            t = min(t, 3.0 * rho * inputs.a_norm / inputs.a3_norm)
        else:
            t = min(t, math.sqrt(6.0 * rho * inputs.g_norm / inputs.a3_norm))
    return t


def _check_rho(rho: float) -> float:
    rho = _finite("rho", rho)
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    return rho


def _ema_lag(beta: float, i: np.ndarray) -> np.ndarray:
    """Mean age ``sum_m m beta^m / sum_m beta^m`` (m < i) of Adam's bias-corrected EMA."""
    if beta == 0.0:
        return np.zeros_like(i)
    # 1 - beta^i via expm1 keeps precision for beta close to 1 (0.999, 0.9999).
    one_minus_pow = -np.expm1(i * math.log(beta))
    return beta / (1.0 - beta) - i * np.exp(i * math.log(beta)) / one_minus_pow


@dataclass(frozen=True)
class OptimizerModel:
    """How ``k`` optimizer steps map onto the trajectory terms: ``(p1, p2, p3)`` of ``k``.

    ``sgd`` (plain gradient descent, learning rate ``lr``): ``delta_k = -lr k g + lr^2 C(k,2) a
    - lr^3 C(k,3) H a + ...``, exact for quadratic ``L_f`` (the ``T[g,g]`` part of ``a3`` has
    ``k(k-1)(2k-1)/12`` instead of ``C(k,3)``; both tend to ``k^3/6``).

    ``adam`` (approximate; bias-corrected Adam/AdamW, ``eps << |g_i|``, weight decay not
    modelled, full-batch gradients): pass ``D g`` and ``D H D g`` with ``D = 1/|g|`` as ``g``
    and ``a``. Linearising ``m_hat/sqrt(v_hat)`` about ``sign(g)`` gives
    ``delta_k = -lr k D g + lr^2 A_k D H D g + O(lr^3)`` with
    ``A_k = sum_{i<=k} (lag_beta2(i) - lag_beta1(i))``, ``lag`` the mean age of the
    bias-corrected moving average: the bend comes only from the first moment tracking the
    gradient faster than the second moment. ``A_k << C(k,2)`` early (0.026 vs 1 at k=2, 3.2 vs 45
    at k=10 for betas (0.9, 0.999)). ``momentum_lag=False`` uses the frozen-preconditioner
    reading ``p2 = C(k,2)`` instead, which overstates Adam's bend by those factors. No third-order
    term is modelled for Adam (``p3`` is None).
    """

    kind: Literal["sgd", "adam"] = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum_lag: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam"):
            raise ValueError(f"optimizer kind must be 'sgd' or 'adam', got {self.kind!r}")
        b1, b2 = (float(b) for b in self.betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam betas must lie in [0, 1), got {self.betas}")
        object.__setattr__(self, "betas", (b1, b2))

    @classmethod
    def parse(cls, spec: str | OptimizerModel) -> OptimizerModel:
        """``"sgd"``/``"gd"`` or ``"adam"``/``"adamw"`` (default betas), or a model as is."""
        if isinstance(spec, OptimizerModel):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"optimizer must be a string or OptimizerModel, got {spec!r}")
        name = spec.strip().lower()
        if name in ("sgd", "gd"):
            return cls("sgd")
        if name in ("adam", "adamw"):
            return cls("adam")
        raise ValueError(f"unknown optimizer {spec!r}: expected 'sgd' or 'adam'/'adamw'")

    @property
    def approximate(self) -> bool:
        return self.kind == "adam"

    @property
    def label(self) -> str:
        if self.kind == "sgd":
            return "sgd"
        lag = "momentum-lag" if self.momentum_lag else "frozen-preconditioner"
        return f"adam (approximate: {lag}, betas={self.betas})"

    def step_polynomials(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(p1, p2, p3)`` at integer steps ``k >= 1`` (``p3`` None when not modelled)."""
        k = np.asarray(k, dtype=np.float64)
        p1 = k.copy()
        if self.kind == "sgd":
            return p1, k * (k - 1) / 2.0, k * (k - 1) * (k - 2) / 6.0
        if not self.momentum_lag:
            return p1, k * (k - 1) / 2.0, None
        kmax = int(k.max()) if k.size else 0
        i = np.arange(1, kmax + 1, dtype=np.float64)
        b1, b2 = self.betas
        increments = _ema_lag(b2, i) - _ema_lag(b1, i)
        a_k = np.concatenate([[0.0], np.cumsum(increments)])
        return p1, a_k[k.astype(np.int64)], None


@dataclass
class Forecast:
    """A forecast of ``dL_a`` over steps ``1..n_steps``; NaN/None beyond the validity horizon.

    ``terms``: contributions by trajectory order (``order1..order4``, as powers of ``t = lr k``)
    and ``noise``; ``dL`` is their sum. ``dominant``: the largest ``|term|`` per step (1..4 or
    ``"noise"``). ``loglog_exponent``: local slope ``d log dL / d log k`` (central differences;
    NaN where ``dL <= 0``). ``horizon_steps``: last valid step (None: unbounded by the inputs).
    ``collapse_step``: first step in the valid window with ``dL >= threshold`` (None: not reached;
    ``collapse_status`` says whether the window ended at the horizon or at ``n_steps``).
    ``safe_steps``: ``collapse_step - 1``, else the window end ``min(n_steps, horizon)``.
    """

    optimizer: str
    approximate: bool
    lr: float
    batch_size: int | None
    rho: float
    steps: np.ndarray
    times: np.ndarray
    dL: np.ndarray
    terms: dict[str, np.ndarray]
    dominant: list[int | str | None]
    loglog_exponent: np.ndarray
    horizon_steps: int | None
    horizon_reason: str
    threshold: float | None
    collapse_step: int | None
    collapse_status: str
    safe_steps: int
    coefficients: FlowCoefficients
    inputs: ForecastInputs
    notes: list[str] = field(default_factory=list)

    @property
    def window_end(self) -> int:
        """Last reported step: ``min(n_steps, horizon_steps)``."""
        n = int(self.steps[-1])
        return n if self.horizon_steps is None else min(n, self.horizon_steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists of floats, ``None`` for NaN / missing values."""
        return {
            "optimizer": self.optimizer,
            "approximate": self.approximate,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "rho": self.rho,
            "steps": [int(k) for k in self.steps],
            "times": _jsonable(self.times),
            "dL": _jsonable(self.dL),
            "terms": {name: _jsonable(v) for name, v in self.terms.items()},
            "dominant": list(self.dominant),
            "loglog_exponent": _jsonable(self.loglog_exponent),
            "horizon_steps": self.horizon_steps,
            "horizon_reason": self.horizon_reason,
            "threshold": self.threshold,
            "collapse_step": self.collapse_step,
            "collapse_status": self.collapse_status,
            "safe_steps": self.safe_steps,
            "coefficients": {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in self.coefficients.to_dict().items()
            },
            "inputs": asdict(self.inputs),
            "notes": list(self.notes),
        }


    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Forecast:
        """The forecast back from :meth:`to_dict` (a results.json); ``None`` reads as NaN."""

        def arr(values: list[float | None]) -> np.ndarray:
            return np.array([math.nan if v is None else v for v in values], dtype=np.float64)

        coeffs = {
            k: (math.nan if v is None and k != "c4_sub" else v)
            for k, v in d["coefficients"].items()
        }
        return cls(
            optimizer=d["optimizer"],
            approximate=d["approximate"],
            lr=d["lr"],
            batch_size=d["batch_size"],
            rho=d["rho"],
            steps=np.array(d["steps"], dtype=np.int64),
            times=arr(d["times"]),
            dL=arr(d["dL"]),
            terms={name: arr(v) for name, v in d["terms"].items()},
            dominant=list(d["dominant"]),
            loglog_exponent=arr(d["loglog_exponent"]),
            horizon_steps=d["horizon_steps"],
            horizon_reason=d["horizon_reason"],
            threshold=d["threshold"],
            collapse_step=d["collapse_step"],
            collapse_status=d["collapse_status"],
            safe_steps=d["safe_steps"],
            coefficients=FlowCoefficients(**coeffs),
            inputs=ForecastInputs(**d["inputs"]),
            notes=list(d["notes"]),
        )


def _jsonable(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def _terms(
    x: ForecastInputs, opt: OptimizerModel, lr: float, steps: np.ndarray, batch_size: int | None
) -> dict[str, np.ndarray]:
    """Per-order contributions to ``dL_a`` at ``steps`` (see :func:`forecast`)."""
    p1, p2, p3 = opt.step_polynomials(steps)
    e1, e2, e3, e4 = lr, lr**2, lr**3, lr**4
    order1 = -e1 * p1 * x.ga_g
    order2 = e2 * p2 * x.ga_a + e2 * p1**2 * x.gFg / 2.0
    order3 = -e3 * p1 * p2 * x.gFa
    order4 = e4 * p2**2 * x.aFa / 2.0
    if p3 is not None:
        if x.ga_a3 is not None:
            order3 = order3 - e3 * p3 * x.ga_a3
        if x.gFa3 is not None:
            order4 = order4 + e4 * p1 * p3 * x.gFa3
    noise = np.zeros(p1.shape)
    if batch_size is not None and x.trFSigma is not None:
        noise = e2 * p1 * x.trFSigma / (2.0 * batch_size)
    return {"order1": order1, "order2": order2, "order3": order3, "order4": order4, "noise": noise}


def _step_horizon(
    x: ForecastInputs, opt: OptimizerModel, lr: float, rho: float, batch_size: int | None
) -> tuple[float, str]:
    """Largest real step count satisfying the optimizer's validity criteria, and which binds."""
    candidates: list[tuple[float, str]] = []
    g, a, a3 = x.g_norm, x.a_norm, x.a3_norm
    if opt.kind == "sgd":
        # lr^2 C(k,2)|a| <= rho lr k |g|  <=>  k <= 1 + 2 rho |g| / (lr |a|)
        if a > 0:
            candidates.append((1.0 + 2.0 * rho * g / (lr * a), "second-order vs first-order"))
        if a3 is not None and a3 > 0:
            if a > 0:  # lr^3 C(k,3)|a3| <= rho lr^2 C(k,2)|a|
                k3 = 2.0 + 3.0 * rho * a / (lr * a3)
            else:  # lr^3 C(k,3)|a3| <= rho lr k |g|
                k3 = 1.5 + math.sqrt(0.25 + 6.0 * rho * g / (lr**2 * a3))
            candidates.append((k3, "third-order vs second-order"))
    else:
        # m/sqrt(v) is linearised about sign(g): every gradient coordinate must change by less
        # than rho of itself, lr (k-1) |(D H D g)_i| <= rho. |a| bounds max_i |a_i| from above.
        a_inf = x.a_inf if x.a_inf is not None else a
        if a_inf > 0:
            reason = "Adam gradient-coordinate change" + (
                "" if x.a_inf is not None else " (bounded by |a|)"
            )
            candidates.append((1.0 + rho / (lr * a_inf), reason))
    k_h, reason = min(candidates) if candidates else (math.inf, "unbounded: no curvature term")
    if opt.kind == "sgd" and x.aFa3 is not None and x.aFa3 != 0.0:
        # The trajectory test above is blind to F: F can weight a3 more than a. The first
        # neglected term of dL_a itself, -lr^5 C(k,2) C(k,3) a^T F a3 (exact when g_a = 0 and
        # F g = 0), must stay below rho times the kept terms. The ratio grows with k (each kept
        # term has lower degree in k, barring sign changes inside one), so bisect.
        def within(k: int) -> bool:
            ks = np.array([k], dtype=np.float64)
            _, p2, p3 = opt.step_polynomials(ks)
            neglected = abs(lr**5 * p2[0] * p3[0] * x.aFa3)
            kept = sum(abs(float(v[0])) for v in _terms(x, opt, lr, ks, batch_size).values())
            return neglected <= rho * kept

        hi = math.floor(k_h) if math.isfinite(k_h) else 10**15
        if hi >= 1 and not within(hi):
            lo = 2  # C(k,3) = 0 for k <= 2: nothing neglected yet
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if within(mid) else (lo, mid)
            k_h, reason = float(lo), "fifth-order term of dL_a vs kept terms"
    return k_h, reason


def forecast(
    inputs: ForecastInputs,
    *,
    lr: float,
    n_steps: int,
    optimizer: str | OptimizerModel = "sgd",
    batch_size: int | None = None,
    threshold: float | None = None,
    rho: float = DEFAULT_RHO,
) -> Forecast:
    """Forecast ``dL_a`` after each of ``1..n_steps`` optimizer steps of learning rate ``lr``.

    ``dL_a(k) = g_a.delta_k + delta_k^T F delta_k / 2`` for ``delta_k = -lr p1 g + lr^2 p2 a``
    (the quadratic form of the two-term trajectory, exactly), plus the ``a3`` terms of order 3
    and 4 when supplied (sgd only), plus the minibatch noise ``lr^2 k tr(F Sigma) / (2 b)`` when
    ``batch_size`` and ``trFSigma`` are given. The noise term is leading order: the noise of
    step ``j`` is carried by ``(I - lr H)^(k-1-j)`` and ``Sigma`` drifts with ``theta``, both
    neglected (relative error ``O(lr k |H|)``); for Adam it is a further approximation (the
    caller passes ``tr(F D Sigma D)``).

    Horizon (``rho``, default 0.5): sgd, the largest ``k`` with ``|lr^2 p2 a| <= rho |lr p1 g|``
    and ``|lr^3 p3 a3| <= rho |lr^2 p2 a|``, and, given ``aFa3``, with the first neglected term
    of ``dL_a`` (``lr^5 p2 p3 aFa3``) ``<= rho`` times the kept terms; Adam, every gradient
    coordinate changed by ``<= rho`` of itself. It marks where the expansion fails, not where
    it is accurate: on the tests' problem with ``F g = 0`` the curve was 62% off at the horizon
    with ``aFa3`` and 208% off at the trajectory-only horizon (28% and 12% at half / a tenth).
    """
    lr = _finite("lr", lr)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer):
        raise ValueError(f"n_steps must be an integer, got {n_steps!r}")
    n_steps = int(n_steps)
    if not 1 <= n_steps <= MAX_STEPS:
        raise ValueError(f"n_steps must be in [1, {MAX_STEPS}], got {n_steps}")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = int(batch_size)
    if threshold is not None:
        threshold = _finite("threshold", threshold)
    rho = _check_rho(rho)
    if not isinstance(inputs, ForecastInputs):
        raise ValueError(f"inputs must be ForecastInputs, got {type(inputs).__name__}")
    opt = OptimizerModel.parse(optimizer)
    x = inputs
    notes: list[str] = []
    if opt.approximate:
        notes.append(
            "approximate: Adam modelled as a sign(g)-preconditioned flow linearised about its "
            "first step (bias-corrected, eps << |g_i|, no weight decay, full-batch moments)"
        )

    if opt.kind == "adam" and (x.ga_a3 is not None or x.gFa3 is not None or x.aFa3 is not None):
        notes.append("a3 terms ignored: no third-order term modelled for Adam")
    if batch_size is not None and x.trFSigma is None:
        notes.append("noise term omitted: trFSigma not supplied")
    steps = np.arange(1, n_steps + 1, dtype=np.int64)
    terms = _terms(x, opt, lr, steps, batch_size)
    total = sum(terms.values())

    # Local log-log slope on the full curve, before masking, so the last valid step has one.
    with np.errstate(divide="ignore", invalid="ignore"):
        log_dl = np.where(total > 0, np.log(np.where(total > 0, total, 1.0)), np.nan)
        if n_steps >= 2:
            exponent = np.gradient(log_dl, np.log(steps.astype(np.float64)))
        else:
            exponent = np.full(1, np.nan)

    k_h, horizon_reason = _step_horizon(x, opt, lr, rho, batch_size)
    horizon_steps = None if math.isinf(k_h) else max(0, math.floor(k_h))
    window_end = n_steps if horizon_steps is None else min(n_steps, horizon_steps)
    invalid = steps > window_end
    for arr in (total, exponent, *terms.values()):
        arr[invalid] = np.nan

    stacked = np.abs(np.stack([terms[name] for name in TERM_NAMES]))
    labels: tuple[int | str, ...] = (1, 2, 3, 4, "noise")
    winner = np.argmax(np.nan_to_num(stacked, nan=0.0), axis=0)
    has_term = np.nan_to_num(stacked, nan=0.0).max(axis=0) > 0
    dominant: list[int | str | None] = [
        labels[w] if ok else None
        for w, ok in zip(winner.tolist(), has_term & ~invalid, strict=True)
    ]

    collapse_step: int | None = None
    if threshold is None:
        status = "no_threshold"
    else:
        hits = np.nonzero(total[:window_end] >= threshold)[0]
        if hits.size:
            collapse_step = int(hits[0]) + 1
            status = "reached"
        elif horizon_steps is not None and horizon_steps < n_steps:
            status = "beyond_horizon"
        else:
            status = "beyond_n_steps"
    safe_steps = collapse_step - 1 if collapse_step is not None else window_end

    return Forecast(
        optimizer=opt.label,
        approximate=opt.approximate,
        lr=lr,
        batch_size=batch_size,
        rho=rho,
        steps=steps,
        times=lr * steps.astype(np.float64),
        dL=total,
        terms=terms,
        dominant=dominant,
        loglog_exponent=exponent,
        horizon_steps=horizon_steps,
        horizon_reason=horizon_reason,
        threshold=threshold,
        collapse_step=collapse_step,
        collapse_status=status,
        safe_steps=safe_steps,
        coefficients=coefficients(x),
        inputs=x,
        notes=notes,
    )


def forecast_from_aic(
    aic: AIC,
    noise_trace: float | None,
    *,
    optimizer: str,
    lr: float,
    n_steps: int,
    batch_size: int | None,
    threshold: float | None,
) -> Forecast:
    """The forecast of a diagnosis: :func:`forecast` fed by the measured geometry.

    Args:
        aic: the quantities measured at theta0 (:func:`alignscope.geometry.measure_direction`):
            of ``g`` and ``H g`` for sgd, of Adam's ``D g`` and ``D H D g`` for adam/adamw.
        noise_trace: ``tr(F Sigma)`` (sgd) or ``tr(F D Sigma D)`` (Adam); None: no noise term.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr, n_steps, batch_size, threshold: as for :func:`forecast`.

    Returns:
        The :class:`Forecast`; for sgd the third-order terms (``|H H g|``, ``g'F H a``,
        ``a'F H a``) are used, for Adam the coordinate-wise horizon (``max_i |a_i|``).

    Raises:
        ValueError: a non-finite measurement or an invalid argument (see :func:`forecast`).
    """
    adam = optimizer in ("adam", "adamw")
    inputs = ForecastInputs(
        gFg=aic.gFg,
        gFa=aic.gFa,
        aFa=aic.aFa,
        g_norm=aic.g_norm,
        a_norm=aic.a_norm,
        ga_g=aic.ga_g,
        ga_a=aic.ga_a,
        aFa_sub=aic.aFa_sub,
        a3_norm=None if adam else aic.Ha_norm,
        gFa3=None if adam else aic.gFa3,
        aFa3=None if adam else aic.aFa3,
        trFSigma=noise_trace,
        a_inf=aic.a_inf if adam else None,
    )
    return forecast(
        inputs,
        lr=lr,
        n_steps=n_steps,
        optimizer=optimizer,
        batch_size=batch_size,
        threshold=threshold,
    )
