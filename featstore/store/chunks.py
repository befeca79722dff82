"""Checked reads: a fast checksum per chunk of hidden states, verified on every read (format 1.2).

The hidden states are cut along tokens into checked chunks of `chunk_rows` tokens (their own
unit, smaller than the layout's storage chunk so that reading one sequence reads little more
than it). Each chunk has one xxh3-64 checksum per layer where the backend keeps a layer's rows
contiguous (Zarr: an inner chunk holds one layer), or one over all layers where whole rows are
contiguous (HDF5): either way a checked piece is one contiguous run of bytes in the buffer a
read fills, so checking needs no copy. Pieces are about `CHECK_PIECE_BYTES`: small enough for
random access, large enough that the per-piece cost stays small next to the hashing. The writers take the checksums from
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

from collections.abc import Callable, Iterator

import numpy as np
import xxhash

from ..errors import CorruptStoreError
from . import format as fmt
from .manifest import ChunkChecksums, StoreManifest

ALGORITHM = "xxh3_64"
# Two levels over the same bytes: small pieces keep random access cheap (reading one sequence reads little
# more than it), large ones keep streaming cheap (each piece costs a Python call and a GIL hand-over, which
# at 32 KiB pieces cost a quarter of an epoch read's speed; measured in BENCHMARKS.md, "Checked reads").
LEVEL_PIECE_BYTES = {fmt.HIDDEN_CHECKSUMS: 32 * 1024, fmt.HIDDEN_SPAN_CHECKSUMS: 256 * 1024}
MIN_CHUNK_ROWS = 16


def chunk_rows_for(manifest: StoreManifest, per_layer: bool, piece_bytes: int) -> int:
    """Tokens per checked chunk: a power of two giving pieces of about `piece_bytes` (at least 16 tokens), and
    no more than a write block, so that a damaged chunk names few storage objects."""
    itemsize = np.dtype(fmt.NUMPY_STORAGE_DTYPE[manifest.extraction.storage_dtype]).itemsize
    row_bytes = manifest.encoder.hidden_size * itemsize * (1 if per_layer else len(manifest.extraction.layers))
    rows = min(max(MIN_CHUNK_ROWS, piece_bytes // row_bytes), manifest.layout.block_tokens)
    return 1 << (rows.bit_length() - 1)


def level_rows(manifest: StoreManifest, per_layer: bool) -> dict[str, int]:
    """Checksum array name -> tokens per checked chunk, for each level."""
    return {array: chunk_rows_for(manifest, per_layer, piece_bytes) for array, piece_bytes in LEVEL_PIECE_BYTES.items()}


def _hash(piece: np.ndarray) -> int:
    return xxhash.xxh3_64_intdigest(_bytes(piece))


def piece_checksums(rows: np.ndarray, per_layer: bool) -> np.ndarray:
    """Checksums of one chunk's rows (n, L, H): one per layer, or one over all of them."""
    if not per_layer:
        return np.array([_hash(rows)], dtype=np.uint64)
    return np.array([_hash(rows[:, layer]) for layer in range(rows.shape[1])], dtype=np.uint64)


def whole_pieces(start: int, rows: np.ndarray, piece_rows: int, total_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, rows) of the pieces of `piece_rows` rows (the last may be shorter) that rows start..start+len(rows)
    of an array of `total_rows` cover completely: what a writer can hash from the data in memory."""
    stop = start + len(rows)
    for index in range(-(-start // piece_rows), -(-total_rows // piece_rows)):
        first, last = index * piece_rows, min((index + 1) * piece_rows, total_rows)
        if last > stop:
            return
        yield index, rows[first - start: last - start]


def chunk_checksums(start: int, rows: np.ndarray, chunk_rows: int, total_rows: int, per_layer: bool
                    ) -> dict[int, np.ndarray]:
    """Checksums of the chunks that rows start..start+len(rows) cover completely (a writer's data in memory)."""
    return {chunk: piece_checksums(piece, per_layer)
            for chunk, piece in whole_pieces(start, rows, chunk_rows, total_rows)}


class ChunkVerifier:
    """Checks hidden-states reads of one store against its recorded chunk checksums."""

    def __init__(self, path: str, info: ChunkChecksums, sums: np.ndarray, total_rows: int,
                 objects_in: Callable[[int, int], list[str]]) -> None:
        if info.algorithm != ALGORITHM:
            raise CorruptStoreError(f"{path}: unknown chunk checksum algorithm {info.algorithm!r}")
        self.path, self.chunk_rows, self.per_layer = path, info.chunk_rows, info.per_layer
        self.sums, self.total_rows, self.objects_in = sums.tolist(), total_rows, objects_in  # Python ints: fast compare

    def widen(self, start: int, stop: int) -> tuple[int, int]:
        """The whole chunks that cover rows start..stop."""
        return start // self.chunk_rows * self.chunk_rows, min(-(-stop // self.chunk_rows) * self.chunk_rows,
                                                                 self.total_rows)

    def mismatches(self, raw: np.ndarray, first: int, columns: list[int] | None) -> list[str]:
        """Where `raw`, rows first..first+len(raw) (whole chunks) of the stored layers `columns` (None: all
        layers, required when checksums cover whole rows), differs from the checksums."""
        found: list[str] = []
        first_chunk, rows = first // self.chunk_rows, len(raw)
        if not rows:
            return found
        if self.per_layer:
            # Each layer's rows as one run of bytes: the Zarr direct reader fills a layer-major buffer (raw is
            # its transposed view), so this is a view; other paths (token-major) pay one copy per layer.
            layer_major = raw.transpose(1, 0, 2)
            for slot, layer in enumerate(range(raw.shape[1]) if columns is None else columns):
                found += self._check_run(_bytes(layer_major[slot]), rows, first_chunk, layer)
        else:
            found += self._check_run(_bytes(raw), rows, first_chunk, 0)
        return found

    def _check_run(self, data: memoryview, rows: int, first_chunk: int, piece: int) -> list[str]:
        step = len(data) // rows * self.chunk_rows if rows else 0
        sums = self.sums
        return [self._where(first_chunk + index, f", stored layer {piece}" if self.per_layer else "")
                for index, offset in enumerate(range(0, len(data), step))
                if xxhash.xxh3_64_intdigest(data[offset: offset + step]) != sums[first_chunk + index][piece]]

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
        objects = self.objects_in(start, stop)
        return (f"{fmt.HIDDEN_STATES} chunk {chunk} (tokens {start}..{stop}{which}"
                + (f", {'object' if len(objects) == 1 else 'objects'} {', '.join(objects)}" if objects else "") + ")")


def _bytes(array: np.ndarray) -> memoryview:
    """The array's bytes in C order, little-endian (a view when it already is)."""
    return memoryview(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))).cast("B")
