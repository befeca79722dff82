"""Copying a complete store between locations (`featstore push` / `featstore pull`).

A copy never looks complete before it is verified. Zarr: the destination's root
metadata is written first with status "writing", then every other object, then the
copy is verified against the source's per-block checksums, and only then the source's
own root metadata (status "complete") is written, which makes the copy byte-identical.
HDF5 (one file): copied to `NAME.partial`, verified, then renamed. The destination is
held under a lease for the whole copy.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import CorruptStoreError, StoreConflictError, StoreFormatError
from ..store import format as fmt
from ..store.backends import detect_backend, read_manifest
from ..store.manifest import StoreManifest
from ..store.verify import verify_store
from .catalog import PARTIAL_SUFFIX, check_store_location
from .lease import Lease
from .location import Location, resolve

logger = logging.getLogger(__name__)

COPY_WORKERS = 4
STREAM_BYTES = 16 * 2**20


def copy_store(source: str | Path | Location, destination: str | Path | Location, overwrite: bool = False,
               storage_options: dict[str, Any] | None = None, progress: bool = True) -> Location:
    """Copy the complete store at `source` to `destination` (or into it, when it is a directory or ends
    with '/'); returns where the copy is. Verified before it is marked complete."""
    src = resolve(source, storage_options)
    kind = detect_backend(src)
    if kind is None:
        raise StoreFormatError(f"{src.url} is not a featstore store")
    problems = verify_store(src, deep=False)
    if problems:
        raise CorruptStoreError(f"refusing to copy {src.url}: " + "; ".join(problems))
    dst = _destination(src, str(destination), storage_options)
    check_store_location(dst)
    with Lease(dst, "featstore copy"):
        if reuse_or_clear(dst, read_manifest(src), overwrite):
            logger.info("%s already holds this store (same fingerprint, complete); nothing to copy", dst.url)
            return dst
        if kind == "zarr":
            _copy_zarr(src, dst, progress)
        else:
            _copy_file(src, dst, progress)
    logger.info("copied %s -> %s (verified)", src.url, dst.url)
    return dst


def _destination(src: Location, destination: str, storage_options: dict[str, Any] | None) -> Location:
    dst = resolve(destination, storage_options)
    into = destination.endswith("/") or (dst.isdir() and detect_backend(dst) is None)
    return dst.child(src.name) if into else dst


def reuse_or_clear(dst: Location, manifest: StoreManifest, overwrite: bool) -> bool:
    """The destination rule of every command that writes a whole store from another (push/pull, convert), run
    under the destination's lease. True: `dst` already holds the store `manifest` describes (the same values,
    encoding and codec), complete and passing a quick verify, so there is nothing to do. An unfinished or damaged
    earlier write of it is cleared, to be redone; anything else is refused unless `overwrite`, then cleared."""
    if not dst.exists():
        return False
    if detect_backend(dst) is not None:
        try:
            existing: StoreManifest | None = read_manifest(dst)
        except StoreFormatError:
            existing = None
        if existing is not None and _identity(existing) == _identity(manifest):
            if existing.complete and not verify_store(dst, deep=False):
                return True
            dst.remove(recursive=True)
            return False
    if not overwrite:
        raise StoreConflictError(f"{dst.url} already exists and holds a different store (or something else); "
                                 "choose another destination, or pass --overwrite to replace it")
    dst.remove(recursive=True)
    return False


def _identity(manifest: StoreManifest) -> tuple[str, str | None]:
    return manifest.fingerprint, manifest.layout.compression


def _copy_zarr(src: Location, dst: Location, progress: bool) -> None:
    root_metadata = src.child("zarr.json").read_bytes()
    interim = json.loads(root_metadata)
    interim["attributes"][fmt.ATTRS_KEY]["status"] = fmt.STATUS_WRITING
    dst.child("zarr.json").write_bytes(json.dumps(interim, indent=2).encode())

    prefix = src.path.rstrip("/") + "/"
    objects = {path[len(prefix):]: int(info["size"]) for path, info in src.fs.find(src.path, detail=True).items()}
    objects.pop("zarr.json")
    bar = tqdm(total=sum(objects.values()), unit="B", unit_scale=True, desc="copy", disable=not progress)

    def copy(key: str) -> None:
        data = src.child(key).read_bytes()
        dst.child(key).write_bytes(data)
        bar.update(len(data))

    with bar, ThreadPoolExecutor(max_workers=COPY_WORKERS, thread_name_prefix="featstore-copy") as pool:
        # Array metadata first: a partial copy is then a well-formed (incomplete) Zarr hierarchy.
        list(pool.map(copy, sorted(objects, key=lambda key: (not key.endswith("zarr.json"), key))))
    copied = {path[len(dst.path.rstrip("/")) + 1:]: int(info["size"])
              for path, info in dst.fs.find(dst.path, detail=True).items()}
    copied.pop("zarr.json", None)
    differing = sorted(key for key in objects if copied.get(key) != objects[key])
    if differing:
        raise CorruptStoreError(f"copy to {dst.url} is incomplete ({len(differing)} objects differ in size, e.g. "
                             f"{differing[0]}); it stays marked incomplete; re-run the copy")
    _check(dst, expect_complete=False)
    dst.child("zarr.json").write_bytes(root_metadata)


def _copy_file(src: Location, dst: Location, progress: bool) -> None:
    partial = dst.sibling(PARTIAL_SUFFIX)
    if dst.is_local:
        dst.local_path().parent.mkdir(parents=True, exist_ok=True)
    size = int(src.fs.size(src.path))
    with tqdm(total=size, unit="B", unit_scale=True, desc="copy", disable=not progress) as bar, \
            src.fs.open(src.path, "rb") as reader, partial.fs.open(partial.path, "wb") as writer:
        while data := reader.read(STREAM_BYTES):
            writer.write(data)
            bar.update(len(data))
    _check(partial, expect_complete=True)
    partial.fs.mv(partial.path, dst.path)


def _check(location: Location, expect_complete: bool) -> None:
    problems = verify_store(location, deep=True, expect_complete=expect_complete)
    if problems:
        raise CorruptStoreError(f"the copy at {location.url} failed verification and is not marked complete: "
                             + "; ".join(problems) + "; re-run the copy")
