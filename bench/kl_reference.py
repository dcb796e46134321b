"""The KL reference recomputed at theta0 against the stored table, side by side (issue 14).

A random Llama with a large vocabulary (the regime where the table hurts), float32 on CPU:
for each path, the seconds of one KL value + gradient, one Fisher ``F v`` and one ``F V`` of 8
vectors, and the bytes the reference keeps resident. The last line of stdout is one JSON object
with the headline figures.

Usage: ``python bench/kl_reference.py [--vocab 32000] [--prompts 16] [--tokens 24] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignscope.curvature import AlignmentKL, FisherOperator, FunctionalLM
from alignscope.data.encode import EncodedPair, collate
from alignscope.params import select_params


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=24, help="response tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    pairs = [
        EncodedPair(
            torch.randint(args.vocab, (8,), generator=gen).tolist(),
            torch.randint(args.vocab, (args.tokens,), generator=gen).tolist(),
        )
        for _ in range(args.prompts)
    ]
    batch = collate(pairs)
    flm = FunctionalLM(model, select_params(model, ["model.layers.1.mlp.*"]))
    v = torch.randn(flm.dim, generator=gen)
    vs = torch.randn(flm.dim, 8, generator=gen)
    moved = flm.theta0 + 1e-2 * v
    rows: dict[str, dict[str, float]] = {}
    for ref in ("table", "recompute"):
        kl = AlignmentKL(flm, batch, reference=ref)
        fisher = FisherOperator(flm, batch, reference=ref)

        def value_and_grad(kl=kl) -> None:
            x = moved.clone().requires_grad_(True)
            torch.autograd.grad(kl(x), x)

        resident = 0 if kl._table is None else kl._table.numel() * kl._table.element_size()
        resident_f = sum(c.table.numel() * c.table.element_size() for c in fisher.chunks
                         if c.table is not None)  # fmt: skip
        rows[ref] = {
            "kl_grad_s": _seconds(value_and_grad, args.repeats),
            "fisher_matvec_s": _seconds(lambda f=fisher: f.matvec(v), args.repeats),
            "fisher_matmat8_s": _seconds(lambda f=fisher: f.matmat(vs), args.repeats),
            "kl_resident_mb": resident / 2**20,
            "fisher_resident_mb": resident_f / 2**20,
        }
    print(f"{args.prompts} prompts x {args.tokens} tokens, vocabulary {args.vocab:,}, "
          f"{flm.dim:,} parameters, {args.threads} thread(s)")  # fmt: skip
    print(f"{'':24s}{'table (old)':>14s}{'recompute (new)':>17s}{'new/old':>9s}")
    for key in rows["table"]:
        old, new = rows["table"][key], rows["recompute"][key]
        ratio = f"{new / old:9.2f}" if old else f"{'-':>9s}"
        print(f"{key:24s}{old:14.4f}{new:17.4f}{ratio}")
    print(json.dumps({
        "bench": "kl_reference", "vocab": args.vocab, "positions": batch.target_mask.sum().item(),
        **{f"{k}_{p}": round(rows[p][k], 4) for p in rows for k in rows[p]},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
