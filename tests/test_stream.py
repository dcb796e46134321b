"""The training stream: what verify, rank's lookahead and the fine-tuning loop train on."""

import pytest
import torch

from alignscope.data.encode import collate, encode_pairs
from alignscope.organism.tokenizer import build_tokenizer
from alignscope.train.stream import batch_indices, training_stream


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["a b c d e f g h"])


def test_stream_fits_like_diagnose_and_counts_drops(tok):
    rows = [
        {"prompt": "a", "response": "b"},
        {"prompt": "a b", "response": "c d e f"},
        {"prompt": "a b c d e f", "response": "g"},  # 9-token prompt: no room in 8
    ]
    stream = training_stream(tok, rows, batch_size=2, seed=0, max_length=8)
    assert len(stream) == 2
    assert stream.summary() == {"max_length": 8, "examples": 3, "truncated": 1, "dropped": 1}
    assert stream.fit is not None and stream.fit.kept == [0, 1]
    with pytest.raises(ValueError, match=r"^set x: all 1 prompts"):
        training_stream(tok, rows[2:], batch_size=1, seed=0, max_length=8, what="set x")
    with pytest.raises(ValueError, match="set y: no examples"):
        training_stream(tok, [], batch_size=1, seed=0, max_length=8, what="set y")


def test_stream_batches_follow_the_seeded_order_and_resume(tok):
    rows = [(f"{w}", "h") for w in "abcdefg"]
    stream = training_stream(tok, rows, batch_size=3, seed=5, max_length=None)
    enc = encode_pairs(tok, rows)
    order = batch_indices(len(rows), 3, 5)
    batches = stream.batches()
    first = [next(batches) for _ in range(4)]
    for got in first:  # the permutation stream cut into batches, epochs running on
        want = collate([enc[i] for i in next(order)], pad_id=tok.pad_token_id)
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.response_mask, want.response_mask)
    resumed = next(stream.batches(start_step=3))  # a resumed run sees the 4th batch next
    assert torch.equal(resumed.input_ids, first[3].input_ids)
    singles = batch_indices(7, 1, 5)
    assert sorted(next(singles)[0] for _ in range(7)) == list(range(7))  # an epoch: each once
