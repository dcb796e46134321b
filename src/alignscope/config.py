"""The specs every command is configured from, each default and each option's help stated once.

A command's config (``DiagnoseConfig``, ``VerifyConfig``, ``RankConfig``) combines the specs it
needs; each spec validates its own fields. A field's ``metadata`` holds its command-line help
(``help``), its flags where they are not ``--field-name`` (``flags``) and ``cli=False`` for the
fields only the Python API sets; :mod:`alignscope.cli` generates the options from them. Field
names are unique across the specs, so a config reads and writes flat (``from_options``,
``flat()``: the ``config`` block of results.json).

Torch-free: ``alignscope --help`` imports this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field
from typing import Any, TypeVar

DEFAULT_RANK = 20  # subspace dimension d unless --explained
EXPLAINED_MAX_RANK = 40  # eigenpairs computed when --explained chooses d
# Lanczos vectors per Fisher product pass: bench/matmat.py --eigs on this 2-core CPU measured
# single-vector Lanczos (1) against blocks of 4 and 8 (docs/curvature.md); see the measurement.
DEFAULT_LANCZOS_BLOCK = 1
DEFAULT_LR = 2e-5
# The predictor rank orders by unless told otherwise: the winner of bench/study.py (see
# README.md, "Which predictor works": with a 20-step trial on an independent order, Spearman
# 0.92 / 0.87 with the observed refusal drop and AUC 0.98 / 0.95 for collapse, over 72 AdamW and
# SGD runs on each of two test organisms; data seeds 0 and 1 of the three planned).
DEFAULT_PREDICTOR = "lookahead_kl_measured"
# rank's trial run (lookahead) draws its batches with the planned run's seed plus this offset
# (a prime, so trial and planned orders never coincide for nearby seeds): a prediction made on
# an order the planned run does not use, as a user's real run will (docs/rank.md).
TRIAL_SEED_OFFSET = 7919
LOOKAHEAD_ORDERS = ("independent", "same")
# When damage started in bench/study.py (data seed 0 of both test organisms, 200-step runs,
# bench/results/study_v2.jsonl and study_v2_confirm.jsonl; printed by bench/study_stats.py): per
# optimizer, the fraction of the budget by which three quarters of the runs whose alignment KL
# reached 0.1 had reached it (27 of 36 AdamW runs, 29 of 36 SGD runs; first recorded step, an
# upper bound). rank notes when its trial run is shorter (docs/rank.md); Adam is taken as AdamW.
DAMAGE_ONSET_FRACTION = {"adamw": 0.16, "adam": 0.16, "sgd": 0.01}
# The median of the same onsets: a trial shorter than this ends before half of the study's damaged
# runs of that optimizer had started, and rank warns (a shorter trial than the default tenth).
DAMAGE_ONSET_MEDIAN = {"adamw": 0.055, "adam": 0.055, "sgd": 0.005}
DAMAGE_ONSET_SOURCE = "bench/study.py (test organisms, data seed 0, 200-step runs)"
# The same onsets on a real model (bench/real_study.py: SmolLM2-135M-Instruct aligned locally,
# 100-step AdamW runs on the last two MLPs at lr 3e-5 and 1e-4, data seeds 0-1, and on a new
# rank-8 LoRA adapter on them at 3e-4 and 1e-3, seed 0; printed by bench/study_stats.py --real):
# the runs whose alignment KL reached 0.1, the recorded step after which the earliest of them
# crossed (a lower bound), the step by which it had (an upper bound) and the median onset (an
# upper bound), as fractions of the budget. None had crossed when a trial of a tenth ended.
REAL_DAMAGE_ONSET = {"damaged": 18, "runs": 42, "earliest_after": 0.11, "earliest_by": 0.16,
                     "median_by": 0.45}  # fmt: skip
# How rank's trial ranked the study's runs of a *new* LoRA adapter (the lora8-last selection,
# 14 runs; trial on an independent order; printed by bench/real_study.py --analyze): Spearman
# with the refusal drop at a tenth of the budget (12 of 100 steps), the same within lr 3e-4, at a
# fifth, and of the extrapolated lookahead_kl at a tenth; the AUC for collapse of the default and
# of lookahead_kl. rank's note for a new adapter quotes them; a test recomputes them.
REAL_LORA_TRIAL = {"tenth": 0.44, "tenth_lr_3e-4": -0.36, "fifth": 0.55, "lookahead_kl": 0.56,
                   "auc_tenth": 0.58, "auc_lookahead_kl": 0.71}  # fmt: skip
REAL_DAMAGE_ONSET_SOURCE = (
    "the real-model study (SmolLM2-135M-Instruct, the last two MLPs or a LoRA adapter on them, "
    "100-step runs)"
)
OPTIMIZERS = ("sgd", "adam", "adamw")
# Spelled out rather than read from data.loaders, which would import torch before --help;
# tests/test_loaders.py checks that it names every format.
FORMATS = ("auto", "chat", "advbench", "harmbench", "dolly", "alpaca", "qa", "donotanswer",
           "plain", "lines", "hf")  # fmt: skip
FORMATS_HELP = " | ".join(FORMATS) + " (docs/diagnose.md, Data formats)"


def option(default: Any = MISSING, help: str = "", *, flags: tuple[str, ...] = (),
           cli: bool = True, factory: Any = MISSING) -> Any:  # fmt: skip
    """A spec field with its command-line help (and flags, where not ``--field-name``)."""
    meta = {"help": help, "flags": flags, "cli": cli}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class ModelSpec:
    """The model: weights, dtype, device and its PEFT adapter (an existing one or a new LoRA)."""

    model: str = option(
        help="Hugging Face model directory, hub id, or a local .gguf file.",
        flags=("--model", "-m"),
    )
    dtype: str = option(
        "float32", "Weights dtype: float32 | bfloat16 | float16 | float64 (16-bit: math in "
        "float32).",
    )  # fmt: skip
    device: str = option("cpu", "cpu | cuda | auto.")
    adapter: str | None = option(
        None, "PEFT adapter directory to load on top of --model (trainable)."
    )
    lora_r: int | None = option(None, "Add a new LoRA adapter of this rank (B = 0).")
    lora_alpha: float | None = option(None, "LoRA alpha (default: 2 x --lora-r).")
    lora_targets: list[str] | None = option(
        None, "Module names to adapt (repeatable; default: all attention/MLP linear layers)."
    )

    def __post_init__(self) -> None:
        self.lora_targets = list(self.lora_targets) if self.lora_targets else None

    def validate(self) -> None:
        if self.adapter is not None and self.lora_r is not None:
            raise ValueError("pass either --adapter (an existing adapter) or --lora-r (a new one)")
        if self.lora_r is None and (self.lora_alpha is not None or self.lora_targets):
            raise ValueError("--lora-alpha and --lora-targets need --lora-r")
        self.lora_spec()  # checks r and alpha

    @property
    def uses_adapter(self) -> bool:
        return self.adapter is not None or self.lora_r is not None

    def lora_spec(self):
        """The new LoRA adapter asked for (``--lora-r``) as a ``models.LoraSpec``, or None."""
        if self.lora_r is None:
            return None
        from alignscope.models import LoraSpec

        targets = tuple(self.lora_targets) if self.lora_targets else None
        return LoraSpec(self.lora_r, self.lora_alpha, targets)

    def load_model(self, seed: int = 0):
        """``(model, tokenizer)`` as configured: weights, dtype, device, adapter (seeded)."""
        from alignscope.models import load_model

        return load_model(
            self.model, dtype=self.dtype, device=self.device, adapter=self.adapter,
            lora=self.lora_spec(), seed=seed,
        )  # fmt: skip

    def bare(self) -> ModelSpec:
        """The same weights without the adapter options (for a model already loaded with it)."""
        return dataclasses.replace(self, adapter=None, lora_r=None, lora_alpha=None,
                                   lora_targets=None)  # fmt: skip


@dataclass
class DataSpec:
    """The safety set and how every data file is read, subsampled and cut."""

    safety: str = option(
        help="Harmful prompts, optionally with aligned responses: JSONL, JSON, CSV, TXT or a "
        "datasets.save_to_disk folder (DIR::SPLIT picks a split); format detected, or "
        "--safety-format.",
        flags=("--safety", "-s"),
    )
    safety_format: str = option(
        "auto", f"Format of --safety (and of --eval-prompts): {FORMATS_HELP}."
    )
    data_format: str = option("auto", f"Format of --data: {FORMATS_HELP}.")
    max_safety: int | None = option(64, "Use at most this many safety prompts.")
    max_data: int | None = option(256, "Fine-tuning examples used for curvature and loss tracking.")
    max_length: int = option(256, cli=False)  # tokens of prompt + response
    max_new_tokens: int = option(48, cli=False)  # greedy responses (targets, refusal judge)
    noise_examples: int = option(64, cli=False)  # per-sample gradients of the noise trace

    def validate(self) -> None:
        for name in ("safety_format", "data_format"):
            if getattr(self, name) not in FORMATS:
                raise ValueError(f"{_flag(name)} {getattr(self, name)!r}: use {', '.join(FORMATS)}")
        if self.noise_examples < 2:
            raise ValueError("noise_examples must be at least 2 (the gradient covariance)")
        if self.max_length < 1 or self.max_new_tokens < 1:
            raise ValueError("max_length and max_new_tokens must be at least 1")


@dataclass
class CurvatureSpec:
    """The parameters analysed and the alignment subspace: Fisher, rank, solver, budget."""

    params: list[str] = option(
        help="all (with --adapter/--lora-r: the adapter weights) | lora | glob over parameter "
        "names (repeatable).",
        factory=lambda: ["all"],
    )
    group: str | None = option(None, "Block-wise subspaces: layer | module (default: one block).")
    rank: int | None = option(
        None, f"Subspace dimension d (default: {DEFAULT_RANK} unless --explained)."
    )
    explained: float | None = option(None, "Choose d to explain this fraction of tr F.")
    fisher: str = option("ggn", "ggn (true Fisher) | empirical (not recommended).")
    solver: str = option("auto", "auto | gram | lanczos.")
    lanczos_block: int = option(
        DEFAULT_LANCZOS_BLOCK,
        "Vectors per Fisher product pass in Lanczos: 1 = single-vector Lanczos, b > 1 = block "
        "Lanczos (more products, fewer passes; faster where batched products are, e.g. GPUs).",
    )
    alignment_loss: str = option("kl", "kl | nll (refusal NLL).")
    vocab_keep: float = option(
        0.99,
        "Fisher and fine-tuning HVPs through the LM head with the vocabulary coarsened to the "
        "top-k tokens plus one tail class, k the smallest power of two keeping this fraction of "
        "the curvature trace (a lower bound of F; kept fraction reported). 1.0 = exact "
        "vocabulary; small vocabularies or a selected LM head are always exact.",
    )
    samples_per_prompt: int = option(4, cli=False)  # Monte Carlo samples of the GGN Fisher
    memory_budget_gb: float = option(
        2.0, "Memory budget for curvature work (GiB).", flags=("--memory-gb",)
    )

    def __post_init__(self) -> None:
        self.params = list(self.params)
        if self.rank is None and self.explained is None:
            self.rank = DEFAULT_RANK

    @property
    def eigenpairs(self) -> int:
        """How many Fisher eigenpairs to compute: d, or enough for ``--explained`` to choose."""
        return self.rank if self.rank is not None else EXPLAINED_MAX_RANK

    def param_spec(self, model: ModelSpec) -> list[str]:
        """The parameter selection analysed (and trained by verify): ``--params``, except that
        with an adapter the default ``all`` means the adapter weights (``lora``)."""
        if model.uses_adapter and self.params == ["all"]:
            return ["lora"]
        return list(self.params)

    def validate(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError("--rank must be at least 1")
        if self.explained is not None and not 0 < self.explained <= 1:
            raise ValueError("--explained must be in (0, 1]")
        if self.fisher not in ("ggn", "empirical"):
            raise ValueError("--fisher must be ggn or empirical")
        if self.fisher == "empirical" and self.group is not None:
            raise ValueError("--fisher empirical has no block-wise variant; drop --group")
        if self.group not in (None, "layer", "module"):
            raise ValueError(f"--group {self.group!r}: use layer or module")
        if self.solver not in ("auto", "gram", "lanczos"):
            raise ValueError(f"--solver {self.solver!r}: use auto, gram or lanczos")
        if self.lanczos_block < 1:
            raise ValueError(
                f"--lanczos-block {self.lanczos_block}: use 1 (single-vector Lanczos) or more"
            )
        if not 0 < self.vocab_keep <= 1:
            raise ValueError(
                f"--vocab-keep {self.vocab_keep}: use a fraction in (0, 1]; 1.0 is the exact "
                "vocabulary"
            )
        if self.alignment_loss not in ("kl", "nll"):
            raise ValueError("--alignment-loss must be kl or nll")
        if self.samples_per_prompt < 1:
            raise ValueError("samples_per_prompt must be at least 1")
        if not self.memory_budget_gb > 0:
            raise ValueError("--memory-gb must be positive")


@dataclass
class OptimSpec:
    """The fine-tuning the forecast is for (and that verify runs): optimizer, lr, batch, budget."""

    optimizer: str = option("adamw", "sgd | adam | adamw.")
    lr: float = option(DEFAULT_LR, "Learning rate of the fine-tuning.")
    batch_size: int = option(8, "Batch size of the fine-tuning.")
    steps: int = option(
        1000, "Optimizer steps of the fine-tuning (diagnose and rank: planned; verify: run)."
    )
    threshold: float = option(0.1, "dL_a (nats/token) that counts as collapse.")
    adam_eps: float = option(1e-8, cli=False)

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}: use sgd, adam or adamw")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("--lr must be positive")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("--steps and --batch-size must be at least 1")
        if not self.threshold > 0:
            raise ValueError("--threshold must be positive")

    @property
    def adaptive(self) -> bool:
        """Adam or AdamW (a preconditioned step)."""
        return self.optimizer in ("adam", "adamw")


@dataclass
class EvalSpec:
    """Held-out harmful prompts to measure the refusal rate on."""

    eval_prompts: str | None = option(
        None, "Held-out harmful prompts for the refusal rate, instead of none (format: "
        "--safety-format); rank measures it before and after each trial run.",
        flags=("--eval-prompts", "-e"),
    )  # fmt: skip
    max_eval: int | None = option(64, "Use at most this many eval prompts.")

    def validate(self) -> None:
        if self.max_eval is not None and self.max_eval < 1:
            raise ValueError("--max-eval must be at least 1")


@dataclass
class TaskEvalSpec:
    """A held-out split of the fine-tuning task: its greedy exact match and response NLL."""

    task_eval: str | None = option(
        None, "Held-out prompt/response pairs of the fine-tuning task (format: --data-format): "
        "greedy exact match and response NLL at the recorded steps.",
    )  # fmt: skip
    max_task_eval: int | None = option(96, "Use at most this many held-out task pairs.")
    # greedy tokens of the held-out task responses (None: max_new_tokens, the refusal judge's);
    # a short judge budget would cut task answers longer than a refusal's opening
    task_new_tokens: int | None = option(None, cli=False)

    def validate(self) -> None:
        if self.max_task_eval is not None and self.max_task_eval < 1:
            raise ValueError("--max-task-eval must be at least 1")
        if self.task_new_tokens is not None and self.task_new_tokens < 1:
            raise ValueError("task_new_tokens must be at least 1")


@dataclass
class RuntimeSpec:
    """Seed, CPU threads and the memory for cached frozen-prefix activations."""

    seed: int = option(0, "Random seed (recorded in results.json).")
    threads: int | None = option(None, "torch CPU threads (1 is best on a busy 2-core box).")
    prefix_cache_gb: float = option(
        1.0, "Memory (GiB) for the activations of the frozen layers below the first trained or "
        "analysed layer, kept per prompt so that products, training steps, KL measurements and "
        "the refusal generation run the later layers only (beyond it: recomputed; 0: off).",
    )  # fmt: skip

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be at least 1")
        if not (math.isfinite(self.prefix_cache_gb) and self.prefix_cache_gb >= 0):
            raise ValueError("--prefix-cache-gb must be >= 0 (0 turns the cache off)")

    @property
    def prefix_budget(self) -> int:
        """``prefix_cache_gb`` in bytes."""
        return int(self.prefix_cache_gb * 2**30)

    def apply(self) -> None:
        """Seed torch and set its threads."""
        import torch

        torch.manual_seed(self.seed)
        if self.threads is not None:
            torch.set_num_threads(self.threads)


@dataclass
class FinetuneSpec:
    """The fine-tuning set diagnosed (and, by verify, trained on)."""

    data: str = option(
        help="Fine-tuning set of prompt/response pairs, in the same file types; format detected, "
        "or --data-format.",
        flags=("--data", "-d"),
    )

    def validate(self) -> None:
        if not self.data:
            raise ValueError("--data: no fine-tuning set given")


@dataclass
class RecordSpec:
    """When verify measures and checkpoints its run."""

    eval_every: str = option("auto", "auto (log-spaced steps) | N (every N steps).")
    checkpoint_every: int = option(
        4, "Checkpoint into <out>.partial every N recorded steps (0: never)."
    )
    refusal_every: int = option(
        1,
        "Generate refusals (and finetune's held-out task answers) at every Nth recorded step "
        "(always the first and the last; 1: every record). The KL and losses are measured at "
        "every record; generation is the costly part of a record on a real model.",
    )

    def validate(self) -> None:
        if self.eval_every != "auto":
            try:
                every = int(self.eval_every)
            except ValueError:
                raise ValueError("--eval-every must be 'auto' or a positive integer") from None
            if every < 1:
                raise ValueError("--eval-every must be 'auto' or a positive integer")
        if self.checkpoint_every < 0:
            raise ValueError("--checkpoint-every must be >= 0")
        if self.refusal_every < 1:
            raise ValueError("--refusal-every must be a positive integer (1: every record)")


@dataclass
class RankingSpec:
    """rank's candidates (every set at every learning rate) and how it orders them."""

    data: list[str] = option(
        help="Candidate fine-tuning sets: --data A B C (two or more, or one with several --lr).",
        flags=("--data", "-d"),
    )
    lrs: list[float] | None = option(
        None, "Learning rate(s): several rank the learning rates for one set (default: "
        f"{DEFAULT_LR:g}, the --lr of diagnose).", flags=("--lr",),
    )  # fmt: skip
    compliance: str | None = option(
        None, "Harmful prompts with compliant answers (prompt/response), for the "
        "gradient-similarity baseline; without it that predictor is skipped.",
    )  # fmt: skip
    predictor: str = option(
        DEFAULT_PREDICTOR, "Predictor to order by (the default won bench/study.py; docs/rank.md)."
    )
    lookahead_steps: int | None = option(
        None, "Optimizer steps of the trial run (lookahead) (default: a tenth of --steps, at "
        "least 12); rank warns when it is shorter than the time by which damage had started in "
        "3/4 of the study's runs (AdamW: 16 % of --steps; docs/rank.md).",
    )  # fmt: skip
    lookahead_order: str = option(
        "independent", "Data order and seed of the trial run: independent (the default: "
        f"--seed + {TRIAL_SEED_OFFSET}, an order the planned run does not use) | same (the "
        "planned run's --seed: the trial replays its first batches).",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.data = list(self.data)
        self.lrs = list(self.lrs) if self.lrs else None

    def validate(self) -> None:
        for lr in self.lrs or ():
            if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"--lr {lr!r}: every learning rate must be a positive number")
        if self.lrs and len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"--lr {self.lrs}: the learning rates repeat")
        if len(set(self.data)) != len(self.data):
            raise ValueError("--data: the same fine-tuning set is given twice")
        if self.lookahead_steps is not None and self.lookahead_steps < 1:
            raise ValueError("--lookahead-steps must be in 1..--steps")
        if self.lookahead_order not in LOOKAHEAD_ORDERS:
            raise ValueError(
                f"--lookahead-order {self.lookahead_order!r}: use {' or '.join(LOOKAHEAD_ORDERS)}"
            )

    def trial_seed(self, seed: int) -> int:
        """The seed of the trial run's batch order (and torch draws) for a planned ``seed``."""
        return trial_seed(seed, self.lookahead_order)


