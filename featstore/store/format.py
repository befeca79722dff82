"""The store format: names, dtypes, attributes and the fingerprint rule (docs/store-format.md).

Kept small and strict on purpose (like safetensors). The attributes' typed form, and the
fingerprint rule, are in manifest.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMAT_NAME = "featstore"
FORMAT_VERSION = "1.1"
ATTRS_KEY = "featstore"

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"

# Arrays. Token-level arrays are in storage order, concatenated without padding.
HIDDEN_STATES = "hidden_states"  # (num_tokens, num_layers, hidden) float16 | float32 | bfloat16-as-uint16
INPUT_IDS = "input_ids"  # (num_tokens,) int32
WORD_IDS = "word_ids"  # (num_tokens,) int32, -1 for special tokens
TOKEN_WINDOW = "token_window"  # (num_tokens,) int16, window the token's vectors come from
TOKEN_OFFSETS = "token_offsets"  # (num_sequences + 1,) int64
WORD_OFFSETS = "word_offsets"  # (num_sequences + 1,) int64
SEQUENCE_INDEX = "sequence_index"  # (num_sequences,) int64: corpus row of each stored sequence
WORD_LABELS = "word_labels"  # (num_words,) int32, token classification only
LABELS = "labels"  # (num_sequences,) int64 (classification) or float32 (regression)
PROGRESS = "progress"  # (2,) int64: committed sequences, committed tokens

BACKEND_NAMES = ("zarr", "hdf5")  # a Zarr v3 group (a directory) or an HDF5 file
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
# numpy has no bfloat16: its raw bits are stored as uint16 and decoded by the reader.
NUMPY_STORAGE_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}

def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def format_major(version: str) -> int:
    return int(str(version).split(".")[0])
