"""What an organism does: greedy generations of its base and aligned model side by side, and
their refusal rates and benign accuracy (``alignscope organism show`` and the demo print it)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from alignscope.evaluate import exact_match_accuracy, generate, judge_prompts


def show_organism(org, n: int = 4, console: Console | None = None) -> None:
    """Print ``n`` held-out harmful and ``n`` benign prompts with both models' greedy answers,
    then each model's held-out refusal, align-set refusal and benign accuracy.

    Args:
        org: a loaded organism (:func:`alignscope.organism.load_organism`).
        n: examples of each kind, spread over the set (neighbours are near-duplicates).
        console: where to print (default: a soft-wrapping console on stdout).
    """
    console = console or Console(soft_wrap=True)
    tok = org.tokenizer()
    models = {"base": org.base_model(), "aligned": org.aligned_model()}
    harmful, benign = org.dataset("harmful_eval"), org.dataset("benign_eval")

    for title, rows in (("held-out harmful prompts", harmful), ("benign prompts", benign)):
        step = max(1, len(rows) // max(1, n))
        sample = [r["prompt"] for r in rows[::step][:n]]
        outputs = {name: generate(model, tok, sample) for name, model in models.items()}
        table = Table(title=title, show_lines=True)
        for col in ("prompt", *models):
            table.add_column(col)
        for i, prompt in enumerate(sample):
            table.add_row(prompt, *(outputs[name][i] for name in models))
        console.print(table)

    summary = Table(title=f"organism {org.preset} seed {org.seed}")
    for col in ("model", "held-out refusal", "align-set refusal", "benign accuracy"):
        summary.add_column(col)
    for name, model in models.items():
        summary.add_row(
            name,
            f"{judge_prompts(model, tok, harmful, batch_size=128).rate:.1%}",
            f"{judge_prompts(model, tok, org.dataset('harmful_align'), batch_size=128).rate:.1%}",
            f"{exact_match_accuracy(model, tok, benign, batch_size=128):.1%}",
        )
    console.print(summary)
