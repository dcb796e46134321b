"""The curvature engine: per-sample gradients, HVPs, Fisher products, eigensolvers and traces."""

from alignscope.curvature.eigen import (
    EigenResult,
    block_gram_eigs,
    block_krylov_default_iter,
    block_krylov_eigs,
    block_lanczos_eigs,
    gram_eigs,
    lanczos_eigs,
)
from alignscope.curvature.fisher import FisherOperator
from alignscope.curvature.functional import (
    FunctionalLM,
    ensure_eager_attention,
    has_forward_ad_attention,
    response_weights,
)
from alignscope.curvature.hvp import HessianOperator, hvp_forward, hvp_reverse
from alignscope.curvature.losses import AlignmentKL, ResponsePositions
from alignscope.curvature.operator import (
    BlockOperator,
    CallableOperator,
    DenseOperator,
    FactorSource,
    LinearOperator,
    stacked_matvecs,
)
from alignscope.curvature.per_sample import per_sample_grads
from alignscope.curvature.spectrum import SpectrumPlan, fisher_eigs, plan_spectrum
from alignscope.curvature.trace import (
    TraceEstimate,
    deflated_trace,
    hutchinson,
    hutchpp,
    subspace_trace,
)

__all__ = [
    "AlignmentKL",
    "BlockOperator",
    "CallableOperator",
    "DenseOperator",
    "EigenResult",
    "FactorSource",
    "FisherOperator",
    "FunctionalLM",
    "HessianOperator",
    "LinearOperator",
    "ResponsePositions",
    "SpectrumPlan",
    "TraceEstimate",
    "block_gram_eigs",
    "block_krylov_default_iter",
    "block_krylov_eigs",
    "block_lanczos_eigs",
    "deflated_trace",
    "ensure_eager_attention",
    "fisher_eigs",
    "gram_eigs",
    "has_forward_ad_attention",
    "hutchinson",
    "hutchpp",
    "hvp_forward",
    "hvp_reverse",
    "lanczos_eigs",
    "per_sample_grads",
    "plan_spectrum",
    "response_weights",
    "stacked_matvecs",
    "subspace_trace",
]
