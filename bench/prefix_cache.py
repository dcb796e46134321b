"""Frozen-prefix caching against the whole network, side by side in one run (CPU, float32).

The 5.4 M-parameter random Llama of ``bench/curvature.py`` (6 layers, hidden 256, vocabulary
2048; batch 8 x 32 tokens) with a last-two-layers selection (``model.layers.4.*`` and
``model.layers.5.*``, 1.45 M parameters). For each path (``FunctionalLM(prefix_cache=False)``,
the whole network; the default, the suffix from cached hidden states) it measures:

1. Fisher products per second: one vector at a time (``matvec``) and 8 at once (``matmat``).
2. The engine stages of a diagnosis, in the order ``alignscope diagnose`` runs them: setup (the
   operator and its softmax), curvature (Lanczos, a fixed number of products), trace (Hutch++),
   gradients (the fine-tuning gradient and 8 per-sample gradients) and the H g coupling.

Paths alternate within each repeat so that background load hits both alike; the table shows the
fastest repeat. The two paths' F v agree to float32 rounding (printed). The last line of stdout
is one JSON object with the headline figures.

Usage: ``python bench/prefix_cache.py [--repeats 2] [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from alignscope.curvature import (
    FisherOperator,
    FunctionalLM,
    HessianOperator,
    lanczos_eigs,
    per_sample_grads,
    response_weights,
)
from alignscope.curvature.trace import hutchpp
from alignscope.geometry import finetune_gradient
from alignscope.params import select_params
from curvature import build_batch, build_model, full_config, quick_config  # bench/ on sys.path

LANCZOS_PRODUCTS = 24
TRACE_PRODUCTS = 12
MATMAT_VECTORS = 8


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_path(model: torch.nn.Module, batch, patterns: list[str], cached: bool) -> dict[str, Any]:
    """One diagnosis-shaped pass over the engine, with or without the prefix cache."""
    times: dict[str, float] = {}
    sel = select_params(model, patterns)

    def setup() -> tuple[FunctionalLM, FisherOperator]:
        flm = FunctionalLM(model, sel, prefix_cache=cached)
        return flm, FisherOperator(flm, batch)

    times["setup"], (flm, op) = _timed(setup)
    assert (flm.prefix is not None) == cached, "the prefix cache did not switch on"
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(flm.dim, generator=gen)
    vs = torch.randn(flm.dim, MATMAT_VECTORS, generator=gen)
    op.matvec(v)  # warm: builds the cached backward graph
    t_matvec, fv = _timed(lambda: [op.matvec(v) for _ in range(3)][-1])
    t_matmat, _ = _timed(lambda: op.matmat(vs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fixed product count need not converge
        times["curvature"], eig = _timed(
            lambda: lanczos_eigs(op, 8, max_iter=LANCZOS_PRODUCTS, tol=0.0)
        )
    times["trace"], _ = _timed(lambda: hutchpp(op, TRACE_PRODUCTS))

    def gradients() -> torch.Tensor:
        g = finetune_gradient(flm, batch)
        w = response_weights(batch, flm.dtype)
        ids = batch.input_ids
        per_sample_grads(flm.example_nll, flm.theta0, (ids, w, *flm.example_extra(ids)))
        return g

    times["gradients"], g = _timed(gradients)
    hessian = HessianOperator(lambda t: flm.mean_nll(t, batch), flm.theta0)
    times["hvp"], _ = _timed(lambda: hessian.matvec(g))
    times["total"] = sum(times.values())
    return {
        "times": times,
        "matvec_per_s": 3 / t_matvec,
        "matmat_per_s": MATMAT_VECTORS / t_matmat,
        "fv": fv,
        "top_eig": float(eig.values[0]),
        "n_params": flm.dim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the small bench model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = quick_config() if args.quick else full_config()
    model = build_model(cfg, seed=0)
    batch = build_batch(cfg, seed=0)
    last = cfg.layers - 1
    # the last two layers (the quick model has two: its last one, so there is a prefix at all)
    patterns = [f"model.layers.{i}.*" for i in range(max(1, last - 1), last + 1)]
    n_model = sum(p.numel() for p in model.parameters())
    print(
        f"model: random Llama, {n_model / 1e6:.2f} M parameters, {cfg.layers} layers, hidden "
        f"{cfg.hidden}, vocab {cfg.vocab}; batch {batch.size} x {batch.input_ids.shape[1]} "
        f"tokens; selection {patterns}; torch {torch.__version__}, {args.threads} thread(s)"
    )
    runs: dict[str, list[dict[str, Any]]] = {"whole": [], "cached": []}
    for r in range(args.repeats):
        order = ("whole", "cached") if r % 2 == 0 else ("cached", "whole")
        for name in order:
            runs[name].append(run_path(model, batch, patterns, cached=name == "cached"))
    best = {
        name: {
            "times": {k: min(x["times"][k] for x in rs) for k in rs[0]["times"]},
            "matvec_per_s": max(x["matvec_per_s"] for x in rs),
            "matmat_per_s": max(x["matmat_per_s"] for x in rs),
        }
        for name, rs in runs.items()
    }
    w, c = runs["whole"][0], runs["cached"][0]
    fv_err = float((w["fv"] - c["fv"]).norm() / w["fv"].norm())
    print(
        f"selected parameters: {w['n_params']:,}; F v relative difference whole vs cached "
        f"{fv_err:.1e} (float32); top eigenvalue {w['top_eig']:.6g} vs {c['top_eig']:.6g}"
    )
    print()
    print(f"{'':34}{'whole':>10}{'cached':>10}{'speedup':>9}")
    rows = [
        ("Fisher products/s, matvec", "matvec_per_s", True),
        (f"Fisher products/s, matmat x{MATMAT_VECTORS}", "matmat_per_s", True),
    ]
    for label, key, higher in rows:
        a, b = best["whole"][key], best["cached"][key]
        print(f"{label:34}{a:10.2f}{b:10.2f}{(b / a if higher else a / b):8.2f}x")
    for stage in best["whole"]["times"]:
        a, b = best["whole"]["times"][stage], best["cached"]["times"][stage]
        print(f"{'stage ' + stage + ' (s)':34}{a:10.2f}{b:10.2f}{a / b:8.2f}x")
    headline = {
        "bench": "prefix_cache",
        "n_params_selected": w["n_params"],
        "matvec_per_s": {k: round(best[k]["matvec_per_s"], 3) for k in best},
        "matmat_per_s": {k: round(best[k]["matmat_per_s"], 3) for k in best},
        "stage_total_s": {k: round(best[k]["times"]["total"], 3) for k in best},
        "speedup_total": round(
            best["whole"]["times"]["total"] / best["cached"]["times"]["total"], 3
        ),
        "fv_rel_diff": fv_err,
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
