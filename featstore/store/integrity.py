"""Per-block checksums, recorded at finalize and checked by `featstore verify` (docs/store-format.md).

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

from .backends import StoreBackend
from .manifest import Integrity

ALGORITHM = "sha256"


def _blocks(backend: StoreBackend, name: str, block_rows: int) -> Iterator[tuple[int, int, int]]:
    rows = backend.shape(name)[0]
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
    digests, stop = {}, start + len(rows)
    for block in range(-(-start // block_rows), -(-total_rows // block_rows)):
        first, last = block * block_rows, min((block + 1) * block_rows, total_rows)
        if last > stop:
            break
        digests[block] = digest_rows(rows[first - start: last - start])
    return digests


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

            arrays[name] = list(pool.map(digest, _blocks(backend, name, block_rows)))
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
        blocks = list(_blocks(backend, name, block_rows))
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
