"""The alignment subspace and the Alignment Instability Condition (AIC) measured at theta0.

Measures, for an aligned model, a safety batch and a fine-tuning batch (docs/theory.md):
concentration of the alignment Fisher (lambda_1..d, tail mass, effective rank), the initial
orthogonality of the fine-tuning gradient ``g`` to the top-d subspace, the curvature coupling
``gamma = |F^1/2 P_d H g|``, the coupling ratio ``kappa``, and the quadratic forms the forecast
needs. Every number is a plain float so the result is JSON-ready.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch

from alignscope.curvature.eigen import EigenResult
from alignscope.curvature.fisher import FisherOperator
from alignscope.curvature.functional import FunctionalLM
from alignscope.curvature.hvp import HessianOperator
from alignscope.data.encode import LMBatch


@dataclass(eq=False)
class Subspace:
    """Top eigenpairs of the alignment Fisher with the trace they are measured against, and how
    they were computed.

    ``vectors`` holds the eigenvectors of the leading ``vectors.shape[1]`` values (all ``k`` when
    computed here; ``None`` when only the spectrum is known, e.g. a results.json read without its
    subspace.pt). ``plan``/``converged``/``max_residual`` record the solver run (``"reused"`` and
    ``None`` for a subspace taken over from an earlier diagnosis); ``trace_method`` and
    ``trace_products`` how ``trace`` was estimated (:class:`~alignscope.curvature.trace.
    TraceEstimate`; None in files written before they were recorded).
    """

    values: torch.Tensor  # [k] descending
    vectors: torch.Tensor | None  # [P, m] orthonormal columns, m <= k
    trace: float
    trace_stderr: float | None
    method: str
    plan: str | None = None
    converged: bool | None = None
    max_residual: float | None = None
    trace_method: str | None = None
    trace_products: int | None = None

    def __eq__(self, other: object) -> bool:
        """Same eigenpairs (exactly), trace and solver record."""
        if not isinstance(other, Subspace):
            return NotImplemented

        def same(a, b) -> bool:
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                return (
                    isinstance(a, torch.Tensor)
                    and isinstance(b, torch.Tensor)
                    and a.dtype == b.dtype
                    and torch.equal(a, b)
                )
            return a == b

        return all(same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    @property
    def k(self) -> int:
        return int(self.values.numel())

    @property
    def dim(self) -> int | None:
        """P, the number of parameters the eigenvectors live in (None without vectors)."""
        return None if self.vectors is None else int(self.vectors.shape[0])

    def rank_for(self, explained: float) -> int:
        """Smallest d whose top-d eigenvalues hold ``explained`` of the trace (capped at k)."""
        if not 0 < explained <= 1:
            raise ValueError("the explained fraction must be in (0, 1]")
        cum = torch.cumsum(self.values, 0) / self.trace
        hit = torch.nonzero(cum >= explained)
        return int(hit[0]) + 1 if hit.numel() else self.k

    def basis(self, d: int) -> torch.Tensor:
        """The top-d eigenvectors, ``[P, d]``."""
        if self.vectors is None:
            raise ValueError("this subspace holds the spectrum only (no subspace.pt was read)")
        if not 1 <= d <= self.vectors.shape[1]:
            raise ValueError(
                f"rank d={d} outside 1..{self.vectors.shape[1]} (the computed eigenpairs)"
            )
        return self.vectors[:, :d]

    def top(self, d: int) -> Subspace:
        """The top-d part: the leading d eigenpairs, same trace and solver record."""
        if not 1 <= d <= self.k:
            raise ValueError(f"rank d={d} outside 1..{self.k} (the computed eigenpairs)")
        return replace(
            self,
            values=self.values[:d],
            vectors=None if self.vectors is None else self.basis(min(d, self.vectors.shape[1])),
        )

    def reused(self) -> Subspace:
        """This subspace as recorded by a diagnosis that took it over instead of computing it."""
        return replace(self, plan="reused", converged=None, max_residual=None)

    def summary(self, d: int) -> dict[str, float | int | list[float]]:
        vals = self.values.tolist()
        top = float(sum(vals[:d]))
        return {
            "d": d,
            "eigenvalues": vals,
            "lambda_1": vals[0],
            "lambda_d": vals[d - 1],
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "trace_method": self.trace_method,
            "trace_products": self.trace_products,
            "explained": top / self.trace if self.trace > 0 else float("nan"),
            "tail_mass": self.trace - top,
            # participation ratio of the computed spectrum: how many directions carry the curvature
            "effective_rank": float(sum(vals) ** 2 / max(sum(x * x for x in vals), 1e-300)),
            "method": self.method,
        }


def make_subspace(
    eig: EigenResult,
    trace: float,
    trace_stderr: float | None,
    plan: str | None = None,
    *,
    trace_method: str | None = None,
    trace_products: int | None = None,
) -> Subspace:
    """The subspace of an eigensolver run (its convergence and largest residual recorded)."""
    return Subspace(
        eig.values,
        eig.vectors,
        trace,
        trace_stderr,
        eig.method,
        plan=plan,
        converged=eig.converged,
        max_residual=None if eig.residuals is None else float(eig.residuals.max()),
        trace_method=trace_method,
        trace_products=trace_products,
    )


@dataclass
class AIC:
    """The three AIC conditions' measured quantities plus the forecast's quadratic forms."""

    d: int
    g_norm: float
    Pg_norm: float  # |P_d g|
    Pg_ratio: float  # |P_d g| / |g|
    F_half_g: float  # sqrt(g^T F g)
    a_norm: float  # |H g|
    a_inf: float  # max_i |(H g)_i|, for Adam's validity horizon
    gamma: float  # |F^1/2 P_d H g|
    kappa: float  # (a^T F a / |a|^2) / (g^T F g / |g|^2)
    gFg: float
    gFa: float
    aFa: float
    aFa_sub: float  # gamma^2
    Ha_norm: float  # |H H g|, for the validity horizon
    gFa3: float  # g^T F H a: the exact t^4 correction when F g != 0
    aFa3: float  # a^T F H a: the first neglected term, for the horizon
    lambda_d: float
    tail_mass: float
    random_Pg_ratio: float  # expected |P_d u|/|u| of a random direction: sqrt(d / P)
    ga_g: float = 0.0  # grad L_a . g (zero for the KL loss at the reference)
    ga_a: float = 0.0  # grad L_a . a

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def measure_direction(
    fisher: FisherOperator,
    hessian: HessianOperator,
    subspace: Subspace,
    g: torch.Tensor,
    d: int,
    diag: torch.Tensor | None = None,
    alignment_grad: torch.Tensor | None = None,
) -> AIC:
    """AIC quantities for the flow ``theta' = -D grad L_f`` (``D = diag``, identity if None).

    With a preconditioner the first-step direction is ``D g`` and the curvature-bent term
    ``D H D g`` (Adam's early steps, docs/theory.md); every field then refers to those.
    ``alignment_grad`` is ``grad L_a(theta0)`` when the alignment loss is not stationary there
    (the refusal NLL); the KL's is exactly zero.
    """
    return measure_directions(fisher, hessian, subspace, g, d, [diag], alignment_grad)[0]


def measure_directions(
    fisher: FisherOperator,
    hessian: HessianOperator,
    subspace: Subspace,
    g: torch.Tensor,
    d: int,
    diags: list[torch.Tensor | None],
    alignment_grad: torch.Tensor | None = None,
) -> list[AIC]:
    """:func:`measure_direction` for several preconditioners at once (None: plain gradient
    flow): the same numbers, with the Hessian-vector products of all of them in two ``matmat``
    calls (``H D g`` for every ``D``, then ``H a``; through one cached gradient graph with
    ``HessianOperator(cache_graph=True)``) and their Fisher forms in one Gram matrix.
    """

    def precond(v: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
        return v if diag is None else diag * v

    def hvps(vs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = hessian.matmat(torch.stack(vs, dim=1))
        return [precond(out[:, i], diag) for i, diag in enumerate(diags)]

    gs = [precond(g, diag) for diag in diags]
    as_ = hvps(gs)
    has = hvps(as_)
    forms = fisher.gram(torch.stack([v for trio in zip(gs, as_, has, strict=True) for v in trio]))
    basis = subspace.basis(d).to(g.dtype)
    lam = subspace.values[:d].to(g.dtype)
    summary = subspace.summary(d)
    return [
        _aic(gi, ai, hai, forms[3 * i : 3 * i + 3, 3 * i : 3 * i + 3], basis, lam, summary, d,
             alignment_grad)
        for i, (gi, ai, hai) in enumerate(zip(gs, as_, has, strict=True))
    ]  # fmt: skip


def _aic(
    g: torch.Tensor,
    a: torch.Tensor,
    ha: torch.Tensor,
    forms: torch.Tensor,
    basis: torch.Tensor,
    lam: torch.Tensor,
    summary: dict,
    d: int,
    alignment_grad: torch.Tensor | None,
) -> AIC:
    """The AIC of one direction ``g``, ``a = H g``, ``ha = H a`` (preconditioned) from the Fisher
    forms ``[[gFg, gFa, gFha], ...]`` of the three."""
    coords_a = basis.T @ a
    pg = basis.T @ g
    gFg, gFa, aFa = float(forms[0, 0]), float(forms[0, 1]), float(forms[1, 1])
    g_norm, a_norm = float(g.norm()), float(a.norm())
    aFa_sub = float((lam * coords_a**2).sum())
    kappa = (aFa / a_norm**2) / (gFg / g_norm**2) if gFg > 0 and a_norm > 0 else float("inf")
    return AIC(
        d=d,
        g_norm=g_norm,
        Pg_norm=float(pg.norm()),
        Pg_ratio=float(pg.norm()) / g_norm if g_norm > 0 else 0.0,
        F_half_g=max(gFg, 0.0) ** 0.5,
        a_norm=a_norm,
        a_inf=float(a.abs().max()),
        gamma=max(aFa_sub, 0.0) ** 0.5,
        kappa=kappa,
        gFg=gFg,
        gFa=gFa,
        aFa=aFa,
        aFa_sub=aFa_sub,
        Ha_norm=float(ha.norm()),
        gFa3=float(forms[0, 2]),
        aFa3=float(forms[1, 2]),
        lambda_d=float(summary["lambda_d"]),
        tail_mass=float(summary["tail_mass"]),
        random_Pg_ratio=(d / g.numel()) ** 0.5,
        ga_g=0.0 if alignment_grad is None else float(alignment_grad @ g),
        ga_a=0.0 if alignment_grad is None else float(alignment_grad @ a),
    )


def finetune_gradient(
    flm: FunctionalLM, batch: LMBatch, n_total: int | None = None
) -> torch.Tensor:
    """``g = grad L_f(theta0)``, the mean response-token NLL of the fine-tuning batch (of this
    process' share of it when ``batch`` is a shard of ``n_total`` examples)."""
    theta = flm.theta0.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(flm.mean_nll(theta, batch, n_total), theta)
    return g


def noise_trace(fisher: FisherOperator, per_sample: torch.Tensor) -> float:
    """``tr(F Sigma)`` with ``Sigma`` the covariance of the per-sample fine-tuning gradients.

    Computed exactly from the rows: ``tr(F Sigma) = mean_m (h_m - g)^T F (h_m - g)`` (with the
    unbiased ``M / (M - 1)`` correction); one ``J v`` per example.
    """
    return noise_traces(fisher, per_sample, [None])[0]


def noise_traces(
    fisher: FisherOperator, per_sample: torch.Tensor, diags: list[torch.Tensor | None]
) -> list[float]:
    """``tr(F D Sigma D)`` for each ``D`` of ``diags`` (None: ``tr(F Sigma)``): the rows of all
    of them through one batched ``quad_diag``."""
    m = per_sample.shape[0]
    if m < 2:
        raise ValueError("the minibatch-noise term needs at least 2 fine-tuning examples")
    centred = per_sample - per_sample.mean(0, keepdim=True)
    rows = torch.cat([centred if diag is None else centred * diag for diag in diags])
    forms = fisher.quad_diag(rows)
    return [float(forms[i * m : (i + 1) * m].sum()) / (m - 1) for i in range(len(diags))]
