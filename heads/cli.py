"""`heads` command line: train, evaluate, predict. A thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import featstore
from featstore.cli import run_cli
from featstore.errors import ConfigError
from featstore.options import add_arguments, given_values, parse_layers

from .config import HEAD_TYPES
from .predict import Predictor, read_inputs
from .trainer import TrainConfig, evaluate_heads, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heads", description="Train heads on cached features; evaluate; "
                                     "predict with the live encoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {featstore.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train heads from stores (the encoder is never loaded)")
    add_arguments(train_parser, TrainConfig)
    train_parser.add_argument("--head", choices=HEAD_TYPES, help="one head of this type (default: adapter)")
    train_parser.add_argument("--layers", type=parse_layers, help="layers the head reads, e.g. 0,3,-1 or all "
                              "(default: all for mixing heads; for linear/mlp the layer a quick sweep scores best "
                              "on --eval-store, without one the layer two thirds up the encoder)")
    train_parser.add_argument("--no-tailor", action="store_true", help="an adapter without its tailor block")
    train_parser.add_argument("--config", help="JSON file of training options with \"heads\": [{\"type\": ..., "
                              "\"name\": ..., \"layers\": [...], ...}]; flags given beside it override it")

    evaluate = commands.add_parser("evaluate", help="metrics of a saved head on a store")
    evaluate.add_argument("--head", required=True, help="saved head directory")
    evaluate.add_argument("--store", required=True, help="labeled store (path or URL) to evaluate on")
    evaluate.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default: 64)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")

    predict = commands.add_parser("predict", help="predict with a head on the live encoder, JSONL out")
    predict.add_argument("--head", required=True, help="saved head directory")
    predict.add_argument("--model", help="encoder (default: the one the head was trained on)")
    predict.add_argument("--input", required=True, help="JSONL with words/text per line, or a text file")
    predict.add_argument("--output", help="write JSONL here instead of stdout")
    predict.add_argument("--no-progress", action="store_true", help="no progress bars (model loading included)")
    predict.add_argument("--device", help="torch device for the encoder and the head (default: cuda if "
                         "available, else cpu)")
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    given = given_values(args, TrainConfig)
    if args.config:
        if args.head or args.layers or args.no_tailor:
            raise ConfigError("--config lists the heads; do not combine it with --head/--layers/--no-tailor")
        return TrainConfig.from_file(args.config, **given)
    spec: dict[str, Any] = {"type": args.head or "adapter"}
    if args.layers is not None:
        spec["layers"] = args.layers
    if args.no_tailor:
        spec["enable_tailor"] = False
    return TrainConfig.from_dict({**given, "heads": [spec]}, "heads train")


def format_report(head: str, store: str, metrics: dict[str, Any]) -> str:
    """The metrics as a small table: overall figures, then one row per entity type for tagging heads."""
    overall = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))
    lines = [f"head {head} on {store}", overall]
    per_type = metrics.get("per_type")
    if per_type:
        lines += ["", f"{'type':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
        lines += [f"{name:<12}{row['precision']:>10.4f}{row['recall']:>10.4f}{row['f1']:>10.4f}{row['support']:>9}"
                  for name, row in sorted(per_type.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _dispatch, argv)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        print(json.dumps(train(_train_config(args)), indent=2))
        return 0
    if args.command == "evaluate":
        result = evaluate_heads([args.head], args.store, args.batch_size)[0]
        if args.json:
            print(json.dumps({"head": result["head"], "store": args.store, **result["metrics"]}, indent=2))
        else:
            print(format_report(result["head"], args.store, result["metrics"]))
        return 0
    if args.command == "predict":
        inputs = read_inputs(args.input)  # checked before the encoder loads
        records = Predictor(args.head, args.model, args.device, progress=not args.no_progress).predict(inputs)
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            sys.stdout.write(text)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
