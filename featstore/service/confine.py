"""Confinement of a job's inputs at the moment they are read, not only when the request is checked.

A request's corpus and model paths are checked against the service's roots when the job is
accepted, but the files can change afterwards: a file swapped for a symlink to something
outside the roots would otherwise be read into a store. So when a job starts, the worker opens
every input file itself, checks where the *open file* really is (its path through
/proc/self/fd, which no later rename or symlink changes), and copies it from that open file
into the job's private directory; the extraction reads only those copies.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ..errors import ConfigError


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _opened_path(descriptor: int, fallback: str) -> Path:
    """Where an open file really is."""
    link = f"/proc/self/fd/{descriptor}"
    if os.path.exists(link):
        return Path(os.readlink(link))
    # No /proc (not Linux): the path's current target, accepted only if it is the very file we opened.
    resolved = Path(fallback).resolve()
    opened, current = os.fstat(descriptor), os.stat(resolved)
    if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
        raise ConfigError(f"{fallback} changed while it was being opened")
    return resolved


MAX_DEPTH = 32  # directory levels (a symlink loop inside the roots ends here)


def copy_confined(source: str | Path, roots: list[Path], destination: Path, depth: int = 0) -> Path:
    """Copy the file or directory tree `source` into `destination` (which it becomes), reading every file
    only through a descriptor whose real location lies under `roots`; raise ConfigError otherwise."""
    source = Path(source)
    if depth > MAX_DEPTH:
        raise ConfigError(f"{source} is nested deeper than {MAX_DEPTH} directories (a symlink loop?)")
    if source.is_dir() and not source.is_symlink():
        destination.mkdir(parents=True, exist_ok=True)
        for entry in sorted(os.listdir(source)):
            copy_confined(source / entry, roots, destination / entry, depth + 1)
        return destination
    descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        real = _opened_path(descriptor, str(source))
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):  # a symlink to a directory: check it, then walk it
            if not _inside(real, roots):
                raise ConfigError(f"{source} leads outside the allowed roots")
            return copy_confined(real, roots, destination, depth + 1)
        if not _inside(real, roots):
            raise ConfigError(f"{source} leads outside the allowed roots; it was not read")
        destination.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.dup(descriptor), "rb") as reader, destination.open("wb") as writer:
            shutil.copyfileobj(reader, writer, 16 * 2**20)
    finally:
        os.close(descriptor)
    return destination
