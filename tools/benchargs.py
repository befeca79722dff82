"""What the benchmarks share: the command line of those that run on one corpus with repeats, the command line
and set-up of those that run in phases on CoNLL-2003, a recorder that keeps every figure in a JSON file as it is
measured, timings taken in rounds (a median and its range), and training heads then scoring them on a test
store."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
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


def in_rounds(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each measure's value in each of `rounds` rounds. Every measure runs once a round, the order reversed every
    other round: a slow spell of a shared machine (on the 2-core VM they come and go within minutes, and moved
    one timing by a third) then falls on all of them, and a ratio of two measures is taken within a round
    (`ratios`)."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for index in range(rounds):
        for name in list(measures) if index % 2 == 0 else reversed(measures):
            values[name].append(measures[name]())
            print(f"round {index + 1}/{rounds} {name}: {values[name][-1]:.4g}", flush=True)  # long runs show progress
    return values


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Round by round (`in_rounds`): numerators[i] / denominators[i]."""
    return [numerator / denominator for numerator, denominator in zip(numerators, denominators, strict=True)]


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """A figure measured in rounds: their median, and the range (min, max)."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def conll2003_parser(doc: str, workdir: str, phases: list[str], default_phases: list[str]
                     ) -> argparse.ArgumentParser:
    """--data, --workdir, --json, --phases, --seeds: the options every phased CoNLL-2003 benchmark takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/conll2003", help="CoNLL-2003 folder")
    parser.add_argument("--workdir", default=workdir, help="stores and heads go here")
    parser.add_argument("--json", help="write figures here as they are measured (a run continues a file)")
    parser.add_argument("--phases", nargs="*", default=default_phases, choices=phases)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    return parser


def conll2003_setup(args: argparse.Namespace) -> tuple[Path, Path, Recorder]:
    """(data folder, work directory, recorder continuing --json) of a phased CoNLL-2003 benchmark."""
    logging.basicConfig(level=logging.WARNING)
    data, workdir = Path(args.data), Path(args.workdir)
    conll2003_workdir(data, workdir)
    return data, workdir, Recorder(Path(args.json) if args.json else None, keep_existing=True)


def train_and_test(stores: dict[str, str], out: Path, heads: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """One training pass over `heads` on stores["train"] (stores["dev"] picks the epoch); returns the trainer's
    summary with each head's test F1 on stores["test"] added (`test_f1`, and `best` in percent)."""
    from heads import TrainConfig, Trainer, evaluate_heads  # only the benchmarks that train need it

    trainer = Trainer(TrainConfig(store=stores["train"], eval_store=stores["dev"], out=str(out), heads=heads,
                                  progress=False, **options))
    summary = trainer.train()
    tested = evaluate_heads([Path(result["dir"]) for result in summary.values()], stores["test"])
    for result, test in zip(summary.values(), tested):
        result["test_f1"] = round(100 * test["metrics"]["f1"], 2)
        result["best"] = None if result["best"] is None else round(100 * result["best"], 2)
    return summary


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
