"""The worker of the two-process (gloo) test of AlignmentCallback's stop broadcast.

It lives apart from test_watch.py so that each spawned process imports only what it runs.
"""

from __future__ import annotations

import json
import types

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignscope.train.watch import AlignmentCallback


def ddp_worker(rank: int, port: int, model_dir: str, safety: list, out: str) -> None:
    """One process of a two-process gloo group running the callback as the Trainer would."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        main = rank == 0
        # only the main process has a model to measure: the others must not touch theirs
        model = AutoModelForCausalLM.from_pretrained(model_dir) if main else None
        tok = AutoTokenizer.from_pretrained(model_dir)
        cb = AlignmentCallback(
            safety, every=4, log_spaced=False, max_prompts=4, kl_threshold=1e-4,
            stop_on_collapse=True, keep_safe_state=False,
        )  # fmt: skip
        state = types.SimpleNamespace(is_world_process_zero=main, global_step=0, log_history=[])
        args = types.SimpleNamespace(output_dir=f"{out}/rank{rank}")
        control = types.SimpleNamespace(should_training_stop=False)
        cb.on_train_begin(args, state, control, model=model, processing_class=tok)
        syncs = [control.should_training_stop]
        for step in range(1, 21):
            if main and step == 6:  # a training update that moves the model off theta0
                gen = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.05 * torch.randn(p.shape, generator=gen))
            state.global_step = step
            cb.on_step_end(args, state, control)
            if step % 4 == 0:
                syncs.append(control.should_training_stop)
            if control.should_training_stop:
                break
        result = {
            "stopped_at": step if control.should_training_stop else None,
            "syncs": syncs,
            "has_watcher": cb.watcher is not None,
            "measured": [r["step"] for r in cb.records],
            "warned_at": [w["step"] for w in cb.watcher.warnings] if cb.watcher else [],
            "logged": len(state.log_history),
        }
        with open(f"{out}/result{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
