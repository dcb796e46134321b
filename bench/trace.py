"""tr F after the eigensolver: Hutch++ (30 products) against Hutchinson deflated by Lanczos's Krylov
basis (10 products), side by side in one process on the Fisher diagnose builds. Not a test.

    python bench/trace.py [--rank 8] [--max-safety 32] [--seeds 10] [--ref-iter 250]
                          [--ref-probes 200] [--short]
                          [--model PATH --safety FILE --params PATTERN ...]

Default: the ``test`` organism (seed 0, built or read from the cache), every parameter. With
``--model`` and ``--safety``: that model (e.g. ``~/.cache/alignscope/real_model/aligned-v2-seed0``)
and safety set, ``--params`` as diagnose takes them. The safety batch, the parameter selection,
the Fisher operator (chunks, vocabulary, frozen-prefix cache) and the eigensolver run (top
``--rank`` by Lanczos, tol 1e-8, seed 0) are diagnose's.

Reference: tr F deflated by a float64 Lanczos basis of ``--ref-iter`` products with
``--ref-probes`` probes (its own standard error printed beside it); ``--ref-iter 0`` (for a
large model) deflates by the eigensolver's basis instead, with probes of a seed no estimate
uses: unbiased, its error its standard error. Then, for ``--seeds`` seeds,
every estimator on the same operator: Hutch++ with 30 products (diagnose before this change),
the deflated estimator on the eigensolver's whole Krylov basis with 5, 10 (diagnose now) and 20
probes, and deflated by the top-k Ritz vectors only with 10 probes (``--short``: only Hutch++
and the deflated estimator with 10 probes). Prints each estimate as it comes and, per estimator,
products, seconds per estimate (mean), RMS and largest |error| relative to the reference, the
mean standard error, and the largest |error| / stderr; the load average at start and end. The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch

from alignscope.commands.diagnose import DiagnoseConfig, _fisher_chunk
from alignscope.curvature import FisherOperator, FunctionalLM, deflated_trace, hutchpp, lanczos_eigs
from alignscope.curvature.trace import DEFLATED_PROBES, TRACE_PRODUCTS, TraceEstimate
from alignscope.data.encode import batch_rows
from alignscope.data.loaders import load_data
from alignscope.data.sample import subsample
from alignscope.evaluate import generate
from alignscope.params import select_params


def _config(args: argparse.Namespace) -> DiagnoseConfig:
    common = dict(rank=args.rank, max_safety=args.max_safety, threads=args.threads)
    if args.model is None:
        from alignscope.organism import load_organism

        org = load_organism(preset="test", seed=0, threads=args.threads, quiet=True)
        return DiagnoseConfig.for_organism(org, "benign_affirmative", **common)
    if args.safety is None:
        raise SystemExit("--model needs --safety (a safety set in any format diagnose reads)")
    return DiagnoseConfig.from_options(
        model=os.path.expanduser(args.model), safety=os.path.expanduser(args.safety),
        data=os.path.expanduser(args.safety), params=args.params, **common,
    )  # fmt: skip


def _fisher(cfg: DiagnoseConfig) -> FisherOperator:
    """The Fisher operator diagnose builds for ``cfg`` (greedy responses as the reference)."""
    model, tok = cfg.load_model()
    budget = int(cfg.curvature.memory_budget_gb * 2**30)
    rows = subsample(load_data(cfg.datasets.safety, "safety").rows, cfg.datasets.max_safety, 0)
    prompts = [r["prompt"] for r in rows]
    greedy = generate(model, tok, prompts, max_new_tokens=cfg.datasets.max_new_tokens)
    pairs = [{"prompt": p, "response": t} for p, t in zip(prompts, greedy, strict=True)]
    batch, _ = batch_rows(tok, pairs, cfg.datasets.max_length, "safety")
    selection = select_params(model, cfg.param_spec(), group=cfg.curvature.group)
    prefix = cfg.runtime.prefix_budget
    flm = FunctionalLM(model, selection, prefix_cache=prefix > 0, prefix_memory_budget=prefix)
    return FisherOperator(flm, batch, chunk_size=_fisher_chunk(model, batch, budget),
                          memory_budget=budget, vocab_keep=cfg.curvature.vocab_keep)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-safety", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--ref-iter", type=int, default=250)
    ap.add_argument("--ref-probes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--safety", default=None)
    ap.add_argument("--params", nargs="+", default=["all"])
    ap.add_argument("--short", action="store_true",
                    help="only Hutch++ 30 and the deflated estimator with 10 probes")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); load average at start {os.getloadavg()}",
          flush=True)  # fmt: skip
    cfg = _config(args)
    op = _fisher(cfg)
    dim = op.shape[0]
    print(f"{'test organism' if args.model is None else 'model'}: {dim:,} parameters, safety "
          f"batch {tuple(op.batch.input_ids.shape)}", flush=True)  # fmt: skip
    out: dict = {"bench": "trace", "dim": dim, "rank": args.rank, "seeds": args.seeds,
                 "model": "test organism" if args.model is None
                 else args.model.replace(os.path.expanduser("~"), "~", 1)}  # fmt: skip

    t = time.perf_counter()
    eig = lanczos_eigs(op, args.rank, tol=1e-8, seed=0, keep_basis=True)
    secs = time.perf_counter() - t
    top = float(eig.values.sum())
    out["eigensolver"] = {"products": eig.n_products, "seconds": round(secs, 2),
                          "converged": eig.converged, "basis_trace": eig.basis_trace,
                          "top_k_sum": top}  # fmt: skip
    print(f"eigensolver: Lanczos top-{args.rank}, {eig.n_products} products in {secs:.1f} s "
          f"({secs / eig.n_products:.3f} s a product), converged {eig.converged}",
          flush=True)  # fmt: skip

    t = time.perf_counter()
    if args.ref_iter > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tol < 0: run to --ref-iter by design
            big = lanczos_eigs(op, args.rank, tol=-1.0, max_iter=args.ref_iter, seed=1000,
                               basis_dtype=torch.float64, keep_basis=True)  # fmt: skip
        ref = deflated_trace(op, big.basis, big.basis_trace, args.ref_probes, seed=10_000)
        big = None
        how = f"{args.ref_iter} Lanczos products, float64 basis, + {args.ref_probes} probes"
    else:  # a large model: the eigensolver's basis, many more probes (seeds none of the runs use)
        # in batches of 10 probes (their float64 blocks are 240 bytes a parameter), averaged
        parts = [
            deflated_trace(op, eig.basis, eig.basis_trace, 10, seed=10_000 + i)
            for i in range(max(1, args.ref_probes // 10))
        ]
        value = statistics.fmean(e.value for e in parts)
        stderr = sum(e.stderr**2 for e in parts) ** 0.5 / len(parts)
        ref = TraceEstimate(value, stderr, 10 * len(parts), "deflated")
        how = f"the eigensolver's basis + {10 * len(parts)} probes"
    secs = time.perf_counter() - t
    out["reference"] = {"value": ref.value, "stderr": ref.stderr, "seconds": round(secs, 1),
                        "products": args.ref_iter + args.ref_probes, "how": how}  # fmt: skip
    print(f"reference tr F = {ref.value:.6g} +- {ref.stderr:.2g} ({ref.stderr / ref.value:.2e} "
          f"relative; {how}, {secs:.0f} s)", flush=True)  # fmt: skip
    print(f"exact part tr(Q^T F Q) = {eig.basis_trace:.6g} ({eig.basis_trace / ref.value:.3f} of "
          f"tr F), top-{args.rank} Ritz values {top:.6g} ({top / ref.value:.3f})",
          flush=True)  # fmt: skip
    ritz = eig.vectors.T.contiguous()
    estimators = {
        f"hutch++ {TRACE_PRODUCTS} (old)": lambda s: hutchpp(op, TRACE_PRODUCTS, seed=s),
        **{
            f"deflated Krylov {n}" + (" (new)" if n == DEFLATED_PROBES else ""):
                (lambda s, n=n: deflated_trace(op, eig.basis, eig.basis_trace, n, seed=s))
            for n in (5, DEFLATED_PROBES, 20)
        },
        f"deflated top-{args.rank} Ritz 10": lambda s: deflated_trace(op, ritz, top, 10, seed=s),
    }  # fmt: skip
    if args.short:
        estimators = {k: v for k, v in estimators.items() if k.endswith(("(old)", "(new)"))}
    runs: dict[str, list] = {name: [] for name in estimators}
    for seed in range(args.seeds):  # interleaved, so load changes hit every estimator alike
        for name, fn in estimators.items():
            t = time.perf_counter()
            est = fn(seed)
            runs[name].append((est, time.perf_counter() - t))
            print(f"  seed {seed} {name}: {est.value:.6g} +- {est.stderr:.2g}, "
                  f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
    print(f"{'estimator':28s} {'products':>8s} {'s/estimate':>10s} {'RMS |err|':>10s} "
          f"{'max |err|':>10s} {'mean se':>9s} {'max |err|/se':>12s}  "
          "(relative to tr F)")  # fmt: skip
    out["rows"] = []
    for name, rs in runs.items():
        errs = [(e.value - ref.value) / ref.value for e, _ in rs]
        rms = statistics.fmean(x * x for x in errs) ** 0.5
        se = statistics.fmean(e.stderr / ref.value for e, _ in rs)
        z = max(abs(e.value - ref.value) / e.stderr for e, _ in rs)
        secs = statistics.fmean(s for _, s in rs)
        n = rs[0][0].n_products
        print(f"{name:28s} {n:8d} {secs:10.2f} {rms:10.2e} {max(map(abs, errs)):10.2e} "
              f"{se:9.2e} {z:12.2f}")  # fmt: skip
        out["rows"].append({"estimator": name, "products": n, "seconds": round(secs, 3),
                            "rms_rel_err": rms, "max_rel_err": max(map(abs, errs)),
                            "mean_rel_stderr": se, "max_err_over_stderr": z})  # fmt: skip
    out["load_average_end"] = os.getloadavg()[0]
    print(f"load average at the end {os.getloadavg()}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
