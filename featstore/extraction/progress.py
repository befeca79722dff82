"""Progress reports of a running extraction (no torch: the service's API process reads them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ExtractProgress:
    """Where an extraction stands; `state` is "extracting", "complete" or "reused"."""

    path: str
    state: str
    sequences_done: int
    sequences_total: int
    tokens_done: int
    tokens_total: int
    tokens_per_second: float = 0.0


# What engines call: reporter(state, sequences committed or computed so far).
Reporter = Callable[[str, int], None]
