"""Workers of the two-process (gloo) tests of data-parallel diagnose, verify, rank and finetune
(tests/test_distributed.py): each spawned process joins the group, runs a command and writes
what it returned as JSON for the parent to compare with a single-process run."""

from __future__ import annotations

import json
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A free localhost port for the rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker: Callable, *args: Any, nprocs: int = 2, timeout: float = 600) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` processes of one gloo group; fail (killing
    them) if they have not all ended after ``timeout`` seconds: a hang is a failure."""
    ctx = mp.spawn(_entry, args=(free_port(), nprocs, worker, args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {nprocs} processes did not end within {timeout} s")


def _entry(rank: int, port: int, size: int, worker: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    try:
        worker(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def diagnose_summary(res) -> dict[str, Any]:
    """What a 2-process diagnosis must share with the 1-process one."""
    return {
        "eigenvalues": res.subspace.values.tolist(),
        "vectors": res.subspace.vectors.tolist(),
        "trace": res.subspace.trace,
        "d": res.d,
        "aic": res.aic_step.to_dict(),
        "noise_trace": res.noise_trace,
        "dL": res.forecast.to_dict()["dL"],
        "losses": res.losses_at_theta0,
        "refusal_rate": res.alignment.refusal_rate,
        "responses": [r["response"] for r in res.alignment.responses],
        "timings": res.timings,
    }


def diagnose_worker(rank: int, options: dict, out: str) -> None:
    from alignscope.commands.diagnose import DiagnoseConfig, run_diagnose

    res = run_diagnose(DiagnoseConfig.from_options(**options), quiet=True)
    Path(out, f"diagnose{rank}.json").write_text(json.dumps(diagnose_summary(res)))


def cli_worker(rank: int, argv: list[str], out: str, fail_rank: int | None) -> None:
    """The command line in each process (``{rank}`` in ``argv`` replaced by the rank);
    ``fail_rank`` raises a ValueError on that rank in the middle of the fine-tuning gradients."""
    from typer.testing import CliRunner

    from alignscope.cli import app

    if fail_rank == rank:
        import alignscope.commands.diagnose as diagnose

        def broken(*args, **kwargs):
            raise ValueError(f"injected failure on rank {rank}")

        diagnose.finetune_gradient = broken
    try:
        argv = [a.format(rank=rank) for a in argv]
        result = CliRunner().invoke(app, argv, catch_exceptions=True)
        info = {"exit_code": result.exit_code, "output": result.output}
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            info["exception"] = "".join(traceback.format_exception(result.exception))
    except BaseException as err:  # noqa: BLE001 - recorded for the parent
        info = {"exit_code": None, "output": repr(err)}
    Path(out, f"cli{rank}.json").write_text(json.dumps(info))


def verify_summary(res) -> dict[str, Any]:
    """What a 2-process verify must share with the 1-process one."""
    keep = ("step", "minibatch_loss", "kl", "refusal_nll", "finetune_loss", "displacement",
            "subspace_fraction", "refusal_rate")  # fmt: skip
    return {
        "trajectory": [{k: r.get(k) for k in keep} for r in res.trajectory],
        "eigenvalues": res.diagnosis.subspace.values.tolist(),
        "dL": res.diagnosis.forecast.to_dict()["dL"],
    }


def verify_worker(rank: int, options: dict, out: str) -> None:
    """verify with checkpoints, then again on the same partial folder: the second run takes the
    stored diagnosis and resumes from the last checkpoint (rank 0 reads both and hands them to
    the others)."""
    from alignscope.commands.verify import VerifyConfig, run_verify

    cfg = VerifyConfig.from_options(**options)
    first = run_verify(cfg, quiet=True, partial_dir=Path(out, "partial"))
    again = run_verify(cfg, quiet=True, partial_dir=Path(out, "partial"))
    info = {**verify_summary(first), "again": verify_summary(again),
            "resumed_from": again.resumed_from}  # fmt: skip
    Path(out, f"verify{rank}.json").write_text(json.dumps(info))


def rank_summary(res) -> dict[str, Any]:
    """What a 2-process rank must share with the 1-process one."""
    out = res.to_json()
    values = {
        c["label"]: {name: p["value"] for name, p in c["predictors"].items()}
        for c in out["candidates"]
    }
    return {"ranking": out["ranking"], "values": values}


def rank_worker(rank: int, options: dict, out: str) -> None:
    from alignscope.commands.rank import RankConfig, run_rank

    res = run_rank(RankConfig.from_options(**options), quiet=True)
    Path(out, f"rank{rank}.json").write_text(json.dumps(rank_summary(res)))


def parity_worker(
    rank: int, argv: list[str], verify_options: dict, rank_options: dict, out: str
) -> None:
    """diagnose on the command line, then verify and rank from the Python API, in one group."""
    cli_worker(rank, argv, out, None)
    verify_worker(rank, verify_options, out)
    rank_worker(rank, rank_options, out)


def finetune_summary(res) -> dict[str, Any]:
    """What a 2-process guarded finetune must share with the 1-process one: per-step losses
    and guard signals, the tracked measurements, the guard's record, the trained weights."""
    from alignscope.config import STEP_CLOCKS

    steps = [{k: v for k, v in s.items() if k not in STEP_CLOCKS} for s in res.steps]
    keep = ("step", "minibatch_loss", "kl", "refusal_nll", "displacement", "refusal_rate")
    trained = {n: p.detach().reshape(-1).tolist() for n, p in res.model.named_parameters()
               if p.requires_grad}  # fmt: skip
    return {
        "steps": steps,
        "trajectory": [{k: r.get(k) for k in keep} for r in res.trajectory],
        "record": res.guard["record"],
        "weights": trained,
    }


def finetune_worker(rank: int, argv: list[str], runs: list[dict], out: str) -> None:
    """finetune on the command line (``argv``), then from the Python API (each of ``runs``)."""
    from alignscope.commands.finetune import FinetuneConfig, run_finetune

    cli_worker(rank, argv, out, None)
    for i, options in enumerate(runs):
        res = run_finetune(FinetuneConfig.from_options(**options), quiet=True)
        Path(out, f"finetune{rank}_{i}.json").write_text(json.dumps(finetune_summary(res)))
