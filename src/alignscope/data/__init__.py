"""Datasets: (prompt, response) pairs, chat templates, tokenized batches with response masks."""

from alignscope.data.encode import EncodedPair, LMBatch, collate, encode_pair, encode_pairs

__all__ = ["EncodedPair", "LMBatch", "collate", "encode_pair", "encode_pairs"]
