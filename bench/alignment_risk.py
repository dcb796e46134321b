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

``--organism smollm2``: the real model's candidates, those of bench/real_study.py's selection
``last-layers`` (the MLPs of layers 28-29) at data seed ``--seed`` (default 0): its seven sets x
its two last-layers AdamW learning rates (``real_study.LRS["last-layers"]``: 1e-4, 3e-5; 100-step
runs), 14 candidates (``--sets``, ``--lrs``: a part of them). Driven as above, except:

- model: the cached aligned SmolLM2-135M-Instruct (~/.cache/alignscope/real_model/aligned-v2-seed0,
  a Hugging Face LlamaForCausalLM, float32, tied head), built by bench/real_study.py /
  bench/real_model.py (this bench only reads the cache; it exits when it is not there);
- parameters: the study's selection, 5,308,416 parameters in 6 tensors
  (``model.layers.{28,29}.mlp.{gate,up,down}_proj.weight``, resolved by alignscope from
  ``model.layers.28.mlp.*``, ``model.layers.29.mlp.*``). alignment-risk's own parameter filter
  is ``FisherConfig.parameter_names`` (an allowlist of parameter names, which its update estimate
  and curvature reuse through the subspace's slices); it is set to those 6 names, and
  ``fisher.max_parameters`` (default 500,000: it refuses larger selections) to the selection's
  size. Every other parameter is also frozen (``requires_grad=False``, as fine-tuning the
  selection does): its Fisher loop calls ``backward()`` on the whole model, so without that it
  would differentiate all 134.5 M parameters before reading the allowlisted gradients. Each row
  records the lengths of the vectors it worked with (``n_parameters``, ``fisher_gradient_size``:
  its per-sample gradients, ``update_size``: its initial update); the bench refuses to write
  the rows if any differs from the selection's size. ``mode="full"`` (``mode="lora"`` picks
  adapter parameters by name);
- safety data: as the study gives rank (bench/real_study.py's options at their defaults through
  ``real_study.rank_options``, the config rank's diagnose reads): ``--max-safety`` 8 of the 32
  prompts of data-v2-seed0/safety.jsonl, subsampled with the data seed (each study process
  diagnoses its own seed first, so that seed's subsample is rank's safety batch there), with the
  aligned model's greedy answers (16 new tokens, diagnose's targets stage) as the responses, in
  one batch of 8; alignment-risk's safety loss is the NLL of those answers (the response NLL
  above), rank's the KL to them;
- fine-tuning data: the set's (study-data-v1-seed0-n96-h32/<set>.jsonl) first 4 batches of 8 (the
  study's batch size) on rank's independent trial order (seed + 7919);
- forecast scores: ``ar_forecast_loss`` at the study's 100-step budget, ``ar_collapse_step``
  scored ``100 / step``.

The analysis joins the rows with the study's by (set, lr, seed) among the ``last-layers`` rows of
``--seed``, each scored as bench/real_study.py scores it (``real_study.with_trial``: rank's trial
predictors from its independent-order trial at its default length; collapsed: refusal at the end
below half of its start). The study may be partial (still running): the candidates without a
study row are left out, and the header says how many were matched. ``--study`` takes several
files (a running study writes one per process).

    nohup nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/alignment_risk.py \
        --organism smollm2 > /tmp/alignment_risk_real.txt &       # 14 candidates
    .venv/bin/python bench/alignment_risk.py --organism smollm2 --analyze \
        [--study bench/results/real_study.jsonl]

