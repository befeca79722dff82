"""Checked reads: a fast checksum per chunk of hidden states, verified on every read (format 1.2).

The hidden states are cut along tokens into chunks of `chunk_rows` tokens (the layout's
inner chunk). Each chunk has one xxh3-64 checksum per layer where the backend stores a layer
of a chunk as one contiguous piece (Zarr: the inner chunk), or one over all its layers where
a chunk's rows are contiguous (HDF5, read whole rows): the unit is what the backend reads in
one piece, so checking never needs an extra copy or read. The writers take the checksums from
the data in memory; finalize stores them in `hidden_checksums`. A reader widens every read to
whole chunks and checks each piece before any value is used, so a missing object, a flipped
byte or a replaced store raises an error instead of returning zeros or other numbers.

Why our own checksum and not the libraries' (Zarr's crc32c codec, HDF5's fletcher32 filter):
HDF5 filters need a chunked layout, which would give up the contiguous layout that keeps a
killed write resumable; and the fast read paths (direct shard and file reads) bypass both
libraries. One content checksum, the same for both backends' paths, is checked everywhere.
xxh3 runs at tens of GB/s and releases the GIL (measured in BENCHMARKS.md, "Checked reads").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xxhash

from ..errors import CorruptStoreError
from . import format as fmt
from .manifest import ChunkChecksums

ALGORITHM = "xxh3_64"


def piece_checksums(rows: np.ndarray, per_layer: bool) -> np.ndarray:
    """Checksums of one chunk's rows (n, L, H): one per layer, or one over all of them."""
    if not per_layer:
        return np.array([_hash(rows)], dtype=np.uint64)
    return np.array([_hash(rows[:, layer]) for layer in range(rows.shape[1])], dtype=np.uint64)


def _hash(piece: np.ndarray) -> int:
    data = np.ascontiguousarray(piece, dtype=piece.dtype.newbyteorder("<"))  # no copy when already contiguous
    return xxhash.xxh3_64_intdigest(memoryview(data).cast("B"))


def chunk_checksums(start: int, rows: np.ndarray, chunk_rows: int, total_rows: int, per_layer: bool
                    ) -> dict[int, np.ndarray]:
    """Checksums of the chunks that rows start..start+len(rows) cover completely (a writer's data in memory)."""
    sums, stop = {}, start + len(rows)
    for chunk in range(-(-start // chunk_rows), -(-total_rows // chunk_rows)):
        first, last = chunk * chunk_rows, min((chunk + 1) * chunk_rows, total_rows)
        if last > stop:
            break
        sums[chunk] = piece_checksums(rows[first - start: last - start], per_layer)
    return sums


class ChunkVerifier:
    """Checks hidden-states reads of one store against its recorded chunk checksums."""

    def __init__(self, path: str, info: ChunkChecksums, sums: np.ndarray, total_rows: int,
                 object_at: Callable[[int], str | None]) -> None:
        if info.algorithm != ALGORITHM:
            raise CorruptStoreError(f"{path}: unknown chunk checksum algorithm {info.algorithm!r}")
        self.path, self.chunk_rows, self.per_layer = path, info.chunk_rows, info.per_layer
        self.sums, self.total_rows, self.object_at = sums, total_rows, object_at

    def widen(self, start: int, stop: int) -> tuple[int, int]:
        """The whole chunks that cover rows start..stop."""
        return start // self.chunk_rows * self.chunk_rows, min(-(-stop // self.chunk_rows) * self.chunk_rows,
                                                                 self.total_rows)

    def mismatches(self, raw: np.ndarray, first: int, columns: list[int] | None) -> list[str]:
        """Where `raw`, rows first..first+len(raw) (whole chunks) of the stored layers `columns` (None: all
        layers, required when checksums cover whole rows), differs from the checksums."""
        found = []
        for offset in range(0, len(raw), self.chunk_rows):
            chunk = (first + offset) // self.chunk_rows
            rows = raw[offset: offset + self.chunk_rows]
            if self.per_layer:
                layers = range(rows.shape[1]) if columns is None else columns
                found += [self._where(chunk, f", stored layer {layer}") for slot, layer in enumerate(layers)
                          if _hash(rows[:, slot]) != int(self.sums[chunk, layer])]
            elif _hash(rows) != int(self.sums[chunk, 0]):
                found.append(self._where(chunk, ""))
        return found

    def check(self, raw: np.ndarray, first: int, columns: list[int] | None) -> None:
        """Raise at the first mismatch (see `mismatches`)."""
        found = self.mismatches(raw, first, columns)
        if found:
            raise CorruptStoreError(
                f"{self.path}: {found[0]} does not match its checksum" + (f" (and {len(found) - 1} more)"
                                                                          if len(found) > 1 else "")
                + ": the data are missing or damaged, or the store was replaced since it was opened. Nothing "
                f"from it was used; run `featstore verify {self.path}` for a full report")

    def _where(self, chunk: int, which: str) -> str:
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.total_rows)
        where = self.object_at(start)
        return (f"{fmt.HIDDEN_STATES} chunk {chunk} (tokens {start}..{stop}{which}"
                + (f", object {where}" if where else "") + ")")
