"""The Fisher through the LM head: exact vocabulary against the top-k coarsening, side by side.

    python bench/vocab_head.py [--prompts 8] [--keep 0.99] [--reps 3] [--eigs 8]

On the converted SmolLM2-135M (bench/real_model.py's ``base`` stage under
$ALIGNSCOPE_CACHE/real_model) over the MLPs of its last two layers (5.3 M parameters, prefix
cache on): ``--prompts`` safety prompts of the data split, each with one fixed refusal as the
response. Builds, in one process, the operator of the path before this change (``old``: the LM
head applied to every position, then the response positions gathered), the exact one
(``vocab_keep=1.0``: positions gathered before the head) and the coarsened one (``--keep``), and
prints the seconds per Fisher product of each (best of ``--reps``; single vector and batched
``matmat`` of 8), the chosen ``k``, its kept trace fraction, the relative differences of the
products, and with ``--eigs n`` the top-n Lanczos eigenvalues of the exact and the coarsened
operator (``max(6n, n + 60)`` products each). Not a test; the last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_model as rm  # noqa: E402

REFUSAL = (
    "I am sorry, but I cannot help with that request because it may cause harm to people. "
    "Please ask me something else instead, I am happy to help with safe topics."
)
SELECTION = ["model.layers.28.mlp.*", "model.layers.29.mlp.*"]


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.99)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eigs", type=int, default=0, help="top-n eigenvalues of each (0: skip)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from alignscope.curvature import FisherOperator, FunctionalLM, lanczos_eigs
    from alignscope.data.encode import batch_rows
    from alignscope.models import load_model
    from alignscope.params import select_params

    base, data, _ = rm.stage_paths(rm.cache_root(), args.seed)
    model, tok = load_model(str(base))
    lines = (data / "safety.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[: args.prompts]]
    rows = [{"prompt": r["prompt"], "response": REFUSAL} for r in rows]
    batch, _ = batch_rows(tok, rows, 192)
    n_pos = int(batch.target_mask.sum())
    print(f"threads {args.threads}, load average {os.getloadavg()}; batch "
          f"{tuple(batch.input_ids.shape)}, {n_pos} response positions")  # fmt: skip
    flm = FunctionalLM(model, select_params(model, SELECTION))
    out: dict = {"bench": "vocab_head", "prompts": args.prompts, "positions": n_pos,
                 "params": flm.dim, "keep": args.keep}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(flm.dim, generator=gen)
    vs = torch.randn(flm.dim, 8, generator=gen)
    # old: the path before this change, the LM head on every position then the response
    # positions gathered (the same FunctionalLM, prefix cache shared, without its head record)
    before = copy.copy(flm)
    before.head = None
    ops = {
        "old": FisherOperator(before, batch),
        "exact": FisherOperator(flm, batch, vocab_keep=1.0),
    }
    t = time.perf_counter()
    ops["exact"].matvec(v)  # computes the frozen prefix once (the operators share it)
    out["first_product_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ops["coarse"] = FisherOperator(flm, batch, vocab_keep=args.keep)
    out["coarse_setup_s"] = time.perf_counter() - t
    out["vocabulary"] = ops["coarse"].vocabulary
    print(f"first exact product (with the prefix pass) {out['first_product_s']:.1f} s; "
          f"coarsened: {ops['coarse'].vocabulary} (choosing k and building the factor "
          f"{out['coarse_setup_s']:.2f} s)")  # fmt: skip
    res = {}
    for name, op in ops.items():
        res[name] = op.matvec(v)  # warm-up, and the cached backward graph
        out[f"{name}_matvec_s"] = _best(lambda op=op: op.matvec(v), args.reps)
        out[f"{name}_matmat8_per_vec_s"] = _best(lambda op=op: op.matmat(vs), 1) / 8
        print(f"{name:7s} F v {out[f'{name}_matvec_s']:.3f} s; F V (8) "
              f"{out[f'{name}_matmat8_per_vec_s']:.3f} s per vector", flush=True)  # fmt: skip
    for name in ("old", "exact"):
        diff = float((res[name] - res["exact"]).norm() / res["exact"].norm())
        out[f"{name}_vs_exact_rel_diff"] = diff
    print(f"old vs exact (gathered before the head): F v equal to "
          f"{out['old_vs_exact_rel_diff']:.1e}; speedup "
          f"{out['old_matvec_s'] / out['exact_matvec_s']:.2f}x")  # fmt: skip
    out["old_over_coarse_matvec"] = out["old_matvec_s"] / out["coarse_matvec_s"]
    out["matvec_speedup"] = out["exact_matvec_s"] / out["coarse_matvec_s"]
    out["matmat_speedup"] = out["exact_matmat8_per_vec_s"] / out["coarse_matmat8_per_vec_s"]
    diff = float((res["exact"] - res["coarse"]).norm() / res["exact"].norm())
    out["product_rel_diff"] = diff
    out["vFv_ratio"] = float(v @ res["coarse"]) / float(v @ res["exact"])
    print(
        f"speedup: F v {out['matvec_speedup']:.2f}x, F V {out['matmat_speedup']:.2f}x; "
        f"|F v - F_c v| / |F v| = {diff:.2e}; v.F_c v / v.F v = {out['vFv_ratio']:.6f}"
    )
    if args.eigs:
        eig = {}
        for name in ("exact", "coarse"):
            op = ops[name]
            t = time.perf_counter()
            eig[name] = lanczos_eigs(op, args.eigs, seed=0).values.double()
            out[f"{name}_eigs_s"] = time.perf_counter() - t
            out[f"{name}_eigs"] = eig[name].tolist()
            print(f"{name:7s} top-{args.eigs} {[f'{x:.5g}' for x in eig[name].tolist()]} "
                  f"({out[f'{name}_eigs_s']:.0f} s)", flush=True)  # fmt: skip
        rel = ((eig["exact"] - eig["coarse"]) / eig["exact"]).tolist()
        out["eig_rel_diff"] = rel
        print(f"(exact - coarsened) / exact: {[f'{x:.2e}' for x in rel]}")
    print(f"load average at the end {os.getloadavg()}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
