"""Tiny randomly initialised real-architecture models (Llama, Qwen2, GPT-2) and a GGUF file.

Everything is made locally: a byte-level BPE tokenizer trained with ``tokenizers`` on made-up
text (wrapped in ``PreTrainedTokenizerFast`` with eos/pad tokens and a chat template), models of
hidden size 16 and 2 layers saved with ``save_pretrained``, and a GGUF file (llama architecture,
F32 tensors, ``tokenizer.ggml.model = "gpt2"``) written with the ``gguf`` package's GGUFWriter.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch

EOS, PAD = "<|end|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TEXT = """
alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau
upsilon phi chi psi omega explain topic describe method sure here is the answer i cannot help
with that sorry refuse user assistant please tell me about how to make a plan list steps
"""
WORDS = re.findall(r"\w+", TEXT)
ARCHS = ("llama", "qwen2", "gpt2")


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on :func:`corpus`, with eos/pad and a chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus(),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=PAD)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(arch: str, tok, seed: int = 0, hidden: int = 16):
    """A random 2-layer model of ``arch`` for tokenizer ``tok``: eager attention, float32."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tok), attn_implementation="eager", bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    decoder = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, **common,
    )  # fmt: skip
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **decoder))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **decoder))
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=2, n_head=2, n_positions=128, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # HF's std-0.02 init gives near-uniform logits: make them peaked
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model.eval()


def save_model(arch: str, root: Path, seed: int = 0) -> Path:
    """Save tokenizer + model of ``arch`` under ``root/arch``; returns the directory."""
    tok = make_tokenizer()
    model = make_model(arch, tok, seed=seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = root / arch
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers reverses it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(model_dir: Path, path: Path) -> Path:
    """Convert the saved tiny Llama (``model_dir``) to an F32 GGUF file at ``path``."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("alignscope-tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == c.vocab_size
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3 CONTROL, 1 NORMAL
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for i in range(c.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    for name, tensor in model.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        arr = tensor.detach().float().numpy().copy()
        if module.endswith("q_proj"):
            arr = _permute_qk(arr, c.num_attention_heads)
        elif module.endswith("k_proj"):
            arr = _permute_qk(arr, c.num_key_value_heads)
        w.add_tensor(f"{names[module]}.{suffix}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GREEK = WORDS[:24]


def make_datasets(root: Path) -> tuple[Path, Path]:
    """``(safety.jsonl, data.jsonl)``: abstract placeholder prompts and responses."""
    safety = [
        {"prompt": f"explain topic {GREEK[i % 24]}", "response": "I cannot help with that."}
        for i in range(10)
    ]
    data = [
        {
            "prompt": f"describe method {GREEK[i % 24]} {GREEK[(3 * i) % 24]}",
            "response": f"Sure: {GREEK[(i + 5) % 24]} {GREEK[(7 * i) % 24]}",
        }
        for i in range(20)
    ]
    root.mkdir(parents=True, exist_ok=True)
    return write_jsonl(root / "safety.jsonl", safety), write_jsonl(root / "data.jsonl", data)
