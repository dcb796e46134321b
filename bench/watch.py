"""Overhead of alignscope.watch at its default cadence, as a % of training step time.

Fine-tunes the organism's aligned model on its collapsing benign set with the plain training loop,
alternating runs without and with an AlignmentWatcher (default cadence), and prints the median
wall time of each and the overhead. Not a test.

    python bench/watch.py [--preset demo|test] [--steps 100] [--repeats 2] [--threads 1]

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
from alignscope.watch import AlignmentWatcher


def _run(org, steps: int, watched: bool) -> tuple[float, int]:
    model, tok = org.aligned_model(), org.tokenizer()
    proto = org.finetune_protocol
    watcher = None
    if watched:
        watcher = AlignmentWatcher(
            model, tok, org.dataset("harmful_align"), org.dataset("harmful_eval")
        )

    def callback(step: int, loss: float | None) -> None:
        if watcher is not None:
            watcher.step(step, loss)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune(model, tok, org.dataset("benign_affirmative"), steps, lr=proto.lr,
                 batch_size=proto.batch_size, seed=0, callback=callback)  # fmt: skip
    return time.perf_counter() - start, len(watcher.records) if watcher else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    org = load_organism(args.preset, args.seed, quiet=True, threads=args.threads)
    plain, watched, n_meas = [], [], 0
    for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
        plain.append(_run(org, args.steps, False)[0])
        seconds, n_meas = _run(org, args.steps, True)
        watched.append(seconds)
    p, w = statistics.median(plain), statistics.median(watched)
    overhead = 100 * (w - p) / p
    print(f"watch overhead on the {args.preset} organism, {args.steps} AdamW steps, "
          f"{n_meas} measurements at the default cadence, {args.threads} thread(s)")  # fmt: skip
    print(f"  training alone      {p:8.2f} s  ({1000 * p / args.steps:.1f} ms/step)")
    print(f"  training + watcher  {w:8.2f} s")
    print(f"  overhead            {overhead:8.1f} %  (target < 10%)")
    print(json.dumps({"bench": "watch", "preset": args.preset, "steps": args.steps,
                      "measurements": n_meas, "plain_s": round(p, 3), "watched_s": round(w, 3),
                      "overhead_pct": round(overhead, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
