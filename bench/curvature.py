"""Benchmark of the curvature engine on a tiny random Llama (CPU, float32).

Measured side by side in one run:

1. HVP / gradient time for forward-over-reverse and double-backward HVPs of the mean NLL, and
   exact Fisher matvec / gradient time.
2. Per-sample gradients: ``vmap`` against a Python loop.
3. Time to the top-k Fisher eigenpairs at matched accuracy (relative eigenvalue error <= 1e-3
   against a tight Lanczos reference): the Monte-Carlo Gram route, matrix-free Lanczos, and
   deflated power iteration (the PyHessian method, re-implemented here as a baseline).
4. Peak memory of each eigen run, measured in a fresh subprocess per method.

The model is briefly fine-tuned on the batch first, so its softmax at the response positions is
peaked like an aligned model's on its own refusals (a uniform softmax gives a degenerate Fisher).
The last line of stdout is one JSON object with the headline figures.

Usage: ``python bench/curvature.py [--seed 0] [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import grad

from alignscope.curvature import (
    FisherOperator,
    FunctionalLM,
    gram_eigs,
    hvp_forward,
    hvp_reverse,
    lanczos_eigs,
    per_sample_grads,
    response_weights,
)
from alignscope.data.encode import EncodedPair, LMBatch, collate
from alignscope.params import select_params

TARGET_REL_ERR = 1e-3  # matched accuracy for the eigen methods
HVP_TARGET = 3.0  # HVP time <= 3x a gradient
EIG_SPEEDUP_TARGET = 10.0  # Lanczos >= 10x faster than deflated power iteration
STAGES = ("reference", "lanczos", "power", "gram")


@dataclass
class BenchConfig:
    """Model, batch and eigen-benchmark sizes."""

    vocab: int = 2048
    hidden: int = 256
    intermediate: int = 688
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    batch: int = 8
    prompt_len: int = 16
    response_len: int = 16
    align_steps: int = 40
    align_lr: float = 1e-3
    repeats: int = 5
    psg_repeats: int = 2  # no warm-up: with the slicing backward, vmap takes ~20 s a call
    k: int = 20
    eig_patterns: list[str] = field(default_factory=list)  # filled in from `layers`
    ref_max_iter: int = 300
    lanczos_tols: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6)
    power_tols: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6)
    power_max_iter: int = 1000  # per eigenpair
    power_budget_s: float = 330.0  # wall-clock cap over all power-iteration tries
    gram_samples: tuple[int, ...] = (4, 16, 48)

    def __post_init__(self) -> None:
        if not self.eig_patterns:
            last = self.layers - 1
            self.eig_patterns = [f"model.layers.{last}.mlp.down_proj.weight", "lm_head.weight"]


def full_config() -> BenchConfig:
    """The default sizes (~5.4 M parameters, batch 8 x 32 tokens)."""
    return BenchConfig()


def quick_config() -> BenchConfig:
    """A small model for a fast smoke run."""
    return BenchConfig(
        vocab=512,
        hidden=64,
        intermediate=172,
        layers=2,
        heads=2,
        kv_heads=1,
        batch=4,
        prompt_len=8,
        response_len=8,
        align_steps=20,
        align_lr=3e-3,
        repeats=3,
        psg_repeats=2,
        k=10,
        ref_max_iter=200,
        power_budget_s=60.0,
        gram_samples=(4, 16),
    )


# -- model and data ---------------------------------------------------------------------------


def build_model(cfg: BenchConfig, seed: int) -> torch.nn.Module:
    """A randomly initialised float32 LlamaForCausalLM with eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(64, cfg.prompt_len + cfg.response_len),
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).float().eval()


def build_batch(cfg: BenchConfig, seed: int) -> LMBatch:
    """Random (prompt, response) token pairs with slightly varying lengths (so padding matters)."""
    gen = torch.Generator().manual_seed(seed + 1)
    pairs = []
    for i in range(cfg.batch):
        lp = cfg.prompt_len - (i % 3)
        lr = cfg.response_len - (i % 2) * 2
        ids = torch.randint(1, cfg.vocab, (lp + lr,), generator=gen).tolist()
        pairs.append(EncodedPair(ids[:lp], ids[lp:]))
    return collate(pairs, pad_id=0)


