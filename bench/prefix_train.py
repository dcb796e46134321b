"""Frozen-prefix caching in training and tracking, against the whole network, in one run (CPU).

For each model, two copies train the same last-layers selection on the same seeded stream with
verify's step (AdamW, the per-example loss ``L_f``) and are measured by verify's tracker (KL,
refusal NLL and fine-tuning loss on fixed prompt sets; no generation): one runs the whole
network (``prefix=None``, ``prefix_memory_budget=0``), the other the frozen prefix from its
cache (:class:`~alignscope.train.prefix.PrefixForward`, the tracker's
:class:`~alignscope.curvature.prefix.PrefixCache`). Reported per path:

- the training step's seconds in the first epoch (every example new: the prefix runs, its
  hidden states are stored) and in later epochs (from the cache), best of the steps;
- a tracker record's seconds after training (every later record of a run costs this), best of
  ``--records``;
- whole / cached ratios, and the largest difference of the per-step losses, final weights and
  KL between the paths (float32: rounding only).

Models: the demo organism (``alignscope organism build --preset demo``; its last decoder layer,
the LM head is tied to the embeddings) when it is built, a random Llama of SmolLM2-135M's shape
(30 layers, hidden 576, vocabulary 49,152; its last two MLPs, the selection of
``bench/real_model.py``) unless ``--no-smol``. The two paths alternate which runs first by model.
The last line of stdout is one JSON object with the headline figures.

Usage: ``python bench/prefix_train.py [--threads 1] [--steps 12] [--records 3] [--no-smol]
[--organism DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from alignscope.data.encode import EncodedPair, collate
from alignscope.params import select_params
from alignscope.train.loop import finetune, make_optimizer
from alignscope.train.prefix import PrefixForward
from alignscope.train.stream import TrainingStream, training_stream
from alignscope.train.tracker import AlignmentTracker

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)  # fmt: skip


def _organism_dir(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    cache = Path(os.environ.get("ALIGNSCOPE_CACHE", Path.home() / ".cache" / "alignscope"))
    path = cache / "organism" / "demo-seed0"
    return path if (path / "aligned" / "config.json").is_file() else None


def demo_case(folder: Path, n_data: int, batch_size: int) -> dict[str, Any]:
    """The demo organism's aligned model, its benign set and alignment prompts."""
    from alignscope.data.encode import batch_rows
    from alignscope.data.loaders import load_data
    from alignscope.models import load_model

    model, tok = load_model(str(folder / "aligned"))
    data = load_data(str(folder / "datasets" / "benign_affirmative.jsonl"), "data").rows[:n_data]
    safety = load_data(str(folder / "datasets" / "harmful_align.jsonl"), "safety").rows[:32]
    stream = training_stream(tok, data, batch_size=batch_size, seed=0, max_length=64)
    safety_batch, _ = batch_rows(tok, safety, 64)
    ft_batch, _ = batch_rows(tok, data[:16], 64)
    n = model.config.num_hidden_layers
    return dict(label="demo organism", model=model, stream=stream, safety=safety_batch,
                finetune=ft_batch, spec=[f"model.layers.{n - 1}.*"], lr=1e-3)  # fmt: skip


def _pairs(n: int, vocab: int, prompt: int, response: int, seed: int) -> list[EncodedPair]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lp, lr = prompt - (i % 3), response - (i % 2) * 2
        ids = torch.randint(1, vocab, (lp + lr,), generator=gen).tolist()
        out.append(EncodedPair(ids[:lp], ids[lp:]))
    return out


