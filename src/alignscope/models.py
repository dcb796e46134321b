"""Loading Hugging Face causal LMs and their tokenizers for analysis.

Safe by default: never ``trust_remote_code`` unless asked, safetensors preferred, eager attention
(forward-mode AD through fused kernels is not implemented in torch).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

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
    if getattr(tok, "chat_template", None) is None:
        warnings.warn(
            f"{path}: the tokenizer has no chat template; using alignscope's plain template "
            "('user: ...\\nassistant:'). Results depend on the template: pass a chat model.",
            stacklevel=2,
        )
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def load_model(
    path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """``(model, tokenizer)`` from a local model directory (or a hub id when online).

    The model comes in eval mode with eager attention, so forward-mode AD works through it.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.exists() and ("/" not in str(path) or str(path).startswith((".", "/"))):
        raise FileNotFoundError(f"model {path}: no such directory")
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=resolve_dtype(dtype),
        attn_implementation="eager",
        trust_remote_code=trust_remote_code,
    )
    model.to(resolve_device(device)).eval()
    return model, load_tokenizer(path, trust_remote_code)
