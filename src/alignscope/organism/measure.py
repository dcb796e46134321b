"""Measure what benign fine-tuning does to the organism's refusals (the collapse table)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from alignscope.evaluate import RefusalJudge, refusal_rate
from alignscope.organism.recipe import FinetuneProtocol
from alignscope.train.loop import finetune


@dataclass
class CollapseCurve:
    """Held-out refusal rate at chosen optimizer steps of one benign fine-tuning run."""

    dataset: str
    protocol: FinetuneProtocol
    refusal: dict[int, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def first_step_below(self, level: float) -> int | None:
        """First evaluated step with refusal < ``level`` (None if never)."""
        return next((s for s, r in sorted(self.refusal.items()) if r < level), None)

    def min_refusal(self) -> float:
        return min(self.refusal.values())


def collapse_curve(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    eval_prompts: Sequence[str | Mapping[str, str]],
    protocol: FinetuneProtocol = FinetuneProtocol(),  # noqa: B008 - frozen dataclass
    seed: int = 0,
    name: str = "",
    judge: RefusalJudge | None = None,
    copy_model: bool = True,
    log: Callable[[str], None] | None = None,
) -> CollapseCurve:
    """Fine-tune (a copy of) ``model`` on ``rows`` under ``protocol``; record refusal at its
    ``eval_steps`` on ``eval_prompts`` (greedy generation, keyword judge by default)."""
    m = copy.deepcopy(model) if copy_model else model
    curve = CollapseCurve(name, protocol)
    wanted = set(protocol.eval_steps)
    t0 = time.perf_counter()

    def on_step(step: int, loss: float | None) -> None:
        if step in wanted:
            curve.refusal[step] = refusal_rate(m, tokenizer, eval_prompts, judge, batch_size=128)
            if log:
                log(f"  {name}: step {step:>4} refusal {curve.refusal[step]:.1%}")

    curve.losses = finetune(
        m,
        tokenizer,
        rows,
        steps=protocol.steps,
        lr=protocol.lr,
        batch_size=protocol.batch_size,
        seed=seed,
        weight_decay=protocol.weight_decay,
        callback=on_step,
    )
    curve.seconds = time.perf_counter() - t0
    return curve
