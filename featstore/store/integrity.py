"""What finalize records and what is checked against it (docs/store-format.md, "Checksums").

Per-block sha256 digests of every array, checked in full by `featstore verify` and for the
small arrays by every reader at open; the arrays' dtypes and shapes and the attribute
sections' digests, checked at open; and (through chunks.py) the per-chunk checksums that
every hidden-states read is checked against.

Every array is cut along axis 0 into blocks of `layout.block_tokens` rows, the extractor's
write unit (for Zarr, one hidden-states shard object per block). A block's digest is the
sha256 of its rows' bytes as stored (C order, little-endian), so it checks content through
whatever the backend does underneath, and names which block is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import CorruptStoreError
from . import format as fmt
from .backends import ArraySpec, StoreBackend
from .chunks import ALGORITHM as CHUNK_ALGORITHM
from .chunks import level_rows, piece_checksums, whole_pieces
from .manifest import ChunkChecksums, Integrity, StoreManifest

ALGORITHM = "sha256"
CHECKSUM_ROWS_PER_OBJECT = 1 << 16  # rows of hidden_checksums per stored object


def _blocks(rows: int, block_rows: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, stop) of the blocks of an array of `rows` rows."""
    for index, start in enumerate(range(0, rows, block_rows)):
        yield index, start, min(start + block_rows, rows)


def digest_rows(rows: np.ndarray) -> str:
    """The digest of a block: sha256 of its rows' bytes in C order, little-endian."""
    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def _digest(backend: StoreBackend, name: str, start: int, stop: int) -> str:
    return digest_rows(backend.read(name, start, stop))


def block_digests(start: int, rows: np.ndarray, block_rows: int, total_rows: int) -> dict[int, str]:
    """Digests of the blocks that rows start..start+len(rows) cover completely (the writer's in-memory data)."""
    return {block: digest_rows(piece) for block, piece in whole_pieces(start, rows, block_rows, total_rows)}


def compute_checksums(backend: StoreBackend, block_rows: int, known: dict[str, dict[int, str]] | None = None
                      ) -> Integrity:
    """The `integrity` attribute for the store's content. `known` digests (computed by the writers from the
    data they wrote) are used as they are; every other block is read back and hashed."""
    known = known or {}
    arrays: dict[str, list[str]] = {}
    # Two reads in flight: hashing one block (hashlib releases the GIL) overlaps reading the next.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="featstore-checksum") as pool:
        for name in backend.array_names():
            given = known.get(name, {})

            def digest(block: tuple[int, int, int], name: str = name, given: dict[int, str] = given) -> str:
                return given[block[0]] if block[0] in given else _digest(backend, name, *block[1:])

            arrays[name] = list(pool.map(digest, _blocks(backend.shape(name)[0], block_rows)))
    return Integrity(algorithm=ALGORITHM, block_rows=block_rows, arrays=arrays)


def checksum_problems(backend: StoreBackend, integrity: Integrity,
                      inspect: Callable[[str, int, int, np.ndarray], None] | None = None) -> list[str]:
    """One message per block whose content does not match the recorded digest (or cannot be read).
    `inspect(name, start, stop, rows)` sees every block read, so callers check content in the same pass."""
    if integrity.algorithm != ALGORITHM:
        return [f"unknown checksum algorithm {integrity.algorithm!r}"]
    problems = []
    block_rows, recorded = integrity.block_rows, integrity.arrays
    present = backend.array_names()
    problems += [f"array {name} is recorded in the checksums but missing" for name in recorded if name not in present]
    problems += [f"array {name} has no recorded checksums" for name in present if name not in recorded]
    for name in [name for name in present if name in recorded]:
        blocks = list(_blocks(backend.shape(name)[0], block_rows))
        if len(blocks) != len(recorded[name]):
            problems.append(f"{name} has {len(blocks)} blocks but {len(recorded[name])} recorded checksums")
            continue
        for (index, start, stop), expected in zip(blocks, recorded[name]):
            where = _where(backend, name, index, start, stop)
            try:
                rows = backend.read(name, start, stop)
            except Exception as error:  # a damaged object: report which, keep checking the rest
                problems.append(f"{where} cannot be read: {type(error).__name__}: {error}")
                continue
            if inspect is not None:
                inspect(name, start, stop, rows)
            if digest_rows(rows) != expected:
                problems.append(f"{where} does not match its checksum (corrupted)")
    return problems


def _where(backend: StoreBackend, name: str, index: int, start: int, stop: int) -> str:
    obj = backend.object_at(name, start)
    return f"{name} block {index} (rows {start}..{stop}" + (f", object {obj})" if obj else ")")


def record_integrity(backend: StoreBackend, manifest: StoreManifest, block_digests: dict[int, str],
                     chunk_sums: dict[str, dict[int, np.ndarray]]) -> Integrity:
    """Everything finalize records (format 1.2): the chunk checksum arrays (from the writers' in-memory
    checksums; chunks an interrupted run wrote are read back), every array's block digests, dtypes and shapes,
    and digests of the attribute sections as they are now."""
    levels = [_write_chunk_level(backend, manifest, array, rows, chunk_sums.get(array, {}))
              for array, rows in level_rows(manifest, backend.checksum_per_layer).items()]
    integrity = compute_checksums(backend, manifest.layout.block_tokens, {fmt.HIDDEN_STATES: block_digests})
    integrity.array_types = {name: {"dtype": str(backend.dtype(name)), "shape": list(backend.shape(name))}
                             for name in backend.array_names()}
    integrity.chunks, integrity.span_chunks = levels
    integrity.sections = manifest.section_digests()
    return integrity