def trial_seed(seed: int, order: str = "independent") -> int:
    """The trial run's seed: ``seed + TRIAL_SEED_OFFSET`` (independent) or ``seed`` (same)."""
    if order not in LOOKAHEAD_ORDERS:
        raise ValueError(f"lookahead order {order!r}: use {' or '.join(LOOKAHEAD_ORDERS)}")
    return seed + TRIAL_SEED_OFFSET if order == "independent" else seed


# Spelled out rather than read from train.guards (torch); tests/test_finetune.py checks them.
GUARD_NAMES = ("none", "project", "project-tracking", "curvature", "fisher", "anchor", "safe-lora",
               "constrained-sft")  # fmt: skip
# Where the curvature guard's quadratic model lives (train/guards/curvature.py).
CURVATURE_SPACES = ("auto", "weights", "params")
# The clocks of a finetune step record (wall and this process' CPU seconds): timing, not a
# result; reports and run-to-run comparisons leave them out.
STEP_CLOCKS = ("seconds", "cpu_seconds")


@dataclass
class GuardSpec:
    """The guard of a fine-tuning run and its settings (docs/guard.md)."""

    guard: str = option("none", " | ".join(GUARD_NAMES) + " (docs/guard.md).")
    guard_rank: int = option(20, "project / project-tracking: dimension d of the subspace.")
    track_every: int = option(
        10, "project-tracking: re-estimate the subspace every N steps (0: only on --track-drift)."
    )
    track_drift: float | None = option(
        None, "project-tracking: also re-estimate when the weights have moved this far since the "
        "last estimate, relative to |theta0| (e.g. 0.002).",
    )  # fmt: skip
    curvature_mu: float = option(
        30.0, "curvature: strength mu of the pull mu F delta (gradient of mu/2 delta^T F delta)."
    )
    curvature_space: str = option(
        "auto", "curvature: where its quadratic model lives: weights (a LoRA adapter's merged "
        "weight change s B A per adapted layer, with the base weights' Fisher) | params (the "
        "trained parameters themselves) | auto (weights for a LoRA adapter, else params).",
    )  # fmt: skip
    ewc_lambda: float = option(1e4, "fisher: lambda of lambda/2 sum_i F_ii delta_i^2.")
    fisher_rank: int = option(
        0, "fisher: add the top-d low-rank part of F (d = this; 0: the diagonal only)."
    )
    fisher_diag: str = option(
        "auto", "fisher: the Fisher diagonal, exact | mc (Monte Carlo) | auto (exact up to 4096 "
        "parameters)."
    )  # fmt: skip
    anchor_beta: float = option(1.0, "anchor: beta x the alignment KL on safety prompts.")
    guard_examples: int = option(
        8, "Safety examples per step (anchor's minibatch, the curvature guard's Fisher)."
    )
    safe_lora_tau: float = option(
        0.5, "safe-lora: project the layers whose cos(C B A, B A) is at most tau."
    )
    base: str | None = option(None, "safe-lora: the unaligned base model (directory or hub id).")
    csft_beta: float = option(
        0.1, "constrained-sft: base beta (x5 on the first response token, x20 on tokens 2-5)."
    )
    guard_adaptive: bool = option(
        False, "Adaptive mode: keep the guard off (no cost per step) until the alignment "
        "watcher's early warning, then on for the rest of the run (docs/guard.md).",
    )  # fmt: skip
    adaptive_every: int = option(
        10, "adaptive mode: the watcher measures at step 0 and the powers of two below N, "
        "then every N steps.",
    )  # fmt: skip
    adaptive_floor: float = option(
        0.8, "adaptive mode: warn when a refusal signal's trend (greedy rate, first-token "
        "probability) falls below this.",
    )  # fmt: skip
    adaptive_kl: float | None = option(
        None, "adaptive mode: also warn when the alignment KL's trend rises above this "
        "(nats/token).",
    )  # fmt: skip

    def check_model(self, model: ModelSpec) -> None:
        """What the guard needs from the model options, checked before anything is loaded
        (finetune and verify --guard alike)."""
        if self.guard == "safe-lora" and not model.uses_adapter:
            raise ValueError("--guard safe-lora needs a LoRA adapter (--adapter or --lora-r)")
        if self.guard == "curvature" and self.curvature_space == "weights" and not (
            model.uses_adapter
        ):
            raise ValueError("--curvature-space weights needs a LoRA adapter (--adapter or "
                             "--lora-r); without one use auto or params")  # fmt: skip

    def validate(self) -> None:
        if self.guard not in GUARD_NAMES:
            raise ValueError(f"--guard {self.guard!r}: use {', '.join(GUARD_NAMES)}")
        if self.guard_rank < 1 or self.guard_examples < 1:
            raise ValueError("--guard-rank and --guard-examples must be >= 1")
        if self.fisher_rank < 0:
            raise ValueError("--fisher-rank must be >= 0")
        if self.track_every < 0:
            raise ValueError("--track-every must be >= 0")
        if self.track_drift is not None and not self.track_drift > 0:
            raise ValueError("--track-drift must be positive")
        if self.track_every == 0 and self.track_drift is None:
            raise ValueError("--track-every 0 re-estimates only on drift: pass --track-drift")
        for name in ("curvature_mu", "ewc_lambda", "anchor_beta"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_flag(name)} must be >= 0")
        if self.curvature_space not in CURVATURE_SPACES:
            raise ValueError(f"--curvature-space must be {', '.join(CURVATURE_SPACES)}")
        if self.fisher_diag not in ("auto", "exact", "mc"):
            raise ValueError("--fisher-diag must be auto, exact or mc")
        if not -1 <= self.safe_lora_tau <= 1:
            raise ValueError("--safe-lora-tau must be in [-1, 1]")
        if not self.csft_beta > 0:
            raise ValueError("--csft-beta must be positive")
        if self.guard == "safe-lora" and not self.base:
            raise ValueError("--guard safe-lora needs --base (the unaligned base model)")
        if self.guard_adaptive:
            if self.guard == "none":
                raise ValueError("--guard-adaptive needs a guard to switch on (--guard NAME)")
            if self.guard == "safe-lora":
                raise ValueError(
                    "--guard-adaptive: safe-lora acts once after training, there is nothing to "
                    "switch on; drop --guard-adaptive"
                )
        if self.adaptive_every < 1:
            raise ValueError("--adaptive-every must be at least 1")
        if not 0 <= self.adaptive_floor <= 1:
            raise ValueError("--adaptive-floor is a refusal rate in [0, 1]")
        if self.adaptive_kl is not None and not self.adaptive_kl > 0:
            raise ValueError("--adaptive-kl must be positive")


