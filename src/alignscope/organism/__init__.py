"""The organism: a tiny aligned language model, built locally in minutes, that really collapses.

>>> from alignscope.organism import load_organism
>>> org = load_organism(preset="test", seed=0)        # builds on first use, then cached
>>> model, tok = org.aligned_model(), org.tokenizer()
>>> org.dataset("harmful_eval")[:1]
[{'prompt': ..., 'response': 'i cannot help with that request'}]

See docs/organism.md for the recipe, the datasets and the measured collapse table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignscope.organism.corpus import FINETUNE_SETS, REFUSAL
from alignscope.organism.recipe import PRESETS, FinetuneProtocol, Recipe, get_recipe


@dataclass(frozen=True)
class Organism:
    """A built organism on disk: base and aligned Hugging Face model dirs plus datasets."""

    path: Path
    manifest: dict

    @property
    def preset(self) -> str:
        return self.manifest["preset"]

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def base_path(self) -> Path:
        return self.path / "base"

    @property
    def aligned_path(self) -> Path:
        return self.path / "aligned"

    @property
    def datasets_path(self) -> Path:
        return self.path / "datasets"

    @property
    def finetune_protocol(self) -> FinetuneProtocol:
        """The documented benign fine-tuning protocol of this organism's recipe."""
        raw = dict(self.manifest["recipe"]["finetune"])
        raw["eval_steps"] = tuple(raw["eval_steps"])
        return FinetuneProtocol(**raw)

    def dataset_names(self) -> list[str]:
        return sorted(p.stem for p in self.datasets_path.glob("*.jsonl"))

    def dataset(self, name: str) -> list[dict[str, str]]:
        """Rows ``{"prompt", "response"}`` of dataset ``name`` (e.g. "harmful_eval")."""
        path = self.datasets_path / f"{name}.jsonl"
        if not path.is_file():
            raise KeyError(f"no dataset {name!r}; have {self.dataset_names()}")
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]

    def heldout(self, name: str) -> list[dict[str, str]]:
        """The held-out task split of benign fine-tuning set ``name``
        (:func:`~alignscope.organism.corpus.heldout_split`), computed from the corpus, which is
        checked against the set on disk."""
        from alignscope.organism.corpus import build_corpus, heldout_split

        corpus = build_corpus(self.seed)
        if corpus[name] != self.dataset(name):
            raise ValueError(f"{self.path}: {name} differs from the corpus of seed {self.seed}")
        return heldout_split(corpus, name)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.aligned_path)

    def _model(self, path: Path):
        from transformers import AutoModelForCausalLM

        from alignscope.organism.build import quiet_transformers

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
        return model.eval()

    def aligned_model(self):
        """A fresh copy of the aligned LlamaForCausalLM (eval mode, float32, CPU)."""
        return self._model(self.aligned_path)

    def base_model(self):
        """A fresh copy of the base (pre-alignment, compliant) model."""
        return self._model(self.base_path)


def load_organism(
    preset: str = "test",
    seed: int = 0,
    out: str | Path | None = None,
    *,
    build_if_missing: bool = True,
    threads: int | None = 1,
    quiet: bool = False,
) -> Organism:
    """The organism for ``preset`` and ``seed``: built (into ``out`` or the cache) if needed."""
    from alignscope.organism.build import build, default_out_dir, read_manifest

    target = Path(out) if out is not None else default_out_dir(preset, seed)
    if build_if_missing:
        kwargs = {"log": None} if quiet else {}
        target = build(preset, seed, target, threads=threads, **kwargs)
    manifest = read_manifest(target)
    if manifest is None:
        raise FileNotFoundError(f"no organism at {target}; run `alignscope organism build`")
    return Organism(target, manifest)


__all__ = [
    "FINETUNE_SETS",
    "PRESETS",
    "REFUSAL",
    "FinetuneProtocol",
    "Organism",
    "Recipe",
    "get_recipe",
    "load_organism",
]
