"""`featstore` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from .corpus import BUNDLED_CORPUS, TASKS, CorpusSpec
from .errors import FeatstoreError
from .extract import DEFAULT_CHUNK_TOKENS, ExtractConfig, extract


def parse_layers(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes 'all' or comma-separated integers, got {text!r}"
                                         ) from None


def _add_extract_arguments(parser: argparse.ArgumentParser, out_required: bool) -> None:
    parser.add_argument("--model", help="local model directory or a hub id already in the local cache "
                        "(default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--corpus", default=str(BUNDLED_CORPUS),
                        help="CoNLL file, JSONL/CSV/Parquet file or save_to_disk directory "
                        "(default: the bundled sample NER corpus)")
    parser.add_argument("--out", required=out_required, help="store path (a directory for zarr, a file for hdf5)")
    corpus = parser.add_argument_group("corpus")
    corpus.add_argument("--corpus-format", default="auto", choices=["auto", "conll", "json", "csv", "parquet",
                                                                      "disk"])
    corpus.add_argument("--split", help="split to read from a saved DatasetDict; also recorded in the store")
    corpus.add_argument("--words-column", help="column of pre-split words (token classification)")
    corpus.add_argument("--text-column", help="column of raw text (sequence tasks)")
    corpus.add_argument("--label-column", help="column of labels (tags per word, or one per row)")
    corpus.add_argument("--task", choices=TASKS, help="default: inferred from the columns")
    corpus.add_argument("--label-names", help="comma-separated label names fixing the id order, e.g. to share it "
                        "between train and dev stores")
    corpus.add_argument("--conll-token-column", type=int, default=0)
    corpus.add_argument("--conll-tag-column", type=int, default=-1)
    run = parser.add_argument_group("extraction")
    run.add_argument("--layers", type=parse_layers, default=None,
                     help="'all' (default) or indices like 0,6,-1 (0 = embeddings, negatives count back)")
    run.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                     help="storage dtype (default float16)")
    run.add_argument("--compute-dtype", choices=["float16", "bfloat16", "float32"],
                     help="default: float32 on CPU, the storage dtype on CUDA")
    run.add_argument("--backend", default="zarr", choices=["zarr", "hdf5"])
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    run.add_argument("--max-batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    run.add_argument("--max-length", type=int, help="window length in tokens (default: the model's maximum)")
    run.add_argument("--stride", type=int, help="overlap between windows in tokens (default: min(128, window/4))")
    run.add_argument("--truncate", action="store_true",
                     help="keep only the first window of long sequences instead of splitting them")
    run.add_argument("--overwrite", action="store_true", help="replace an existing store made differently")
    run.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    run.add_argument("--block-tokens", type=int, help="tokens per write/commit block (default: 64 MiB worth)")
    run.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    corpus = CorpusSpec(
        path=args.corpus, format=args.corpus_format, split=args.split, words_column=args.words_column,
        text_column=args.text_column, label_column=args.label_column, task=args.task,
        label_names=args.label_names.split(",") if args.label_names else None,
        conll_token_column=args.conll_token_column, conll_tag_column=args.conll_tag_column)
    return ExtractConfig(
        out=args.out, model=args.model, corpus=corpus, layers=args.layers, dtype=args.dtype,
        compute_dtype=args.compute_dtype, backend=args.backend, device=args.device,
        max_batch_tokens=args.max_batch_tokens, max_length=args.max_length, stride=args.stride,
        truncate=args.truncate, overwrite=args.overwrite, chunk_tokens=args.chunk_tokens,
        block_tokens=args.block_tokens, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featstore", description="Extract a frozen encoder's hidden states "
                                     "once into a chunked store, and read them back.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    extract_parser = commands.add_parser("extract", help="extract hidden states into a store (resumable)")
    _add_extract_arguments(extract_parser, out_required=True)
    info = commands.add_parser("info", help="summarise a store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="print the raw attributes as JSON")
    verify = commands.add_parser("verify", help="check a store is complete and consistent (exit 1 if not)")
    verify.add_argument("store")
    verify.add_argument("--quick", action="store_true", help="skip reading every hidden state")
    demo = commands.add_parser("demo", help="end to end on the bundled corpus and packaged MiniLM: extract, verify, "
                               "train an adapter from the store, predict with the live encoder")
    demo.add_argument("--workdir", default="featstore-demo", help="where the demo writes its store")
    return parser


def run_cli(parser: argparse.ArgumentParser, dispatch: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None) -> int:
    """Parse, set up logging, dispatch; a FeatstoreError becomes its message on stderr and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return dispatch(args)
    except FeatstoreError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _dispatch, argv)


def _dispatch(args: argparse.Namespace) -> int:
    from .verify import describe_store, verify_store

    if args.command == "extract":
        print(extract(config_from_args(args)).path)
        return 0
    if args.command == "info":
        if args.json:
            from .backends import open_backend

            backend = open_backend(args.store)
            print(json.dumps(backend.get_attrs(), indent=2))
            backend.close()
        else:
            print(describe_store(args.store))
        return 0
    if args.command == "verify":
        problems = verify_store(args.store, deep=not args.quick)
        for problem in problems:
            print(f"FAIL {args.store}: {problem}", file=sys.stderr)
        if not problems:
            print(f"OK {args.store}")
        return 1 if problems else 0
    if args.command == "demo":
        # The demo spans extraction and head training, so it lives in the heads package on top of this one.
        from heads.demo import run_demo

        return run_demo(args.workdir)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
