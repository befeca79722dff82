"""Zarr v3 backend: a directory group; hidden states sharded so one shard = one write block.

Each write of the extractor covers whole shards (except at a resume point and at the
end), so zarr writes complete shard objects instead of read-modify-writing them.
Inside a shard, inner chunks are `chunk_tokens x 1 layer x hidden`, so reading a layer
subset touches only those layers' bytes. No compressor: fp16 activations barely
compress and decompression would cost read throughput.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from ..format import ATTRS_KEY
from .base import ArraySpec, StoreBackend


class ZarrBackend(StoreBackend):
    name = "zarr"

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        super().__init__(path)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def create(cls, path: str | Path) -> ZarrBackend:
        return cls(path, zarr.open_group(str(path), mode="w-"))

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> ZarrBackend:
        return cls(path, zarr.open_group(str(path), mode=mode))

    def get_attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs.get(ATTRS_KEY, {}))

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self.group.attrs[ATTRS_KEY] = attrs

    def create_array(self, spec: ArraySpec, data: np.ndarray | None = None) -> None:
        if spec.inner_chunk is None:
            chunks, shards = (max(1, min(spec.block, spec.shape[0])), *spec.shape[1:]), None
        else:
            chunks, shards = spec.inner_chunk, (spec.block, *spec.shape[1:])
        array = self.group.create_array(spec.name, shape=spec.shape, dtype=spec.dtype, chunks=chunks,
                                        shards=shards, compressors=None, fill_value=0)
        if data is not None:
            array[...] = data
        self._arrays[spec.name] = array

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self._array(name)[start: start + len(data)] = data

    def read(self, name: str, start: int = 0, stop: int | None = None, columns: Any = None) -> np.ndarray:
        array = self._array(name)
        if columns is None or isinstance(columns, slice):
            return array[start:stop] if columns is None else array[start:stop, columns]
        return array.oindex[slice(start, stop), list(columns)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._array(name).dtype)

    def array_names(self) -> list[str]:
        return sorted(self.group.array_keys())

    def nbytes_stored(self, name: str | None = None) -> int:
        if name is not None:
            return int(self._array(name).nbytes_stored())
        return sum(int(self._array(array).nbytes_stored()) for array in self.array_names())

    def missing_blocks(self, name: str) -> list[int]:
        array = self._array(name)
        block = (array.shards or array.chunks)[0]
        n_blocks = -(-array.shape[0] // block)
        tail = "/".join("0" for _ in array.shape[1:])
        keys = [f"{name}/c/{index}" + (f"/{tail}" if tail else "") for index in range(n_blocks)]
        return [index for index, key in enumerate(keys) if not sync(self.group.store.exists(key))]
