"""Frozen-prefix caching against the whole network, side by side in one run (CPU, float32).

The 5.4 M-parameter random Llama of ``bench/curvature.py`` (6 layers, hidden 256, vocabulary
2048; batch 8 x 32 tokens) with a last-two-layers selection (``model.layers.4.*`` and
``model.layers.5.*``, 1.45 M parameters). For each path (``FunctionalLM(prefix_cache=False)``,
the whole network; the default, the suffix from cached hidden states) it measures:

1. Fisher products per second: one vector at a time (``matvec``) and 8 at once (``matmat``).
2. The engine stages of a diagnosis, in the order ``alignscope diagnose`` runs them: setup (the
   operator and its softmax), curvature (Lanczos, a fixed number of products), trace (Hutch++),
   gradients (the fine-tuning gradient and 8 per-sample gradients) and the H g coupling.

Both paths run each stage back to back, their order alternating by repeat, so that background
load hits both alike; the table shows the fastest repeat. The two paths' F v agree to float32
rounding (printed). The last line of stdout is one JSON object with the headline figures.

Usage: ``python bench/prefix_cache.py [--repeats 3] [--threads 1] [--quick]``.
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

LANCZOS_PRODUCTS = 16
TRACE_PRODUCTS = 12
MATMAT_VECTORS = 8


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class BenchPath:
    """One path (whole network or cached prefix) through the diagnosis-shaped stages."""

    def __init__(self, model: torch.nn.Module, batch, patterns: list[str], cached: bool) -> None:
        self.model, self.batch, self.cached = model, batch, cached
        self.sel = select_params(model, patterns)
        gen = torch.Generator().manual_seed(0)
        self.v = torch.randn(self.sel.size, generator=gen)
        self.vs = torch.randn(self.sel.size, MATMAT_VECTORS, generator=gen)

    def setup(self) -> None:
        self.flm = FunctionalLM(self.model, self.sel, prefix_cache=self.cached)
        assert (self.flm.prefix is not None) == self.cached, "the prefix cache did not switch on"
        self.op = FisherOperator(self.flm, self.batch)

    def matvec(self) -> torch.Tensor:
        return self.op.matvec(self.v)

    def matmat(self) -> torch.Tensor:
        return self.op.matmat(self.vs)

    def curvature(self) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fixed product count need not converge
            eig = lanczos_eigs(self.op, 8, max_iter=LANCZOS_PRODUCTS, tol=0.0)
        return float(eig.values[0])

    def trace(self) -> None:
        hutchpp(self.op, TRACE_PRODUCTS)

    def gradients(self) -> None:
        flm, batch = self.flm, self.batch
        self.g = finetune_gradient(flm, batch)
        w = response_weights(batch, flm.dtype)
        ids = batch.input_ids
        per_sample_grads(flm.example_nll, flm.theta0, (ids, w, *flm.example_extra(ids)))

    def hvp(self) -> None:
        HessianOperator(lambda t: self.flm.mean_nll(t, self.batch), self.flm.theta0).matvec(self.g)


STAGES = ("setup", "curvature", "trace", "gradients", "hvp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
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
    paths = {
        name: BenchPath(model, batch, patterns, name == "cached") for name in ("whole", "cached")
    }
    times: dict[str, dict[str, list[float]]] = {n: {} for n in paths}
    outputs: dict[str, dict[str, Any]] = {n: {} for n in paths}
    # Every stage and product runs both paths back to back, the order alternating by repeat, so
    # that background load on a shared machine hits both alike; the fastest repeat is kept.
    for r in range(args.repeats):
        order = ("whole", "cached") if r % 2 == 0 else ("cached", "whole")
        for stage in (*STAGES[:1], "matvec", "matmat", *STAGES[1:]):
            for name in order:
                reps = 3 if stage == "matvec" else 1
                t, out = _timed(
                    lambda p=paths[name], s=stage, n=reps: [getattr(p, s)() for _ in range(n)]
                )
                times[name].setdefault(stage, []).append(t / reps)
                outputs[name][stage] = out[-1]
            if stage == "setup":
                for name in order:
                    paths[name].matvec()  # warm: builds the cached backward graph
    best = {
        name: {
            "times": {s: min(times[name][s]) for s in STAGES},
            "matvec_per_s": 1 / min(times[name]["matvec"]),
            "matmat_per_s": MATMAT_VECTORS / min(times[name]["matmat"]),
        }
        for name in paths
    }
    for b in best.values():
        b["times"]["total"] = sum(b["times"].values())
    fw, fc = outputs["whole"]["matvec"], outputs["cached"]["matvec"]
    fv_err = float((fw - fc).norm() / fw.norm())
    n_sel = paths["whole"].sel.size
    eig_w, eig_c = outputs["whole"]["curvature"], outputs["cached"]["curvature"]
    print(
        f"selected parameters: {n_sel:,}; F v relative difference whole vs cached "
        f"{fv_err:.1e} (float32); top eigenvalue {eig_w:.6g} vs {eig_c:.6g}; best of "
        f"{args.repeats} repeats"
    )
    print()
    print(f"{'':34}{'whole':>10}{'cached':>10}{'speedup':>9}")
    for label, key in (
        ("Fisher products/s, matvec", "matvec_per_s"),
        (f"Fisher products/s, matmat x{MATMAT_VECTORS}", "matmat_per_s"),
    ):
        a, b = best["whole"][key], best["cached"][key]
        print(f"{label:34}{a:10.2f}{b:10.2f}{b / a:8.2f}x")
    for stage in best["whole"]["times"]:
        a, b = best["whole"]["times"][stage], best["cached"]["times"][stage]
        print(f"{'stage ' + stage + ' (s)':34}{a:10.2f}{b:10.2f}{a / b:8.2f}x")
    headline = {
        "bench": "prefix_cache",
        "n_params_selected": n_sel,
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
