"""How much memory a diagnosis will need, printed before the work starts.

The estimate adds what stays resident: the weights, the KL reference (the softmax over the
vocabulary at the response positions of the safety set: one Fisher chunk's worth, recomputed per
product, or every position's when stored as a table), the eigensolver's working set (from
:func:`~alignscope.curvature.spectrum.plan_spectrum`, which also picks Lanczos or the Gram route
from the budget), the trace estimator's float64 blocks and the per-sample-gradient chunk, which
is sized to the budget. When the eigensolver cannot fit the budget, or the total cannot fit the
memory the machine has free, the error lists the options that would fit, each with its own
estimate.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch

from alignscope.config import CurvatureSpec, DataSpec, ModelSpec
from alignscope.curvature.spectrum import SpectrumPlan, block_dims, plan_spectrum
from alignscope.curvature.trace import deflated_bytes, hutchpp_bytes
from alignscope.models import vocab_size
from alignscope.params import select_params

GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each part of a diagnosis keeps resident, and the eigensolver plan."""

    weights: int
    kl_reference: int
    eigensolver: int
    gradient_chunks: int
    plan: SpectrumPlan | None
    available: int | None
    trace: int = 0  # tr F: the deflated estimator's probes, or Hutch++'s blocks

    @property
    def total(self) -> int:
        # The trace estimate runs while the eigensolver's Krylov basis is still held (it deflates
        # by it); after a route without one (Gram, block-wise) the allocator keeps the basis's
        # pages anyway, the measured peak close to their sum: count both.
        return (
            self.weights + self.kl_reference + self.eigensolver + self.trace + self.gradient_chunks
        )

    @property
    def still_needed(self) -> int:
        """What the work adds once the model is loaded (``available`` already excludes it)."""
        return self.total - self.weights

    def describe(self) -> str:
        parts = [
            f"weights {self.weights / GiB:.2f}",
            f"KL reference {self.kl_reference / GiB:.2f}",
            f"eigensolver {self.eigensolver / GiB:.2f}",
            f"trace {self.trace / GiB:.2f}",
            f"gradient chunks <= {self.gradient_chunks / GiB:.2f}",
        ]
        free = "" if self.available is None else f" ({self.available / GiB:.1f} GiB available)"
        plan = f"; {self.plan.describe()}" if self.plan is not None else ""
        return f"memory estimate ~{self.total / GiB:.2f} GiB{free} ({', '.join(parts)} GiB){plan}"

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "plan"}
        out["total"] = self.total
        out["plan"] = self.plan.describe() if self.plan is not None else None
        return out


