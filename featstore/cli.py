"""`featstore` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from .errors import FeatstoreError
from .extraction.corpus import BUNDLED_CORPUS, TASKS, CorpusSpec
from .extraction.extract import DEFAULT_CHUNK_TOKENS, ExtractConfig, extract
from .service.jobs import StatusFileWriter


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
    parser.add_argument("--out", required=out_required, help="store path or URL (s3://bucket/prefix/name.zarr): a "
                        "directory for zarr, a file for hdf5; optional with --catalog")
    parser.add_argument("--catalog", help="catalog root (directory or s3:// prefix): reuse a complete store with the "
                        "same content fingerprint from it, else extract into it (at --out, or a path it chooses)")
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
    run.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for another process writing the same store (default: fail at once)")
    run.add_argument("--engine", choices=["local", "ray"], default="local",
                     help="ray: split the work across Ray actors (one per GPU, else per CPU) writing one store")
    run.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per CPU)")
    run.add_argument("--ray-address", help="Ray cluster to join ('auto', ray://host:10001); default: start a "
                     "local one")
    run.add_argument("--status-file", help="keep a JSON progress report here (path, state, sequences/tokens done, "
                     "tokens/s), replaced atomically; the extraction service reads it")


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
        block_tokens=args.block_tokens, progress=not args.no_progress, catalog=args.catalog,
        lock_wait=args.lock_wait, storage_options=args.storage_options,
        on_progress=StatusFileWriter(args.status_file) if args.status_file else None, engine=args.engine,
        workers=args.workers, ray_address=args.ray_address)


def parse_storage_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--storage-option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, objects such as client_kwargs
    except ValueError:
        return key, value


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="service URL (default: $FEATSTORE_SERVER)")
    parser.add_argument("--token", help="bearer token (default: $FEATSTORE_SERVICE_TOKEN)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featstore", description="Extract a frozen encoder's hidden states "
                                     "once into a chunked store, and read them back.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-S", "--storage-option", dest="storage_options_list", action="append", default=[],
                        type=parse_storage_option, metavar="KEY=VALUE",
                        help="fsspec storage option for remote locations (repeatable), e.g. "
                        "client_kwargs='{\"endpoint_url\": \"http://127.0.0.1:8333\"}'; S3 endpoint and "
                        "credentials otherwise come from the AWS_* environment variables")
    commands = parser.add_subparsers(dest="command", required=True)
    extract_parser = commands.add_parser("extract", help="extract hidden states into a store (resumable)")
    _add_extract_arguments(extract_parser, out_required=False)
    info = commands.add_parser("info", help="summarise a store (path or URL)")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="print the raw attributes as JSON")
    verify = commands.add_parser("verify", help="check a store (path or URL) is complete, consistent and matches "
                                 "its checksums (exit 1 if not, naming what is wrong)")
    verify.add_argument("store")
    verify.add_argument("--quick", action="store_true", help="skip reading every byte (no checksum check)")
    for name, what in (("push", "upload a local store to a URL (or any location)"),
                       ("pull", "download a store from a URL (or any location)")):
        copy = commands.add_parser(name, help=f"{what}; verified before it is marked complete")
        copy.add_argument("source")
        copy.add_argument("destination", help="store path/URL, or a directory / prefix ending in '/' to copy into")
        copy.add_argument("--overwrite", action="store_true", help="replace a different store at the destination")
        copy.add_argument("--no-progress", action="store_true")
    serve = commands.add_parser("serve", help="run the extraction service (HTTP API, persistent job queue)")
    serve.add_argument("--catalog", required=True, help="catalog root where finished stores land")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8470)
    serve.add_argument("--corpus-root", action="append", default=[],
                       help="directory requests may read corpora from (repeatable; default: the current directory)")
    serve.add_argument("--model-root", action="append", default=[],
                       help="directory requests may load model directories from (repeatable)")
    serve.add_argument("--state-dir", default="featstore-service", help="job database, logs and status files")
    serve.add_argument("--token-file", help="file holding the bearer token (default: $FEATSTORE_SERVICE_TOKEN); "
                       "required unless --host is a loopback address")
    serve.add_argument("--workers", type=int, help="parallel jobs (default: one per GPU, one on CPU)")
    serve.add_argument("--max-request-bytes", type=int, default=64 * 1024)
    serve.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="ray: run every job on Ray actors instead of one local process per GPU")
    serve.add_argument("--ray-address", help="with --engine ray: the cluster ('auto', ray://host:10001); default: "
                       "a local Ray instance per job")
    submit = commands.add_parser("submit", help="submit an extraction job to the service")
    _add_server_arguments(submit)
    submit.add_argument("--model")
    submit.add_argument("--corpus", required=True, help="corpus path as the service sees it (under a corpus root)")
    submit.add_argument("--out", help="store path relative to the service's catalog")
    for flag in ("--split", "--words-column", "--text-column", "--label-column", "--task"):
        submit.add_argument(flag)
    submit.add_argument("--corpus-format")
    submit.add_argument("--label-names")
    submit.add_argument("--layers", type=parse_layers)
    submit.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    submit.add_argument("--backend", choices=["zarr", "hdf5"])
    submit.add_argument("--max-length", type=int)
    submit.add_argument("--truncate", action="store_true")
    submit.add_argument("--follow", action="store_true", help="wait for the job, with a progress bar")
    jobs = commands.add_parser("jobs", help="list the service's jobs")
    _add_server_arguments(jobs)
    job = commands.add_parser("job", help="show one job; --follow waits for it, --cancel cancels it")
    _add_server_arguments(job)
    job.add_argument("job_id")
    job.add_argument("--follow", action="store_true")
    job.add_argument("--cancel", action="store_true")
    ls = commands.add_parser("ls", help="list the stores under a catalog root (directory or s3:// prefix)")
    ls.add_argument("root")
    ls.add_argument("--json", action="store_true", help="one JSON object per store")
    gc = commands.add_parser("gc", help="find incomplete or abandoned stores, unfinished copies and stale leases")
    gc.add_argument("root")
    gc.add_argument("--delete", action="store_true", help="delete what was found (never a store being written)")
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
    if not args.verbose:  # the storage clients log every credential and endpoint lookup at INFO
        for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return dispatch(args)
    except FeatstoreError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _dispatch, argv)


def _dispatch(args: argparse.Namespace) -> int:
    from .store.verify import describe_store, verify_store

    args.storage_options = dict(args.storage_options_list)
    if args.command == "extract":
        # SIGTERM (a cancelled service job) unwinds like Ctrl-C: the lease is released, committed work kept.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        print(extract(config_from_args(args)).path)
        return 0
    if args.command == "info":
        if args.json:
            from .sharing.location import resolve
            from .store.backends import read_attrs

            print(json.dumps(read_attrs(resolve(args.store, args.storage_options)), indent=2))
        else:
            print(describe_store(args.store, args.storage_options))
        return 0
    if args.command in ("push", "pull"):
        from .sharing.transfer import copy_store

        print(copy_store(args.source, args.destination, args.overwrite, args.storage_options,
                         progress=not args.no_progress).url)
        return 0
    if args.command in ("ls", "gc"):
        return _catalog_command(args)
    if args.command in ("serve", "submit", "jobs", "job"):
        return _service_command(args)
    if args.command == "verify":
        problems = verify_store(args.store, deep=not args.quick, storage_options=args.storage_options)
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


def _service_command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from .service.api import ServiceConfig, load_token, serve

        serve(ServiceConfig(catalog=args.catalog, state_dir=args.state_dir, corpus_roots=args.corpus_root,
                            model_roots=args.model_root, token=load_token(args.token_file), workers=args.workers,
                            max_request_bytes=args.max_request_bytes, engine=args.engine,
                            ray_address=args.ray_address),
              args.host, args.port)
        return 0
    from .service.client import FINISHED, ServiceClient

    client = ServiceClient(args.server, args.token)
    if args.command == "jobs":
        for job in client.jobs():
            progress = job.get("progress") or {}
            done = f"{progress.get('sequences_done', 0)}/{progress.get('sequences_total', '?')}"
            print(f"{job['id']}  {job['status']:<9}  {done:>13}  {job['created_at']}  {job['store'] or '-'}")
        return 0
    if args.command == "submit":
        spec = {name: getattr(args, name) for name in ("model", "corpus", "out", "split", "words_column", "text_column",
                                                        "label_column", "task", "corpus_format", "layers", "dtype",
                                                        "backend", "max_length")}
        spec["label_names"] = args.label_names.split(",") if args.label_names else None
        spec["truncate"] = args.truncate or None
        job = client.submit(spec)
        print(f"job {job['id']} {'(same as an active identical job) ' if job['coalesced'] else ''}{job['status']}",
              file=sys.stderr)
    else:
        job = client.cancel(args.job_id) if args.cancel else client.job(args.job_id)
    if args.follow:
        job = client.follow(job["id"])
    print(json.dumps(job, indent=2))
    return 1 if job["status"] in FINISHED and job["status"] != "succeeded" else 0


def _catalog_command(args: argparse.Namespace) -> int:
    from .sharing.catalog import Catalog

    catalog = Catalog(args.root, args.storage_options)
    if args.command == "gc":
        found = catalog.garbage()
        for entry, why in found:
            print(f"{'deleting' if args.delete else 'found'} {entry.location.url}: {why}")
            if args.delete:
                catalog.remove(entry)
        if not found:
            print(f"nothing to clean under {catalog.root.url}")
        return 0
    rows = [entry.summary(catalog.root) for entry in catalog.entries()]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    columns = ("status", "encoder", "corpus", "split", "layers", "tokens", "size", "created", "fingerprint", "path")
    table = [[_cell(name, row) for name in columns] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in table)) for i, name in enumerate(columns)]
    print("  ".join(name.upper().ljust(width) for name, width in zip(columns, widths)).rstrip())
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


def _cell(name: str, row: dict) -> str:
    value = row.get("size_bytes") if name == "size" else row.get(name)
    if value is None:
        return "-"
    if name == "size":
        return _human_bytes(int(value))
    if name == "layers":
        return ",".join(map(str, value)) if len(value) <= 4 else f"{len(value)} ({value[0]}..{value[-1]})"
    if name == "fingerprint":
        return str(value)[:12]
    return f"{value:,}" if isinstance(value, int) else str(value)


def _human_bytes(size: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while size >= 1024 and power < len(units) - 1:
        size, power = size / 1024, power + 1
    return f"{size:.0f} B" if power == 0 else f"{size:.1f} {units[power]}"


if __name__ == "__main__":
    sys.exit(main())
