"""Worker of the two-process (gloo) test of the coarsened vocabulary (tests/test_vocab_coarse.py):
each rank holds half the prompts; k must be chosen alike from the summed traces."""

from __future__ import annotations

import torch

from _tiny import random_batch, tiny_llama
from alignscope import distributed as dist
from alignscope.curvature import FisherOperator, FunctionalLM, HessianOperator
from alignscope.curvature.surrogate import HiddenNLLSurrogate
from alignscope.params import select_params

KEEP = 0.5


def products(batch_shard, n_total: int) -> dict:
    """The Fisher and surrogate-Hessian products of a (shard of a) batch of ``n_total``."""
    model = tiny_llama(hidden=16, vocab=128)
    flm = FunctionalLM(model, select_params(model, ["model.layers.1.mlp.*"]))
    batch = (
        random_batch(4, vocab=128)
        if batch_shard is None
        else batch_shard(random_batch(4, vocab=128))
    )
    fisher = dist.SumOverRanks(FisherOperator(flm, batch, n_total=n_total, vocab_keep=KEEP))
    sur = HiddenNLLSurrogate(flm, batch, n_total, vocab_keep=KEEP)
    hessian = dist.SumOverRanks(HessianOperator(sur, flm.theta0))
    v = torch.randn(flm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {
        "fisher": fisher.vocabulary,
        "hessian": sur.vocabulary,
        "Fv": fisher.matvec(v),
        "Hv": hessian.matvec(v),
    }


def vocab_worker(rank: int, out: str) -> None:
    got = products(lambda b: dist.shard_batch(b, "prompts"), 4)
    torch.save(got, f"{out}/{rank}.pt")
