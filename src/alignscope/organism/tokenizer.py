"""A word-level tokenizer for the organism, saved as a standard Hugging Face tokenizer.

Words are split on whitespace only (no punctuation splitting), so a normalized corpus string
(single spaces, punctuation as separate words) round-trips exactly: ``decode(encode(s)) == s``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>"
SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS, USER, ASSISTANT)

# "<bos> <user> {prompt} <assistant> {response} <eos>". The generation prompt ends with
# "<assistant>", and a full conversation extends it, which data.encode.encode_pair relies on.
# Only user and assistant turns exist in the organism's world; other roles are an error.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' <user> ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' <assistant> ' + message['content'] + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('the organism knows only user and assistant turns') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' <assistant>' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], max_length: int = 64) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word of ``texts`` (sorted: deterministic ids)."""
    words = sorted({w for t in texts for w in t.split()} - set(SPECIALS))
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: tokenizers joins decoded tokens with single spaces, the corpus normal form.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
