"""`heads` command line: train, evaluate, predict. A thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from featstore import open_store
from featstore.cli import run_cli
from featstore.errors import ConfigError
from featstore.options import parse_layers

from .config import HEAD_TYPES
from .head import Head
from .predict import Predictor, read_inputs
from .trainer import TrainConfig, evaluate_heads, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heads", description="Train heads on cached features; evaluate; "
                                     "predict with the live encoder.")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train heads from stores (the encoder is never loaded)")
    train_parser.add_argument("--store", required=True, help="training store")
    train_parser.add_argument("--eval-store", help="evaluation store for early stopping and best checkpoints")
    train_parser.add_argument("--out", required=True, help="output directory")
    train_parser.add_argument("--head", choices=HEAD_TYPES, help="one head of this type (default adapter)")
    train_parser.add_argument("--config", help="JSON file: {\"heads\": [{\"type\": ..., \"name\": ..., "
                              "\"layers\": [...], ...}], plus any training option}")
    train_parser.add_argument("--layers", type=parse_layers, help="layers the head reads (default: by type)")
    train_parser.add_argument("--no-tailor", action="store_true", help="adapter without its tailor block")
    train_parser.add_argument("--epochs", type=int)
    train_parser.add_argument("--batch-size", type=int)
    train_parser.add_argument("--lr", type=float)
    train_parser.add_argument("--weight-decay", type=float)
    train_parser.add_argument("--seed", type=int)
    train_parser.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    train_parser.add_argument("--device")
    train_parser.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    train_parser.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser("evaluate", help="metrics of a saved head on a store")
    evaluate.add_argument("--head", required=True, help="saved head directory")
    evaluate.add_argument("--store", required=True)
    evaluate.add_argument("--batch-size", type=int, default=64)

    predict = commands.add_parser("predict", help="predict with a head on the live encoder, JSONL out")
    predict.add_argument("--head", required=True)
    predict.add_argument("--model", help="encoder (default: the one the head was trained on)")
    predict.add_argument("--input", required=True, help="JSONL with words/text per line, or a text file")
    predict.add_argument("--output", help="write JSONL here instead of stdout")
    predict.add_argument("--device")
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {"store": args.store, "eval_store": args.eval_store, "out": args.out, "epochs": args.epochs,
                 "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                 "seed": args.seed, "patience": args.patience, "device": args.device,
                 "resume": args.resume or None, "progress": False if args.no_progress else None}
    if args.config:
        if args.head or args.layers or args.no_tailor:
            raise ConfigError("--config lists the heads; do not combine it with --head/--layers/--no-tailor")
        return TrainConfig.from_file(args.config, **overrides)
    spec = {"type": args.head or "adapter"}
    if args.layers is not None:
        spec["layers"] = args.layers
    if args.no_tailor:
        spec["enable_tailor"] = False
    return TrainConfig(heads=[spec], **{key: value for key, value in overrides.items() if value is not None})


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _dispatch, argv)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        print(json.dumps(train(_train_config(args)), indent=2))
        return 0
    if args.command == "evaluate":
        head = Head.from_pretrained(args.head)
        with open_store(args.store) as store:
            result = evaluate_heads([head], store, args.batch_size)[0]
        print(json.dumps({"head": head.config.name, "store": args.store, **result["metrics"]}, indent=2))
        return 0
    if args.command == "predict":
        records = Predictor(args.head, args.model, args.device).predict(read_inputs(args.input))
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
