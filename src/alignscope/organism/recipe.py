"""Presets of the organism: model size and the two training phases, as plain dataclasses.

The recipe (with the seed and the package version) is hashed into the cache key of a build, so
changing any number here makes a new build rather than silently reusing an old one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bump when the build procedure changes in a way the recipe fields do not show.
BUILD_FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    """A LlamaForCausalLM shape (eager attention, so forward-mode AD works on it)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    tie_embeddings: bool = True
    max_positions: int = 64


@dataclass(frozen=True)
class PhaseSpec:
    """One training phase: AdamW with linear warmup then cosine decay.

    ``harmful_repeats``: how many times the harmful training prompts are repeated in the phase's
    data mixture (the benign training tasks appear once), to balance the two.
    """

    steps: int
    lr: float
    batch_size: int
    warmup: int = 20
    weight_decay: float = 0.0
    harmful_repeats: int = 1


@dataclass(frozen=True)
class FinetuneProtocol:
    """The documented benign fine-tuning protocol (collapse measurements, later `verify`)."""

    optimizer: str = "AdamW"
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    steps: int = 200
    eval_steps: tuple[int, ...] = (0, 10, 25, 50, 100, 200)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    base: PhaseSpec
    align: PhaseSpec
    finetune: FinetuneProtocol = field(default_factory=FinetuneProtocol)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self, seed: int, version: str, corpus_digest: str) -> str:
        """Cache key: a hash of recipe, seed, package version, build format and corpus."""
        blob = json.dumps(
            {
                "recipe": self.to_dict(),
                "seed": seed,
                "version": version,
                "format": BUILD_FORMAT,
                "corpus": corpus_digest,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


PRESETS: dict[str, Recipe] = {
    # Small and quick: runs in CI.
    "test": Recipe(
        name="test",
        model=ModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        base=PhaseSpec(steps=800, lr=3e-3, batch_size=32, warmup=20, harmful_repeats=2),
        align=PhaseSpec(steps=200, lr=2e-3, batch_size=32, warmup=10, harmful_repeats=2),
    ),
    # The organism of the demo and of the documented measurements. Its fine-tuning lr is lower:
    # an Adam step moves every weight by about lr, so the change of the function per step grows
    # with the number of weights; at 1e-3 this wider, deeper model is wrecked by any benign set
    # (see docs/organism.md), at 3e-4 only the affirmative set collapses it.
    "demo": Recipe(
        name="demo",
        model=ModelSpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256),
        base=PhaseSpec(steps=1000, lr=1e-3, batch_size=64, warmup=50, harmful_repeats=2),
        align=PhaseSpec(steps=400, lr=1e-3, batch_size=64, warmup=20, harmful_repeats=2),
        finetune=FinetuneProtocol(lr=3e-4),
    ),
}


def get_recipe(preset: str) -> Recipe:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None
