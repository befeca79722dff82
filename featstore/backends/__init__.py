"""Store backends: where arrays and attributes live. Both expose the same small API.

Backends know nothing about encoders or corpora; the layout decisions they share
(token-major arrays, blocks of `block_tokens` tokens as the unit of writing and
committing) are explained in docs/store-format.md.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FeatstoreError
from .base import ArraySpec, StoreBackend
from .hdf5 import HDF5_SIGNATURE, HDF5Backend
from .zarr import ZarrBackend

BACKENDS: dict[str, type[StoreBackend]] = {"zarr": ZarrBackend, "hdf5": HDF5Backend}


def detect_backend(path: str | Path) -> str | None:
    """'zarr' or 'hdf5' when `path` looks like a store of that backend, None when it is neither."""
    path = Path(path)
    if path.is_dir() and (path / "zarr.json").is_file():
        return "zarr"
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return "hdf5"
    return None


def open_backend(path: str | Path, mode: str = "r") -> StoreBackend:
    backend = detect_backend(path)
    if backend is None:
        what = "does not exist" if not Path(path).exists() else "is neither a Zarr group nor an HDF5 file"
        raise FeatstoreError(f"{path} {what}; it is not a featstore store")
    return BACKENDS[backend].open(path, mode)


__all__ = ["BACKENDS", "ArraySpec", "HDF5Backend", "StoreBackend", "ZarrBackend", "detect_backend", "open_backend"]
