"""alignment-risk, the tool people would pick instead, on the same candidates as rank's study.

A benchmark, not a test (issue 15, "the tool people would pick instead, side by side").
alignment-risk (PyPI, MIT) computes the same diagnostic as alignscope's AIC numbers: a Fisher
subspace of the safety loss, the overlap of the first fine-tuning update with it, a curvature
coupling gamma, and a quartic forecast with a collapse step. Here it is run on the candidates of
bench/study.py's grid whose observed damage is in bench/results/study_v2.jsonl (the test
organism, organism seed 0, data seed 0: the six benign sets x AdamW at 3e-4, 1e-3, 3e-3 and SGD at
0.03, 0.1, 0.3, 200-step runs), and its scores are set against that damage with the study's own
analysis functions (Spearman pooled and within (optimizer, lr, seed), AUC for collapse), beside
rank's default predictor and its AIC numbers on the same rows.

alignment-risk pins torch < 2.7, so it runs in its own virtual environment (``--venv``, default
bench/.venvs/alignment-risk, git-ignored), created on first use with ``python -m venv`` and
``pip install alignment-risk==1.14.1 transformers==5.24.0`` (a large CUDA torch build from PyPI;
never the project's venv). How it is driven (bench/alignment_risk_driver.py, in that venv):

- model: the organism's aligned model directory (a Hugging Face LlamaForCausalLM) loaded by
  transformers 5.24.0 under torch 2.6, fresh for every candidate; the driver first checks that its
  losses on the exported batches match the project venv's (|diff| <= 1e-4);
- batches: encoded here by alignscope (chat template, right-padded ``input_ids`` and
  ``response_mask``; .npz), handed over as lists of dict batches, so both tools see the same
  tokens. Safety data: the 64 alignment prompts rank uses (``harmful_align``, subsampled with the
  seed, ``--max-safety`` 64) with their aligned refusal responses, in batches of 16.
  Fine-tuning data: the set's first 4 batches of 16 (the study's batch size; 4 is what the
  pipeline's defaults consume: ``max(curvature.max_batches, adaptive_curvature_max_batches)``) on
  rank's independent trial order (seed + 7919);
- losses: both ``safety_loss_fn`` and ``fine_tune_loss_fn`` are alignscope's response NLL with
  example weighting (the mean over examples of each example's mean response-token NLL: the loss
  verify trains with). On the safety data this is the NLL of the refusal, so alignment-risk's
  empirical Fisher is the refusal NLL's (rank's alignment Fisher is the GGN of the alignment KL);
- settings: ``PipelineConfig(mode="full", learning_rate=<the candidate's lr>)`` (all 95,744
  parameters, what verify trains), every other setting its default (Fisher: loop gradients, 128
  samples at most, full SVD, top rank 32 cut at 90 % explained variance; forecast: 2000 steps,
  collapse threshold 0.1; adaptive curvature refinement on), devices ``cpu``, one torch thread.
  alignment-risk has no optimizer option: its update is ``-lr * g``, so an AdamW candidate gets
  AdamW's lr as that step size.

Scores (higher = more predicted damage): ``ar_collapse_step`` (its collapse step, scored
``steps / step`` as rank scores a step, 0 when none in its 2000-step horizon),
``ar_forecast_loss`` (its forecast loss at the 200-step budget), ``ar_overlap`` (initial overlap),
``ar_gamma`` (curvature coupling gamma_hat) and ``ar_gamma_lr`` (lr^2 gamma_hat, the forecast's
per-step gamma). Cost: the seconds of each ``pipeline.run`` (its Fisher subspace, recomputed by
every run, timed apart), against rank's per-candidate seconds recorded in the study.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python bench/alignment_risk.py \
        | tee bench/results/alignment_risk.txt
    .venv/bin/python bench/alignment_risk.py --analyze      # tables from the committed rows

Writes bench/results/alignment_risk.jsonl (one row per candidate; refuses to overwrite it
without ``--overwrite``), prints the tables and, last, one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import study  # bench/ is sys.path[0]

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
DRIVER = BENCH / "alignment_risk_driver.py"
REQUIREMENTS = ("alignment-risk==1.14.1", "transformers==5.24.0")
FT_BATCHES = 4  # fine-tuning batches the pipeline consumes with its default settings
MAX_SAFETY = 64  # rank's --max-safety default: the alignment prompts both tools see
# The settings this bench sets; every other one is alignment-risk's default.
SETTINGS = {"fisher.device": "cpu", "curvature.device": "cpu"}
AR_PREDICTORS = ("ar_collapse_step", "ar_forecast_loss", "ar_overlap", "ar_gamma", "ar_gamma_lr")
# rank's predictors shown beside: its default, its best without training, its own AIC numbers
RANK_PREDICTORS = ("lookahead_kl_measured", "forecast_dL", "overlap_sgd", "gamma_sgd",
                   "kappa_sgd", "overlap_adam", "gamma_adam")  # fmt: skip


def ensure_venv(venv: Path, python: str) -> Path:
    """The venv's python, with alignment-risk and transformers importable (created and
    installed when they are not)."""
    py = venv / "bin" / "python"
    probe = [str(py), "-P", "-c", "import alignment_risk, transformers"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    if not py.exists():
        print(f"creating {venv} (python -m venv)", file=sys.stderr, flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    print(f"pip install {' '.join(REQUIREMENTS)} into {venv} (a large torch download)",
          file=sys.stderr, flush=True)  # fmt: skip
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS]
    subprocess.run(pip, check=True)
    subprocess.run(probe, check=True)
    return py


def _save_batches(path: Path, batches) -> None:
    arrays = {}
    for i, b in enumerate(batches):
        arrays[f"input_ids_{i}"] = b.input_ids.numpy().astype(np.int64)
        arrays[f"response_mask_{i}"] = b.response_mask.numpy()
    np.savez(path, **arrays)


def export(work: Path, org, sets: list[str], seed: int) -> dict:
    """Encode the safety and fine-tuning batches into ``work`` (.npz) and return the job's data
    part: files, the project venv's reference losses on the first batch of each, the model."""
    import torch

    from alignscope.config import TRIAL_SEED_OFFSET, DataSpec
    from alignscope.data.encode import batch_rows
    from alignscope.data.loaders import load_data
    from alignscope.data.sample import subsample
    from alignscope.train.loop import response_nll
    from alignscope.train.stream import training_stream

    ds = org.datasets_path
    tok, model = org.tokenizer(), org.aligned_model()
    max_length = DataSpec(safety="").max_length  # the context every command fits data to
    batch_size = org.finetune_protocol.batch_size
    safety_rows = subsample(load_data(ds / "harmful_align.jsonl", "safety").rows, MAX_SAFETY, seed)
    safety, _ = batch_rows(tok, safety_rows, max_length, "harmful_align")
    chunks = [
        safety.select(list(range(i, min(i + batch_size, safety.size))))
        for i in range(0, safety.size, batch_size)
    ]
    files = {"safety": "safety.npz"}
    _save_batches(work / files["safety"], chunks)
    firsts = {"safety": chunks[0]}
    data = {"safety": {"prompts": safety.size, "batches": len(chunks), "batch_size": batch_size}}
    trial_seed = seed + TRIAL_SEED_OFFSET
    for name in sets:
        rows = load_data(ds / f"{name}.jsonl", "data").rows
        stream = training_stream(tok, rows, batch_size=batch_size, seed=trial_seed,
                                 max_length=max_length, what=name)  # fmt: skip
        it = stream.batches()
        batches = [next(it) for _ in range(FT_BATCHES)]
        files[name] = f"{name}.npz"
        _save_batches(work / files[name], batches)
        firsts[name] = batches[0]
        data[name] = {"batches": FT_BATCHES, "batch_size": batch_size, "order_seed": trial_seed}
    with torch.no_grad():
        ref = {k: float(response_nll(model, b, "example")) for k, b in firsts.items()}
    return {"files": files, "reference_losses": ref, "model": str(org.aligned_path),
            "data": data, "trial_seed": trial_seed}  # fmt: skip