def available_memory(device: torch.device) -> int | None:
    """Bytes still available on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable`` of
    /proc/meminfo, which counts reclaimable page cache, else the free physical pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform exposes these
        return None


def fisher_chunk_examples(model: torch.nn.Module, seq_len: int, n: int, budget: int) -> int:
    """Examples per Fisher product chunk (of ``n``, sequences of ``seq_len`` tokens): the cached
    graph holds a few ``T x V`` logit-sized tensors per example (logits, log-softmax, tangents),
    so the budget is spent on ~8 of them; bigger chunks are faster."""
    per_example = 8 * seq_len * vocab_size(model) * 4
    return int(max(1, min(n, budget // per_example)))


# Bytes a gradient graph built for double backward holds per token and per (layer x hidden):
# 12 GB for 1,568 tokens through SmolLM2's 30 layers of 576 (measured, exact vocabulary), ~110
# floats; rounded up.
HVP_GRAPH_FLOATS = 128


def hvp_chunk_examples(model: torch.nn.Module, seq_len: int, budget: int) -> int:
    """Examples per Hessian-vector-product chunk (at least one): each keeps a double-backward
    graph of ~:data:`HVP_GRAPH_FLOATS` floats per token, layer and hidden unit."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or 1
    hidden = getattr(config, "hidden_size", None) or 1024
    per_token = HVP_GRAPH_FLOATS * layers * hidden * 4
    return max(1, budget // max(1, per_token * seq_len))


def _lora_size(model: torch.nn.Module, r: int) -> int:
    """Scalars of an r-rank LoRA on every linear layer but the output head (peft 'all-linear')."""
    total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or name.endswith(("lm_head", "embed_tokens", "wte")):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            total += r * sum(weight.shape)
    return total


def estimate_memory(
    spec: ModelSpec,
    curvature: CurvatureSpec,
    data: DataSpec,
    model: torch.nn.Module,
    selection,
    n_safety: int,
    *,
    check_available: bool = True,
    eigensolver: bool = True,
    kl_reference: str = "recompute",
) -> MemoryEstimate:
    """The estimate for a diagnosis of ``model`` (loaded as ``spec`` says) with ``selection``,
    the subspace as ``curvature`` says and generated responses of ``data.max_new_tokens``;
    raises :class:`MemoryError` naming the options that would fit when it cannot.
    ``eigensolver=False``: the subspace is reused from an earlier diagnosis, so no eigensolver
    runs. ``kl_reference``: the Fisher's ``reference`` (``"recompute"``, diagnose's choice, or
    ``"table"``)."""
    budget = int(curvature.memory_budget_gb * GiB)
    itemsize = 8 if spec.dtype == "float64" else 4  # curvature runs in at least float32
    k = curvature.eigenpairs
    n_rows = n_safety * curvature.samples_per_prompt
    vocab = vocab_size(model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if any(p.dtype != torch.float32 and p.dtype != torch.float64 for p in model.parameters()):
        weights += sum(p.numel() * itemsize for p in model.parameters())  # float32 copy
    if kl_reference == "table":
        held = n_safety
    else:
        # Recomputed: one Fisher chunk's softmax at a time (the response length standing in for
        # the sequence length errs high).
        held = fisher_chunk_examples(model, data.max_new_tokens, n_safety, budget)
    reference = held * data.max_new_tokens * vocab * itemsize

    def plan(dim: int, rank: int, dims=None, method: str = curvature.solver) -> SpectrumPlan:
        return plan_spectrum(
            dim, rank, n_rows, method=method, memory_budget=budget, itemsize=itemsize,
            blockwise=dims is not None, block_dims=dims, block_size=curvature.lanczos_block,
        )  # fmt: skip

    sp = None
    if eigensolver and curvature.fisher == "ggn":
        try:
            sp = plan(selection.size, k, block_dims(selection) if curvature.group else None)
        except MemoryError:
            advice = _advice(spec, curvature, model, selection, plan, k, budget)
            raise MemoryError(advice) from None
    est = MemoryEstimate(
        weights=weights,
        kl_reference=reference,
        eigensolver=(
            0
            if not eigensolver
            else sp.bytes_needed
            if sp is not None
            else n_rows * selection.size * itemsize  # the empirical Fisher's rows
        ),  # fmt: skip
        gradient_chunks=budget,
        plan=sp,
        available=available_memory(next(model.parameters()).device),
        trace=(
            0
            if sp is None
            else deflated_bytes(selection.size)
            if sp.keeps_basis
            else hutchpp_bytes(selection.size)
        ),  # fmt: skip
    )
    if check_available and est.available is not None and est.still_needed > est.available:
        raise MemoryError(
            f"{est.describe()}: the work adds ~{est.still_needed / GiB:.2f} GiB to the loaded "
            f"model, more than the {est.available / GiB:.2f} GiB still available. Lower "
            f"--memory-gb (gradient "
            f"chunks and the eigensolver use it), --max-safety (the KL reference holds "
            f"{held} of {n_safety} prompts x "
            f"{data.max_new_tokens} tokens x {vocab:,} vocabulary at once), or "
            "analyse fewer parameters (--params, --lora-r)"
        )
    return est


def _advice(spec: ModelSpec, curvature: CurvatureSpec, model, selection, plan, k: int,
            budget: int) -> str:  # fmt: skip
    """What the eigensolver needs, and which options would fit the budget."""
    fits: list[str] = []

    def trial(label: str, dim: int, rank: int, dims=None) -> None:
        try:
            p = plan(dim, rank, dims)
        except MemoryError:
            return
        fits.append(f"{label} (~{p.bytes_needed / GiB:.2f} GiB, {p.method})")

    dims = block_dims(selection) if curvature.group else None  # the requested grouping, if any
    if curvature.group is None:
        layered = select_params(model, curvature.param_spec(spec), group="layer")
        trial("--group layer", selection.size, k, block_dims(layered))
    for rank in (10, 5):
        if rank < k:
            trial(f"--rank {rank}", selection.size, rank, dims)
    if not spec.uses_adapter:
        for r in (16, 8):
            trial(f"--lora-r {r}", _lora_size(model, r), k)
    # a forced method never raises: it reports what it would need
    need = min(plan(selection.size, k, dims, m).bytes_needed for m in ("lanczos", "gram")) / GiB
    gb = math.ceil(need * 1.1 * 10) / 10
    options = "; ".join(fits) if fits else "none of --group layer, --rank 10/5, --lora-r 16/8"
    return (
        f"the top-{k} Fisher eigenpairs over {selection.size:,} parameters need ~{need:.2f} "
        f"GiB, over the --memory-gb budget of {budget / GiB:.2f} GiB. Options that fit: {options}. "
        f"Or raise the budget to --memory-gb {gb:g} if the machine has that much free."
    )