def align(model: torch.nn.Module, batch: LMBatch, steps: int, lr: float) -> tuple[float, float]:
    """A short Adam fine-tune on the batch's responses; returns the mean NLL before and after."""
    weights = response_weights(batch)

    def loss_fn() -> torch.Tensor:
        logits = model(batch.input_ids, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None])
        return -(logp.squeeze(-1) * weights).sum(-1).mean()

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with torch.no_grad():
        before = float(loss_fn())
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(loss_fn())
    return before, after


# -- measurement helpers ----------------------------------------------------------------------


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of each function, run round-robin so that background load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def _proc_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident-set growth of this process over a ``with`` block, in bytes.

    Frees what it can first (gc + malloc_trim), reads the current RSS, resets the kernel's
    high-water mark (``/proc/self/clear_refs``), and reports ``VmHWM - RSS_before`` at exit. Falls
    back to ``ru_maxrss`` (a process-lifetime peak, so an upper bound) if the reset is refused.
    """

    def __enter__(self) -> PeakRSS:
        _release_memory()
        self.exact = True
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        self.before = _proc_kib("VmRSS") * 1024
        self.peak = 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            hwm = _proc_kib("VmHWM") * 1024
        else:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = max(0, hwm - self.before)


def machine_info(threads: int) -> dict[str, Any]:
    """Platform, CPU model, core count, library versions, threads and load."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": threads,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Plain aligned text table (stable when stdout is not a terminal)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print(line)
    for n, r in enumerate(cells):
        pairs = enumerate(zip(r, widths, strict=True))
        parts = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs)
        print("  ".join(parts))
        if n == 0:
            print(line)


def fmt_s(x: float) -> str:
    """Seconds, or ms under one second."""
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_bytes(x: float) -> str:
    """MiB / GiB."""
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


# -- 1. HVP and Fisher products ---------------------------------------------------------------


def bench_products(model: torch.nn.Module, batch: LMBatch, cfg: BenchConfig) -> dict[str, Any]:
    """HVP (both modes) and Fisher matvec against a gradient, all parameters, interleaved."""
    flm = FunctionalLM(model, select_params(model))
    theta = flm.theta0

    def f(th: torch.Tensor) -> torch.Tensor:
        return flm.mean_nll(th, batch)

    v = torch.randn(flm.dim, generator=torch.Generator().manual_seed(7))
    op = FisherOperator(flm, batch)
    op.matvec(v)  # builds and caches the backward graph: every later product reuses it

    def grad_autograd() -> torch.Tensor:
        x = theta.detach().requires_grad_(True)
        return torch.autograd.grad(f(x), x)[0]

    def forward_only() -> torch.Tensor:
        with torch.no_grad():
            return f(theta)

    fns: dict[str, Callable[[], object]] = {
        "forward (no grad)": forward_only,
        "gradient (torch.func.grad)": lambda: grad(f)(theta),
        "gradient (autograd.grad)": grad_autograd,
        "HVP forward-over-reverse": lambda: hvp_forward(f, theta, v),
        "HVP double backward": lambda: hvp_reverse(f, theta, v),
        "Fisher matvec (cached vjp)": lambda: op.matvec(v),
    }
    times = time_interleaved(fns, cfg.repeats)
    med = {k: statistics.median(t) for k, t in times.items()}
    hf, hr = hvp_forward(f, theta, v), hvp_reverse(f, theta, v)
    agree = float((hf - hr).norm() / hr.norm())
    return {"P": flm.dim, "median_s": med, "all_s": times, "hvp_mode_rel_diff": agree}


# -- 2. per-sample gradients ------------------------------------------------------------------


def bench_per_sample(model: torch.nn.Module, batch: LMBatch, cfg: BenchConfig) -> dict[str, Any]:
    """vmap against loop per-sample gradients over all parameters, interleaved."""
    flm = FunctionalLM(model, select_params(model))
    inputs = (batch.input_ids, response_weights(batch))
    results: dict[str, torch.Tensor] = {}

    def run(method: str) -> Callable[[], None]:
        def go() -> None:
            results[method] = per_sample_grads(flm.example_nll, flm.theta0, inputs, method=method)

        return go

    times = time_interleaved({"vmap": run("vmap"), "loop": run("loop")}, cfg.psg_repeats, warmup=0)
    med = {k: statistics.median(t) for k, t in times.items()}
    diff = float((results["vmap"] - results["loop"]).abs().max())
    scale = float(results["loop"].abs().max())
    return {
        "P": flm.dim,
        "N": batch.size,
        "median_s": med,
        "all_s": times,
        "max_abs_diff": diff,
        "max_abs": scale,
    }


