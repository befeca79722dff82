"""Start-up time of the light commands (`featstore ls/verify --quick/info/gc`, the service's API import)
of the featstore code in a checkout: what a user waits for before anything happens.

A/B in one sitting, alternating trees (`git worktree add /tmp/old REV`):

    python tools/bench_startup.py --trees /tmp/old . --repeats 5 --json benchmarks/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(tree: Path, store: Path) -> dict[str, list[str]]:
    # The service's API module moved in the layout change; time whichever this tree has.
    api = "featstore.service.api" if (tree / "featstore" / "service" / "api.py").exists() else "featstore.service"
    cli = [sys.executable, "-m", "featstore.cli"]
    return {"ls": [*cli, "ls", str(store.parent)], "verify --quick": [*cli, "verify", "--quick", str(store)],
            "info": [*cli, "info", str(store)], "gc": [*cli, "gc", str(store.parent)],
            "service API import": [sys.executable, "-c", f"import {api}"]}


def seconds(command: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=tree)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", nargs="+", default=["."], help="checkouts to compare (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    trees = [Path(tree).resolve() for tree in args.trees]
    root = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    store = root / "catalog" / "sample.zarr"
    # The bundled sample corpus through the first tree; every tree reads the same store format.
    subprocess.run([sys.executable, "-m", "featstore.cli", "extract", "--out", str(store), "--no-progress"],
                   env={**os.environ, "PYTHONPATH": str(trees[0]), "HF_HUB_OFFLINE": "1"}, check=True,
                   capture_output=True, cwd=trees[0])
    times: dict[str, dict[str, list[float]]] = {str(tree): {} for tree in trees}
    for _ in range(args.repeats):
        for tree in trees:  # alternate, so drift on the machine hits every tree alike
            for name, command in commands(tree, store).items():
                times[str(tree)].setdefault(name, []).append(seconds(command, tree))
    result = {tree: {name: {"median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
                            "max_s": round(max(values), 3)} for name, values in by_command.items()}
              for tree, by_command in times.items()}
    for tree, by_command in result.items():
        print(tree)
        for name, figures in by_command.items():
            print(f"  {name:<20} median {figures['median_s']:.2f} s (min {figures['min_s']:.2f}, "
                  f"max {figures['max_s']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "results": result}, indent=2))


if __name__ == "__main__":
    main()
