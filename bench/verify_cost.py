"""Where verify's seconds go on SmolLM2-135M, and the tracker's shortcuts off / on side by side
in one process. Not a test.

    python bench/verify_cost.py [--seed 0] [--set affirmative] [--steps 32] [--threads 2]
                                [--model aligned|base] [--diagnosis DIR]
                                [--paths new old no-shortcuts]

Runs ``run_verify`` with bench/real_model.py's settings (last two MLPs, rank 8, batch 8,
``--max-safety 8 --max-data 16 --noise-examples 8 --max-eval 32 --max-new-tokens 16``) and
times each phase by wrapping the functions that do it: setup (model copy, the eval set's
reference responses), the training steps (forward, backward, optimizer), and every tracked
record split into the KL + NLL passes, the fine-tuning loss, the subspace statistics and the
refusal generation. ``new`` is the default; ``old`` turns off what the verifygen branch added
(:func:`_old_verify`: the eval prompts' frozen-prefix states replayed in every refusal
generation's prefill); ``no-shortcuts`` turns off the tracker's earlier shortcuts too (the KL
reference at theta0 recomputed at every record; step 0's responses generated again). All
paths must record the same trajectory (printed: the largest differences from ``new``).

``--diagnosis DIR``: a diagnosis saved as DIR/diagnose.json + DIR/subspace.pt (as
bench/real_model.py writes them); without it one is run first (minutes, not timed here). The
machine's load average is printed with every number: other jobs on the 2 cores inflate them.
The last line of stdout is one line of JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_model as rm  # noqa: E402

# (module attribute path, phase name): the functions whose time makes each phase
PHASES = [
    ("alignscope.commands.verify:copy.deepcopy", "deepcopy (model, generation configs)"),
    ("alignscope.commands.verify:generate", "setup: eval reference responses"),
    ("alignscope.train.tracker:AlignmentTracker.__init__", "setup: tracker (KL tables)"),
    ("alignscope.train.loop:shard_nll", "train: forward"),
    ("torch:Tensor.backward", "train: backward"),
    ("torch.optim:AdamW.step", "train: optimizer step"),
    ("alignscope.train.tracker:AlignmentTracker.measure", "records (all)"),
    ("alignscope.curvature.losses:AlignmentKL.with_nll", "records: KL + NLL passes"),
    ("alignscope.curvature.functional:FunctionalLM.mean_nll", "records: fine-tuning loss"),
    ("alignscope.train.tracker:AlignmentTracker.subspace_stats", "records: subspace stats"),
    ("alignscope.train.tracker:judge_prompts", "records: refusal generation"),
]


def _timers(acc: dict, count: dict) -> list:
    """Wrap every PHASES function (returns the undo list)."""
    import importlib

    undo = []
    depth: dict = defaultdict(int)  # recursive calls (deepcopy) count once
    for spec, name in PHASES:
        mod_name, attr = spec.split(":")
        owner = importlib.import_module(mod_name)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, last)

        def timed(*a, _fn=fn, _name=name, **k):
            depth[_name] += 1
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                depth[_name] -= 1
                if not depth[_name]:
                    acc[_name] += time.perf_counter() - t
                    count[_name] += 1

        setattr(owner, last, functools.wraps(fn)(timed))
        undo.append((owner, last, fn))
    return undo


def _old_tracker(monkey: list) -> None:
    """The tracker before its shortcuts: no KL table, no step-0 responses."""
    from alignscope.train import tracker as tr

    init = tr.AlignmentTracker.__init__

    def init_without(self, *a, initial_responses=None, **k):
        init(self, *a, **k)

    monkey.append((tr, "KL_TABLE_BUDGET", tr.KL_TABLE_BUDGET))
    monkey.append((tr.AlignmentTracker, "__init__", init))
    tr.KL_TABLE_BUDGET = 0
    tr.AlignmentTracker.__init__ = init_without


def _old_verify(monkey: list) -> None:
    """verify before the verifygen branch: every refusal generation runs its whole prefill;
    the KL passes and the fine-tuning loss project every position onto the vocabulary."""
    from alignscope.curvature.functional import FunctionalLM, response_weights
    from alignscope.curvature.losses import AlignmentKL
    from alignscope.train.prefix_generate import GenerationPrefix

    def position_logits(self, theta):
        return self.positions.gather(self.flm.logits(theta, self.batch.input_ids))

    def per_example_nll(self, theta, batch):
        return self.example_nll(theta, batch.input_ids, response_weights(batch, self.dtype))

    for owner, attr, fn in [
        (GenerationPrefix, "build", classmethod(lambda cls, *a, **k: None)),
        (AlignmentKL, "position_logits", position_logits),
        (FunctionalLM, "per_example_nll", per_example_nll),
    ]:
        monkey.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, fn)


def _generation_prefixes(monkey: list) -> list:
    """Collect the GenerationPrefix objects verify builds (their counters are printed)."""
    from alignscope.train.prefix_generate import GenerationPrefix

    made: list = []
    build = GenerationPrefix.__dict__["build"]

    def collect(cls, *a, **k):
        out = build.__func__(cls, *a, **k)
        if out is not None:
            made.append(out)
        return out

    monkey.append((GenerationPrefix, "build", build))
    GenerationPrefix.build = classmethod(collect)
    return made


def run_path(name: str, cfg, diag, model, tok) -> dict:
    from alignscope.commands.verify import run_verify

    acc: dict = defaultdict(float)
    count: dict = defaultdict(int)
    undo: list = []
    if name in ("old", "no-shortcuts"):
        _old_verify(undo)
    if name == "no-shortcuts":
        _old_tracker(undo)
    made = _generation_prefixes(undo) if name == "new" else []
    undo += _timers(acc, count)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        res = run_verify(cfg, diagnosis=diag, model=model, tokenizer=tok, quiet=True)
    finally:
        for owner, attr, fn in reversed(undo):
            setattr(owner, attr, fn)
    total = time.perf_counter() - t
    traj = res.to_json()["trajectory"]
    train = sum(v for k, v in acc.items() if k.startswith("train"))
    fine = res.timings.get("finetune", 0.0)
    phases = {k: round(v, 2) for k, v in sorted(acc.items())}
    phases["train: other (batches, hooks)"] = round(fine - train - acc["records (all)"], 2)
    return {
        "total_s": round(total, 2),
        "setup_s": round(res.timings.get("setup", 0.0), 2),
        "finetune_s": round(fine, 2),
        "phases": phases,
        "calls": dict(count),
        "records": len(traj),
        "trajectory": traj,
        "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "generation_prefix": [
            {k: getattr(g, k) for k in ("n_recorded", "n_replayed", "n_rows_reused",
                                        "n_rows_computed", "n_split_steps", "nbytes")}
            for g in made
        ],  # fmt: skip
    }


def _max_diff(a: list, b: list) -> dict:
    out = {}
    for key in ("kl", "refusal_nll", "eval_kl", "eval_nll", "finetune_loss", "refusal_rate",
                "displacement"):  # fmt: skip
        diffs = [abs(x[key] - y[key]) for x, y in zip(a, b, strict=True)
                 if x.get(key) is not None and y.get(key) is not None]  # fmt: skip
        out[key] = max(diffs, default=0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", default="affirmative")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=["aligned", "base"], default="aligned")
    ap.add_argument("--diagnosis", type=Path, default=None)
    ap.add_argument(
        "--paths", nargs="+", choices=["new", "old", "no-shortcuts"], default=["new", "old"]
    )
    args = ap.parse_args()
    root = rm.cache_root()
    base, data, aligned = rm.stage_paths(root, args.seed)
    model_dir = base if args.model == "base" else aligned
    opts = rm.build_parser().parse_args(["--seed", str(args.seed), "--steps", str(args.steps)])
    cfg = rm.verify_config(opts, model_dir, data, args.set)
    cfg = replace(cfg, runtime=replace(cfg.runtime, threads=args.threads))
    torch.set_num_threads(args.threads)

    from alignscope.commands.diagnose import DiagnoseResult, run_diagnose
    from alignscope.models import load_model
    from alignscope.report.output import load_subspace

    model, tok = load_model(str(model_dir))
    if args.diagnosis is not None:
        diag_json = json.loads((args.diagnosis / "diagnose.json").read_text(encoding="utf-8"))
        diag = DiagnoseResult.from_json(diag_json, load_subspace(args.diagnosis / "subspace.pt"))
    else:
        diag = run_diagnose(cfg.diagnose_config(), model=model, tokenizer=tok, quiet=True)
    print(f"verify of {args.steps} adamw steps, {args.model} SmolLM2-135M, last two MLPs, "
          f"{args.threads} torch threads, {os.cpu_count()} cores", flush=True)  # fmt: skip
    runs = {}
    for name in args.paths:
        runs[name] = r = run_path(name, cfg, diag, model, tok)
        print(f"\n[{name}] verify {r['total_s']:.1f} s (setup {r['setup_s']:.1f} s, fine-tune "
              f"with {r['records']} records {r['finetune_s']:.1f} s); load average "
              f"{r['load'][0]} at start, {r['load'][1]} at end", flush=True)  # fmt: skip
        for phase, sec in r["phases"].items():
            print(f"  {phase:34s} {sec:8.1f} s  x{r['calls'].get(phase, '-')}")
        for g in r["generation_prefix"]:
            print(f"  generation prefix: {g['n_recorded']} prefill recorded, {g['n_replayed']} "
                  f"replayed; decode rows x steps {g['n_rows_reused']} reused, "
                  f"{g['n_rows_computed']} computed ({g['n_split_steps']} split steps); "
                  f"{g['nbytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    out = {"bench": "verify_cost", "model": args.model, "steps": args.steps,
           "threads": args.threads}  # fmt: skip
    for name, r in runs.items():
        out[f"{name}_verify_s"] = r["total_s"]
        out[f"{name}_load"] = r["load"]
    for name in (n for n in runs if n != "new" and "new" in runs):
        diff = _max_diff(runs[name]["trajectory"], runs["new"]["trajectory"])
        out[f"speedup_{name}"] = ratio = round(runs[name]["total_s"] / runs["new"]["total_s"], 2)
        out[f"trajectory_max_abs_diff_{name}"] = diff
        print(f"\n{name} / new: {ratio}x; trajectories differ by at most "
              + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
