"""LoRA diagnose's curvature products, old path against new, side by side in one process. Not a
test.

    python bench/lora_products.py [--seed 0] [--set affirmative] [--max-safety 8] [--max-data 16]
                                  [--model base|aligned] [--threads 1] [--reps 2]

On SmolLM2-135M (bench/real_model.py's cached stages; ``--model base`` needs only the first four)
with a new LoRA r=8 adapter on every linear layer (2,442,240 parameters, B = 0), the safety
batch diagnose builds (the model's greedy responses to ``--max-safety`` prompts) and
``--max-data`` examples of ``--set``, the default ``--vocab-keep``:

1. one Fisher product ``F v`` (what single-vector Lanczos spends), old: ``J v`` by forward-mode
   AD (``jvp_mode="forward"``, the default before this change), new: by transposing the chunk's
   cached backward graph (``jvp_mode="auto"``); and ``F V`` for 8 vectors (Hutch++'s blocks);
2. the hvp stage's four Hessian-vector products (``H g``, ``H D g``, then ``H a``, ``H a'``),
   old: one double backward each over the whole batch, rebuilding the gradient graph; new: as
   diagnose now does, the loss summed over chunks of examples (``HessianSum``), each chunk's
   graph built once per pair of vectors and dropped.

Prints seconds and vectors per second of each, the ratio, and the largest relative difference
of the outputs (float32 rounding only: both paths compute the same products). Best of
``--reps`` timings, interleaved. The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_model as rm  # noqa: E402


def _best(fn, reps: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _compare(label: str, fn_old, fn_new, n: int, reps: int) -> tuple:
    """Old and new interleaved ``reps`` times; the best time of each and the outputs' largest
    relative difference."""
    s_old, s_new = float("inf"), float("inf")
    for _ in range(reps):
        s, a = _best(fn_old, 1)
        s_old = min(s_old, s)
        s, b = _best(fn_new, 1)
        s_new = min(s_new, s)
    print(f"{label:18s} old {s_old:7.2f} s ({n / s_old:5.3f} vec/s)  new {s_new:7.2f} s "
          f"({n / s_new:5.3f} vec/s)  {s_old / s_new:5.2f}x  rel diff {_rel(b, a):.1e}",
          flush=True)  # fmt: skip
    return label, n, s_old, s_new, _rel(b, a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", default="affirmative")
    ap.add_argument("--max-safety", type=int, default=8)
    ap.add_argument("--max-data", type=int, default=16)
    ap.add_argument("--model", choices=["aligned", "base"], default="base")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = rm.cache_root()
    base, data, aligned = rm.stage_paths(root, args.seed)
    path = base if args.model == "base" else aligned
    if not (path / "config.json").exists() or not (data / "safety.jsonl").exists():
        sys.exit(f"{path}: no model or no data split; run `python bench/real_model.py` first")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); load average at start {os.getloadavg()}")  # fmt: skip

    from dataclasses import replace

    from alignscope.commands.diagnose import _hvp_chunks
    from alignscope.curvature import FisherOperator, FunctionalLM, HessianOperator
    from alignscope.curvature.hvp import HessianSum
    from alignscope.curvature.surrogate import HiddenNLLSurrogate
    from alignscope.data.encode import batch_rows
    from alignscope.data.loaders import load_data
    from alignscope.data.sample import subsample
    from alignscope.evaluate import generate
    from alignscope.geometry import finetune_gradient
    from alignscope.params import select_params

    opts = rm.build_parser().parse_args(
        ["--seed", str(args.seed), "--max-safety", str(args.max_safety),
         "--max-data", str(args.max_data)]
    )  # fmt: skip
    cfg = rm.verify_config(argparse.Namespace(**{**vars(opts), "params": ["all"]}), path, data,
                           args.set)  # fmt: skip
    cfg = replace(cfg, model=replace(cfg.model, lora_r=8)).diagnose_config()
    model, tok = cfg.load_model()
    safety = subsample(load_data(cfg.datasets.safety, "safety").rows, args.max_safety, args.seed)
    prompts = [r["prompt"] for r in safety]
    greedy = generate(model, tok, prompts, max_new_tokens=cfg.datasets.max_new_tokens)
    pairs = [{"prompt": p, "response": t} for p, t in zip(prompts, greedy, strict=True)]
    safety_batch, _ = batch_rows(tok, pairs, cfg.datasets.max_length, "safety")
    rows = subsample(load_data(cfg.finetune.data, "data").rows, args.max_data, args.seed)
    data_batch, _ = batch_rows(tok, rows, cfg.datasets.max_length, "data")
    selection = select_params(model, cfg.param_spec())
    flm = FunctionalLM(model, selection)
    print(f"LoRA r=8, all linear layers: {selection.size:,} parameters; safety batch "
          f"{tuple(safety_batch.input_ids.shape)}, data batch {tuple(data_batch.input_ids.shape)}",
          flush=True)  # fmt: skip
    out: dict = {"bench": "lora_products", "model": args.model, "threads": args.threads,
                 "max_safety": args.max_safety, "max_data": args.max_data}  # fmt: skip
    keep = cfg.curvature.vocab_keep
    old = FisherOperator(flm, safety_batch, jvp_mode="forward", vocab_keep=keep)
    new = FisherOperator(flm, safety_batch, vocab_keep=keep)
    print(f"Fisher vocabulary: {new.vocabulary}", flush=True)
    gen = torch.Generator().manual_seed(0)
    vs = torch.randn(selection.size, 8, generator=gen)
    # the first product of each builds its cached graphs: not timed
    t = time.perf_counter()
    new.matvec(vs[:, 0])
    out["new_setup_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    old.matvec(vs[:, 0])
    out["old_setup_s"] = round(time.perf_counter() - t, 2)
    rows_out = [
        _compare("F v (Lanczos)", lambda: old.matvec(vs[:, 1]), lambda: new.matvec(vs[:, 1]), 1,
                 args.reps),
        _compare("F V, 8 vectors", lambda: old.matmat(vs), lambda: new.matmat(vs), 8, args.reps),
    ]  # fmt: skip
    old = new = None  # their cached graphs

    surrogate = HiddenNLLSurrogate(flm, data_batch, vocab_keep=keep)
    loss = surrogate  # the exact mean NLL when it did not coarsen
    g = finetune_gradient(flm, data_batch)
    dg = g / (g.abs() + 1e-3)  # a stand-in preconditioned direction (Adam's D g)

    def hvp_old():
        h = HessianOperator(loss, flm.theta0)
        a = [h.matvec(g), h.matvec(dg)]
        return torch.stack([a[0], a[1], h.matvec(a[0]), h.matvec(a[1])], dim=1)

    def hvp_new():  # as diagnose: chunks sized by the 2 GiB budget, one graph each per matmat
        parts = _hvp_chunks(model, data_batch, 2 * 2**30)
        h = HessianSum(surrogate.split(parts), flm.theta0)
        a = h.matmat(torch.stack([g, dg], dim=1))
        return torch.cat([a, h.matmat(a)], dim=1)

    print(f"fine-tuning HVP vocabulary: {surrogate.vocabulary}", flush=True)
    rows_out.append(_compare("4 HVPs (hvp stage)", hvp_old, hvp_new, 4, args.reps))
    out["rows"] = [
        {"what": w, "vectors": n, "old_s": round(so, 2), "new_s": round(sn, 2),
         "speedup": round(so / sn, 2), "rel_diff": rd}
        for w, n, so, sn, rd in rows_out
    ]  # fmt: skip
    out["load_average_end"] = os.getloadavg()[0]
    print(f"load average at the end {os.getloadavg()}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