# -- 3. eigen methods (each run in a subprocess) ----------------------------------------------


class TimedMatVec:
    """Wraps an operator to count products and the time spent inside them (itself a
    LinearOperator; calling it is ``matvec``, for the power-iteration baseline)."""

    def __init__(self, op: FisherOperator) -> None:
        self.op, self.n, self.seconds = op, 0, 0.0
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - t0
        self.n += 1
        return out

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.op.matmat(vectors)
        self.seconds += time.perf_counter() - t0
        self.n += vectors.shape[1]
        return out

    __call__ = matvec


@dataclass
class PowerResult:
    """Output of :func:`deflated_power`."""

    values: torch.Tensor
    vectors: torch.Tensor
    n_products: int
    iterations: list[int]
    finished: bool  # all k pairs met the stopping rule within the budgets


def deflated_power(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    *,
    tol: float,
    max_iter: int,
    deadline: float,
    seed: int,
    op_dtype: torch.dtype,
) -> PowerResult:
    """Top-k eigenpairs by power iteration with Hotelling deflation (the PyHessian method).

    For pair j: ``v <- (F v - sum_{i<j} l_i (v_i . v) v_i) / norm`` from a random start until the
    Rayleigh quotient's relative change is below ``tol`` or ``max_iter`` products. Stops early
    (``finished=False``) when ``time.perf_counter()`` passes ``deadline``.
    """
    gen = torch.Generator().manual_seed(seed)
    values: list[float] = []
    vectors: list[torch.Tensor] = []
    iterations: list[int] = []
    n = 0
    finished = True
    for _ in range(k):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        v /= v.norm()
        basis = torch.stack(vectors) if vectors else None
        lams = torch.tensor(values, dtype=torch.float64)
        lam_prev: float | None = None
        lam = 0.0
        converged = False
        it = 0
        for step in range(1, max_iter + 1):
            it = step
            w = matvec(v.to(op_dtype)).to(torch.float64)
            n += 1
            if basis is not None:
                w -= basis.T @ (lams * (basis @ v))
            lam = float(v @ w)
            v = w / w.norm()
            if lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam):
                converged = True
                break
            lam_prev = lam
            if time.perf_counter() > deadline:
                break
        values.append(lam)
        vectors.append(v)
        iterations.append(it)
        if not converged:
            finished = False
            if time.perf_counter() > deadline:
                break
    order = torch.argsort(torch.tensor(values, dtype=torch.float64), descending=True)
    vals = torch.tensor(values, dtype=torch.float64)[order]
    vecs = torch.stack(vectors, dim=1)[:, order]
    return PowerResult(vals, vecs, n, iterations, finished and len(values) == k)


def _rel_err(values: torch.Tensor, ref: torch.Tensor) -> float:
    """Max relative error of the sorted top values against the reference (inf if too few)."""
    k = ref.numel()
    if values.numel() < k:
        return float("inf")
    top = torch.sort(values.to(torch.float64), descending=True).values[:k]
    return float(((top - ref).abs() / ref.abs()).max())


def _overlap(vectors: torch.Tensor, ref_vectors: torch.Tensor) -> float:
    """``||Q_ref^T Q||_F^2 / k``: 1 when the two top-k subspaces coincide."""
    k = ref_vectors.shape[1]
    if vectors.shape[1] < k:
        return float("nan")
    q, _ = torch.linalg.qr(vectors[:, :k].to(torch.float64))
    return float((ref_vectors.to(torch.float64).T @ q).pow(2).sum() / k)


def _stage_setup(state_path: Path) -> tuple[dict[str, Any], FunctionalLM, LMBatch]:
    state = torch.load(state_path, weights_only=False)
    cfg = BenchConfig(**state["cfg"])
    model = build_model(cfg, state["seed"])
    model.load_state_dict(state["model"])
    model.eval()
    batch = LMBatch(*state["batch"])
    flm = FunctionalLM(model, select_params(model, cfg.eig_patterns))
    return state, flm, batch


