"""The command line shared by the benchmarks that run on one corpus with repeats."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


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
