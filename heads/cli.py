"""`heads` command line: train, sweep, evaluate, report, register, ls, predict. A thin layer over the library."""

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

from .config import HEAD_TYPES, is_probe
from .predict import Predictor, read_inputs
from .trainer import TrainConfig, evaluate_heads, train

PROBE_TYPES = [name for name in HEAD_TYPES if is_probe(name)]


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
    train_parser.add_argument("--crf", action="store_true", help="tagging: a CRF output layer (Viterbi decoding; "
                              "with BIO tags never an invalid transition)")
    train_parser.add_argument("--tail-layers", type=int, metavar="K", help="--head tail: retrain the encoder's top K "
                              "layers over stored layer L-K, which is all the store needs (default: 1)")
    train_parser.add_argument("--lora-rank", type=int, metavar="R", help="--head tail: train only LoRA deltas of "
                              f"rank R on the tail's linear maps (PEFT; {featstore.install_hint('lora')}) "
                              "(default: 0, every tail weight trains)")
    train_parser.add_argument("--config", help="JSON file of training options with \"heads\": [{\"type\": ..., "
                              "\"name\": ..., \"layers\": [...], ...}]; flags given beside it override it")

    sweep = commands.add_parser("sweep", help="one probe per stored layer in one pass; the probing curve (PNG) "
                                "and its table (CSV, JSON)")
    add_arguments(sweep, TrainConfig)
    sweep.add_argument("--head", choices=PROBE_TYPES, default=PROBE_TYPES[0], help="probe type (default: "
                       f"{PROBE_TYPES[0]})")

    evaluate = commands.add_parser("evaluate", help="metrics of a saved head on a store")
    evaluate.add_argument("--head", required=True, help="saved head directory")
    evaluate.add_argument("--store", required=True, help="labeled store (path or URL) to evaluate on")
    evaluate.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default: 64)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")

    report = commands.add_parser("report", help="an HTML page with figures of what a head (or a multi-head run) "
                                 "learned")
    report.add_argument("head_dir", metavar="HEAD_DIR", help="saved head, or a multi-head run's output directory")
    report.add_argument("--store", help="labeled store to evaluate on (default: the head's own eval store, if it is "
                        "still there)")
    report.add_argument("--out", required=True, help="directory for index.html, the PNG figures and report.json")
    report.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default: 64)")

    register = commands.add_parser("register", help="record saved heads and the stores they were trained and "
                                   "evaluated on in a catalog (lineage)")
    register.add_argument("head_dirs", nargs="+", metavar="HEAD_DIR", help="saved head directories")
    register.add_argument("--catalog", required=True, metavar="ROOT", help="catalog root (directory or s3:// prefix)")
    heads_ls = commands.add_parser("ls", help="the heads registered with a catalog, with their stores and metrics")
    heads_ls.add_argument("root", metavar="ROOT", help="catalog root (directory or s3:// prefix)")
    heads_ls.add_argument("--json", action="store_true", help="one JSON object per head")

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
    head_flags = {"layers": args.layers, "enable_tailor": False if args.no_tailor else None,
                  "crf": True if args.crf else None, "tail_layers": args.tail_layers, "lora_rank": args.lora_rank}
    head_options = {key: value for key, value in head_flags.items() if value is not None}
    if args.config:
        if args.head or head_options:
            raise ConfigError("--config lists the heads; do not combine it with --head/--layers/--no-tailor/--crf/"
                              "--tail-layers/--lora-rank")
        return TrainConfig.from_file(args.config, **given)
    spec: dict[str, Any] = {"type": args.head or "adapter", **head_options}
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


def print_heads(rows: list[dict[str, Any]], as_json: bool) -> None:
    """`heads ls`: one line per head (name, type, primary metrics, its stores: a path, or "missing")."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    for row in rows:
        metrics = " ".join(f"{key} {value:.4f}" for key, value in row["metrics"].items() if key in ("f1", "accuracy",
                                                                                                     "pearson"))
        stores = "  ".join(f"{role}: {store['location'] if store['in_catalog'] else 'missing'} "
                           f"({store['fingerprint'][:12]})" for role, store in row["stores"].items())
        print(f"{row['name']}  {row['type']}  {metrics or '-'}  {stores}  {row['location']}")
    if not rows:
        print("no heads registered")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _dispatch, argv)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        print(json.dumps(train(_train_config(args)), indent=2))
        return 0
    if args.command == "sweep":
        from .sweep import probe_sweep

        config = TrainConfig.from_dict({**given_values(args, TrainConfig), "heads": [{"type": args.head}]},
                                       "heads sweep")
        print(json.dumps(probe_sweep(config), indent=2))
        return 0
    if args.command == "evaluate":
        result = evaluate_heads([args.head], args.store, args.batch_size)[0]
        if args.json:
            print(json.dumps({"head": result["head"], "store": args.store, **result["metrics"]}, indent=2))
        else:
            print(format_report(result["head"], args.store, result["metrics"]))
        return 0
    if args.command == "report":
        from .report import build_report

        print(f"report written to {build_report(args.head_dir, args.out, args.store, args.batch_size)}")
        return 0
    if args.command == "register":
        from .registry import register_heads

        for record in register_heads(args.head_dirs, args.catalog):
            print(f"registered {record}")
        return 0
    if args.command == "ls":
        from .registry import list_heads

        print_heads(list_heads(args.root), args.json)
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
