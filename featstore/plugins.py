"""Commands that other installed packages add to the `featstore` CLI.

A package declares an entry point in the group `featstore.commands` whose object has
`add_parser(subparsers, name)` and `run(args) -> exit code`. `heads` adds `featstore demo`
this way, so featstore itself never imports heads. Loading an entry point must stay cheap
(no torch): every `featstore` invocation builds the full parser.
"""

from __future__ import annotations

import argparse
import functools
from importlib.metadata import entry_points
from typing import Any, Protocol

ENTRY_POINT_GROUP = "featstore.commands"


class Command(Protocol):
    def add_parser(self, subparsers: Any, name: str) -> argparse.ArgumentParser: ...

    def run(self, args: argparse.Namespace) -> int: ...


@functools.cache
def plugin_commands() -> dict[str, Command]:
    return {entry.name: entry.load() for entry in entry_points(group=ENTRY_POINT_GROUP)}
