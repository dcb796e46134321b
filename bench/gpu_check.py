"""One short check of the real-model path on a GPU: diagnose, verify and curvature products.

For a tiny random Llama and a random Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9
heads, 3 key/value heads, MLP 1536, vocabulary 49,152), saved to a temporary directory and run
with ``--device`` and the weights' dtype (bf16 on CUDA by default; alignscope upcasts 16-bit
weights to float32 for the math, so TF32 decides the matmul precision): ``diagnose`` over the last
two MLPs (rank 8), ``verify`` for a few steps on the same selection, and the exact Fisher
``F v`` / ``F V`` (8 vectors) and Hessian ``H v`` products. Prints each stage's seconds and the
peak CUDA memory (``torch.cuda.max_memory_allocated``), the TF32 settings and the environment
record a results.json gets, and ends with one JSON line of headline figures.

The models are random, so the numbers are costs only (the forecasts mean nothing). The datasets
and tokenizer are the organism's corpus (made locally; nothing is downloaded).

    python bench/gpu_check.py --device cuda            # tiny and 135M, bf16, TF32 allowed
    python bench/gpu_check.py --device cpu --quick     # tiny model only, float32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose
from alignscope.commands.verify import VerifyConfig, run_verify
from alignscope.curvature import FisherOperator, FunctionalLM, HessianOperator
from alignscope.data.encode import batch_rows
from alignscope.organism.build import quiet_transformers
from alignscope.organism.corpus import build_corpus
from alignscope.organism.tokenizer import build_tokenizer
from alignscope.params import select_params
from alignscope.report.output import environment

# (name, LlamaConfig fields); the vocabulary of "tiny" is the tokenizer's own.
MODELS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
}  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """``(result, seconds, peak CUDA GiB or None)`` of one call."""
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start, _peak_gib(device)


def write_inputs(root: Path) -> tuple[Any, dict[str, Path]]:
    """The organism corpus' tokenizer and the safety, fine-tuning and eval sets as jsonl."""
    corpus = build_corpus(0)
    tok = build_tokenizer(r[k] for name in corpus.names() for r in corpus[name]
                          for k in ("prompt", "response"))  # fmt: skip
    files = {"safety": "harmful_align", "data": "benign_affirmative", "eval": "harmful_eval"}
    paths = {}
    for key, name in files.items():
        paths[key] = root / f"{name}.jsonl"
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in corpus[name]))
    return tok, paths


def save_model(name: str, tok, root: Path, dtype: torch.dtype) -> Path:
    fields = dict(MODELS[name])
    vocab = max(fields.pop("vocab_size", 0), len(tok))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **fields,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype)
    out = root / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def check_model(name: str, args, tok, paths: dict[str, Path], root: Path) -> dict[str, Any]:
    device, dtype = args.device, args.dtype
    path = save_model(name, tok, root, getattr(torch, dtype))
    layers = MODELS[name]["num_hidden_layers"]
    params = [f"model.layers.{i}.mlp.*" for i in (layers - 2, layers - 1)]
    common = dict(
        model=str(path), safety=str(paths["safety"]), data=str(paths["data"]), device=device,
        dtype=dtype, params=params, rank=8, max_safety=args.prompts, max_data=args.prompts,
        noise_examples=4, max_new_tokens=16, optimizer="adamw", lr=1e-4, batch_size=4,
        steps=args.steps, seed=0, threads=args.threads,
    )  # fmt: skip
    row: dict[str, Any] = {"model": name}
    dcfg = DiagnoseConfig.from_options(**common)
    diag, row["diagnose_s"], row["diagnose_peak_gib"] = timed(
        device, lambda: run_diagnose(dcfg, quiet=True)
    )
    row["n_params"] = diag.parameters.n_params
    flat = dcfg.flat()
    row["recorded"] = {"device": flat["device"], "dtype": flat["dtype"]}
    vcfg = VerifyConfig.from_options(
        **common, eval_prompts=str(paths["eval"]), max_eval=8, eval_every=args.steps
    )
    _, row["verify_s"], row["verify_peak_gib"] = timed(
        device, lambda: run_verify(vcfg, diagnosis=diag, quiet=True)
    )
    # the curvature products on the same selection, on the loaded model
    model, tokenizer = dcfg.load_model()
    sel = select_params(model, params)
    flm = FunctionalLM(model, sel)
    batch, _ = batch_rows(tokenizer, diag.alignment.responses, dcfg.datasets.max_length)
    batch = batch.to(flm.device)
    fisher = FisherOperator(flm, batch)
    hessian = HessianOperator(lambda t: flm.mean_nll(t, batch), flm.theta0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(flm.dim, generator=gen).to(flm.device, flm.dtype)
    vs = torch.randn(flm.dim, 8, generator=gen).to(flm.device, flm.dtype)
    for label, fn in (("fisher_matvec", lambda: fisher.matvec(v)),
                      ("fisher_matmat8", lambda: fisher.matmat(vs)),
                      ("hvp", lambda: hessian.matvec(v))):  # fmt: skip
        fn()  # warm-up (kernels, cached graph)
        _, row[f"{label}_s"], row[f"{label}_peak_gib"] = timed(device, fn)
    return row


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="weights dtype (default: bfloat16 on CUDA, "
                    "float32 on CPU)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="the tiny model only")
    ap.add_argument("--steps", type=int, default=4, help="verify's fine-tuning steps")
    ap.add_argument("--prompts", type=int, default=16, help="safety and fine-tuning examples")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-tf32", action="store_true", help="strict float32 matmuls on CUDA")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if cuda:  # TF32 allowed unless asked otherwise; recorded in results.json's environment
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    env = environment()
    print(f"device {args.device} ({env['cuda']}), weights {args.dtype}, TF32 matmul "
          f"{env['tf32_matmul']}, cuDNN {env['tf32_cudnn']}, torch {env['torch']}")  # fmt: skip
    names = ["tiny"] if args.quick else list(MODELS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        tok, paths = write_inputs(Path(tmp))
        for name in names:
            rows.append(check_model(name, args, tok, paths, Path(tmp)))
            row = rows[-1]
            print(f"\n{name}: {row['n_params']:,} selected parameters (last two MLPs), rank 8, "
                  f"recorded {row['recorded']}")  # fmt: skip
            print(f"  {'stage':16s}{'seconds':>10s}{'peak CUDA GiB':>15s}")
            for stage in ("diagnose", "verify", "fisher_matvec", "fisher_matmat8", "hvp"):
                peak = _fmt(row[stage + "_peak_gib"])
                print(f"  {stage:16s}{row[stage + '_s']:10.3f}{peak:>15s}")
    head = {"bench": "gpu_check", "device": args.device, "dtype": args.dtype,
            "tf32": env["tf32_matmul"], "gpu": env["cuda"]}  # fmt: skip
    for row in rows:
        for key, value in row.items():
            if key not in ("model", "recorded"):
                value = round(value, 4) if isinstance(value, float) else value
                head[f"{row['model']}.{key}"] = value
    print(json.dumps(head))


if __name__ == "__main__":
    main()
