"""Tiny float64 models and batches for dense-reference tests (imported by test modules)."""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from alignscope.curvature.functional import EXACT_EAGER
from alignscope.data.encode import EncodedPair, LMBatch, collate

VOCAB = 11


def tiny_llama(
    seed: int = 0, hidden: int = 8, layers: int = 2, vocab: int = VOCAB
) -> LlamaForCausalLM:
    """A random float64 Llama with exact eager attention (a few thousand parameters)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        attn_implementation=EXACT_EAGER,
    )
    model = exact_float64(LlamaForCausalLM(config))
    # HF initialises with std 0.02: scale up so logits are far from uniform and curvature is
    # not dominated by a near-uniform softmax.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20.0)
    return model


def _rmsnorm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_float64(model: nn.Module) -> nn.Module:
    """Cast to float64 and make RMSNorm compute in float64 too.

    Transformers' RMSNorm upcasts to float32 and back, which is exact for float32 models but caps
    a float64 model's derivatives at float32 precision; dense-reference tests need all float64.
    """
    model = model.to(torch.float64).eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rmsnorm_in_input_dtype, module)
    return model


def trained_lora(model: nn.Module, layers: list[int] | None = None) -> nn.Module:
    """``model`` with a float64 rank-2 LoRA adapter on q/v/down projections (of ``layers``, or
    every layer), its B matrices drawn non-zero so the adapter is not the identity map."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=2, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=layers
    )
    wrapped = exact_float64(get_peft_model(model, config))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    return wrapped


class TinyMLPLM(nn.Module):
    """A position-wise MLP language model: embedding -> tanh MLP -> logits (no attention)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)
        self.double()

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.embed(input_ids))))


def random_pairs(n: int = 4, seed: int = 1, vocab: int = VOCAB) -> list[EncodedPair]:
    """Examples of different prompt and response lengths (so padding and masks matter)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        lp, lr = 2 + (i % 3), 1 + (i * 2) % 4
        ids = torch.randint(1, vocab, (lp + lr,), generator=gen).tolist()
        examples.append(EncodedPair(ids[:lp], ids[lp:]))
    return examples


def random_batch(n: int = 4, seed: int = 1, vocab: int = VOCAB) -> LMBatch:
    """:func:`random_pairs` collated into one padded batch."""
    return collate(random_pairs(n, seed, vocab), pad_id=0)