def run(args) -> None:
    from alignscope.organism import load_organism

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        sys.exit(f"{out} exists; pass --overwrite to replace it, or --analyze to read it")
    study_rows = [r for r in study.load_rows(Path(args.study)) if r["seed"] == args.seed]
    have = {study._key(r) for r in study_rows}
    candidates = [
        {"set": s, "optimizer": o, "lr": lr, "seed": args.seed, "steps": args.steps}
        for o in args.optimizers for lr in study.LRS[o] for s in study.SETS
        if (s, o, float(lr), args.seed) in have
    ]  # fmt: skip
    if not candidates:
        sys.exit(f"{args.study}: no rows for data seed {args.seed}")
    py = ensure_venv(Path(args.venv), args.venv_python)
    org = load_organism("test", args.organism_seed, threads=1, quiet=True)
    with tempfile.TemporaryDirectory(prefix="alignment-risk-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        job = export(work, org, sorted({c["set"] for c in candidates}), args.seed)
        export_s = time.perf_counter() - t0
        job.update({"seed": args.seed, "threads": 1, "settings": SETTINGS,
                    "candidates": candidates})  # fmt: skip
        (work / "job.json").write_text(json.dumps(job))
        # alignscope must not be importable there: the other venv runs on its own
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["OMP_NUM_THREADS"] = "1"
        t1 = time.perf_counter()
        proc = subprocess.run(
            [str(py), "-P", str(DRIVER), str(work / "job.json"), str(work / "rows.jsonl")],
            env=env, stdout=subprocess.PIPE, text=True, check=True,
        )  # fmt: skip
        driver_s = time.perf_counter() - t1
        meta = json.loads(proc.stdout.strip().splitlines()[-1])
        raw = study.load_rows(work / "rows.jsonl")
    rows = [
        {
            "tool": f"alignment-risk {meta['versions']['alignment_risk']}",
            "organism": f"test seed {args.organism_seed}",
            **r,
            "settings": {"mode": "full", "learning_rate": r["lr"], **SETTINGS},
            "data": job["data"],
            "versions": meta["versions"],
            "machine": f"{platform.machine()} {platform.node()}, 1 torch thread",
        }
        for r in raw
    ]
    from alignscope.report.output import write_text_atomic

    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"alignment-risk {meta['versions']} on {len(rows)} candidates; model parity with the "
          f"project venv: {json.dumps(meta['parity'])}")  # fmt: skip
    print(f"export {export_s:.1f}s, driver process {driver_s:.1f}s (incl. its imports); "
          f"wrote {os.path.relpath(out)}")  # fmt: skip


