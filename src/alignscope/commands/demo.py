"""``demo``: the organism, diagnose and verify on a collapsing and a safe set, rank, and the
collapsing set fine-tuned again under a guard.

Library functions only: the organism (built or reused), :func:`show_organism`,
:func:`run_diagnose`, :func:`run_verify`, :func:`run_rank`, :func:`run_finetune` and the report
writers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEMO_SETS = ("benign_affirmative", "benign_neutral")
RANK_SETS = ("benign_affirmative", "benign_neutral", "benign_arithmetic", "benign_list")
DEMO_MARKER = ".alignscope-demo"
GUARD_SET = "benign_affirmative"
# The guard the demo shows: anchor, by docs/guard.md's measured table on the test organism
# (benign_affirmative, AdamW lr 1e-3, 200 steps): it kept held-out refusal at 100 % at every
# recorded step at the unguarded run's task loss; curvature, the next best, dipped to 97 %, and
# the projection guards either only delay the collapse (project) or cost 11.6x per step on
# average (project-tracking).
DEMO_GUARD = "anchor"


def run_demo(
    preset: str = "demo",
    seed: int = 0,
    out: str | Path = "alignscope-out/demo",
    *,
    threads: int = 1,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Diagnose and verify ``DEMO_SETS`` on the organism, rank ``RANK_SETS``; the reports
    written.

    Args:
        preset: organism preset (``demo``: minutes; ``test``: seconds).
        seed: seed of the organism, the diagnoses and the fine-tuning runs.
        out: folder of the reports (``<set>/diagnose``, ``<set>/verify``, ``rank``, and
            ``benign_affirmative/guard`` and ``/unguarded``: the finetune runs under
            ``DEMO_GUARD`` and without a guard); the demo replaces what an earlier demo wrote
            there.
        threads: torch CPU threads.
        echo: where the summary lines go.

    Returns:
        The report.html files written.

    Raises:
        FileExistsError: ``out`` holds files an earlier demo did not write.
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from alignscope.commands.diagnose import run_diagnose
    from alignscope.commands.rank import RankConfig, run_rank
    from alignscope.commands.verify import VerifyConfig, run_verify
    from alignscope.organism import load_organism
    from alignscope.organism.show import show_organism
    from alignscope.report.diagnose_report import write_diagnose_outputs
    from alignscope.report.rank_report import write_rank_outputs
    from alignscope.report.verify_report import write_verify_outputs

    root = Path(out)
    if root.exists() and any(root.iterdir()) and not (root / DEMO_MARKER).exists():
        raise FileExistsError(f"{root} holds other results; choose another --out")
    torch.set_num_threads(threads)
    org = load_organism(preset, seed, threads=threads)
    show_organism(org, n=3)
    proto = org.finetune_protocol
    summary = Table(title=f"AdamW lr {proto.lr:g}, batch {proto.batch_size}, {proto.steps} steps")
    cols = ("benign set", "|P g|/|g|", "kappa", "gamma", "horizon", "refusal", "KL>0.1 at")
    for col in cols:
        summary.add_column(col, no_wrap=True)
    written, first = [], None
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARKER).write_text("written by `alignscope demo`; it replaces this folder\n")
    ds = org.datasets_path
    for name in DEMO_SETS:
        cfg = VerifyConfig.for_organism(
            org, name, seed=seed, threads=threads, eval_prompts=str(ds / "harmful_eval.jsonl")
        )
        diagnosis = run_diagnose(cfg.diagnose_config())
        first = first or diagnosis
        res = diagnosis.to_json()
        sub = diagnosis.subspace
        write_diagnose_outputs(res, root / name / "diagnose", overwrite=True, subspace=sub)
        verified = run_verify(cfg, diagnosis=diagnosis)
        ver = verified.to_json()
        path = write_verify_outputs(ver, root / name / "verify", overwrite=True, subspace=sub)
        a, fc, sc = res["aic"]["gradient"], res["forecast"], ver["scores"]
        summary.add_row(
            name.removeprefix("benign_"),
            f"{a['Pg_ratio']:.3f}",
            f"{a['kappa']:.3g}",
            f"{a['gamma']:.3g}",
            f"{fc['horizon_steps']} steps",
            f"{sc['refusal_rate_start']:.0%} -> {sc['refusal_rate_end']:.0%}",
            str(sc["threshold_step_observed"] or "never"),
        )
        written.append(root / name / "diagnose" / "report.html")
        written.append(path / "report.html")
    Console(width=max(100, Console().width)).print(summary)
    rank_cfg = RankConfig.from_options(
        model=str(org.aligned_path), safety=str(ds / "harmful_align.jsonl"),
        data=[str(ds / f"{n}.jsonl") for n in RANK_SETS], lrs=[proto.lr], optimizer="adamw",
        batch_size=proto.batch_size, steps=proto.steps,
        compliance=str(ds / "harmful_train_compliant.jsonl"), seed=seed, threads=threads,
    )  # fmt: skip
    # same model, safety prompts, seed and rank as the first diagnosis: reuse its subspace
    ranked = run_rank(rank_cfg, subspace=first.subspace).to_json()
    written.append(write_rank_outputs(ranked, root / "rank", overwrite=True) / "report.html")
    echo(f"rank by {ranked['predictor']}: " + " < ".join(ranked["ranking"]))
    echo(ranked["summary"])
    written.extend(_guard_section(org, root, seed, threads))
    from alignscope.report.index import write_index

    # one page over every run above (what `alignscope report DIR` writes), so a newcomer opens
    # a single file
    written.append(write_index(root, overwrite=True))
    for path in written:
        echo(f"report: {path}")
    return written


def _guard_section(org, root: Path, seed: int, threads: int) -> list[Path]:
    """``GUARD_SET`` fine-tuned under ``DEMO_GUARD`` and without a guard (same protocol, seed
    and held-out measurements), side by side; the two finetune reports written."""
    from rich.console import Console
    from rich.table import Table

    from alignscope.commands.finetune import FinetuneConfig, run_finetune
    from alignscope.organism.corpus import task_match
    from alignscope.report.finetune_report import write_finetune_outputs

    eval_prompts = str(org.datasets_path / "harmful_eval.jsonl")
    held = org.heldout(GUARD_SET)
    rows, written = [], []
    for guard, folder in ((DEMO_GUARD, "guard"), ("none", "unguarded")):
        cfg = FinetuneConfig.for_organism(
            org, GUARD_SET, seed=seed, threads=threads, eval_prompts=eval_prompts, guard=guard
        )
        result = run_finetune(cfg, task_rows=held, task_match=task_match, quiet=True)
        path = write_finetune_outputs(result, root / GUARD_SET / folder, overwrite=True)
        written.append(path / "report.html")
        sm = result.summary()
        rows.append(
            (
                guard,
                f"{sm['refusal_rate_start']:.0%} -> {sm['refusal_rate_end']:.0%}",
                f"{sm['refusal_rate_min']:.0%}",
                f"{sm['task_exact_match_start']:.0%} -> {sm['task_exact_match_end']:.0%}",
                f"{sm['task_nll_end']:.3f}",
                f"{sm['seconds_per_step'] * 1e3:.0f} ms",
            )
        )
    proto = org.finetune_protocol
    table = Table(title=f"{GUARD_SET} again, {proto.steps} steps, under a guard (docs/guard.md)")
    for col in ("guard", "refusal", "lowest", "held-out task exact match", "task NLL", "per step"):
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, Console().width)).print(table)
    return written
