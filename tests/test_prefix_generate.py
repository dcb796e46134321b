"""Generation with the frozen prefix's states recorded and reused: the same tokens as a plain
``generate`` and the same logits at the prefill and every decode step, in float64, on tiny
Llama, Qwen2 and GPT-2 models (left padding, prompts of different lengths, two batches)."""

from __future__ import annotations

import pytest
import torch

from _hf_models import ARCHS, corpus, make_model, make_tokenizer
from _tiny import exact_float64
from alignscope.curvature.functional import EXACT_EAGER
from alignscope.evaluate import _pad_left, _prompt_texts, generate
from alignscope.params import select_params
from alignscope.train.prefix_generate import GenerationPrefix

SUFFIX = {"llama": "model.layers.1.*", "qwen2": "model.layers.1.mlp.*", "gpt2": "transformer.h.1.*"}
PROMPTS = [" ".join(corpus(12, seed=3)[i : i + 1 + i % 4]) for i in range(7)]  # 7 lengths


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _model(arch: str, tok):
    model = exact_float64(make_model(arch, tok))
    model.config._attn_implementation = EXACT_EAGER  # softmax in float64 too
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _nudge(tensors, seed: int) -> None:
    """A training step's worth of change (the suffix) or a change to the frozen prefix."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors:
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _token_ids(model, tok, prefix=None, n: int = 8) -> list[torch.Tensor]:
    out = []
    for start in range(0, len(PROMPTS), 4):  # two batches of different widths
        enc = _pad_left(tok, _prompt_texts(tok, PROMPTS[start : start + 4]), tok.pad_token_id)
        kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        if prefix is None:
            out.append(model.generate(**enc, **kw))
        else:
            with prefix.serving(enc["input_ids"], enc["attention_mask"]):
                out.append(model.generate(**enc, **kw))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_same_tokens_and_logits_as_plain_generate(arch, tok):
    model = _model(arch, tok)
    sel = select_params(model, SUFFIX[arch])
    prefix = GenerationPrefix.build(model, sel)
    assert prefix is not None
    suffix = list(sel.tensors(model).values())
    lengths = {len(tok(t)["input_ids"]) for t in _prompt_texts(tok, PROMPTS)}
    assert len(lengths) > 3  # left padding matters

    first = _token_ids(model, tok, prefix)  # records both batches
    assert prefix.n_recorded == 2 and prefix.n_replayed == 0
    for a, b in zip(first, _token_ids(model, tok), strict=True):
        assert torch.equal(a, b)
    for seed in (1, 2):  # training moves the suffix: the recorded prompt states still hold
        _nudge(suffix, seed)
        plain = _token_ids(model, tok)
        cached = _token_ids(model, tok, prefix)
        for a, b in zip(cached, plain, strict=True):
            assert torch.equal(a, b)
    assert prefix.n_recorded == 2 and prefix.n_replayed == 4
    changed = [not torch.equal(a, b) for a, b in zip(plain, first, strict=True)]
    assert any(changed), "the nudges should change some responses (else the check is empty)"

    # the prefill's logits, with the position ids generate derives from the mask
    enc = _pad_left(tok, _prompt_texts(tok, PROMPTS[:4]), tok.pad_token_id)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = model(**enc, position_ids=pos, use_cache=True).logits
        with prefix.serving(enc["input_ids"], enc["attention_mask"]):
            got = model(**enc, position_ids=pos, use_cache=True).logits
            # other position ids than the recorded prefill's: the whole network runs
            shifted = model(**enc, position_ids=pos + 1, use_cache=True).logits
        plain_shifted = model(**enc, position_ids=pos + 1, use_cache=True).logits
    assert prefix.n_replayed == 5
    torch.testing.assert_close(shifted, plain_shifted, rtol=0, atol=0)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_changed_prefix_is_recorded_again(arch, tok):
    model = _model(arch, tok)
    sel = select_params(model, SUFFIX[arch])
    prefix = GenerationPrefix.build(model, sel)
    _token_ids(model, tok, prefix)
    frozen = [p for n, p in model.named_parameters() if n not in set(sel.names)]
    _nudge(frozen[:3], 5)  # the embeddings among them
    plain = _token_ids(model, tok)
    cached = _token_ids(model, tok, prefix)
    assert prefix.n_recorded == 4 and prefix.n_replayed == 0
    for a, b in zip(cached, plain, strict=True):
        assert torch.equal(a, b)


def test_generate_with_prefix_and_fallbacks(tok):
    model = _model("llama", tok)
    prefix = GenerationPrefix.build(model, select_params(model, SUFFIX["llama"]))
    plain = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, prefix=prefix) == plain
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, prefix=prefix) == plain
    assert (prefix.n_recorded, prefix.n_replayed) == (2, 2)
    other = _model("llama", tok)
    with pytest.raises(ValueError, match="another model"):
        generate(other, tok, PROMPTS, prefix=prefix)
    # no frozen prefix: layer 0 selected, or no budget
    assert GenerationPrefix.build(model, select_params(model, "model.layers.0.*")) is None
    assert GenerationPrefix.build(model, select_params(model, SUFFIX["llama"]), 0) is None
    # a budget too small for the prompt states: nothing kept, plain prefills, same responses
    small = GenerationPrefix.build(model, select_params(model, SUFFIX["llama"]), 64)
    assert generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, prefix=small) == plain
    assert (small.n_recorded, small.n_replayed, small.nbytes) == (0, 0, 0)


def _logits_per_step(model, tok, prefix=None) -> list[torch.Tensor]:
    """The LM head's output at every forward of generate (prefill: the last position)."""
    seen: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: seen.append(out[:, -1].clone()))
    try:
        _token_ids(model, tok, prefix)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_reuse_rows_seen_before(arch, tok):
    """After a change of the suffix some rows generate what they did before (their prefix
    states come from the record) and some do not (they run the prefix as a smaller batch):
    every step's logits equal the plain generation's."""
    model = _model(arch, tok)
    sel = select_params(model, SUFFIX[arch])
    prefix = GenerationPrefix.build(model, sel)
    first = _token_ids(model, tok, prefix)
    assert prefix.n_rows_reused == 0 and prefix.n_rows_computed > 0
    computed = prefix.n_rows_computed
    _nudge(list(sel.tensors(model).values()), 1)
    want = _logits_per_step(model, tok)
    got = _logits_per_step(model, tok, prefix)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    plain = _token_ids(model, tok)
    assert any(not torch.equal(a, b) for a, b in zip(plain, first, strict=True))
    # both kinds of rows occurred: from the record and through the prefix
    assert prefix.n_rows_reused > 0 and prefix.n_rows_computed > computed
    assert prefix.n_split_steps > 0
    # unchanged weights: every row of every decode step comes from the records
    before = prefix.n_rows_computed
    for a, b in zip(_token_ids(model, tok, prefix), plain, strict=True):
        assert torch.equal(a, b)
    assert prefix.n_rows_computed == before
