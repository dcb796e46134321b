"""Data-parallel diagnose: ``torchrun --nproc_per_node N`` (one thread each) against one process
on the organism, in one run; the same numbers expected, the speedup reported. Not a test.

    python bench/ddp.py [--preset demo|test] [--nproc 2] [--seed 0] [--rank 20]
                        [--max-safety 64] [--max-data 256] [--out bench-ddp-out]
                        [--organism DIR]

Both runs are the command line (``python -m alignscope diagnose`` and ``python -m
torch.distributed.run --standalone --nproc_per_node N -m alignscope diagnose``), timed from
start to exit (loading included) and per stage (results.json's ``timings_s``). The last line of
stdout is one line of JSON with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from alignscope.organism import load_organism

TARGET = 1.5  # speedup of 2 processes over 1 (issue 14)


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall


def max_rel(a: list, b: list) -> float:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return max((abs(x - y) / max(abs(x), 1e-300) for x, y in pairs), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--max-safety", type=int, default=64)
    ap.add_argument("--max-data", type=int, default=256)
    ap.add_argument("--data", default="benign_affirmative")
    ap.add_argument("--out", default="bench-ddp-out")
    ap.add_argument("--organism", default=None, help="organism folder (default: the cache)")
    args = ap.parse_args()
    org = load_organism(args.preset, args.seed, args.organism, quiet=True, threads=args.threads)
    proto = org.finetune_protocol
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = [
        "diagnose", "--model", str(org.aligned_path),
        "--safety", str(org.datasets_path / "harmful_align.jsonl"),
        "--data", str(org.datasets_path / f"{args.data}.jsonl"),
        "--optimizer", "adamw", "--lr", str(proto.lr), "--batch-size", str(proto.batch_size),
        "--steps", str(proto.steps), "--rank", str(args.rank), "--seed", str(args.seed),
        "--max-safety", str(args.max_safety), "--max-data", str(args.max_data),
        "--threads", str(args.threads),
    ]  # fmt: skip
    one_cmd = [sys.executable, "-m", "alignscope", *common, "--out", str(out / "one")]
    many_cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={args.nproc}", "-m", "alignscope", *common, "--out", str(out / "ddp"),
    ]  # fmt: skip
    print(f"diagnose on the {args.preset} organism, rank {args.rank}, {args.max_safety} safety "
          f"prompts x {args.max_data} examples, {args.threads} thread(s) per process")  # fmt: skip
    wall_one = run(one_cmd, args.threads)
    wall_many = run(many_cmd, args.threads)
    one = json.loads((out / "one" / "results.json").read_text())
    many = json.loads((out / "ddp" / "results.json").read_text())
    stages_one, stages_many = one["timings_s"], many["timings_s"]
    work_one, work_many = sum(stages_one.values()), sum(stages_many.values())
    print(f"{'stage':<12}{'1 process':>12}{f'{args.nproc} processes':>16}")
    for stage in stages_one:
        print(f"{stage:<12}{stages_one[stage]:>12.2f}{stages_many.get(stage, 0.0):>16.2f}")
    print(f"{'stages':<12}{work_one:>12.2f}{work_many:>16.2f}")
    print(f"{'wall':<12}{wall_one:>12.2f}{wall_many:>16.2f}  (process start and loading included)")
    eig = max_rel(one["subspace"]["eigenvalues"], many["subspace"]["eigenvalues"])
    dl = max_rel(one["forecast"]["dL"], many["forecast"]["dL"])
    speedup, speedup_wall = work_one / work_many, wall_one / wall_many
    print(f"speedup {speedup:.2f}x over the stages ({speedup_wall:.2f}x wall), target >= {TARGET}x")
    print(f"largest relative difference: eigenvalues {eig:.1e}, forecast dL {dl:.1e}")
    headline = {
        "bench": "ddp",
        "preset": args.preset,
        "nproc": args.nproc,
        "threads_per_process": args.threads,
        "rank": args.rank,
        "stages_1_s": round(work_one, 3),
        "stages_n_s": round(work_many, 3),
        "wall_1_s": round(wall_one, 3),
        "wall_n_s": round(wall_many, 3),
        "speedup": round(speedup, 3),
        "speedup_wall": round(speedup_wall, 3),
        "target_met": speedup >= TARGET,
        "eigenvalues_max_rel_diff": eig,
        "forecast_max_rel_diff": dl,
    }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
