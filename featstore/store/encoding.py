"""Storage encodings, numpy side: hidden states as stored -> floats (docs/store-format.md, "Encodings").

The encodings themselves are a table in format.py (`ENCODINGS`); the extraction side turns encoder
output into them on the encoder's device (`featstore.extraction.encoder.to_storage`). Here: taking a
writer's rows apart into the arrays they are stored in, and decoding what a reader read.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt


def _float8_e4m3_values() -> np.ndarray:
    """The float32 value of every float8 e4m3fn bit pattern (sign, 4 exponent bits with bias 7, 3 mantissa bits;
    no infinities; S.1111.111 is NaN), so decoding is one table lookup."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    values = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0)) * sign
    values[(bits & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


FLOAT8_E4M3_VALUES = _float8_e4m3_values()


def split_wire(rows: np.ndarray, codes_dtype: np.dtype, scaled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A writer's rows (as `to_storage` made them) -> (hidden_states rows, hidden_scales rows or None)."""
    if not scaled:
        return np.asarray(rows, dtype=codes_dtype), None
    width = rows.shape[-1] - fmt.SCALE_BYTES
    codes = np.ascontiguousarray(rows[..., :width]).view(codes_dtype)
    scales = np.ascontiguousarray(rows[..., width:]).view(np.float32)[..., 0]
    return codes, scales


def decoded_dtype(storage_dtype: str) -> np.dtype:
    """The dtype `decode_hidden` returns for a storage dtype: float16 and float32 as stored, the others float32."""
    return np.dtype(np.float16 if storage_dtype == "float16" else np.float32)


def decode_hidden(stored: np.ndarray, storage_dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored hidden states (T, L, H) as numpy floats: float16/float32 as stored, bfloat16 widened to float32, a
    scaled encoding's codes times their (T, L) scales in float32."""
    if storage_dtype == "bfloat16":
        return (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    encoding = fmt.ENCODINGS[storage_dtype]
    if not encoding.scaled:
        return stored
    if scales is None:
        raise ValueError(f"{storage_dtype} hidden states need their scales to be decoded")
    if storage_dtype == "float8_e4m3":
        values = FLOAT8_E4M3_VALUES[stored]
        return np.multiply(values, scales[..., None], out=values)
    return np.multiply(stored, scales[..., None], dtype=np.float32)  # one pass: 2.5x astype-then-multiply
