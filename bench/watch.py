"""Overhead of alignscope.train.watch at its default cadence, as a % of training step time.

Fine-tunes the organism's aligned model on its collapsing benign set with the plain training loop,
alternating runs without and with an AlignmentWatcher (default cadence), and prints the median
wall time of each, and the CPU time spent inside the watcher as a % of the training CPU time
in the same runs (the headline: side-by-side wall times drift when the machine is loaded).
Not a test.

    python bench/watch.py [--preset demo|test] [--steps N] [--repeats 2] [--threads 1]

The last line of stdout is one line of JSON with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from alignscope.organism import load_organism
from alignscope.train.loop import finetune
from alignscope.train.watch import AlignmentWatcher


def _run(org, steps: int, watched: bool, every: int = 25) -> tuple[float, tuple, int]:
    """(wall s of the whole run, CPU s spent inside the watcher, measurements)."""
    model, tok = org.aligned_model(), org.tokenizer()
    proto = org.finetune_protocol
    watcher = None
    if watched:
        watcher = AlignmentWatcher(
            model, tok, org.dataset("harmful_align"), org.dataset("harmful_eval"), every=every
        )
    inside = 0.0

    def callback(step: int, loss: float | None) -> None:
        nonlocal inside
        if watcher is not None:
            t0 = time.thread_time()
            watcher.step(step, loss)
            inside += time.thread_time() - t0

    start, cpu0 = time.perf_counter(), time.thread_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune(model, tok, org.dataset("benign_affirmative"), steps, lr=proto.lr,
                 batch_size=proto.batch_size, seed=0, callback=callback)  # fmt: skip
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    return wall, (inside, cpu), len(watcher.records) if watcher else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the protocol's steps")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=25, help="cadence (default: the watcher's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    org = load_organism(args.preset, args.seed, quiet=True, threads=args.threads)
    args.steps = args.steps or org.finetune_protocol.steps
    plain, watched, shares, n_meas = [], [], [], 0
    for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
        plain.append(_run(org, args.steps, False)[0])
        seconds, (inside, cpu), n_meas = _run(org, args.steps, True, args.every)
        watched.append(seconds)
        shares.append(100 * inside / (cpu - inside))  # CPU time: robust to a loaded machine
    p, w = statistics.median(plain), statistics.median(watched)
    overhead = 100 * (w - p) / p
    cpu_overhead = statistics.median(shares)
    print(f"watch overhead on the {args.preset} organism, {args.steps} AdamW steps, "
          f"{n_meas} measurements (every={args.every}), {args.threads} thread(s)")  # fmt: skip
    print(f"  training alone      {p:8.2f} s  ({1000 * p / args.steps:.1f} ms/step)")
    print(f"  training + watcher  {w:8.2f} s  (wall-clock overhead {overhead:.1f} %)")
    print(f"  overhead            {cpu_overhead:8.1f} %  of training CPU time, measured inside "
          "the watched runs (target < 10%)")
    print(json.dumps({"bench": "watch", "preset": args.preset, "steps": args.steps,
                      "every": args.every, "measurements": n_meas,
                      "plain_s": round(p, 3), "watched_s": round(w, 3),
                      "overhead_wall_pct": round(overhead, 2),
                      "overhead_pct": round(cpu_overhead, 2)}))  # fmt: skip

if __name__ == "__main__":
    main()