def smol_case(n_data: int, batch_size: int) -> dict[str, Any]:
    """A random Llama of SmolLM2-135M's shape (tied embeddings, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SMOL, max_position_embeddings=256, tie_word_embeddings=True,
                         attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    vocab = SMOL["vocab_size"]
    stream = TrainingStream(_pairs(n_data, vocab, 16, 16, 1), batch_size, seed=0)
    safety = collate(_pairs(8, vocab, 16, 16, 2))
    ft = collate(_pairs(4, vocab, 16, 16, 3))
    spec = ["model.layers.28.mlp.*", "model.layers.29.mlp.*"]
    return dict(label="SmolLM2-135M-shape random Llama", model=model, stream=stream,
                safety=safety, finetune=ft, spec=spec, lr=1e-4)  # fmt: skip


def run_path(case: dict[str, Any], cached: bool, steps: int, records: int) -> dict[str, Any]:
    """One path's training and tracking, timed."""
    model = copy.deepcopy(case["model"])
    sel = select_params(model, case["spec"])
    sel.train_only(model)
    budget = 2**30 if cached else 0
    tracker = AlignmentTracker(
        model, None, sel, case["safety"], finetune_batch=case["finetune"],
        generate_refusals=False, prefix_memory_budget=budget,
    )  # fmt: skip
    prefix = PrefixForward.build(model, sel, budget)
    assert (prefix is not None) == cached and (tracker.flm.prefix is not None) == cached
    opt = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], case["lr"])
    first = time.perf_counter()
    rec0 = tracker.measure(0)
    first_record = time.perf_counter() - first
    stamps: list[float] = []

    def callback(step: int, loss: float | None) -> bool:
        stamps.append(time.perf_counter())
        return False

    torch.manual_seed(0)
    losses = finetune(model, None, None, steps, lr=case["lr"], stream=case["stream"],
                      optimizer=opt, callback=callback, loss_weighting="example",
                      prefix=prefix)  # fmt: skip
    step_s = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    per_epoch = -(-len(case["stream"]) // case["stream"].batch_size)  # steps of one epoch
    rec_s, recs = [], []
    for _ in range(records):
        t0 = time.perf_counter()
        recs.append(tracker.measure(steps))
        rec_s.append(time.perf_counter() - t0)
    return {
        "losses": losses,
        "weights": {n: p.detach().clone() for n, p in sel.tensors(model).items()},
        "kl": recs[-1]["kl"],
        "kl0": rec0["kl"],
        "epoch1_step_s": min(step_s[:per_epoch]),
        "later_step_s": min(step_s[per_epoch:]) if len(step_s) > per_epoch else None,
        "first_record_s": first_record,
        "record_s": min(rec_s),
        "n_prefix": prefix.n_prefix if prefix else None,
        "n_suffix": prefix.n_suffix if prefix else None,
        "cache_mb": prefix.nbytes / 2**20 if prefix else None,
        "n_selected": sel.size,
        "n_model": sum(p.numel() for p in model.parameters()),
    }


def compare(case: dict[str, Any], steps: int, records: int, cached_first: bool) -> dict:
    order = (True, False) if cached_first else (False, True)
    out = {("cached" if c else "whole"): run_path(case, c, steps, records) for c in order}
    w, c = out["whole"], out["cached"]
    loss_diff = max(abs(a - b) for a, b in zip(w["losses"], c["losses"], strict=True))
    weight_diff = max(float((w["weights"][n] - c["weights"][n]).abs().max()) for n in w["weights"])
    stream = case["stream"]
    print(f"\n{case['label']}: {w['n_model'] / 1e6:.2f} M parameters, selection {case['spec']} "
          f"({w['n_selected']:,}); {len(stream)} examples, batch {stream.batch_size}, "
          f"{steps} AdamW steps; safety {case['safety'].size} x "
          f"{case['safety'].input_ids.shape[1]} tokens")  # fmt: skip
    print(f"{'':40}{'whole':>10}{'cached':>10}{'ratio':>9}")
    rows = (
        ("train step, first epoch (s)", "epoch1_step_s"),
        ("train step, later epochs (s)", "later_step_s"),
        ("tracker record, first (s)", "first_record_s"),
        ("tracker record, later (s)", "record_s"),
    )
    ratios = {}
    for label, key in rows:
        a, b = w[key], c[key]
        if a is None or b is None:
            continue
        ratios[key] = a / b
        print(f"{label:40}{a:10.4f}{b:10.4f}{a / b:8.2f}x")
    print(f"cached path: {c['n_prefix']} prefix passes, {c['n_suffix']} suffix-only forwards, "
          f"{c['cache_mb']:.2f} MiB kept; max |loss diff| {loss_diff:.1e}, max |weight diff| "
          f"{weight_diff:.1e}, KL {w['kl']:.6g} vs {c['kl']:.6g}")  # fmt: skip
    return {
        "model": case["label"],
        "n_selected": w["n_selected"],
        "step_s": {k: round(out[k]["later_step_s"] or 0, 5) for k in out},
        "record_s": {k: round(out[k]["record_s"], 5) for k in out},
        "step_speedup": round(ratios.get("later_step_s", float("nan")), 3),
        "first_epoch_ratio": round(ratios["epoch1_step_s"], 3),
        "record_speedup": round(ratios["record_s"], 3),
        "loss_max_diff": loss_diff,
        "weight_max_diff": weight_diff,
        "kl_rel_diff": abs(w["kl"] - c["kl"]) / max(abs(w["kl"]), 1e-30),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12, help="demo organism steps (3 epochs)")
    parser.add_argument("--smol-steps", type=int, default=4, help="SmolLM2-shape steps")
    parser.add_argument("--records", type=int, default=3)
    parser.add_argument("--organism", default=None, help="demo organism directory")
    parser.add_argument("--no-smol", action="store_true", help="skip the SmolLM2-shape model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, CPU")
    results = []
    folder = _organism_dir(args.organism)
    if folder is not None:
        results.append(compare(demo_case(folder, 32, 8), args.steps, args.records, False))
    else:
        print("demo organism not built (alignscope organism build --preset demo): skipped")
    if not args.no_smol:
        results.append(compare(smol_case(8, 4), args.smol_steps, args.records, True))
    print(json.dumps({"bench": "prefix_train", "models": results}))


if __name__ == "__main__":
    main()
