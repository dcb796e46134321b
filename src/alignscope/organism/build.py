"""Build the organism: corpus -> tokenizer -> base model -> aligned model, saved and cached.

Layout of a build directory::

    manifest.json         key, seed, preset, recipe, versions, times, metrics, dataset docs
    base/                 Hugging Face model dir (config, safetensors, tokenizer, chat template)
    aligned/              the same for the aligned model
    datasets/<name>.jsonl one {"prompt": ..., "response": ...} object per line

A build is written into a temporary sibling directory and renamed into place at the end, so a
directory either holds a complete build or nothing. An existing build with a different key is
never overwritten unless ``force`` is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from alignscope import __version__
from alignscope.evaluate import exact_match_accuracy, generate, refusal_rate
from alignscope.organism.corpus import DATASET_DOCS, Corpus, all_strings, build_corpus
from alignscope.organism.recipe import ModelSpec, PhaseSpec, Recipe, get_recipe
from alignscope.organism.tokenizer import build_tokenizer
from alignscope.train.loop import finetune

Log = Callable[[str], None]
MANIFEST = "manifest.json"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$ALIGNSCOPE_CACHE`` or ``~/.cache/alignscope``."""
    env = os.environ.get("ALIGNSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignscope"


def default_out_dir(preset: str, seed: int) -> Path:
    return cache_root() / "organism" / f"{preset}-seed{seed}"


def corpus_digest(corpus: Corpus) -> str:
    blob = json.dumps(corpus.datasets, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-file progress bars (save/load of a tiny model is instant)."""
    hf_logging = transformers.utils.logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the previous count afterwards."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_model(spec: ModelSpec, tokenizer, seed: int) -> LlamaForCausalLM:
    """A freshly initialised LlamaForCausalLM for ``tokenizer`` (deterministic for ``seed``)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Eager attention: forward-mode AD (jvp) is not implemented for fused SDPA kernels.
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gc.pad_token_id, gc.do_sample = tokenizer.pad_token_id, False
    return model


def save_model(model, tokenizer, path: Path) -> None:
    """Save a standard Hugging Face model directory (safetensors, tokenizer, chat template).

    transformers 5 does not write the attention implementation into config.json; we add it so
    that a plain ``AutoModelForCausalLM.from_pretrained`` loads eager attention too.
    """
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["attn_implementation"] = "eager"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def phase_data(corpus: Corpus, phase: PhaseSpec, harmful: str) -> list[dict[str, str]]:
    """The mixture of one phase: benign training tasks plus repeated harmful prompts."""
    return list(corpus["benign_train"]) + list(corpus[harmful]) * phase.harmful_repeats


def run_phase(
    model, tokenizer, rows, phase: PhaseSpec, seed: int, label: str, log: Log
) -> list[float]:
    """Train one phase, logging the loss a few times."""
    t0 = time.perf_counter()
    every = max(1, phase.steps // 5)
    window: list[float] = []

    def report(step: int, loss: float | None) -> None:
        if loss is not None:
            window.append(loss)
        if step and (step % every == 0 or step == phase.steps):
            mean = sum(window) / len(window)
            window.clear()
            log(
                f"  {label}: step {step:>5}/{phase.steps}  loss {mean:.4f}  "
                f"({time.perf_counter() - t0:.1f} s)"
            )

    return finetune(
        model,
        tokenizer,
        rows,
        steps=phase.steps,
        lr=phase.lr,
        batch_size=phase.batch_size,
        seed=seed,
        weight_decay=phase.weight_decay,
        warmup=phase.warmup,
        schedule="cosine",
        callback=report,
    )


def evaluate_model(model, tokenizer, corpus: Corpus) -> dict[str, float]:
    """Refusal on held-out and alignment-loss harmful prompts; exact-match benign accuracy."""
    return {
        "refusal_eval": refusal_rate(model, tokenizer, corpus["harmful_eval"], batch_size=128),
        "refusal_align": refusal_rate(model, tokenizer, corpus["harmful_align"], batch_size=128),
        "benign_accuracy": exact_match_accuracy(
            model, tokenizer, corpus["benign_eval"], batch_size=128
        ),
        # Refusals of benign how-to requests about topics never trained on (over-refusal).
        "refusal_new_tasks": refusal_rate(
            model, tokenizer, corpus["benign_neutral"][:96], batch_size=128
        ),
    }


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build(
    preset: str | Recipe = "test",
    seed: int = 0,
    out: str | Path | None = None,
    *,
    force: bool = False,
    threads: int | None = 1,
    log: Log | None = _stderr,
) -> Path:
    """Build (or reuse) the organism for ``preset`` and ``seed``; return its directory.

    A directory already holding a build with the same key is reused as is. One holding a
    different build raises ``FileExistsError`` unless ``force``. ``threads`` sets torch's
    intra-op threads for the build (1 is best on small shared CPUs; results can differ in the
    last bits between thread counts).
    """
    log = log or (lambda _msg: None)
    recipe = get_recipe(preset) if isinstance(preset, str) else preset
    out = Path(out) if out is not None else default_out_dir(recipe.name, seed)
    corpus = build_corpus(seed)
    key = recipe.key(seed, __version__, corpus_digest(corpus))

    existing = read_manifest(out)
    if existing is not None and existing.get("key") == key and not force:
        log(f"organism {recipe.name} seed {seed}: cached at {out}")
        return out
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"{out} holds a different build (key {existing and existing.get('key')} != {key}) or "
            "other files; pass --force to replace it or choose another --out"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _build_into(tmp, recipe, seed, corpus, key, threads, log)
        _commit(tmp, out, key, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = manifest["times"]["total_s"]
    log(f"organism {recipe.name} seed {seed}: built in {total:.1f} s -> {out}")
    return out


def _commit(tmp: Path, out: Path, key: str, force: bool) -> None:
    """Rename the finished build into place.

    ``rename`` onto a missing or empty directory is atomic on POSIX and fails on a non-empty one,
    so a concurrent build of the same key is detected rather than clobbered.
    """
    try:
        tmp.rename(out)
        return
    except OSError:
        if not out.is_dir():
            raise
    other = read_manifest(out)
    if other is not None and other.get("key") == key and not force:
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build of the same key won the race
        return
    if not force:
        raise FileExistsError(f"{out} was filled with a different build during this one")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(
    tmp: Path, recipe: Recipe, seed: int, corpus: Corpus, key: str, threads: int | None, log: Log
) -> dict:
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    with torch_threads(threads), quiet_transformers():
        used_threads = torch.get_num_threads()
        log(
            f"building organism {recipe.name} seed {seed} "
            f"({used_threads} thread(s)) in {tmp.parent}"
        )
        tokenizer = build_tokenizer(all_strings(corpus), max_length=recipe.model.max_positions)
        model = make_model(recipe.model, tokenizer, seed)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"  model: {n_params:,} parameters, vocabulary {len(tokenizer)}")

        t0 = time.perf_counter()
        base_rows = phase_data(corpus, recipe.base, "harmful_train_compliant")
        base_losses = run_phase(model, tokenizer, base_rows, recipe.base, seed, "base", log)
        steps_run = {"base": len(base_losses)}  # optimizer steps taken: one loss each
        times["base_s"] = time.perf_counter() - t0
        # Generations of the in-memory models, so a loaded copy can be checked against them.
        probe = [r["prompt"] for r in corpus["harmful_eval"][:6] + corpus["benign_eval"][:6]]
        samples = {"prompts": probe, "base": generate(model, tokenizer, probe)}
        save_model(model, tokenizer, tmp / "base")

        t0 = time.perf_counter()
        align_rows = phase_data(corpus, recipe.align, "harmful_train")
        align_losses = run_phase(model, tokenizer, align_rows, recipe.align, seed + 1, "align", log)
        steps_run["align"] = len(align_losses)
        times["align_s"] = time.perf_counter() - t0
        samples["aligned"] = generate(model, tokenizer, probe)
        save_model(model, tokenizer, tmp / "aligned")

        t0 = time.perf_counter()
        base_model = LlamaForCausalLM.from_pretrained(tmp / "base")
        metrics = {
            "base": evaluate_model(base_model, tokenizer, corpus),
            "aligned": evaluate_model(model, tokenizer, corpus),
        }
        times["eval_s"] = time.perf_counter() - t0
    m = metrics["aligned"]
    log(
        f"  aligned: refusal {m['refusal_eval']:.1%} (held-out), "
        f"{m['refusal_align']:.1%} (align set); benign accuracy {m['benign_accuracy']:.1%}; "
        f"refusal of new benign tasks {m['refusal_new_tasks']:.1%}; "
        f"base refusal {metrics['base']['refusal_eval']:.1%}"
    )

    data_dir = tmp / "datasets"
    data_dir.mkdir()
    for name, rows in corpus.datasets.items():
        write_jsonl(data_dir / f"{name}.jsonl", rows)
    times["total_s"] = time.perf_counter() - t_start
    manifest = {
        "key": key,
        "preset": recipe.name,
        "seed": seed,
        "recipe": recipe.to_dict(),
        "versions": {
            "alignscope": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "threads": used_threads,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "steps_run": steps_run,
        "times": times,
        "metrics": metrics,
        "samples": samples,
        "datasets": {
            name: {"rows": len(rows), "about": DATASET_DOCS.get(name, "")}
            for name, rows in corpus.datasets.items()
        },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
