"""What the benchmarks share: the command line of those that run on one corpus with repeats, the CoNLL-2003
folder check, and a recorder that keeps every figure in a JSON file as it is measured."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any


def parse_bench_args(doc: str, prefix: str) -> tuple[argparse.Namespace, Path]:
    """--corpus, --workdir (default: a new temporary directory), --repeats, --json; returns (args, workdir)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    return args, workdir


def conll2003_workdir(data: Path, workdir: Path) -> None:
    """Refuse a missing CoNLL-2003 folder before anything runs; create the work directory."""
    if not (data / "train.txt").exists():
        raise SystemExit(f"CoNLL-2003 not found under {data}")
    workdir.mkdir(parents=True, exist_ok=True)


class Recorder:
    """Accumulates results and rewrites the JSON file after every step, so a long run keeps what it measured.
    `keep_existing`: a run continues the figures already in the file (and can skip what they hold)."""

    def __init__(self, path: Path | None, keep_existing: bool = False) -> None:
        import torch  # only the benchmarks that record need it

        self.path = path
        self.results: dict[str, Any] = json.loads(path.read_text()) if keep_existing and path and path.exists() \
            else {}
        self.results.update(machine=f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} torch "
                            "threads", torch=torch.__version__)

    def __setitem__(self, key: str, value: Any) -> None:
        self.results[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if self.path:
            self.path.write_text(json.dumps(self.results, indent=2))
