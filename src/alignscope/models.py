"""Loading Hugging Face causal LMs and their tokenizers for analysis.

Safe by default: never ``trust_remote_code`` unless asked, safetensors preferred, eager attention
(forward-mode AD through fused kernels is not implemented in torch).

:func:`load_model` is the one place models are built, for ``diagnose`` and ``verify`` alike:
a local directory, a hub id or a ``.gguf`` file; then optionally an existing PEFT adapter
(``adapter``) or a new LoRA adapter (``lora``, deterministic for the seed). Weights are rounded to
the requested dtype; bfloat16/float16 models are then upcast to float32, so every curvature
product, generation and the fine-tuning of ``verify`` run in float32 (``compute_dtype``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignscope.errors import MissingExtraError

# Used, with a warning, for models whose tokenizer ships no chat template.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use cpu")
    return torch.device(name)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer, with a documented plain chat template when it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return _check_chat_template(tok, path)


GGUF_INSTALL = "pip install 'alignscope[gguf]'"


@dataclass(frozen=True)
class LoraSpec:
    """A new LoRA adapter: rank ``r``, scale ``alpha`` (default ``2 r``), target modules.

    ``targets=None`` adapts every linear layer of the attention and MLP blocks (peft's
    ``"all-linear"``: ``nn.Linear`` and GPT-2's ``Conv1D``, the output head excluded). B is
    zero-initialised, so the adapted model equals the base model at theta0.
    """

    r: int
    alpha: float | None = None
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError("--lora-r must be at least 1")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError("--lora-alpha must be positive")

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r


def compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for 16-bit weights, else the weights' own dtype."""
    dt = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    return torch.float32 if dt in (torch.bfloat16, torch.float16) else dt


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            f"loading a .gguf model needs the gguf package: {GGUF_INSTALL}"
        ) from None


def _check_chat_template(tok, path: str | Path):
    if getattr(tok, "chat_template", None) is None:
        warnings.warn(
            f"{path}: the tokenizer has no chat template; using alignscope's plain template "
            "('user: ...\\nassistant:'). Results depend on the template: pass a chat model.",
            stacklevel=3,
        )
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def load_model(
    path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    *,
    adapter: str | Path | None = None,
    lora: LoraSpec | None = None,
    seed: int = 0,
):
    """``(model, tokenizer)`` from a local model directory, a hub id (when online) or a local
    ``.gguf`` file (dequantised by transformers' GGUF loader; needs the ``gguf`` extra).

    The weights are loaded (rounded) in ``dtype``; 16-bit models are then upcast to float32
    (:func:`compute_dtype`). ``adapter``: a PEFT adapter directory loaded on top, trainable.
    ``lora``: a new LoRA adapter, initialised from ``seed`` (B = 0). At most one of the two.
    The model comes in eval mode with eager attention, so forward-mode AD works through it.

    Args:
        path: a model directory, a hub id or a ``.gguf`` file.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``float64`` (the weights' rounding).
        device: ``cpu`` | ``cuda`` | ``auto``.
        trust_remote_code: off by default; never turned on by alignscope itself.
        adapter, lora, seed: see above.

    Returns:
        ``(model, tokenizer)``; a tokenizer without a chat template gets a plain one (warned).

    Raises:
        FileNotFoundError: no such directory or GGUF file.
        MissingExtraError: a GGUF file without the ``gguf`` package.
        ValueError: both ``adapter`` and ``lora``, or a bad dtype/device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter is not None and lora is not None:
        raise ValueError("pass either --adapter (an existing adapter) or --lora-r (a new one)")
    p = Path(path)
    kwargs: dict[str, Any] = dict(
        dtype=resolve_dtype(dtype), attn_implementation="eager", trust_remote_code=trust_remote_code
    )
    if is_gguf(path):
        if not p.is_file():
            raise FileNotFoundError(f"model {path}: no such GGUF file")
        _require_gguf()
        source, kwargs["gguf_file"] = str(p.parent), p.name
    else:
        if not p.exists() and ("/" not in str(path) or str(path).startswith((".", "/"))):
            raise FileNotFoundError(f"model {path}: no such directory")
        source = str(path)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if "gguf_file" in kwargs:
        # The weights are dequantised torch tensors now; the GGUF quantizer left on the model
        # only makes save_pretrained refuse ("not serializable"), which breaks watch's last-safe
        # checkpoint and any saving of a fine-tuned GGUF model.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **tok_kwargs)
    tok = _check_chat_template(tok, path)
    model = model.to(device=resolve_device(device), dtype=compute_dtype(dtype))
    if adapter is not None or lora is not None:
        model = attach_adapter(model, adapter=adapter, lora=lora, seed=seed)
    return model.eval(), tok


def attach_adapter(model, *, adapter: str | Path | None = None, lora: LoraSpec | None = None,
                   seed: int = 0):  # fmt: skip
    """Wrap ``model`` (in place) with an existing PEFT adapter or a new LoRA adapter.

    Only the adapter weights are trainable afterwards. A new adapter's A matrices are drawn from
    ``seed`` (without touching the global RNG) and its B matrices are zero, so the model's
    outputs are unchanged.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"--adapter {adapter}: no such adapter directory")
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    assert lora is not None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.scale_alpha,
        lora_dropout=0.0,
        target_modules=list(lora.targets) if lora.targets else "all-linear",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as err:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"--lora-targets: {err}") from None
    return wrapped


# Vocabulary assumed for memory sizing when a model states none (a typical modern LM's order).
DEFAULT_VOCAB_SIZE = 50_000


def vocab_size(model) -> int:
    """The model's vocabulary size, for sizing logit-shaped buffers.

    Read from ``config.vocab_size``, else the text config of a multimodal model, else the rows of
    the output embeddings; ``DEFAULT_VOCAB_SIZE`` when none of them says.
    """
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if not size and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    if not size and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        size = int(weight.shape[0]) if weight is not None else None
    return int(size) if size else DEFAULT_VOCAB_SIZE


def adapter_modules(model) -> list[str]:
    """Names of the modules that carry a LoRA adapter, sorted."""
    return sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n})


def describe_adapter(
    model, adapter: str | Path | None = None, targets: list[str] | str | None = None
) -> dict[str, Any] | None:
    """A JSON-ready summary of the PEFT adapter on ``model`` (None without one): where it came
    from, r, alpha, the targets asked for (``targets``, else the adapter config's) and the
    modules that carry it."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    name = getattr(model, "active_adapter", "default")
    cfg = configs[name if isinstance(name, str) else name[0]]
    targets = cfg.target_modules if targets is None else targets
    targets = sorted(targets) if isinstance(targets, set | list | tuple) else targets
    return {
        "source": str(adapter) if adapter is not None else "new (B = 0, A from the seed)",
        "type": str(getattr(cfg, "peft_type", "LORA")).rsplit(".", 1)[-1],
        "r": getattr(cfg, "r", None),
        "alpha": getattr(cfg, "lora_alpha", None),
        "target_modules": targets,
        "modules": adapter_modules(model),
        "n_adapter_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
    }
