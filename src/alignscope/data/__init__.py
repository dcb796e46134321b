"""Datasets: (prompt, response) pairs, chat templates, tokenized batches with response masks."""

from alignscope.data.encode import (
    EncodedPair,
    Fit,
    LMBatch,
    batch_rows,
    collate,
    encode_pair,
    encode_pairs,
    fit_to_length,
)
from alignscope.data.loaders import FORMATS, LoadedRows, load_data, load_rows

__all__ = [
    "FORMATS",
    "EncodedPair",
    "Fit",
    "LMBatch",
    "LoadedRows",
    "batch_rows",
    "collate",
    "encode_pair",
    "encode_pairs",
    "fit_to_length",
    "load_data",
    "load_rows",
]
