"""Zarr v3 backend: a directory group; hidden states sharded so one shard = one write block.

Each write of the extractor covers whole shards (except at a resume point and at the
end), so zarr writes complete shard objects instead of read-modify-writing them.
Inside a shard, inner chunks are `chunk_tokens x 1 layer x hidden`, so reading a layer
subset touches only those layers' bytes. No compressor unless the store asks for one
(`layout.compression`): activations compress little (BENCHMARKS.md, "Storage encodings")
and decompression costs read throughput; compressed arrays are read through zarr-python.
"""

from __future__ import annotations

import json
import os
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from ...errors import CorruptStoreError
from ...sharing.location import Location
from ..format import ARRAY_NAMES, ATTRS_KEY, NUMPY_STORAGE_DTYPE, Compression
from .base import ArraySpec, StoreBackend

RAW_BYTES_CODEC = {"name": "bytes", "configuration": {"endian": "little"}}
SINGLE_BYTE_CODEC = {"name": "bytes"}  # how zarr writes the raw codec of 1-byte types (no byte order to name)
INDEX_MISSING = np.iinfo(np.uint64).max
HIDDEN_ARRAY_DTYPES = set(NUMPY_STORAGE_DTYPE.values())  # the direct shard reader reads every encoding's codes


class ShardReader:
    """Direct reads of an uncompressed, sharded array laid out as featstore writes it.

    zarr-python copies each inner chunk about three times on the way to the caller (measured
    ~1 GB/s against ~3-10 GB/s for memmap, docs/store-format.md), and on object storage issues
    one ranged GET per inner chunk. This reads the shard index (Zarr v3 sharding spec: (offset,
    nbytes) uint64 pairs + crc32c at the end of the shard) and fetches the requested per-layer
    chunks: locally with `preadv` straight into a layer-major output buffer; remotely as the
    fewest byte ranges that cover them (adjacent chunks merged), fetched concurrently. Only used
    when the array metadata matches that layout exactly; otherwise zarr-python reads.
    """

    def __init__(self, location: Location, metadata: dict[str, Any]) -> None:
        self.location = location
        self.shape = tuple(metadata["shape"])
        self.dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        sharding = metadata["codecs"][0]["configuration"]
        self.shard_tokens = metadata["chunk_grid"]["configuration"]["chunk_shape"][0]
        self.chunk_tokens = sharding["chunk_shape"][0]
        self.chunks_per_shard = -(-self.shard_tokens // self.chunk_tokens)
        self.row_bytes = self.shape[2] * self.dtype.itemsize
        self.index_bytes = self.chunks_per_shard * self.shape[1] * 16
        # Remote shard indexes are cached: a complete store's shards never change, and a GET costs a round trip.
        self._indexes: dict[int, np.ndarray | None] = {}

    @classmethod
    def for_array(cls, location: Location) -> ShardReader | None:
        try:
            metadata = json.loads(location.child("zarr.json").read_bytes())
        except (OSError, ValueError):
            return None
        codecs = metadata.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or len(metadata["shape"]) != 3:
            return None
        sharding = codecs[0]["configuration"]
        layout_ok = (sharding.get("codecs") in ([RAW_BYTES_CODEC], [SINGLE_BYTE_CODEC])
                     and sharding.get("index_codecs") == [RAW_BYTES_CODEC, {"name": "crc32c"}]
                     and sharding.get("index_location", "end") == "end"
                     and sharding["chunk_shape"][1:] == [1, metadata["shape"][2]]
                     and metadata["chunk_grid"]["configuration"]["chunk_shape"][1:] == metadata["shape"][1:]
                     and metadata.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") == "/"
                     and metadata.get("chunk_key_encoding", {}).get("name", "default") == "default"
                     and metadata["data_type"] in HIDDEN_ARRAY_DTYPES)
        return cls(location, metadata) if layout_ok else None

    def read(self, start: int, stop: int, layers: list[int]) -> np.ndarray:
        """Rows start..stop of the given layers, as a (rows, layers, hidden) view of a layer-major buffer."""
        out = np.empty((len(layers), stop - start, self.shape[2]), dtype=self.dtype)
        for shard in range(start // self.shard_tokens, -(-stop // self.shard_tokens)):
            shard_location = self.location.child("c", str(shard), "0", "0")
            if self.location.is_local:
                self._read_local_shard(shard, shard_location, start, stop, layers, out)
            else:
                self._read_remote_shard(shard, shard_location, start, stop, layers, out)
        return out.transpose(1, 0, 2)

    def _pieces(self, shard: int, index: np.ndarray, start: int, stop: int, layers: list[int], out: np.ndarray
                ) -> list[tuple[np.ndarray, int]]:
        """(target view, byte offset in the shard) for every requested chunk piece; zero-fills missing chunks."""
        pieces = []
        shard_start = shard * self.shard_tokens
        for chunk in range(self.chunks_per_shard):
            chunk_start = shard_start + chunk * self.chunk_tokens
            first, last = max(start, chunk_start), min(stop, chunk_start + self.chunk_tokens)
            if first >= last:
                continue
            for slot, layer in enumerate(layers):
                offset, nbytes = index[chunk, layer]
                target = out[slot, first - start: last - start]
                if offset == INDEX_MISSING:
                    target[...] = 0
                    continue
                position = int(offset) + (first - chunk_start) * self.row_bytes
                if position + target.nbytes > int(offset) + int(nbytes):
                    raise OSError(f"shard {shard}: chunk ({chunk}, {layer}) is shorter than its declared size")
                pieces.append((target, position))
        return pieces

    def _fill_missing_shard(self, shard: int, start: int, stop: int, out: np.ndarray) -> None:
        first = max(start, shard * self.shard_tokens) - start
        last = min(stop, (shard + 1) * self.shard_tokens) - start
        out[:, first:last] = 0  # the array's fill value

    def _parse_index(self, raw: bytes, location: Location) -> np.ndarray:
        """The shard index from its bytes and trailing crc32c, which is checked (as zarr-python does)."""
        index, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if len(raw) != self.index_bytes + 4 or google_crc32c.value(bytes(index)) != crc:
            raise CorruptStoreError(f"{location.url}: the shard index does not match its crc32c; the shard is "
                                    "damaged")
        return np.frombuffer(index, dtype="<u8").reshape(self.chunks_per_shard, self.shape[1], 2)

    def _read_local_shard(self, shard: int, location: Location, start: int, stop: int, layers: list[int],
                          out: np.ndarray) -> None:
        try:
            fd = os.open(location.path, os.O_RDONLY)
        except FileNotFoundError:
            self._fill_missing_shard(shard, start, stop, out)
            return
        try:
            size = os.fstat(fd).st_size
            index = self._parse_index(os.pread(fd, self.index_bytes + 4, size - self.index_bytes - 4), location)
            for target, position in self._pieces(shard, index, start, stop, layers, out):
                if os.preadv(fd, [memoryview(target).cast("B")], position) != target.nbytes:
                    raise OSError(f"{location.url}: short read; the shard is truncated")
        finally:
            os.close(fd)

    def _read_remote_shard(self, shard: int, location: Location, start: int, stop: int, layers: list[int],
                           out: np.ndarray) -> None:
        if shard not in self._indexes:
            try:
                size = int(location.fs.size(location.path))
                raw = location.read_bytes(size - self.index_bytes - 4, size)
                self._indexes[shard] = self._parse_index(raw, location)
            except FileNotFoundError:
                self._indexes[shard] = None
        index = self._indexes[shard]
        if index is None:
            self._fill_missing_shard(shard, start, stop, out)
            return
        pieces = sorted(self._pieces(shard, index, start, stop, layers, out), key=lambda piece: piece[1])
        ranges: list[list[int]] = []  # [start, end) byte ranges, adjacent pieces merged
        for target, position in pieces:
            if ranges and ranges[-1][1] == position:
                ranges[-1][1] += target.nbytes
            else:
                ranges.append([position, position + target.nbytes])
        blobs = location.fs.cat_ranges([location.path] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges])
        blob_of = iter(zip(ranges, blobs))
        (range_start, range_end), blob = next(blob_of, ((0, 0), b""))
        for target, position in pieces:
            while position >= range_end:
                (range_start, range_end), blob = next(blob_of)
            if isinstance(blob, Exception) or len(blob) < position - range_start + target.nbytes:
                raise OSError(f"{location.url}: short read of bytes {range_start}..{range_end}; the shard is "
                              f"truncated ({blob if isinstance(blob, Exception) else len(blob)})")
            view = memoryview(blob)[position - range_start: position - range_start + target.nbytes]
            target[...] = np.frombuffer(view, dtype=self.dtype).reshape(target.shape)


def _compressors(spec: ArraySpec) -> list[BloscCodec] | None:
    """The zarr codecs of `spec.compression` (format.COMPRESSION_CODECS): Blosc's zstd after a byte shuffle."""
    if spec.compression is None:
        return None
    codec = Compression.parse(spec.compression)
    return [BloscCodec(cname=codec.codec, clevel=codec.level, shuffle="shuffle",
                       typesize=np.dtype(spec.dtype).itemsize)]


class ZarrBackend(StoreBackend):
    name = "zarr"
    checksum_per_layer = True  # an inner chunk holds one layer: the piece a layer-subset read fetches

    def __init__(self, location: Location, group: zarr.Group) -> None:
        super().__init__(location)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}
        self._shard_readers: dict[str, ShardReader | None] = {}

    @staticmethod
    def _zarr_store(location: Location, read_only: bool) -> zarr.abc.store.Store:
        if location.is_local:
            return zarr.storage.LocalStore(location.path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(location.url, storage_options=location.storage_options,
                                                 read_only=read_only)

    @classmethod
    def create(cls, location: Location) -> ZarrBackend:
        return cls(location, zarr.open_group(cls._zarr_store(location, read_only=False), mode="w-"))

    @classmethod
    def open(cls, location: Location, mode: str = "r") -> ZarrBackend:
        return cls(location, zarr.open_group(cls._zarr_store(location, read_only=mode == "r"), mode=mode))

    def get_attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs.get(ATTRS_KEY, {}))

    def is_empty_shell(self) -> bool:
        return not dict(self.group.attrs) and set(self.group.keys()) <= set(ARRAY_NAMES)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        self.group.attrs[ATTRS_KEY] = attrs

    def create_array(self, spec: ArraySpec, data: np.ndarray | None = None) -> None:
        if spec.inner_chunk is None:
            chunks, shards = (max(1, min(spec.block, spec.shape[0])), *spec.shape[1:]), None
        else:
            chunks, shards = spec.inner_chunk, (spec.block, *spec.shape[1:])
        array = self.group.create_array(spec.name, shape=spec.shape, dtype=spec.dtype, chunks=chunks,
                                        shards=shards, compressors=_compressors(spec), fill_value=0)
        if data is not None:
            array[...] = data
        self._arrays[spec.name] = array

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self._array(name)[start: start + len(data)] = data

    def _shard_reader(self, name: str) -> ShardReader | None:
        if name not in self._shard_readers:
            self._shard_readers[name] = ShardReader.for_array(self.location.child(name))
        return self._shard_readers[name]

    def read(self, name: str, start: int = 0, stop: int | None = None, columns: Any = None) -> np.ndarray:
        array = self._array(name)
        reader = self._shard_reader(name) if self.direct_reads else None
        if reader is not None:
            stop = array.shape[0] if stop is None else min(stop, array.shape[0])
            layers = list(range(array.shape[1]))
            return reader.read(start, max(start, stop), layers[columns] if isinstance(columns, slice) else
                               (layers if columns is None else list(columns)))
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
        block_rows = self._block_rows(name)
        store = self.group.store
        return [index for index in range(-(-self._array(name).shape[0] // block_rows))
                if not sync(store.exists(self._block_object(name, index)))]

    def objects_in(self, name: str, start: int, stop: int) -> list[str]:
        block_rows = self._block_rows(name)
        return [self._block_object(name, index) for index in range(start // block_rows, -(-stop // block_rows))]

    def object_at(self, name: str, row: int) -> str:
        return self._block_object(name, row // self._block_rows(name))

    def _block_rows(self, name: str) -> int:
        """Rows per stored object of `name`: a shard where the array is sharded, else a chunk."""
        array = self._array(name)
        return int((array.shards or array.chunks)[0])

    def _block_object(self, name: str, index: int) -> str:
        """The key of the object holding block `index` (blocks span every other axis whole)."""
        tail = "/".join("0" for _ in self._array(name).shape[1:])
        return f"{name}/c/{index}" + (f"/{tail}" if tail else "")
