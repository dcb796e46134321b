"""``demo``: the organism, diagnose and verify on a collapsing and a safe set, then rank.

Library functions only: the organism (built or reused), :func:`show_organism`,
:func:`run_diagnose`, :func:`run_verify`, :func:`run_rank` and the report writers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEMO_SETS = ("benign_affirmative", "benign_neutral")
RANK_SETS = ("benign_affirmative", "benign_neutral", "benign_arithmetic", "benign_list")
DEMO_MARKER = ".alignscope-demo"


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
        out: folder of the reports (``<set>/diagnose``, ``<set>/verify``, ``rank``); the demo
            replaces what an earlier demo wrote there.
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
    for path in written:
        echo(f"report: {path}")
    return written