writes bench/results/alignment_risk_real.jsonl (refuses to overwrite it without ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
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
SELECTION = "last-layers"  # the real model's: bench/real_study.py's MLPs of layers 28-29
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


def _export_batches(
    work: Path,
    model,
    tok,
    safety,
    sets: dict[str, Path],
    batch_size: int,
    max_length: int,
    order: int,
) -> tuple[dict, dict, dict]:
    """Save ``safety`` (an encoded batch) in batches of ``batch_size`` and each set's first
    :data:`FT_BATCHES` batches on the trial order ``order`` into ``work`` (.npz); return the
    files, the project venv's reference losses on the first batch of each, and the data part."""
    import torch

    from alignscope.data.loaders import load_data
    from alignscope.train.loop import response_nll
    from alignscope.train.stream import training_stream

    chunks = [
        safety.select(list(range(i, min(i + batch_size, safety.size))))
        for i in range(0, safety.size, batch_size)
    ]
    files = {"safety": "safety.npz"}
    _save_batches(work / files["safety"], chunks)
    firsts = {"safety": chunks[0]}
    data = {"safety": {"prompts": safety.size, "batches": len(chunks), "batch_size": batch_size}}
    for name, path in sets.items():
        rows = load_data(path, "data").rows
        stream = training_stream(tok, rows, batch_size=batch_size, seed=order,
                                 max_length=max_length, what=name)  # fmt: skip
        it = stream.batches()
        batches = [next(it) for _ in range(FT_BATCHES)]
        files[name] = f"{name}.npz"
        _save_batches(work / files[name], batches)
        firsts[name] = batches[0]
        data[name] = {"batches": FT_BATCHES, "batch_size": batch_size, "order_seed": order}
    with torch.no_grad():
        ref = {k: float(response_nll(model, b, "example")) for k, b in firsts.items()}
    return files, ref, data


def export(work: Path, org, sets: list[str], seed: int) -> dict:
    """Encode the safety and fine-tuning batches into ``work`` (.npz) and return the job's data
    part: files, the project venv's reference losses on the first batch of each, the model."""

    from alignscope.config import TRIAL_SEED_OFFSET, DataSpec
    from alignscope.data.encode import batch_rows
    from alignscope.data.loaders import load_data
    from alignscope.data.sample import subsample

    ds = org.datasets_path
    tok, model = org.tokenizer(), org.aligned_model()
    max_length = DataSpec(safety="").max_length  # the context every command fits data to
    batch_size = org.finetune_protocol.batch_size
    safety_rows = subsample(load_data(ds / "harmful_align.jsonl", "safety").rows, MAX_SAFETY, seed)
    safety, _ = batch_rows(tok, safety_rows, max_length, "harmful_align")
    trial_seed = seed + TRIAL_SEED_OFFSET
    sets_paths = {name: ds / f"{name}.jsonl" for name in sets}
    files, ref, data = _export_batches(work, model, tok, safety, sets_paths, batch_size,
                                       max_length, trial_seed)  # fmt: skip
    return {"files": files, "reference_losses": ref, "model": str(org.aligned_path),
            "data": data, "trial_seed": trial_seed}  # fmt: skip


def drive(py: Path, work: Path, job: dict) -> tuple[list[dict], dict | None, float, str | None]:
    """Run the driver in the alignment-risk venv on ``work/job.json``: ``(raw rows, its meta,
    seconds, error)``. The rows it finished are returned even when it fails or is stopped
    (SIGTERM), with ``error`` saying why it ended early."""
    (work / "job.json").write_text(json.dumps(job))
    # alignscope must not be importable there: the other venv runs on its own
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    prev = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # keep finished rows
    t1 = time.perf_counter()
    proc = subprocess.Popen(
        [str(py), "-P", str(DRIVER), str(work / "job.json"), str(work / "rows.jsonl")],
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    error = None
    try:
        proc.communicate()
        if proc.returncode:
            error = f"the driver exited with status {proc.returncode}"
    except (SystemExit, KeyboardInterrupt):
        proc.terminate()
        proc.wait()
        error = "stopped"
    finally:
        signal.signal(signal.SIGTERM, prev)
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    return study.load_rows(work / "rows.jsonl"), meta, time.perf_counter() - t1, error


def write_rows(out: Path, rows: list[dict], error: str | None, expected: int) -> None:
    from alignscope.report.output import write_text_atomic

    if rows:
        write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    if error:
        sys.exit(f"{error} after {len(rows)} of {expected} candidates"
                 + (f"; wrote those to {os.path.relpath(out)}" if rows else ""))  # fmt: skip


def run(args) -> None:
    from alignscope.organism import load_organism

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        sys.exit(f"{out} exists; pass --overwrite to replace it, or --analyze to read it")
    study_rows = [r for p in args.study for r in study.load_rows(Path(p)) if r["seed"] == args.seed]
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
        raw, meta, driver_s, error = drive(py, work, job)
    if meta is None:  # it stopped before its first candidate
        write_rows(out, [], error or "no meta.json from the driver", len(candidates))
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
    write_rows(out, rows, error, len(candidates))
    print(f"alignment-risk {meta['versions']} on {len(rows)} candidates; model parity with the "
          f"project venv: {json.dumps(meta['parity'])}")  # fmt: skip
    print(f"export {export_s:.1f}s, driver process {driver_s:.1f}s (incl. its imports); "
          f"wrote {os.path.relpath(out)}")  # fmt: skip


# --- the real model: SmolLM2-135M-Instruct, bench/real_study.py's candidates -------------------


def study_settings() -> argparse.Namespace:
    """bench/real_study.py's options at their defaults: the study's settings."""
    import real_study

    return real_study.parser().parse_args([])


def export_real(work: Path, sets: list[str], seed: int) -> dict:
    """Encode the study's safety batch and each set's fine-tuning batches into ``work`` (.npz);
    return the job's data part, the selection's parameter names and the reference losses."""
    import torch

    import real_model as rm
    import real_study
    from alignscope.commands.rank import RankConfig
    from alignscope.config import trial_seed
    from alignscope.data.encode import batch_rows
    from alignscope.data.loaders import load_data
    from alignscope.data.sample import subsample
    from alignscope.evaluate import generate
    from alignscope.params import select_params

    sargs = study_settings()
    root = rm.cache_root()
    _, data, aligned = rm.stage_paths(root, sargs.seed)
    sets_dir = real_study.study_sets_dir(root, sargs)
    paths = [aligned, data / "safety.jsonl", *(sets_dir / f"{s}.jsonl" for s in sets)]
    for path in paths:
        if not path.exists():
            sys.exit(f"{path} does not exist: run bench/real_study.py first (it builds the "
                     f"cached aligned model and the study's sets)")  # fmt: skip
    cfg = RankConfig.from_options(
        data=[str(sets_dir / f"{s}.jsonl") for s in sets], lrs=list(real_study.LRS[SELECTION]),
        **real_study.rank_options(sargs, aligned, data / "safety.jsonl", SELECTION),
    )  # fmt: skip
    dcfg = cfg.model_config()
    ds, batch_size = dcfg.datasets, dcfg.optim.batch_size
    model, tok = dcfg.load_model()
    selection = select_params(model, dcfg.param_spec())
    # rank's safety batch (diagnose's targets stage): --max-safety prompts subsampled with the
    # run's data seed (each study process diagnoses its own seed first), the aligned model's
    # greedy answers as the responses
    rows = subsample(load_data(ds.safety, "safety").rows, ds.max_safety, seed)
    prompts = [r["prompt"] for r in rows]
    with torch.no_grad():
        greedy = generate(model, tok, prompts, max_new_tokens=ds.max_new_tokens)
    if not all(g.strip() for g in greedy):
        sys.exit("an empty greedy response among the safety prompts (diagnose would refuse)")
    safety, _ = batch_rows(tok, [{"prompt": p, "response": g} for p, g in zip(
        prompts, greedy, strict=True)], ds.max_length, "safety")  # fmt: skip
    order = trial_seed(seed, "independent")
    files, ref, data_part = _export_batches(
        work, model, tok, safety, {name: sets_dir / f"{name}.jsonl" for name in sets},
        batch_size, ds.max_length, order,
    )  # fmt: skip
    data_part["safety"]["responses"] = (
        f"the aligned model's greedy answers, {ds.max_new_tokens} new tokens"
    )
    return {"files": files, "reference_losses": ref, "model": str(aligned), "data": data_part,
            "trial_seed": order, "parameter_names": list(selection.names),
            "n_selected": selection.size, "steps": dcfg.optim.steps,
            "model_label": "~/" + str(aligned.relative_to(Path.home()))
            if aligned.is_relative_to(Path.home()) else aligned.name}  # fmt: skip


def run_real(args) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        sys.exit(f"{out} exists; pass --overwrite to replace it, or --analyze to read it")
    import real_study

    sets = args.sets or list(real_study.SETS)
    lrs = args.lrs or list(real_study.LRS[SELECTION])
    unknown = [s for s in sets if s not in real_study.SETS]
    if unknown:
        sys.exit(f"--sets {' '.join(unknown)}: not a set of the study; use "
                 f"{', '.join(real_study.SETS)}")  # fmt: skip
    steps = study_settings().steps
    # the study's order: the larger lr first, so a run stopped part-way holds whole rankings
    candidates = [
        {"set": s, "selection": SELECTION, "optimizer": "adamw", "lr": lr, "seed": args.seed,
         "steps": steps}
        for lr in sorted(lrs, reverse=True) for s in sets
    ]  # fmt: skip
    py = ensure_venv(Path(args.venv), args.venv_python)
    with tempfile.TemporaryDirectory(prefix="alignment-risk-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        job = export_real(work, sets, args.seed)
        export_s = time.perf_counter() - t0
        settings = {**SETTINGS, "fisher.parameter_names": job["parameter_names"],
                    "fisher.max_parameters": job["n_selected"]}  # fmt: skip
        job.update({"seed": args.seed, "threads": 1, "settings": settings,
                    "trainable": job["parameter_names"], "candidates": candidates})  # fmt: skip
        print(f"export {export_s:.1f}s; {len(candidates)} candidates, selection "
              f"{job['n_selected']:,} parameters", file=sys.stderr, flush=True)  # fmt: skip
        raw, meta, driver_s, error = drive(py, work, job)
    bad = [r for r in raw if not r["n_parameters"] == r["fisher_gradient_size"]
           == r["update_size"] == job["n_selected"]]  # fmt: skip
    if bad:  # the selection alignment-risk worked on is not the study's
        sys.exit(f"alignment-risk saw {bad[0]['n_parameters']:,} parameters (gradient "
                 f"{bad[0]['fisher_gradient_size']:,}, update {bad[0]['update_size']:,}); the "
                 f"selection has {job['n_selected']:,}")  # fmt: skip
    if meta is None:  # it stopped before its first candidate
        write_rows(out, [], error or "no meta.json from the driver", len(candidates))
    versions = meta["versions"]
    rows = [
        {
            "tool": f"alignment-risk {versions['alignment_risk']}",
            "organism": "smollm2",
            "model": job["model_label"],
            **r,
            "settings": {"mode": "full", "learning_rate": r["lr"], **SETTINGS,
                         "fisher.parameter_names": "the selection's (parameter_names)",
                         "fisher.max_parameters": job["n_selected"],
                         "requires_grad": "the selection only (every other parameter frozen)"},
            "data": {k: job["data"][k] for k in ("safety", r["set"])},
            "versions": versions,
            "machine": f"{platform.machine()} {platform.node()}, 1 torch thread",
        }
        for r in raw
    ]  # fmt: skip
    write_rows(out, rows, error, len(candidates))
    print(f"alignment-risk {versions} on {len(rows)} candidates; model parity with the project "
          f"venv: {json.dumps(meta['parity'])}")  # fmt: skip
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


def real_key(row: dict) -> tuple:
    """A real-model candidate: (set, lr, data seed); the selection is fixed (:data:`SELECTION`)."""
    return (row["set"], float(row["lr"]), int(row["seed"]))


def joined(ar_rows: list[dict], study_rows: list[dict], key=study._key,
           partial: bool = False) -> list[dict]:  # fmt: skip
    """Each study row with alignment-risk's predictors of the same candidate (``key``) added.
    An alignment-risk row without a study row is an error, or with ``partial`` (a study grid
    still running) left out."""
    by_key = {key(r): r for r in study_rows}
    out = []
    for a in ar_rows:
        k = key(a)
        if k not in by_key:
            if partial:
                continue
            raise SystemExit(f"no study row for {k}: analyse against the study it was run on")
        r = by_key[k]
        out.append({**r, "predictors": {**r["predictors"], **ar_predictors(a)}, "ar": a})
    return out


def real_study_rows(rows: list[dict], seed: int) -> list[dict]:
    """bench/real_study.py's rows of :data:`SELECTION` and data ``seed`` as the study scores
    them (``real_study.with_trial``: rank's trial, independent order, its default length;
    collapsed = refusal below half of its start), one per candidate."""
    import real_study

    by_key = {real_key(r): r for r in rows if r["selection"] == SELECTION and r["seed"] == seed}
    return [real_study.with_trial(r, "independent", r["lookahead_steps"]) for r in by_key.values()]


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
    """Join --out's rows with the study rows of --study and print the tables (``report``)."""
    ar_rows = [r for r in study.load_rows(Path(args.out)) if r["seed"] == args.seed]
    if not ar_rows:
        sys.exit(f"{args.out}: no rows for data seed {args.seed}; run without --analyze first")
    loaded = [r for p in args.study for r in study.load_rows(Path(p))]
    names = ", ".join(Path(p).name for p in args.study)
    if args.organism == "test":
        rows = joined(ar_rows, loaded)
        what = (f"{len(rows)} candidates of bench/study.py's grid, observed damage from "
                f"{names} (200-step runs, refusal on 64 held-out harmful prompts, keyword "
                f"judge)")  # fmt: skip
        subsets = {o: [r for r in rows if r["optimizer"] == o] for o in args.optimizers}
    else:
        srows = real_study_rows(loaded, args.seed)
        rows = joined(ar_rows, srows, key=real_key, partial=True)
        r0 = rows[0] if rows else {}
        what = (f"{len(rows)} of its {len(ar_rows)} candidates matched with the real study's "
                f"{len(srows)} rows of {SELECTION}, data seed {args.seed} (in {names}); observed "
                f"damage: {r0.get('steps')}-step AdamW runs, refusal on {r0.get('max_eval')} "
                f"held-out Do-Not-Answer prompts, {r0.get('judge')}; collapse = refusal below "
                f"half its start")  # fmt: skip
        subsets = {f"adamw {SELECTION}": rows}
    return report(ar_rows, rows, subsets, what, args.seed)


def report(ar_rows: list[dict], rows: list[dict], subsets: dict[str, list[dict]], what: str,
           seed: int) -> dict:  # fmt: skip
    """Print the predictor tables per subset, the per-candidate outputs and the cost; return the
    headline figures."""
    if len(subsets) > 1:
        subsets["all"] = rows
    a0 = ar_rows[0]
    print(f"\n{a0['tool']} ({json.dumps(a0['versions'])}) on {a0['organism']}, data seed "
          f"{seed}: {what}")  # fmt: skip
    headline: dict = {"tool": a0["tool"], "organism": a0["organism"], "data_seed": seed,
                      "candidates": len(rows), "alignment_risk_rows": len(ar_rows)}  # fmt: skip
    if not rows:
        print("no candidate has a study row yet: nothing to score")
        return headline
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
    budgets = sorted({r["steps"] for r in rows})
    print("\nper candidate (alignment-risk's raw outputs beside the observed damage):")
    print(
        "| set | opt | lr | overlap | gamma_hat | epsilon_hat | forecast loss @"
        + "/".join(map(str, budgets))
        + " | collapse step | refined | seconds | rank default KL | refusal drop | final KL "
        "| collapsed |"
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
    p.add_argument("--organism", default="test", choices=("test", "smollm2"),
                   help="test: the test organism's study (bench/study.py); smollm2: the real "
                   "model's (bench/real_study.py, selection last-layers)")  # fmt: skip
    p.add_argument("--out", default=None, help="default bench/results/alignment_risk.jsonl "
                   "(test), alignment_risk_real.jsonl (smollm2)")  # fmt: skip
    p.add_argument("--study", nargs="+", default=None,
                   help="the study's rows: candidates and their observed damage (default "
                   "bench/results/study_v2.jsonl, or real_study.jsonl; several files are "
                   "pooled: a real study still running writes one per process)")  # fmt: skip
    p.add_argument("--organism-seed", type=int, default=0, help="seed of the test organism")
    p.add_argument("--seed", type=int, default=0, help="data seed of the study rows")
    p.add_argument("--steps", type=int, default=200, help="the test study's step budget")
    p.add_argument("--optimizers", nargs="+", default=list(study.LRS), choices=list(study.LRS),
                   help="test organism only")  # fmt: skip
    p.add_argument("--sets", nargs="+", default=None,
                   help="smollm2 only: these of the study's sets (default all seven)")  # fmt: skip
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="smollm2 only: these learning rates (default the study's last-layers "
                   "lrs)")  # fmt: skip
    p.add_argument("--venv", default=str(BENCH / ".venvs" / "alignment-risk"))
    p.add_argument("--venv-python", default=sys.executable,
                   help="interpreter the venv is created from (Python 3.10-3.12)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    p.add_argument("--analyze", action="store_true", help="only analyse --out")
    args = p.parse_args(argv)
    real = args.organism == "smollm2"
    if args.out is None:
        args.out = str(RESULTS / ("alignment_risk_real.jsonl" if real else "alignment_risk.jsonl"))
    if args.study is None:
        args.study = [str(RESULTS / ("real_study.jsonl" if real else "study_v2.jsonl"))]
    if not real and (args.sets or args.lrs):
        p.error("--sets and --lrs apply to --organism smollm2 (the test grid is the study's)")
    if not args.analyze:
        (run_real if real else run)(args)
    print(json.dumps(analyze(args)))


if __name__ == "__main__":
    main()