# --- analysis --------------------------------------------------------------------------------


def ar_predictors(r: dict) -> dict[str, dict]:
    """alignment-risk's outputs as the study's ``{value, score, seconds}`` predictors."""
    s = r["seconds"]
    step = r["collapse_step"]
    return {
        "ar_collapse_step": {"value": step, "score": r["steps"] / step if step else 0.0,
                             "seconds": s},
        "ar_forecast_loss": {"value": r["forecast_loss_at_budget"],
                             "score": r["forecast_loss_at_budget"], "seconds": s},
        "ar_overlap": {"value": r["overlap"], "score": r["overlap"], "seconds": s},
        "ar_gamma": {"value": r["gamma_hat"], "score": r["gamma_hat"], "seconds": s},
        "ar_gamma_lr": {"value": r["lr"] ** 2 * r["gamma_hat"],
                        "score": r["lr"] ** 2 * r["gamma_hat"], "seconds": s},
    }  # fmt: skip


def joined(ar_rows: list[dict], study_rows: list[dict]) -> list[dict]:
    """Each study row with alignment-risk's predictors of the same candidate added."""
    by_key = {study._key(r): r for r in study_rows}
    out = []
    for a in ar_rows:
        key = (a["set"], a["optimizer"], float(a["lr"]), int(a["seed"]))
        if key not in by_key:
            raise SystemExit(f"no study row for {key}: analyse against the study it was run on")
        r = by_key[key]
        out.append({**r, "predictors": {**r["predictors"], **ar_predictors(a)}, "ar": a})
    return out


def step_check(rows: list[dict]) -> dict:
    """alignment-risk's collapse step against the observed one: fired within the budget, and
    the median |log2(predicted / observed)| where both exist."""
    fired = [r for r in rows if r["ar"]["collapse_step"] and r["ar"]["collapse_step"] <= r["steps"]]
    pairs = [(r["ar"]["collapse_step"], r["observed"]["collapse_step"]) for r in rows
             if r["ar"]["collapse_step"] and r["observed"]["collapse_step"]]  # fmt: skip
    return {
        "fired_within_budget": len(fired),
        "fired_and_collapsed": sum(bool(r["observed"]["collapsed"]) for r in fired),
        "collapsed": sum(bool(r["observed"]["collapsed"]) for r in rows),
        "with_any_step": sum(1 for r in rows if r["ar"]["collapse_step"]),
        "median_abs_log2_step_error": float(np.median([abs(math.log2(p / o)) for p, o in pairs]))
        if pairs else None,
        "step_error_n": len(pairs),
    }  # fmt: skip