def _write_chunk_level(backend: StoreBackend, manifest: StoreManifest, array: str, chunk_rows: int,
                       known: dict[int, np.ndarray]) -> ChunkChecksums:
    level = ChunkChecksums(array=array, algorithm=CHUNK_ALGORITHM, chunk_rows=chunk_rows,
                           per_layer=backend.checksum_per_layer)
    total = manifest.counts.num_tokens
    pieces = len(manifest.extraction.layers) if level.per_layer else 1
    sums = np.empty((-(-total // chunk_rows), pieces), dtype=np.uint64)
    for chunk in range(len(sums)):
        if chunk in known:
            sums[chunk] = known[chunk]
        else:  # written by an earlier, interrupted run
            start = chunk * chunk_rows
            sums[chunk] = piece_checksums(backend.read(fmt.HIDDEN_STATES, start, min(start + chunk_rows, total)),
                                          level.per_layer)
    if array in backend.array_names():  # a finalize that was interrupted after writing it
        backend.write(array, 0, sums)
    else:
        backend.create_array(ArraySpec(array, sums.shape, str(sums.dtype),
                                       max(1, min(len(sums), CHECKSUM_ROWS_PER_OBJECT))), sums)
    return level


def metadata_problems(backend: StoreBackend, manifest: StoreManifest) -> list[str]:
    """What gives the bytes their meaning, checked without reading data: every array has the dtype and shape
    its attributes imply (and finalize recorded), the attribute sections are those finalize recorded, and a
    complete store carries its integrity data."""
    problems = []
    present = set(backend.array_names())
    integrity = manifest.integrity
    if manifest.complete and integrity is None and fmt.format_tuple(manifest.format_version) >= fmt.INTEGRITY_SINCE:
        problems.append(f"the store is complete (format {manifest.format_version}) but its integrity section is "
                        "missing: its content cannot be checked")
    described = {level.array for level in integrity.chunk_levels} if integrity is not None else set()
    problems += [f"the store holds {array} but its integrity section does not describe them"
                 for array in (fmt.HIDDEN_CHECKSUMS, fmt.HIDDEN_SPAN_CHECKSUMS) if array in present - described]
    for name, (shape, dtype) in manifest.expected_arrays().items():
        if name not in present:
            if manifest.complete:  # an incomplete copy may not hold every array yet
                problems.append(f"array {name} is missing")
            continue
        if backend.dtype(name) != np.dtype(dtype):
            problems.append(f"array {name} has data type {backend.dtype(name)}, but the store's attributes "
                            f"say {dtype}")
        if backend.shape(name) != shape:
            problems.append(f"array {name} has shape {backend.shape(name)}, expected {shape}")
    inputs, extraction = manifest.fingerprint_inputs, manifest.extraction
    if inputs.fingerprint() != manifest.fingerprint:
        problems.append("fingerprint does not match the recorded fingerprint inputs")
    for name in ("layers", "storage_dtype", "compute_dtype", "max_length", "stride", "truncation"):
        if getattr(inputs, name) != getattr(extraction, name):
            problems.append(f"extraction.{name} ({getattr(extraction, name)!r}) differs from the fingerprinted "
                            f"value ({getattr(inputs, name)!r})")
    if integrity is not None and integrity.array_types is not None:
        for name, recorded in integrity.array_types.items():
            if name not in present:
                continue  # named above, or by the checksums
            actual = {"dtype": str(backend.dtype(name)), "shape": list(backend.shape(name))}
            if actual != recorded:
                problems.append(f"array {name} is {actual['dtype']} {tuple(actual['shape'])} but was finalized as "
                                f"{recorded.get('dtype')} {tuple(recorded.get('shape', ()))}")
        problems += [f"array {name} was added after the store was finalized"
                     for name in sorted(present - set(integrity.array_types))]
    if integrity is not None and integrity.sections is not None:
        now = manifest.section_digests()
        recorded = integrity.sections
        changed = sorted(key for key in set(now) | set(recorded) if now.get(key) != recorded.get(key))
        if changed:
            problems.append(f"the store's metadata changed after it was finalized (sections: {', '.join(changed)}); "
                            "label names, layers or dtypes may no longer describe the data")
    return list(dict.fromkeys(problems))


def check_rows(path: str, integrity: Integrity, name: str, rows: np.ndarray) -> None:
    """Check a whole array read into memory against its recorded block digests; raise naming the block."""
    recorded = integrity.arrays.get(name)
    if recorded is None:
        raise CorruptStoreError(f"{path}: array {name} has no recorded checksums")
    blocks = list(_blocks(len(rows), integrity.block_rows))
    if len(blocks) != len(recorded):
        raise CorruptStoreError(f"{path}: array {name} has {len(blocks)} blocks but {len(recorded)} recorded "
                                "checksums")
    for index, start, stop in blocks:
        check_block(path, integrity, name, index, rows[start:stop])


def check_block(path: str, integrity: Integrity, name: str, index: int, rows: np.ndarray) -> None:
    """Check block `index` of array `name` against its recorded digest; raise naming the block."""
    recorded = integrity.arrays.get(name, [])
    start = index * integrity.block_rows
    if index >= len(recorded) or digest_rows(rows) != recorded[index]:
        raise CorruptStoreError(f"{path}: array {name} block {index} (rows {start}..{start + len(rows)}) does not "
                                f"match its checksum: the store is damaged; run `featstore verify {path}` for a "
                                "full report")
