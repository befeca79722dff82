"""Store backends: where arrays and attributes live. Both expose the same small API.

Backends know nothing about encoders or corpora; the layout decisions they share
(token-major arrays, blocks of `block_tokens` tokens as the unit of writing and
committing) are explained in docs/store-format.md.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import StoreFormatError
from ...sharing.location import Location, resolve
from ..format import BACKEND_NAMES
from ..manifest import StoreManifest
from .base import ArraySpec, StoreBackend
from .hdf5 import HDF5_SIGNATURE, HDF5Backend
from .zarr import ZarrBackend

BACKENDS: dict[str, type[StoreBackend]] = {"zarr": ZarrBackend, "hdf5": HDF5Backend}
assert tuple(BACKENDS) == BACKEND_NAMES, "format.BACKEND_NAMES lists the backends"


def detect_backend(location: str | Path | Location) -> str | None:
    """'zarr' or 'hdf5' when `location` looks like a store of that backend, None when it is neither."""
    location = resolve(location)
    if location.child("zarr.json").isfile():
        return "zarr"
    if location.isfile() and location.read_bytes(0, len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
        return "hdf5"
    return None


def open_backend(location: str | Path | Location, mode: str = "r") -> StoreBackend:
    location = resolve(location)
    backend = detect_backend(location)
    if backend is None:
        what = "does not exist" if not location.exists() else "is neither a Zarr group nor an HDF5 file"
        raise StoreFormatError(f"{location.url} {what}; it is not a featstore store")
    return BACKENDS[backend].open(location, mode)


def read_attrs(location: str | Path | Location) -> dict:
    """A store's raw featstore attributes, without keeping it open."""
    backend = open_backend(location, "r")
    try:
        return backend.get_attrs()
    finally:
        backend.close()


def read_manifest(location: str | Path | Location) -> StoreManifest:
    """A store's validated attributes, without keeping it open."""
    location = resolve(location)
    return StoreManifest.from_attrs(read_attrs(location), location.url)


__all__ = ["BACKENDS", "ArraySpec", "HDF5Backend", "StoreBackend", "ZarrBackend", "detect_backend", "open_backend",
           "read_attrs", "read_manifest"]