def run_stage(stage: str, state_path: Path) -> dict[str, Any]:
    """One eigen method with its tolerance ladder, in this (fresh) process."""
    state, flm, batch = _stage_setup(state_path)
    cfg = BenchConfig(**state["cfg"])
    k, dim, seed = cfg.k, flm.dim, state["seed"]
    ref_vals = state.get("ref_values")
    ref_vecs = torch.load(state["ref_vectors"]) if stage != "reference" else None
    tries: list[dict[str, Any]] = []

    def record(res_vals: torch.Tensor, res_vecs: torch.Tensor, extra: dict[str, Any]) -> float:
        err = float("nan") if ref_vals is None else _rel_err(res_vals, ref_vals)
        ov = float("nan") if ref_vecs is None else _overlap(res_vecs, ref_vecs)
        tries.append({**extra, "max_rel_err": err, "overlap": ov})
        return err

    if stage == "reference":
        op = FisherOperator(flm, batch)
        mv = TimedMatVec(op)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = lanczos_eigs(
                mv,
                k,
                tol=1e-10,
                max_iter=cfg.ref_max_iter,
                seed=seed + 1000,
                # a float64 basis for the reference: float32 cannot reach tol=1e-10
                basis_dtype=torch.float64,
            )
            secs = time.perf_counter() - t0
        torch.save(res.vectors, state["ref_vectors"])
        res_max = float(res.residuals.max()) if res.residuals is not None else float("nan")
        tries.append(
            {
                "tol": 1e-10,
                "seconds": secs,
                "products": res.n_products,
                "matvec_s": mv.seconds,
                "peak_rss": mem.peak,
                "stored_bytes": (res.n_products + 1) * dim * 8,
                "values": res.values.tolist(),
                "max_residual": res_max,
                # |lambda - theta| <= residual for a symmetric operator (Ritz pair bound)
                "err_bound": res_max / float(res.values[-1]),
            }
        )
    elif stage == "lanczos":
        for tol in cfg.lanczos_tols:
            op = FisherOperator(flm, batch)
            mv = TimedMatVec(op)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                res = lanczos_eigs(mv, k, tol=tol, max_iter=cfg.ref_max_iter, seed=seed)
                secs = time.perf_counter() - t0
            err = record(
                res.values,
                res.vectors,
                {
                    "tol": tol,
                    "seconds": secs,
                    "products": res.n_products,
                    "matvec_s": mv.seconds,
                    "peak_rss": mem.peak,
                    "stored_bytes": (res.n_products + 1) * dim * 4,  # float32 basis
                },
            )
            del op, res
            if err <= TARGET_REL_ERR:
                break
    elif stage == "power":
        budget_end = time.perf_counter() + state["power_budget_s"]
        for tol in cfg.power_tols:
            op = FisherOperator(flm, batch)
            mv = TimedMatVec(op)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                deadline = min(budget_end, t0 + state["power_try_cap_s"])
                res = deflated_power(
                    mv,
                    dim,
                    k,
                    tol=tol,
                    max_iter=cfg.power_max_iter,
                    deadline=deadline,
                    seed=seed,
                    op_dtype=flm.dtype,
                )
                secs = time.perf_counter() - t0
            err = record(
                res.values,
                res.vectors,
                {
                    "tol": tol,
                    "seconds": secs,
                    "products": res.n_products,
                    "matvec_s": mv.seconds,
                    "peak_rss": mem.peak,
                    "stored_bytes": (k + 2) * dim * 8,
                    "finished": res.finished,
                    "iterations": res.iterations,
                },
            )
            del op, res
            if err <= TARGET_REL_ERR or time.perf_counter() >= deadline:
                break
    elif stage == "gram":
        for s in cfg.gram_samples:
            op = FisherOperator(flm, batch)
            n_rows = batch.size * s
            if n_rows < k:
                continue
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                rows = op.mc_factor_rows(s, generator=torch.Generator().manual_seed(seed))
                t_rows = time.perf_counter() - t0
                res = gram_eigs(rows, k)
                secs = time.perf_counter() - t0
            err = record(
                res.values,
                res.vectors,
                {
                    "samples_per_example": s,
                    "rows": n_rows,
                    "seconds": secs,
                    "rows_s": t_rows,
                    "products": 0,
                    "peak_rss": mem.peak,
                    "stored_bytes": n_rows * dim * (4 + 8),
                },
            )
            del op, res, rows
            if err <= TARGET_REL_ERR:
                break
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return {"stage": stage, "dim": dim, "tries": tries}


