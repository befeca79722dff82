"""The backend contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...sharing.location import Location
from ..manifest import StoreManifest


@dataclass(frozen=True)
class ArraySpec:
    """An array to create. `block` is the write/commit unit along axis 0 (tokens or sequences);
    `inner_chunk` (hidden states only) is the smallest independently readable piece."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    block: int
    inner_chunk: tuple[int, ...] | None = None
    compression: str | None = None  # format.Compression's "codec:level" (hidden states only), None: raw


class StoreBackend(ABC):
    name: str
    # The unit of the hidden states' chunk checksums (store/chunks.py): a chunk's piece of one layer where that
    # piece is contiguous in storage (and read alone), else a chunk's whole rows.
    checksum_per_layer: bool

    def __init__(self, location: Location) -> None:
        self.location = location
        self.path = location.url
        # Direct reads bypass the storage library where the layout allows (local stores); `featstore verify`
        # turns them off so every byte goes through the library and its own checks (e.g. shard-index CRCs).
        self.direct_reads = True

    @classmethod
    @abstractmethod
    def create(cls, location: Location) -> StoreBackend:
        """A new empty store at `location` (which must not exist)."""

    @classmethod
    @abstractmethod
    def open(cls, location: Location, mode: str = "r") -> StoreBackend:
        """An existing store; mode 'r' never writes, 'r+' allows writes."""

    @abstractmethod
    def get_attrs(self) -> dict[str, Any]: ...

    @abstractmethod
    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Replace the store's featstore attributes durably."""

    def get_manifest(self) -> StoreManifest:
        """The validated attributes (raises StoreFormatError naming what is malformed)."""
        return StoreManifest.from_attrs(self.get_attrs(), self.path)

    def set_manifest(self, manifest: StoreManifest) -> None:
        self.set_attrs(manifest.to_dict())

    @abstractmethod
    def create_array(self, spec: ArraySpec, data: np.ndarray | None = None) -> None: ...

    @abstractmethod
    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Write `data` at rows start..start+len(data) of array `name`, durably."""

    @abstractmethod
    def read(self, name: str, start: int = 0, stop: int | None = None, columns: Any = None) -> np.ndarray:
        """Rows start..stop of array `name`; `columns` selects along axis 1 (hidden-state layers)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, name: str) -> np.dtype: ...

    @abstractmethod
    def array_names(self) -> list[str]: ...

    @abstractmethod
    def nbytes_stored(self, name: str | None = None) -> int:
        """Bytes on disk of one array, or of the whole store."""

    @abstractmethod
    def missing_blocks(self, name: str) -> list[int]:
        """Indices of write blocks of `name` that hold no data on disk."""

    @abstractmethod
    def is_empty_shell(self) -> bool:
        """No attributes at all and no members but featstore arrays: what a writer killed between creating the
        store and writing its attributes leaves (attributes are written right after the arrays, before any
        hidden state), safe to start over."""

    def object_at(self, name: str, row: int) -> str | None:
        """The storage object holding row `row` of `name`, for messages (None: not stored in separate objects)."""
        return None

    def objects_in(self, name: str, start: int, stop: int) -> list[str]:
        """The storage objects holding rows start..stop of `name`, for messages (empty: one file)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
