"""The store format: names, dtypes, encodings, attributes and the fingerprint rule (docs/store-format.md).

Kept small and strict on purpose (like safetensors). The attributes' typed form, and the
fingerprint rule, are in manifest.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_NAME = "featstore"
FORMAT_VERSION = "1.4"
ATTRS_KEY = "featstore"

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

# Arrays. Token-level arrays are in storage order, concatenated without padding.
HIDDEN_STATES = "hidden_states"  # (num_tokens, num_layers, hidden) in the storage encoding's array dtype
HIDDEN_SCALES = "hidden_scales"  # (num_tokens, num_layers) float32 (1.3, scaled encodings): one scale per token/layer
INPUT_IDS = "input_ids"  # (num_tokens,) int32
WORD_IDS = "word_ids"  # (num_tokens,) int32, -1 for special tokens
TOKEN_WINDOW = "token_window"  # (num_tokens,) int16, window the token's vectors come from
TOKEN_OFFSETS = "token_offsets"  # (num_sequences + 1,) int64
WORD_OFFSETS = "word_offsets"  # (num_sequences + 1,) int64
SEQUENCE_INDEX = "sequence_index"  # (num_sequences,) int64: corpus row of each stored sequence
WORD_LABELS = "word_labels"  # (num_words,) int32, token classification only
LABELS = "labels"  # (num_sequences,) int64 (classification) or float32 (regression)
PROGRESS = "progress"  # (2,) int64: committed sequences, committed tokens
HIDDEN_CHECKSUMS = "hidden_checksums"  # (chunks, pieces) uint64 (1.2): xxh3-64 of small hidden-states pieces
HIDDEN_SPAN_CHECKSUMS = "hidden_span_checksums"  # (chunks, pieces) uint64 (1.2): the same over large pieces
ARRAY_NAMES = (HIDDEN_STATES, HIDDEN_SCALES, INPUT_IDS, WORD_IDS, TOKEN_WINDOW, TOKEN_OFFSETS, WORD_OFFSETS,
               SEQUENCE_INDEX, WORD_LABELS, LABELS, PROGRESS, HIDDEN_CHECKSUMS, HIDDEN_SPAN_CHECKSUMS)

# The dtype of every array but the hidden states (whose dtype follows the storage dtype); verify and the
# reader refuse a store whose arrays say otherwise (same bytes under another dtype are garbage values).
ARRAY_DTYPES = {HIDDEN_SCALES: "float32", INPUT_IDS: "int32", WORD_IDS: "int32", TOKEN_WINDOW: "int16",
                TOKEN_OFFSETS: "int64", WORD_OFFSETS: "int64", SEQUENCE_INDEX: "int64", WORD_LABELS: "int32",
                PROGRESS: "int64", HIDDEN_CHECKSUMS: "uint64", HIDDEN_SPAN_CHECKSUMS: "uint64"}
# LABELS holds int64 class ids or float32 regression targets, by task.

# `corpus.task`: what the labels are.
TOKEN_CLASSIFICATION = "token-classification"  # one label per word (word_labels)
SEQUENCE_CLASSIFICATION = "sequence-classification"  # one class id per sequence (labels, int64)
REGRESSION = "regression"  # one target per sequence (labels, float32)
TASKS = (TOKEN_CLASSIFICATION, SEQUENCE_CLASSIFICATION, REGRESSION)

BACKEND_NAMES = ("zarr", "hdf5")  # a Zarr v3 group (a directory) or an HDF5 file


@dataclass(frozen=True)
class Encoding:
    """How hidden states are stored (`extraction.storage_dtype`). A scaled encoding stores codes in
    `hidden_states` and, in `hidden_scales`, one float32 scale per token and layer: value = code * scale, with
    scale = the row's largest magnitude / `code_max` (symmetric absmax), so every row uses the codes' full range."""

    array_dtype: str  # numpy dtype of `hidden_states`: neither Zarr nor HDF5 has bfloat16 or float8, so their bits
    scaled: bool = False
    code_max: float = 0.0  # largest code magnitude (scaled encodings)


ENCODINGS = {
    "float16": Encoding("float16"),
    "bfloat16": Encoding("uint16"),  # raw bfloat16 bits
    "float32": Encoding("float32"),
    "int8": Encoding("int8", scaled=True, code_max=127.0),
    "float8_e4m3": Encoding("uint8", scaled=True, code_max=448.0),  # raw float8 e4m3fn bits (OCP FP8, no inf)
}
STORAGE_DTYPES = tuple(ENCODINGS)
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")  # what an encoder can run in
NUMPY_STORAGE_DTYPE = {name: encoding.array_dtype for name, encoding in ENCODINGS.items()}
SCALE_BYTES = 4  # one float32 scale per token and layer


def code_bytes_per_token(storage_dtype: str, num_layers: int, hidden_size: int) -> int:
    """Bytes one token takes in `hidden_states` (what `counts.hidden_bytes` counts, per token)."""
    return num_layers * hidden_size * np.dtype(ENCODINGS[storage_dtype].array_dtype).itemsize


def stored_bytes_per_token(storage_dtype: str, num_layers: int, hidden_size: int) -> int:
    """Bytes one token takes in the hidden-state arrays (scales included)."""
    scales = num_layers * SCALE_BYTES if ENCODINGS[storage_dtype].scaled else 0
    return code_bytes_per_token(storage_dtype, num_layers, hidden_size) + scales


# Lossless codecs on the hidden states (`layout.compression`, 1.4): name -> (lowest level, highest, default).
# "zstd" is Blosc's zstd after a byte shuffle: the bytes of 2- and 4-byte values are grouped by significance
# first, where zstd finds the runs that sign and exponent bytes make (1-byte codes are compressed as they are).
COMPRESSION_CODECS = {"zstd": (1, 9, 5)}
NO_COMPRESSION = "none"  # the --compression value that asks for raw chunks


@dataclass(frozen=True)
class Compression:
    codec: str
    level: int

    @classmethod
    def parse(cls, text: str) -> Compression:
        """"zstd" or "zstd:LEVEL" (ValueError saying what is accepted otherwise)."""
        codec, _, level_text = text.strip().lower().partition(":")
        if codec not in COMPRESSION_CODECS:
            raise ValueError(f"unknown compression {text!r}; choose from {', '.join(COMPRESSION_CODECS)} "
                             "(optionally :LEVEL)")
        lowest, highest, default = COMPRESSION_CODECS[codec]
        try:
            level = int(level_text) if level_text else default
        except ValueError:
            level = lowest - 1
        if not lowest <= level <= highest:
            raise ValueError(f"compression {text!r}: the {codec} level is an integer from {lowest} to {highest}")
        return cls(codec, level)

    def __str__(self) -> str:
        return f"{self.codec}:{self.level}"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def format_major(version: str) -> int:
    return int(str(version).split(".")[0])


def format_tuple(version: str) -> tuple[int, ...]:
    """"1.2" -> (1, 2), for comparing versions."""
    return tuple(int(part) for part in str(version).split("."))


INTEGRITY_SINCE = (1, 1)  # complete stores of this format version and later carry an `integrity` section