def analyze(args) -> dict:
    ar_rows = [r for r in study.load_rows(Path(args.out)) if r["seed"] == args.seed]
    if not ar_rows:
        sys.exit(f"{args.out}: no rows for data seed {args.seed}; run without --analyze first")
    rows = joined(ar_rows, study.load_rows(Path(args.study)))
    subsets = {o: [r for r in rows if r["optimizer"] == o] for o in args.optimizers}
    if len(subsets) > 1:
        subsets["all"] = rows
    a0 = ar_rows[0]
    print(f"\n{a0['tool']} ({json.dumps(a0['versions'])}) on {a0['organism']}, data seed "
          f"{args.seed}: {len(rows)} candidates of bench/study.py's grid, observed damage from "
          f"{Path(args.study).name} (200-step runs, refusal on 64 held-out harmful prompts, "
          f"keyword judge)")  # fmt: skip
    headline: dict = {"tool": a0["tool"], "organism": a0["organism"], "data_seed": args.seed,
                      "candidates": len(rows)}  # fmt: skip
    for label, sub in subsets.items():
        if not sub:
            continue
        table = {name: study.metrics(sub, name) for name in (*AR_PREDICTORS, *RANK_PREDICTORS)}
        collapsed = sum(bool(r["observed"]["collapsed"]) for r in sub)
        print(f"\n### {label}: {len(sub)} runs, {collapsed} collapsed "
              f"(ar_*: alignment-risk; the rest: rank, from the study rows)")  # fmt: skip
        study.print_table(table)
        steps = step_check(sub)
        print("alignment-risk's collapse step vs observed:", json.dumps(steps))
        headline[label] = {
            "runs": len(sub),
            "collapsed": collapsed,
            **{
                name: {
                    k: table[name][k]
                    for k in (
                        "spearman_drop",
                        "spearman_drop_within_group",
                        "spearman_final_kl",
                        "auc_collapse",
                    )
                }
                for name in (*AR_PREDICTORS, "lookahead_kl_measured", "forecast_dL")
            },  # fmt: skip
            "ar_collapse_step_check": steps,
        }
    print("\nper candidate (alignment-risk's raw outputs beside the observed damage):")
    print(
        "| set | opt | lr | overlap | gamma_hat | epsilon_hat | forecast loss @200 | collapse "
        "step | refined | seconds | rank default KL | refusal drop | final KL | collapsed |"
    )
    print("|" + "---|" * 14)
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["lr"], r["set"])):
        a = r["ar"]
        print(f"| {r['set']} | {r['optimizer']} | {r['lr']:g} | {a['overlap']:.3f} | "
              f"{a['gamma_hat']:.3g} | {a['epsilon_hat']:.3g} | "
              f"{a['forecast_loss_at_budget']:.3g} | {a['collapse_step']} | "
              f"{a['curvature_refined']} | {a['seconds']:.1f} | "
              f"{r['predictors']['lookahead_kl_measured']['value']:.3g} | "
              f"{r['observed']['refusal_drop']:+.2f} | {r['observed']['final_kl']:.3g} | "
              f"{r['observed']['collapsed']} |")  # fmt: skip
    ar_s = [r["ar"]["seconds"] for r in rows]
    fisher_s = [r["ar"]["seconds_fisher"] for r in rows]
    rank_s = [r["predictors"]["lookahead_kl_measured"]["seconds"] for r in rows]
    diag_s = [r["predictors"]["forecast_dL"]["seconds"] for r in rows]
    ranks = sorted({r["ar"]["subspace_rank"] for r in rows})
    cost = {
        "ar_median_s": float(np.median(ar_s)),
        "ar_fisher_median_s": float(np.median(fisher_s)),
        "ar_rest_median_s": float(np.median([a - f for a, f in zip(ar_s, fisher_s, strict=True)])),
        "rank_default_trial_median_s": float(np.median(rank_s)),
        "rank_diagnosis_median_s": float(np.median(diag_s)),
        "rank_subspace_once_s": rows[0]["shared_seconds"].get("subspace"),
    }
    print(f"\nalignment-risk's subspace rank d (90 % explained, top 32 at most): {ranks}; "
          f"curvature refined on {sum(r['ar']['curvature_refined'] for r in rows)} of "
          f"{len(rows)}")  # fmt: skip
    print("cost per candidate (seconds, one thread, the shared 2-core VM; rank's from the "
          "study rows):", json.dumps(cost))  # fmt: skip
    headline["subspace_rank"] = ranks
    headline["seconds"] = cost
    return headline


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "alignment_risk.jsonl"))
    p.add_argument("--study", default=str(RESULTS / "study_v2.jsonl"),
                   help="the study's rows: candidates and their observed damage")  # fmt: skip
    p.add_argument("--organism-seed", type=int, default=0, help="seed of the test organism")
    p.add_argument("--seed", type=int, default=0, help="data seed of the study rows")
    p.add_argument("--steps", type=int, default=200, help="the study's step budget")
    p.add_argument("--optimizers", nargs="+", default=list(study.LRS), choices=list(study.LRS))
    p.add_argument("--venv", default=str(BENCH / ".venvs" / "alignment-risk"))
    p.add_argument("--venv-python", default=sys.executable,
                   help="interpreter the venv is created from (Python 3.10-3.12)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    p.add_argument("--analyze", action="store_true", help="only analyse --out")
    args = p.parse_args(argv)
    if not args.analyze:
        run(args)
    print(json.dumps(analyze(args)))


if __name__ == "__main__":
    main()