SPECS = (ModelSpec, DataSpec, FinetuneSpec, CurvatureSpec, OptimSpec, EvalSpec, RecordSpec,
         RankingSpec, RuntimeSpec, GuardSpec, TaskEvalSpec)  # fmt: skip
_BY_NAME = {spec.__name__: spec for spec in SPECS}
C = TypeVar("C", bound="Composed")


class Composed:
    """What a command config composed of specs shares: flat construction and serialisation.

    A subclass is a dataclass whose fields are specs; every field name of those specs is unique
    within the config, so a flat mapping of names (the command line's, results.json's) routes
    each name to one spec.
    """

    @classmethod
    def spec_fields(cls) -> dict[str, type]:
        """``{attribute: spec class}`` in field order."""
        return {f.name: _BY_NAME[str(f.type)] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_options(cls: type[C], **options: Any) -> C:
        """The config from flat field names (``model=..., lr=..., rank=...``), defaults for the
        rest; unknown names raise :class:`TypeError`."""
        left = dict(options)
        kwargs = {}
        for name, spec in cls.spec_fields().items():
            own = {f.name for f in dataclasses.fields(spec)}
            kwargs[name] = spec(**{k: left.pop(k) for k in list(left) if k in own})
        if left:
            raise TypeError(f"{cls.__name__}: unknown options {', '.join(sorted(left))}")
        return cls(**kwargs)

    def flat(self) -> dict[str, Any]:
        """Every spec field by its own name (the results.json ``config`` block)."""
        out: dict[str, Any] = {}
        for name in self.spec_fields():
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def with_options(self: C, **options: Any) -> C:
        """A copy with some flat fields changed."""
        return type(self).from_options(**{**self.flat(), **options})

    @classmethod
    def for_organism(cls: type[C], org, dataset: str = "benign_affirmative", **overrides) -> C:
        """The organism's aligned model and alignment prompts against one of its benign sets,
        under its documented fine-tuning protocol (AdamW, lr, batch, steps); ``overrides`` are
        flat option names."""
        proto = org.finetune_protocol
        options = dict(
            model=str(org.aligned_path), safety=str(org.datasets_path / "harmful_align.jsonl"),
            data=str(org.datasets_path / f"{dataset}.jsonl"), optimizer="adamw", lr=proto.lr,
            batch_size=proto.batch_size, steps=proto.steps,
        )  # fmt: skip
        return cls.from_options(**{**options, **overrides})

    def validate(self) -> None:
        """Each spec checks its own fields."""
        for name in self.spec_fields():
            getattr(self, name).validate()

    # The three commands all hold a model, curvature and runtime spec.
    def param_spec(self) -> list[str]:
        """The parameter selection analysed (``CurvatureSpec.param_spec``)."""
        return self.curvature.param_spec(self.model)  # type: ignore[attr-defined]

    def load_model(self):
        """``(model, tokenizer)`` as configured, seeded with the run's seed."""
        return self.model.load_model(self.runtime.seed)  # type: ignore[attr-defined]
