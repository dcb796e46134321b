"""Run one small diagnosis and print its memory estimate and the peak RSS it added (JSON).

Run as a script in a fresh process (tests/test_memory.py) so that nothing else the test session
allocated counts: ``python _memory_probe.py <work dir>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _hf_models import make_datasets, make_model, make_tokenizer  # noqa: E402
from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    # "5" resets the process' peak RSS (VmHWM) to its current RSS (Linux >= 4.0), so the peak
    # read afterwards is this diagnosis' own, not the warm-up's
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def main(root: Path) -> None:
    torch.set_num_threads(1)
    tok = make_tokenizer()
    safety, data = make_datasets(root)
    cfg = DiagnoseConfig.from_options(
        model="tiny", safety=str(safety), data=str(data), rank=4, max_safety=8, max_data=16,
        noise_examples=4, steps=20, max_new_tokens=8, threads=1, memory_budget_gb=0.03,
        solver="lanczos",
    )  # fmt: skip
    # A first diagnosis of a far smaller model loads every lazy import and warms the allocator,
    # so the measured one adds only its own working set.
    run_diagnose(cfg, model=make_model("llama", tok, hidden=8), tokenizer=tok, quiet=True)
    model = make_model("llama", tok, hidden=96)  # ~0.23 M parameters
    _reset_peak()
    start = _status("VmRSS")
    result = run_diagnose(cfg, model=model, tokenizer=tok, quiet=True)
    peak = _status("VmHWM")
    memory = result.memory
    print(json.dumps({
        "n_params": result.parameters.n_params,
        "estimate_still_needed": memory["total"] - memory["weights"],
        "measured_growth": peak - start,
        "memory": memory,
    }))  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
