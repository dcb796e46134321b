"""Tokenize (prompt, response) pairs with a chat template and batch them with response masks.

Batches are right-padded. With causal attention a real token never attends to a later pad, so
the logits at real positions do not depend on padding and no attention mask has to be passed to
the model: this keeps every forward pass a pure function of ``input_ids`` (vmap- and
forward-mode-friendly, no data-dependent mask construction inside transformers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncodedPair:
    """One tokenized example: chat-formatted prompt ids (with generation prompt), response ids."""

    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class LMBatch:
    """A right-padded batch of (prompt, response) sequences.

    ``response_mask[b, t]`` is True where token ``t`` of example ``b`` is a response token; such a
    token is predicted by the logits at position ``t - 1``. ``target_mask`` is that mask shifted
    onto the predicting positions, so ``logits[target_mask]`` are exactly the response predictions.
    """

    input_ids: torch.Tensor  # [B, T] long
    response_mask: torch.Tensor  # [B, T] bool
    lengths: torch.Tensor  # [B] long, real (unpadded) lengths

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_mask(self) -> torch.Tensor:
        """[B, T-1] bool: positions whose next-token prediction is a response token."""
        return self.response_mask[:, 1:]

    @property
    def targets(self) -> torch.Tensor:
        """[B, T-1] long: the next token at every position."""
        return self.input_ids[:, 1:]

    @property
    def n_response_tokens(self) -> torch.Tensor:
        """[B] number of response tokens of each example."""
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(
            self.input_ids.to(device), self.response_mask.to(device), self.lengths.to(device)
        )

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> LMBatch:
        """A sub-batch (trimmed to its own longest example)."""
        ids, mask, lengths = self.input_ids[index], self.response_mask[index], self.lengths[index]
        if ids.dim() == 1:
            ids, mask, lengths = ids[None], mask[None], lengths.reshape(1)
        width = int(lengths.max()) if lengths.numel() else 0
        return LMBatch(ids[:, :width], mask[:, :width], lengths)


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_pair(tokenizer, prompt: str, response: str) -> EncodedPair:
    """Tokenize one pair through the tokenizer's chat template.

    The prompt part is the template rendered with the generation prompt; the response part is
    what the full conversation adds after it (so the end-of-turn tokens count as response).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template; set tokenizer.chat_template (or load the model "
            "through alignscope.models, which installs a documented plain template)"
        )
    user = [{"role": "user", "content": prompt}]
    prompt_text = _render(tokenizer, user, add_generation_prompt=True)
    full_text = _render(
        tokenizer, [*user, {"role": "assistant", "content": response}], add_generation_prompt=False
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if full_text.startswith(prompt_text):
        response_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)[
            "input_ids"
        ]
    else:  # templates that rewrite earlier turns: fall back to the raw response plus EOS
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = [*response_ids, tokenizer.eos_token_id]
    return EncodedPair(list(prompt_ids), list(response_ids))


def encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None = None
) -> list[EncodedPair]:
    """Tokenize many pairs; raise when one cannot fit ``max_length`` even without its response
    (:func:`fit_to_length` drops such examples and cuts long responses instead)."""
    encoded = [encode_pair(tokenizer, p, r) for p, r in pairs]
    if max_length is not None:
        for i, e in enumerate(encoded):
            if len(e.prompt_ids) >= max_length:
                raise ValueError(
                    f"example {i}: the prompt alone is {len(e.prompt_ids)} tokens, longer than the "
                    f"context of {max_length}; shorten it or raise --max-length"
                )
    return encoded


@dataclass(frozen=True)
class Fit:
    """What :func:`fit_to_length` did: responses cut, examples dropped (by index), kept indices."""

    max_length: int | None
    n_examples: int
    truncated: int  # examples whose response was cut to fit
    dropped: list[int]  # examples whose prompt alone fills the context
    kept: list[int]

    def summary(self) -> dict[str, int | None]:
        return {
            "max_length": self.max_length,
            "examples": self.n_examples,
            "truncated": self.truncated,
            "dropped": len(self.dropped),
        }


def fit_to_length(
    encoded: Sequence[EncodedPair], max_length: int | None
) -> tuple[list[EncodedPair], Fit]:
    """Fit examples into ``max_length`` tokens: cut responses, drop over-long prompts.

    An example whose prompt alone has ``max_length`` tokens or more is dropped rather than
    left-truncated: cutting the start of a chat-formatted prompt removes the template's opening
    tokens (an input the model never sees) and can change what a harmful request asks. Raises
    when every example is dropped.
    """
    if max_length is None:
        return list(encoded), Fit(None, len(encoded), 0, [], list(range(len(encoded))))
    kept, out, dropped, truncated = [], [], [], 0
    for i, e in enumerate(encoded):
        room = max_length - len(e.prompt_ids)
        if room < 1:
            dropped.append(i)
            continue
        truncated += len(e.response_ids) > room
        kept.append(i)
        out.append(EncodedPair(e.prompt_ids, e.response_ids[:room]))
    if encoded and not out:
        longest = max(len(e.prompt_ids) for e in encoded)
        raise ValueError(
            f"all {len(encoded)} prompts are at least as long as the context of {max_length} "
            f"tokens (longest {longest}), leaving no room for a response, and were dropped; "
            "raise --max-length or shorten the prompts"
        )
    return out, Fit(max_length, len(encoded), truncated, dropped, kept)


def collate(
    examples: Sequence[EncodedPair], pad_id: int = 0, max_length: int | None = None
) -> LMBatch:
    """Right-pad examples into an :class:`LMBatch`; responses are cut to ``max_length``."""
    if not examples:
        raise ValueError("cannot build a batch from zero examples: the dataset is empty")
    rows, masks = [], []
    for i, e in enumerate(examples):
        ids = e.prompt_ids + e.response_ids
        mask = [False] * len(e.prompt_ids) + [True] * len(e.response_ids)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            raise ValueError(
                f"example {i} has no response tokens (after truncation to {max_length}); "
                "every example needs a non-empty response"
            )
        rows.append(ids)
        masks.append(mask)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[b, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return LMBatch(input_ids, response_mask, lengths)


def batch_rows(
    tokenizer, rows: Sequence[Mapping[str, str]], max_length: int | None, what: str = "rows"
) -> tuple[LMBatch, Fit]:
    """The batch of ``{"prompt", "response"}`` rows fitted into ``max_length`` (responses cut,
    over-long prompts dropped: ``Fit.kept`` says which rows are in it); errors name ``what``."""
    pairs = [(r["prompt"], r["response"]) for r in rows]
    try:
        enc, fit = fit_to_length(encode_pairs(tokenizer, pairs), max_length)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate(enc, pad_id=pad, max_length=max_length), fit
