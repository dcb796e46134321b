"""Wall time of ``diagnose`` on the organism, per stage (targets, subspace, gradients, HVP,
forecast), measured in one run. Not a test.

    python bench/diagnose.py [--preset demo|test] [--seed 0] [--threads 1] [--rank 20]

The last line of stdout is one line of JSON with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose
from alignscope.organism import load_organism


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--data", default="benign_affirmative")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    org = load_organism(args.preset, args.seed, quiet=True, threads=args.threads)
    cfg = DiagnoseConfig.for_organism(
        org, args.data, rank=args.rank, seed=args.seed, threads=args.threads
    )
    start = time.perf_counter()
    result = run_diagnose(cfg, quiet=True)
    total = time.perf_counter() - start
    res = result.to_json()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if "model name" in line]
    cpu = names[0] if names else platform.processor()
    print(
        f"diagnose on the {args.preset} organism ({res['parameters']['n_params']:,} params, "
        f"{res['alignment']['n_prompts']} safety prompts, rank {args.rank})"
    )
    print(f"machine: {cpu}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'stage':<12}{'seconds':>10}")
    for stage, seconds in result.timings.items():
        print(f"{stage:<12}{seconds:>10.2f}")
    print(f"{'total':<12}{total:>10.2f}")
    print(
        json.dumps(
            {
                "bench": "diagnose",
                "preset": args.preset,
                "total_s": round(total, 3),
                **{f"{k}_s": round(v, 3) for k, v in result.timings.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
