"""Where a store lives: a local path or any fsspec URL (s3://bucket/prefix/..., file://...).

Local paths keep their fast paths (direct shard reads, preadv on HDF5); every other
location goes through fsspec. S3 endpoint and credentials come from the usual AWS
environment variables (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE ...), which botocore reads itself, or from explicit
fsspec storage options (`FEATSTORE_STORAGE_OPTIONS` as JSON, or `--storage-option KEY=VALUE`).
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import ConfigError, StoreError

STORAGE_OPTIONS_ENV = "FEATSTORE_STORAGE_OPTIONS"


def storage_options_from_env() -> dict[str, Any]:
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as error:
        raise ConfigError(f"{STORAGE_OPTIONS_ENV} is not valid JSON: {error}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{STORAGE_OPTIONS_ENV} must be a JSON object of fsspec storage options")
    return options


@dataclass(frozen=True)
class Location:
    """A store location: `url` as shown to users, `fs` + `path` to act on it."""

    url: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def protocol(self) -> str:
        return "file" if self.is_local else self.url.split("://", 1)[0]

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def local_path(self) -> Path:
        if not self.is_local:
            raise StoreError(f"{self.url} is not a local path")
        return Path(self.path)

    def _at(self, path: str) -> Location:
        """Another location on the same filesystem."""
        url = str(Path(path)) if self.is_local else f"{self.protocol}://{path}"
        return Location(url, self.fs, path, self.storage_options)

    def child(self, *parts: str) -> Location:
        return self._at(posixpath.join(self.path.rstrip("/"), *parts))

    def sibling(self, suffix: str) -> Location:
        """The location with `suffix` appended to its name (lock files, partial copies)."""
        return self._at(self.path.rstrip("/") + suffix)

    def parent(self) -> Location:
        return self._at(posixpath.dirname(self.path.rstrip("/")))

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def isfile(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        if start is None and end is None:
            return self.fs.cat_file(self.path)
        return self.fs.cat_file(self.path, start=start, end=end)

    def write_bytes(self, data: bytes, exclusive: bool = False) -> None:
        """Write a whole object; with `exclusive`, fail with FileExistsError if it exists (S3 If-None-Match).
        Readers never see a partial object: locally an exclusive create is O_EXCL on a temporary name made
        whole first, then linked into place (fsspec's local "create" is check-then-write, not atomic); an
        overwrite is a rename over the old file."""
        if self.is_local:
            self._write_local(data, exclusive)
            return
        try:
            self.fs.pipe_file(self.path, data, mode="create" if exclusive else "overwrite")
        except OSError as error:
            if exclusive and ("pre-condition" in str(error).lower() or "precondition" in str(error).lower()):
                raise FileExistsError(self.url) from error
            raise

    def _write_local(self, data: bytes, exclusive: bool) -> None:
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_bytes(data)
        try:
            if not exclusive:
                os.replace(temporary, target)
                return
            try:
                os.link(temporary, target)  # atomic, and fails with FileExistsError if the name exists
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: O_EXCL still creates atomically
                descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(data)
        finally:
            temporary.unlink(missing_ok=True)

    def remove(self, recursive: bool = False) -> None:
        self.fs.rm(self.path, recursive=recursive)


def resolve(location: str | Path | Location, storage_options: dict[str, Any] | None = None) -> Location:
    """A Location for a path or URL; relative local paths are made absolute."""
    if isinstance(location, Location):
        return location
    text = str(location)
    # Listings must be fresh: other processes create and finish stores, and a catalog walk or an
    # existence check must see that (fsspec caches listings per filesystem instance by default).
    options = {"use_listings_cache": False, **storage_options_from_env(), **(storage_options or {})}
    if "://" not in text or text.startswith("file://"):
        path = os.path.abspath(text[len("file://"):] if text.startswith("file://") else text)
        return Location(text if "://" not in text else path, LocalFileSystem(), path, {})
    try:
        fs, path = fsspec.core.url_to_fs(text, **options)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"cannot open {text}: {error} (for s3:// install s3fs)") from None
    return Location(text.rstrip("/"), fs, path.rstrip("/"), options)
