"""HDF5 backend: one file; every array contiguous, allocated in full when created.

Why contiguous with early allocation: after creation, writing hidden states changes
raw bytes only, never HDF5 metadata (no chunk B-tree grows), so a process killed
mid-write leaves a file that opens cleanly and resumes from its committed progress.
It also makes reads plain file reads: rows are read with one `preadv` into the caller's buffer.
Remote HDF5 stores (object storage) are read-only, through an fsspec file object: HDF5
needs in-place updates that object stores do not offer, so they are written locally and pushed.
A compressed store (`layout.compression`; only `featstore convert` writes one, since an
interrupted conversion starts over) keeps its hidden states chunked instead, each chunk
through the Blosc filter of the optional `hdf5plugin` package.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import h5py
import numpy as np

from ... import install_hint
from ...errors import StoreError
from ...sharing.location import Location
from ..format import ARRAY_NAMES, ATTRS_KEY, Compression
from .base import ArraySpec, StoreBackend

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _hdf5plugin() -> Any:
    """The optional hdf5plugin package; importing it registers its filters (Blosc) with HDF5 for reading."""
    try:
        import hdf5plugin  # optional: only compressed HDF5 stores need it
    except ImportError:
        raise StoreError("compressed HDF5 stores need the hdf5plugin package: pip install hdf5plugin (or "
                         f"{install_hint('hdf5-compression')})") from None
    return hdf5plugin


def _blosc_filter(compression: str) -> dict[str, Any]:
    """h5py's dataset options for `compression` (format.Compression: Blosc's zstd after a byte shuffle)."""
    codec, plugin = Compression.parse(compression), _hdf5plugin()
    return dict(plugin.Blosc(cname=codec.codec, clevel=codec.level, shuffle=plugin.Blosc.SHUFFLE))


class HDF5Backend(StoreBackend):
    name = "hdf5"
    checksum_per_layer = False  # token-major contiguous rows: a chunk's rows are one byte range

    def __init__(self, location: Location, handle: h5py.File) -> None:
        super().__init__(location)
        self.handle = handle
        self._file_descriptor: int | None = None
        self._remote_file: Any = None
        self.direct_reads = location.is_local

    @classmethod
    def create(cls, location: Location) -> HDF5Backend:
        if not location.is_local:
            raise StoreError(f"cannot write an HDF5 store to {location.url}: HDF5 needs a local or shared "
                                 "filesystem; use --backend zarr for object storage, or extract locally and "
                                 "`featstore push` the file")
        return cls(location, h5py.File(location.path, "w-", track_order=True))

    @classmethod
    def open(cls, location: Location, mode: str = "r") -> HDF5Backend:
        if location.is_local:
            # No file locking for readers: it would need write access to the lock and fails on read-only mounts.
            return cls(location, h5py.File(location.path, mode, locking=mode != "r"))
        if mode != "r":
            raise StoreError(f"{location.url}: remote HDF5 stores are read-only; pull it to change it")
        remote_file = location.fs.open(location.path, "rb", block_size=8 * 2**20)
        backend = cls(location, h5py.File(remote_file, "r"))
        backend._remote_file = remote_file
        return backend

    def get_attrs(self) -> dict[str, Any]:
        raw = self.handle.attrs.get(ATTRS_KEY)
        return json.loads(raw) if raw is not None else {}

    def is_empty_shell(self) -> bool:
        return not dict(self.handle.attrs) and set(self.handle.keys()) <= set(ARRAY_NAMES)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self.handle.attrs[ATTRS_KEY] = json.dumps(attrs)
        self.handle.flush()

    def create_array(self, spec: ArraySpec, data: np.ndarray | None = None) -> None:
        if spec.compression is not None:
            self.handle.create_dataset(spec.name, shape=spec.shape, dtype=spec.dtype, chunks=spec.inner_chunk,
                                       **_blosc_filter(spec.compression))
            self.handle.flush()
            return
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        space = h5py.h5s.create_simple(spec.shape)
        h5py.h5d.create(self.handle.id, spec.name.encode(), h5py.h5t.py_create(np.dtype(spec.dtype)), space,
                        dcpl=dcpl)
        if data is not None and data.size:
            self.handle[spec.name][...] = data
        self.handle.flush()

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self.handle[name][start: start + len(data)] = data
        self.handle.flush()

    def read(self, name: str, start: int = 0, stop: int | None = None, columns: Any = None) -> np.ndarray:
        dataset = self.handle[name]
        offset = dataset.id.get_offset() if dataset.size and self.direct_reads else None
        if offset is None:
            if dataset.id.get_create_plist().get_nfilters():
                _hdf5plugin()  # registers the filter, or says what to install
            rows = dataset[start:stop]
            return rows if columns is None else rows[:, columns]
        stop = dataset.shape[0] if stop is None else min(stop, dataset.shape[0])
        # One pread into an owned buffer: contiguous rows are contiguous bytes (faster than a memmap copy).
        out = np.empty((max(stop - start, 0), *dataset.shape[1:]), dtype=dataset.dtype)
        if out.nbytes:
            row_bytes = out.nbytes // len(out)
            if os.preadv(self._fd(), [memoryview(out).cast("B")], offset + start * row_bytes) != out.nbytes:
                raise OSError(f"{self.path}: short read of {name} rows {start}..{stop}; the file is truncated")
        return out if columns is None else out[:, columns]

    def _fd(self) -> int:
        if self._file_descriptor is None:
            self._file_descriptor = os.open(self.location.path, os.O_RDONLY)
        return self._file_descriptor

    def _file_size(self) -> int:
        return int(self.location.fs.size(self.location.path))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handle[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.handle[name].dtype)

    def array_names(self) -> list[str]:
        return sorted(self.handle.keys())

    def nbytes_stored(self, name: str | None = None) -> int:
        if name is None:
            return self._file_size()
        return int(self.handle[name].id.get_storage_size())

    def missing_blocks(self, name: str) -> list[int]:
        dataset = self.handle[name]
        if dataset.chunks is not None:  # compressed: a block is missing where any of its chunks is
            block = self.get_manifest().layout.block_tokens
            stored = {dataset.id.get_chunk_info(index).chunk_offset for index in range(dataset.id.get_num_chunks())}
            wanted = itertools.product(*(range(0, size, chunk) for size, chunk in zip(dataset.shape, dataset.chunks)))
            return sorted({offset[0] // block for offset in wanted if offset not in stored})
        # Contiguous data is allocated at creation: the only way to lose a block is a truncated file.
        offset = dataset.id.get_offset()
        if offset is None:
            return [0] if dataset.size else []
        row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=np.int64))
        available = self._file_size() - offset
        complete_rows = max(0, available // row_bytes) if row_bytes else dataset.shape[0]
        return [0] if complete_rows < dataset.shape[0] else []

    def close(self) -> None:
        if self._file_descriptor is not None:
            os.close(self._file_descriptor)
            self._file_descriptor = None
        self.handle.close()
        if self._remote_file is not None:
            self._remote_file.close()
