"""The status file through which an extraction child process reports progress to the service."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..extraction.progress import ExtractProgress
from ..sharing.location import resolve

STATUS_WRITE_INTERVAL = 0.5


def write_status(path: str | Path, progress: ExtractProgress) -> None:
    """Replace the status file atomically (the worker may read it at any moment)."""
    _replace(path, asdict(progress))


def write_failure(path: str | Path, message: str) -> None:
    """Record why the job failed (a message safe to show an API client) in the status file."""
    path = Path(path)
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        status = {}
    _replace(path, {**status, "state": "failed", "error": message})


def _replace(path: str | Path, status: dict) -> None:
    resolve(path).write_bytes(json.dumps(status).encode())  # whole, then renamed into place


class StatusFileWriter:
    """An `extract(spec, on_progress=...)` callback writing at most every STATUS_WRITE_INTERVAL seconds."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.last = path, 0.0

    def __call__(self, progress: ExtractProgress) -> None:
        now = time.monotonic()
        if progress.state == "extracting" and now - self.last < STATUS_WRITE_INTERVAL and self.last:
            return
        self.last = now
        write_status(self.path, progress)
