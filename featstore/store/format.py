"""The store format: names, dtypes, attributes and the fingerprint rule (docs/store-format.md).

Kept small and strict on purpose (like safetensors): a reader accepts any store of
the same major version and refuses a newer major version with a clear message.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..errors import FeatstoreError

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

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
# numpy has no bfloat16: its raw bits are stored as uint16 and decoded by the reader.
NUMPY_STORAGE_DTYPE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}

# Inputs to the fingerprint: everything that determines the stored values, nothing that
# only determines where or how fast they were written (paths, device, backend, chunking,
# batch token budget). See docs/store-format.md, "Fingerprint".
FINGERPRINT_FIELDS = (
    "format_major", "encoder_weights_sha256", "encoder_config_sha256", "tokenizer_sha256",
    "corpus_fingerprint", "layers", "compute_dtype", "storage_dtype", "max_length", "stride",
    "truncation", "window_rule",
)


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    """Content fingerprint: sha256 of the canonical JSON of exactly FINGERPRINT_FIELDS."""
    missing = [name for name in FINGERPRINT_FIELDS if name not in inputs]
    if missing:
        raise ValueError(f"fingerprint inputs lack {missing}")
    return sha256_json({name: inputs[name] for name in FINGERPRINT_FIELDS})


def format_major(version: str) -> int:
    return int(str(version).split(".")[0])


def check_compatible(attrs: dict[str, Any], where: str) -> None:
    """Refuse stores this version cannot read, with what to do about it."""
    if attrs.get("format") != FORMAT_NAME:
        raise FeatstoreError(f"{where} is not a featstore store (no featstore attributes)")
    version = attrs.get("format_version", "?")
    try:
        major = format_major(version)
    except ValueError:
        raise FeatstoreError(f"{where} has an unreadable format version {version!r}") from None
    if major > format_major(FORMAT_VERSION):
        raise FeatstoreError(f"{where} uses store format {version}, newer than this featstore supports "
                             f"({FORMAT_VERSION}); upgrade featstore to read it")
