"""Run alignment-risk on the candidates bench/alignment_risk.py exported (its own venv).

Not run by hand: bench/alignment_risk.py starts it inside the alignment-risk virtual environment
(torch < 2.7, transformers), where alignscope is not importable, as

    VENV/bin/python -P bench/alignment_risk_driver.py JOB.json OUT.jsonl

(``-P``: bench/ is not put on sys.path, so ``import alignment_risk`` finds the package, not
bench/alignment_risk.py). JOB.json names the organism's aligned model directory (a Hugging Face
LlamaForCausalLM, loaded here by transformers), the exported batches (.npz: token ids and
response masks encoded by alignscope, so both tools see the same tokens), the candidates and the
reference losses the project's venv computed on the same batches (checked here first: the model
must load to the same function in this venv). Each candidate is one
``AlignmentRiskPipeline(PipelineConfig(...)).run(...)`` call as alignment-risk's README documents
it, on a fresh copy of the model; one JSON line per candidate goes to OUT.jsonl and one JSON object
(versions, the parity check) to stdout and, before the first candidate, to meta.json beside
OUT.jsonl. A job with ``trainable`` (parameter names) freezes every other parameter
(``requires_grad=False``) before the pipeline sees the model; its settings then name the same
parameters as ``fisher.parameter_names``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_batches(path: Path) -> list[dict[str, torch.Tensor]]:
    """The batches of one .npz (``input_ids_{i}``, ``response_mask_{i}``), as dicts of tensors:
    alignment-risk slices dict batches per sample for its per-sample Fisher gradients."""
    data = np.load(path)
    n = len([k for k in data.files if k.startswith("input_ids_")])
    return [
        {
            "input_ids": torch.from_numpy(data[f"input_ids_{i}"]).long(),
            "response_mask": torch.from_numpy(data[f"response_mask_{i}"]).bool(),
        }
        for i in range(n)
    ]


def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over examples of each example's mean response-token NLL: alignscope's
    ``response_nll(weighting="example")``, the loss verify trains with. Right-padded batches, no
    attention mask (causal attention: real tokens never see the padding), as alignscope does."""
    ids = batch["input_ids"]
    mask = batch["response_mask"][:, 1:]
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    weights = mask.float() / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return (nll * weights).sum(dim=1).mean()


def load_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return model.float().eval()


def parity(job: dict, model: torch.nn.Module, work: Path) -> dict:
    """This venv's losses on the first exported batch of each file against the project venv's."""
    out = {}
    with torch.no_grad():
        for name, ref in job["reference_losses"].items():
            batch = load_batches(work / job["files"][name])[0]
            got = float(response_nll(model, batch))
            out[name] = {"here": got, "project": ref, "abs_diff": abs(got - ref)}
    worst = max(v["abs_diff"] for v in out.values())
    if worst > 1e-4:
        raise SystemExit(
            f"the model does not load to the same function in this venv: loss differs by {worst:g} "
            f"from the project venv's ({json.dumps(out)})"
        )
    return out


