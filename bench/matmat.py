"""Benchmark of batched curvature products: a loop of matvecs against one matmat, side by side.

On the random ~5.4 M-parameter Llama of bench/curvature.py (same builder, same short "alignment"
fine-tune so the softmax is peaked), measured in one run with interleaved repeats:

1. Exact Fisher products on the eigen selection of bench/curvature.py (last MLP down-projection +
   LM head, what diagnose analyses; with ``--all-params`` also on all parameters): ``k`` vectors
   one ``matvec`` at a time against one ``matmat`` of ``k`` columns; vectors per second for both,
   and their agreement.
2. The same for Hessian-vector products of the mean fine-tuning NLL (double backward).

The last line of stdout is one JSON object with the headline figures.

Usage: ``OMP_NUM_THREADS=1 python bench/matmat.py [--seed 0] [--quick] [--threads 1] [--k 8]
[--repeats 3] [--all-params]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from alignscope.curvature import FisherOperator, FunctionalLM, HessianOperator
from alignscope.curvature.operator import LinearOperator, stacked_matvecs
from alignscope.params import select_params

# The sibling benchmark's model builder and helpers: one definition of the bench model.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from curvature import (  # noqa: E402
    align,
    build_batch,
    build_model,
    full_config,
    machine_info,
    print_table,
    quick_config,
    time_interleaved,
)

TARGET_SPEEDUP = 1.5  # issue #14: batched Fisher products >= 1.5x the vectors/s of the loop


def compare(op: LinearOperator, k: int, repeats: int, seed: int) -> dict[str, Any]:
    """Loop of ``k`` matvecs vs one ``matmat`` of ``k`` columns: times, vectors/s, agreement."""
    gen = torch.Generator().manual_seed(seed)
    vs = torch.randn(op.shape[0], k, generator=gen).to(op.dtype)
    loop_out = stacked_matvecs(op, vs)
    batch_out = op.matmat(vs)  # also the warm-up of the batched path
    rel = float((batch_out - loop_out).norm() / loop_out.norm())
    times = time_interleaved(
        {"loop": lambda: stacked_matvecs(op, vs), "matmat": lambda: op.matmat(vs)},
        repeats,
        warmup=0,
    )
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "P": op.shape[0],
        "k": k,
        "loop_s": med["loop"],
        "matmat_s": med["matmat"],
        "loop_vec_per_s": k / med["loop"],
        "matmat_vec_per_s": k / med["matmat"],
        "speedup": med["loop"] / med["matmat"],
        "rel_diff": rel,
        "all_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small model, fast smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--k", type=int, default=8, help="vectors per matmat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    parser.add_argument(
        "--all-params", action="store_true", help="also measure on all parameters (slow)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = quick_config() if args.quick else full_config()
    info = machine_info(args.threads)
    print("alignscope batched-product benchmark" + (" (--quick)" if args.quick else ""))
    for key, val in info.items():
        print(f"  {key:14s} {val}")

    model = build_model(cfg, args.seed)
    batch = build_batch(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    before, after = align(model, batch, cfg.align_steps, cfg.align_lr)
    print(
        f"\nmodel: LlamaForCausalLM float32 eager, {n_params / 1e6:.2f} M params; batch "
        f"{batch.size} pairs x {batch.input_ids.shape[1]} tokens; aligned NLL "
        f"{before:.3f} -> {after:.3f}"
    )

    results: dict[str, dict[str, Any]] = {}
    selections: dict[str, list[str] | str] = {"eigen selection": cfg.eig_patterns}
    if args.all_params:
        selections["all parameters"] = "all"
    for name, patterns in selections.items():
        flm = FunctionalLM(model, select_params(model, patterns))
        fisher = FisherOperator(flm, batch)
        results[f"Fisher, {name}"] = compare(fisher, args.k, args.repeats, args.seed)
        hess = HessianOperator(lambda t, flm=flm: flm.mean_nll(t, batch), flm.theta0)
        results[f"Hessian, {name}"] = compare(hess, args.k, args.repeats, args.seed)

    rows = [
        [
            name,
            f"{r['P']:,}",
            f"{r['loop_s']:.2f} s",
            f"{r['matmat_s']:.2f} s",
            f"{r['loop_vec_per_s']:.2f}",
            f"{r['matmat_vec_per_s']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['rel_diff']:.1e}",
        ]
        for name, r in results.items()
    ]
    print_table(
        f"{args.k} products: a loop of matvecs vs one matmat (median of {args.repeats}, "
        "interleaved)",
        ["operator", "P", "loop", "matmat", "loop vec/s", "matmat vec/s", "speedup", "rel diff"],
        rows,
    )
    head = results["Fisher, eigen selection"]
    verdict = "met" if head["speedup"] >= TARGET_SPEEDUP else "NOT met"
    print(
        f"\ntarget (#14): batched Fisher products >= {TARGET_SPEEDUP}x the loop's vectors/s at "
        f"{args.k} vectors: {head['speedup']:.2f}x on the eigen selection, {verdict}"
    )
    headline = {
        "bench": "matmat",
        "quick": args.quick,
        "threads": args.threads,
        "k": args.k,
        "n_params": n_params,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - t_start, 1),
        **{
            key: {
                "P": r["P"],
                "loop_vec_per_s": round(r["loop_vec_per_s"], 3),
                "matmat_vec_per_s": round(r["matmat_vec_per_s"], 3),
                "speedup": round(r["speedup"], 3),
                "rel_diff": r["rel_diff"],
            }
            for key, r in results.items()
        },
        "fisher_target_met": head["speedup"] >= TARGET_SPEEDUP,
        "machine": info,
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