def spawn_stage(stage: str, state_path: Path, threads: int) -> dict[str, Any]:
    """Run one eigen stage in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--stage",
        stage,
        "--state",
        str(state_path),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"eigen stage {stage!r} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chosen(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The first (loosest) try that met the accuracy target.

    When none did, the last (tightest, most expensive) try, whose time is then a lower bound on
    what the method needs; ``best_err`` is the smallest error any try reached.
    """
    best_err = min(t["max_rel_err"] for t in tries)
    for t in tries:
        if t["max_rel_err"] <= TARGET_REL_ERR:
            return {**t, "reached": True, "best_err": best_err}
    return {**tries[-1], "reached": False, "best_err": best_err}


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    """Parse flags; run a single eigen stage (internal) or the whole benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small model, fast smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.state)))
        return
    run_all(args.seed, args.quick, args.threads)


def run_all(seed: int, quick: bool, threads: int) -> None:
    """The whole benchmark: print tables, then the JSON headline as the last line."""
    t_start = time.perf_counter()
    cfg = quick_config() if quick else full_config()
    info = machine_info(threads)
    print("alignscope curvature benchmark" + (" (--quick)" if quick else ""))
    for key, val in info.items():
        print(f"  {key:14s} {val}")

    model = build_model(cfg, seed)
    batch = build_batch(cfg, seed)
    n_params = sum(p.numel() for p in model.parameters())
    before, after = align(model, batch, cfg.align_steps, cfg.align_lr)
    print(
        f"\nmodel: LlamaForCausalLM float32 eager, {n_params / 1e6:.2f} M params (hidden "
        f"{cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab}); batch {batch.size} pairs x "
        f"{batch.input_ids.shape[1]} tokens ({int(batch.target_mask.sum())} response positions)"
    )
    print(
        f"'aligned' by {cfg.align_steps} Adam steps on the batch: mean response NLL "
        f"{before:.3f} -> {after:.3f}"
    )

    # 1. products
    prod = bench_products(model, batch, cfg)
    med = prod["median_s"]
    g = med["gradient (torch.func.grad)"]
    g_ag = med["gradient (autograd.grad)"]
    rows = []
    for name, t in med.items():
        spread = f"{min(prod['all_s'][name]) * 1e3:.0f}-{max(prod['all_s'][name]) * 1e3:.0f}"
        rows.append([name, fmt_s(t), spread, f"{t / g:.2f}x", f"{t / g_ag:.2f}x"])
    print_table(
        f"1. products, all {prod['P']:,} parameters, median of {cfg.repeats} interleaved repeats "
        "after a warm-up",
        ["operation", "median", "range ms", "/ grad(func)", "/ grad(autograd)"],
        rows,
    )
    r_fwd = med["HVP forward-over-reverse"] / g
    r_rev = med["HVP double backward"] / g
    r_fis = med["Fisher matvec (cached vjp)"] / g
    print(f"  forward vs double-backward HVP agree to {prod['hvp_mode_rel_diff']:.1e} (rel. norm)")
    hvp_best = min(r_fwd, r_rev)

    # 2. per-sample gradients
    psg = bench_per_sample(model, batch, cfg)
    pm = psg["median_s"]
    print_table(
        f"2. per-sample gradients, N={psg['N']} x P={psg['P']:,} (all parameters, "
        f"{psg['N'] * psg['P'] * 4 / 2**20:.0f} MiB output), median of {cfg.psg_repeats}, "
        "no warm-up",
        ["method", "median", "/ one batch gradient"],
        [[m, fmt_s(t), f"{t / g:.2f}x"] for m, t in pm.items()],
    )
    psg_speedup = pm["loop"] / pm["vmap"]
    print(
        f"  vmap speed-up over loop: {psg_speedup:.2f}x; max |vmap - loop| = "
        f"{psg['max_abs_diff']:.1e} (max |g| = {psg['max_abs']:.1e})"
    )

    # 3 + 4. eigen methods in subprocesses
    eig = run_eigen(model, batch, cfg, seed, threads)

    # targets and headline
    hvp_pass = hvp_best <= HVP_TARGET
    lz, pw, gr, ref = eig["lanczos"], eig["power"], eig["gram"], eig["reference"]
    speedup = pw["seconds"] / lz["seconds"]
    speed_is_bound = not pw["reached"]  # power never got there: the ratio is a lower bound
    if pw["reached"]:
        eig_pass: bool | None = speedup >= EIG_SPEEDUP_TARGET
    else:
        eig_pass = True if speedup >= EIG_SPEEDUP_TARGET else None
    print("\ntargets")
    for name, r in (("forward-over-reverse", r_fwd), ("double backward", r_rev)):
        verdict = "PASS" if r <= HVP_TARGET else "FAIL"
        print(f"  HVP ({name}) <= {HVP_TARGET:g}x gradient: {r:.2f}x  {verdict}")
    sp = (">= " if speed_is_bound else "") + f"{speedup:.1f}x"
    verdict = {True: "PASS", False: "FAIL", None: "UNDECIDED (power budget ran out)"}[eig_pass]
    print(
        f"  top-{cfg.k} Lanczos >= {EIG_SPEEDUP_TARGET:g}x faster than deflated power "
        f"(both at max rel. err <= {TARGET_REL_ERR:g}): {sp}  {verdict}"
    )
    total = time.perf_counter() - t_start
    print(
        f"\ntotal wall time {total:.0f} s; load average at end "
        f"{[round(x, 2) for x in os.getloadavg()]}"
    )
    headline = {
        "seed": seed,
        "quick": quick,
        "threads": threads,
        "n_params": n_params,
        "grad_s": round(g, 4),
        "hvp_forward_over_grad": round(r_fwd, 3),
        "hvp_reverse_over_grad": round(r_rev, 3),
        "fisher_matvec_over_grad": round(r_fis, 3),
        "hvp_target_pass": hvp_pass,
        "psg_vmap_s": round(pm["vmap"], 4),
        "psg_loop_s": round(pm["loop"], 4),
        "psg_vmap_speedup": round(psg_speedup, 3),
        "eig_dim": eig["dim"],
        "eig_k": cfg.k,
        "reference_s": round(ref["seconds"], 2),
        "reference_products": ref["products"],
        "lanczos_s": round(lz["seconds"], 3),
        "lanczos_products": lz["products"],
        "lanczos_max_rel_err": lz["max_rel_err"],
        "lanczos_matvec_fraction": round(lz["matvec_s"] / lz["seconds"], 3),
        "power_s": round(pw["seconds"], 3),
        "power_products": pw["products"],
        "power_max_rel_err": pw["max_rel_err"],
        "power_reached": pw["reached"],
        "power_tol": pw["tol"],
        "gram_s": round(gr["seconds"], 3),
        "gram_samples_per_example": gr["samples_per_example"],
        "gram_max_rel_err": gr["max_rel_err"],
        "gram_reached": gr["reached"],
        "lanczos_vs_power_speedup": round(speedup, 2),
        "lanczos_vs_power_speedup_is_lower_bound": speed_is_bound,
        "lanczos_vs_power_product_ratio": round(pw["products"] / max(1, lz["products"]), 2),
        "eig_target_pass": eig_pass,
        "peak_rss_bytes": {m: eig[m]["peak_rss"] for m in ("lanczos", "power", "gram")},
        "total_s": round(total, 1),
    }
    print(json.dumps(_json_safe(headline), allow_nan=False))


def _json_safe(obj: Any) -> Any:
    """Strict JSON: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run_eigen(
    model: torch.nn.Module, batch: LMBatch, cfg: BenchConfig, seed: int, threads: int
) -> dict[str, Any]:
    """Section 3/4: the reference, then Lanczos, power and Gram, each in its own subprocess."""
    with tempfile.TemporaryDirectory(prefix="alignscope-bench-") as tmp:
        state_path = Path(tmp) / "state.pt"
        state: dict[str, Any] = {
            "cfg": asdict(cfg),
            "seed": seed,
            "model": model.state_dict(),
            "batch": (batch.input_ids, batch.response_mask, batch.lengths),
            "ref_vectors": str(Path(tmp) / "ref_vectors.pt"),
            "power_budget_s": cfg.power_budget_s,
            "power_try_cap_s": cfg.power_budget_s,
        }
        torch.save(state, state_path)
        out = spawn_stage("reference", state_path, threads)
        ref = out["tries"][0]
        state["ref_values"] = torch.tensor(ref["values"], dtype=torch.float64)
        torch.save(state, state_path)
        lz_all = spawn_stage("lanczos", state_path, threads)["tries"]
        lz = chosen(lz_all)
        # A power try is cut off once it has taken 10.5x the matched Lanczos time: by then the
        # >= 10x question is settled whatever happens next, and the run stays bounded.
        state["power_try_cap_s"] = max(10.5 * lz["seconds"], 1.0)
        torch.save(state, state_path)
        pw_all = spawn_stage("power", state_path, threads)["tries"]
        gr_all = spawn_stage("gram", state_path, threads)["tries"]
    pw, gr = chosen(pw_all), chosen(gr_all)

    vals = ref["values"]
    print(
        f"\n3. top-{cfg.k} Fisher eigenpairs, exact F-products on the batch; parameter subset "
        f"{cfg.eig_patterns} (P = {out['dim']:,})"
    )
    print(
        f"  reference: Lanczos tol=1e-10, {ref['products']} products, {ref['seconds']:.1f} s "
        f"(not counted below); max residual {ref['max_residual']:.1e} -> eigenvalue rel. error "
        f"<= {ref['err_bound']:.1e}"
    )
    print(
        f"  spectrum: l1={vals[0]:.4g}, l2={vals[1]:.4g}, l{cfg.k}={vals[-1]:.4g}, "
        f"l1/l{cfg.k}={vals[0] / vals[-1]:.2f}; min relative gap among top-{cfg.k}: "
        f"{min((a - b) / a for a, b in zip(vals, vals[1:], strict=False)):.1e}"
    )
    rows = []
    for name, tries in (("Lanczos", lz_all), ("deflated power", pw_all), ("Gram (MC)", gr_all)):
        for t in tries:
            setting = (
                f"S={t['samples_per_example']} (K={t['rows']})"
                if "rows" in t
                else (f"tol={t['tol']:g}")
            )
            mark = " *" if t["max_rel_err"] <= TARGET_REL_ERR else ""
            if name == "deflated power" and not t.get("finished", True):
                mark += " (cut off)"
            in_mv = t.get("matvec_s")
            rows.append(
                [
                    name,
                    setting,
                    fmt_s(t["seconds"]),
                    t["products"],
                    "-" if in_mv is None else f"{100 * in_mv / t['seconds']:.0f}%",
                    f"{t['max_rel_err']:.1e}{mark}",
                    f"{t['overlap']:.3f}",
                    fmt_bytes(t["peak_rss"]),
                    fmt_bytes(t["stored_bytes"]),
                ]
            )
    print_table(
        "  tolerance ladders (loosest first; * = max rel. eigenvalue error <= 1e-3)",
        [
            "method",
            "setting",
            "time",
            "F-products",
            "in F-prod",
            "max rel err",
            "subspace ovl",
            "peak RSS +",
            "stored vecs",
        ],
        rows,
    )
    print(
        "  peak RSS + = growth of the subprocess's resident set during that run (Linux VmHWM reset "
        "before it, after gc + malloc_trim; includes the cached vjp graph, torch workspaces). "
        "stored vecs = theoretical bytes of the vectors the method keeps (Lanczos float32 basis, "
        "power's k float64 vectors + 2 work, Gram's float32 rows + their float64 copy). "
        "subspace ovl = ||V_ref^T Q||_F^2 / k of the top-k subspaces (1 = identical; "
        "sensitive to near-ties at l_k)."
    )
    if not gr["reached"]:
        need = gr["samples_per_example"] * (gr["max_rel_err"] / TARGET_REL_ERR) ** 2
        print(
            f"  Gram route did not reach {TARGET_REL_ERR:g}: {gr['max_rel_err']:.1e} at "
            f"S={gr['samples_per_example']} samples/example; a 1/sqrt(S) extrapolation would "
            f"need S ~ {need:,.0f} ({need * batch.size * out['dim'] * 4 / 2**30:,.0f} GiB of rows)"
        )
    if not pw["reached"]:
        print(
            f"  deflated power did not reach {TARGET_REL_ERR:g} (best {pw['best_err']:.1e}); "
            "its time is a lower bound"
        )
    return {"dim": out["dim"], "reference": ref, "lanczos": lz, "power": pw, "gram": gr}


if __name__ == "__main__":
    main()