def run_candidate(job: dict, cand: dict, work: Path) -> dict:
    from alignment_risk import AlignmentRiskPipeline, PipelineConfig

    torch.manual_seed(job["seed"])
    model = load_model(job["model"])
    trainable = job.get("trainable")  # None: every parameter (the organism's mode="full")
    if trainable is not None:
        # the fine-tuner's view: only the selection trainable. alignment-risk's Fisher loop calls
        # backward() on everything with requires_grad, so the rest must be frozen, not only left
        # out of its allowlist (fisher.parameter_names, set from the job's settings)
        names = set(trainable)
        missing = names - {n for n, _ in model.named_parameters()}
        if missing:
            raise SystemExit(f"parameters not in the model: {sorted(missing)}")
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
    safety = load_batches(work / job["files"]["safety"])
    finetune = load_batches(work / job["files"][cand["set"]])
    config = PipelineConfig(mode="full", learning_rate=float(cand["lr"]))
    for key, value in job["settings"].items():  # e.g. "fisher.device": "cpu"
        section, field = key.split(".")
        setattr(getattr(config, section), field, value)
    pipeline = AlignmentRiskPipeline(config)
    fisher_s = []
    analyze = pipeline.fisher_analyzer.analyze

    def timed_analyze(*args, **kwargs):  # the Fisher subspace's share of the run, timed apart
        t = time.perf_counter()
        try:
            return analyze(*args, **kwargs)
        finally:
            fisher_s.append(time.perf_counter() - t)

    pipeline.fisher_analyzer.analyze = timed_analyze
    update_size = []
    estimate = pipeline._estimate_initial_update

    def sized_estimate(*args, **kwargs):  # the length of the update it projects
        out = estimate(*args, **kwargs)
        update_size.append(int(out.numel()))
        return out

    pipeline._estimate_initial_update = sized_estimate
    t0 = time.perf_counter()
    report = pipeline.run(
        model=model,
        safety_dataloader=safety,
        safety_loss_fn=response_nll,
        fine_tune_dataloader=finetune,
        fine_tune_loss_fn=response_nll,
    )
    seconds = time.perf_counter() - t0
    fc, ir, cv, sub = report.forecast, report.initial_risk, report.curvature, report.subspace
    budget = min(int(cand["steps"]), len(fc.estimated_loss) - 1)
    eig = sub.fisher_eigenvalues.tolist()
    return {
        **cand,
        "collapse_step": fc.collapse_step,
        "collapse_time": fc.collapse_time,
        "forecast_loss_at_budget": float(fc.estimated_loss[budget]),
        "forecast_drift_at_budget": float(fc.projected_drift[budget]),
        "quartic_bound_at_budget": float(fc.quartic_lower_bound[budget]),
        "forecast_loss_at_horizon": float(fc.estimated_loss[-1]),
        "horizon_steps": int(fc.steps[-1]),
        "overlap": ir.cosine_to_subspace,
        "update_norm": ir.update_norm,
        "projected_norm": ir.projected_norm,
        "trigger_curvature_check": ir.trigger_curvature_check,
        "gamma_hat": cv.gamma_hat,
        "epsilon_hat": cv.epsilon_hat,
        "acceleration_norm": cv.acceleration_norm,
        "projected_acceleration_norm": cv.projected_acceleration_norm,
        "lambda_min": pipeline._stable_lambda_min(sub),
        "subspace_rank": len(eig),
        "fisher_eigenvalues": eig,
        "n_parameters": sum(s.end - s.start for s in sub.parameter_slices),
        "parameter_names": [s.name for s in sub.parameter_slices],
        # the vectors it worked with: per-sample Fisher gradients (its eigenvectors' length),
        # the initial update; both must have the selection's size
        "fisher_gradient_size": int(sub.fisher_eigenvectors.shape[0]),
        "update_size": update_size[0],
        "curvature_refined": "refined" in report.warning,
        "warning": report.warning,
        "seconds": seconds,
        "seconds_fisher": sum(fisher_s),
    }


def main(argv: list[str]) -> None:
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    work = job_path.parent
    torch.set_num_threads(job["threads"])
    import transformers

    import alignment_risk

    check = parity(job, load_model(job["model"]), work)
    meta = {
        "versions": {
            "alignment_risk": alignment_risk.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
        "parity": check,
    }
    # beside the rows, so that a run stopped part-way still says what made its rows
    (out_path.parent / "meta.json").write_text(json.dumps(meta))
    with out_path.open("w") as f:
        for i, cand in enumerate(job["candidates"], 1):
            row = run_candidate(job, cand, work)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(
                f"[{i}/{len(job['candidates'])}] {cand['set']} {cand['optimizer']} "
                f"lr={cand['lr']:g}: collapse step {row['collapse_step']}, overlap "
                f"{row['overlap']:.3f}, {row['seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    print(json.dumps(meta))


if __name__ == "__main__":
    main(sys.argv[1:])
