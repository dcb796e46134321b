"""Benchmark of batched curvature products: a loop of matvecs against one matmat, side by side.

On the random ~5.4 M-parameter Llama of bench/curvature.py (same builder, same short "alignment"
fine-tune so the softmax is peaked), measured in one run with interleaved repeats:

1. Exact Fisher products on the eigen selection of bench/curvature.py (last MLP down-projection +
   LM head, what diagnose analyses; with ``--all-params`` also on all parameters): ``k`` vectors
   one ``matvec`` at a time against one ``matmat`` of ``k`` columns; vectors per second for both,
   and their agreement.
2. The same for Hessian-vector products of the mean fine-tuning NLL (double backward).
3. With ``--eigs``: the Fisher eigensolve on the eigen selection, single-vector Lanczos (one
   ``matvec`` per iteration, diagnose's path with ``--lanczos-block 1``) against block Lanczos
   with 4 and 8 vectors per ``matmat``: products, passes, vectors per second and wall time to
   the top-10 and top-20 at ``--tol`` (diagnose's 1e-8), and the eigenvalues' agreement.

The last line of stdout is one JSON object with the headline figures.

Usage: ``OMP_NUM_THREADS=1 python bench/matmat.py [--seed 0] [--quick] [--threads 1] [--k 8]
[--repeats 3] [--all-params] [--eigs] [--tol 1e-8] [--eig-ks 10 20] [--blocks 4 8]``.
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

from alignscope.curvature import (
    FisherOperator,
    FunctionalLM,
    HessianOperator,
    block_krylov_eigs,
    lanczos_eigs,
)
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


def eigensolve(op: LinearOperator, k: int, block: int, tol: float, seed: int) -> dict[str, Any]:
    """One top-``k`` eigensolve: block 1 is today's single-vector Lanczos, else block Lanczos."""
    t0 = time.perf_counter()
    if block == 1:
        res = lanczos_eigs(op, k, tol=tol, seed=seed)
    else:
        res = block_krylov_eigs(op, k, block_size=block, tol=tol, seed=seed)
    wall = time.perf_counter() - t0
    return {
        "k": k,
        "block": block,
        "products": res.n_products,
        "passes": -(-res.n_products // block),
        "wall_s": wall,
        "vec_per_s": res.n_products / wall,
        "converged": res.converged,
        "max_residual": float(res.residuals.max()) if res.residuals is not None else None,
        "values": res.values,
        "vectors": res.vectors,
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
    parser.add_argument(
        "--eigs", action="store_true", help="also time the Fisher eigensolve, Lanczos vs blocks"
    )
    parser.add_argument("--tol", type=float, default=1e-8, help="eigensolve tolerance")
    parser.add_argument("--eig-ks", type=int, nargs="+", default=[10, 20], help="top-k to solve")
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8], help="block sizes")
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
    eigs: list[dict[str, Any]] = []
    if args.eigs:
        flm = FunctionalLM(model, select_params(model, cfg.eig_patterns))
        fisher = FisherOperator(flm, batch)
        for k in args.eig_ks:
            ref = None
            for block in [1, *args.blocks]:
                r = eigensolve(fisher, k, block, args.tol, args.seed)
                if ref is None:
                    ref = r
                top = float(ref["values"][0])
                r["max_rel_eig_diff"] = float((r["values"] - ref["values"]).abs().max()) / top
                # sine of the largest principal angle between the two top-k subspaces
                u = torch.linalg.qr(ref["vectors"].double())[0]
                v = torch.linalg.qr(r["vectors"].double())[0]
                r["max_sin_angle"] = float(torch.linalg.matrix_norm(v - u @ (u.T @ v), ord=2))
                eigs.append(r)
                print(
                    f"  top-{k} block {block}: {r['products']} products in {r['wall_s']:.1f} s",
                    flush=True,
                )
        base = {e["k"]: e for e in eigs if e["block"] == 1}
        rows = [
            [
                f"top-{e['k']}",
                "Lanczos (1)" if e["block"] == 1 else f"block {e['block']}",
                str(e["products"]),
                str(e["passes"]),
                f"{e['vec_per_s']:.2f}",
                f"{e['wall_s']:.1f} s",
                f"{base[e['k']]['wall_s'] / e['wall_s']:.2f}x",
                "yes" if e["converged"] else "NO",
                f"{e['max_rel_eig_diff']:.1e}",
                f"{e['max_sin_angle']:.1e}",
            ]
            for e in eigs
        ]
        print_table(
            f"Fisher eigensolve on the eigen selection to tol {args.tol:g}: single-vector "
            "Lanczos vs block Lanczos (one run each; eig diff / top eigenvalue and sin angle "
            "against the Lanczos run)",
            ["want", "solver", "products", "passes", "vec/s", "wall", "speedup", "conv",
             "eig diff", "sin angle"],
            rows,
        )  # fmt: skip
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
        "eigensolve": [
            {key: e[key] for key in ("k", "block", "products", "passes", "converged")}
            | {key: round(e[key], 3) for key in ("wall_s", "vec_per_s")}
            | {key: float(f"{e[key]:.2e}") for key in ("max_rel_eig_diff", "max_sin_angle")}
            for e in eigs
        ],
        "eig_tol": args.tol if args.eigs else None,
        "machine": info,
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
