"""`featstore` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from . import __version__
from .errors import FeatstoreError
from .extraction.spec import ExtractSpec
from .options import add_arguments, given_values, parse_layers
from .plugins import plugin_commands
from .store.format import BACKEND_NAMES, STORAGE_DTYPES


def _add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, ExtractSpec)
    parser.add_argument("--spec", metavar="FILE", help="JSON extraction spec (ExtractSpec.to_dict(), as the service's "
                        "workers write); flags given beside it override its values")
    parser.add_argument("--status-file", help="keep a JSON progress report here (path, state, sequences/tokens done, "
                        "tokens/s), replaced atomically; the extraction service reads it")


def spec_from_args(args: argparse.Namespace) -> ExtractSpec:
    values = given_values(args, ExtractSpec)
    if args.storage_options_list:  # the global -S KEY=VALUE options
        values["storage_options"] = dict(args.storage_options_list)
    if args.spec:
        return ExtractSpec.from_file(args.spec, **values)
    return ExtractSpec.from_dict(values, where="featstore extract")


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-S", "--storage-option", dest="storage_options_list", action="append", default=[],
                        type=parse_storage_option, metavar="KEY=VALUE",
                        help="fsspec storage option for remote locations (repeatable), e.g. "
                        "client_kwargs='{\"endpoint_url\": \"http://127.0.0.1:8333\"}'; S3 endpoint and "
                        "credentials otherwise come from the AWS_* environment variables")
    commands = parser.add_subparsers(dest="command", required=True)
    extract_parser = commands.add_parser("extract", help="extract hidden states into a store (resumable)")
    _add_extract_arguments(extract_parser)
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
        copy.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert = commands.add_parser("convert", help="write a re-encoded copy (e.g. --dtype int8) or a copy with fewer "
                                  "layers of a complete store, without the encoder; verified before it is reported")
    convert.add_argument("source", help="a complete store (path or URL)")
    convert.add_argument("destination", help="the new store (path or URL)")
    convert.add_argument("--dtype", choices=STORAGE_DTYPES, help="storage encoding (default: the source's)")
    convert.add_argument("--layers", type=parse_layers, metavar="0,3,-1",
                         help="stored layers to keep (default: all the source holds)")
    convert.add_argument("--backend", choices=BACKEND_NAMES, help="zarr or hdf5 (default: the source's)")
    convert.add_argument("--compression", metavar="zstd[:LEVEL]|none",
                         help="lossless codec on the hidden states (default: the source's)")
    convert.add_argument("--overwrite", action="store_true", help="replace a different store at the destination")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    serve = commands.add_parser("serve", help="run the extraction service (HTTP API, persistent job queue)")
    serve.add_argument("--catalog", required=True, help="catalog root where finished stores land")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; any other "
                       "needs a token)")
    serve.add_argument("--port", type=int, default=8470, help="port to listen on (default: 8470)")
    serve.add_argument("--corpus-root", action="append", default=[],
                       help="directory requests may read corpora from (repeatable; default: the current directory)")
    serve.add_argument("--model-root", action="append", default=[],
                       help="directory requests may load model directories from (repeatable)")
    serve.add_argument("--state-dir", default="featstore-service", help="job database, logs and status files")
    serve.add_argument("--token-file", help="file holding the bearer token (default: $FEATSTORE_SERVICE_TOKEN); "
                       "required unless --host is a loopback address")
    serve.add_argument("--workers", type=int, help="parallel jobs (default: one per GPU, one on CPU)")
    serve.add_argument("--max-request-bytes", type=int, default=64 * 1024,
                       help="largest request body accepted (default: 65536)")
    serve.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="ray: run every job on Ray actors instead of one local process per GPU")
    serve.add_argument("--ray-address", help="with --engine ray: the cluster ('auto', ray://host:10001); default: "
                       "a local Ray instance per job")
    submit = commands.add_parser("submit", help="submit an extraction job to the service (the extraction options "
                                 "of `featstore extract` that the service accepts)")
    _add_server_arguments(submit)
    add_arguments(submit, ExtractSpec, submit_only=True)
    submit.add_argument("--follow", action="store_true", help="wait for the job, with a progress bar")
    jobs = commands.add_parser("jobs", help="list the service's jobs")
    _add_server_arguments(jobs)
    job = commands.add_parser("job", help="show one job; --follow waits for it, --cancel cancels it")
    _add_server_arguments(job)
    job.add_argument("job_id")
    job.add_argument("--follow", action="store_true", help="wait for the job, with a progress bar")
    job.add_argument("--cancel", action="store_true", help="cancel the job (its store keeps what was committed)")
    ls = commands.add_parser("ls", help="list the stores under a catalog root (directory or s3:// prefix)")
    ls.add_argument("root")
    ls.add_argument("--json", action="store_true", help="one JSON object per store")
    ls.add_argument("--heads", action="store_true", help="with each store, the registered heads trained or "
                    "evaluated on it (heads train --catalog, heads register)")
    gc = commands.add_parser("gc", help="find incomplete or abandoned stores, unfinished copies and stale leases")
    gc.add_argument("root")
    gc.add_argument("--delete", action="store_true", help="delete what was found (never a store being written)")
    gc.add_argument("--unused", action="store_true", help="also complete stores that no registered head names")
    gc.add_argument("--include-named", action="store_true", help="also stores that registered heads still name "
                    "(by default they are kept, and listed as kept)")
    for name, command in plugin_commands().items():
        command.add_parser(commands, name)
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
    args.storage_options = dict(args.storage_options_list)
    if args.command == "extract":
        from .extraction.extract import extract
        from .service.status import StatusFileWriter, write_failure

        # SIGTERM (a cancelled service job) unwinds like Ctrl-C: the lease is released, committed work kept.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if not args.status_file:
            print(extract(spec_from_args(args)).path)
            return 0
        try:
            print(extract(spec_from_args(args), StatusFileWriter(args.status_file)).path)
        except Exception as error:  # the service shows this to its client: never the inputs' content
            public = error.public_message() if isinstance(error, FeatstoreError) else (
                f"internal error ({type(error).__name__}); see the service's log of this job")
            write_failure(args.status_file, public)
            raise
        return 0
    if args.command == "info":
        if args.json:
            from .sharing.location import resolve
            from .store.backends import read_attrs

            print(json.dumps(read_attrs(resolve(args.store, args.storage_options)), indent=2))
        else:
            from .store.info import describe_store

            print(describe_store(args.store, args.storage_options))
        return 0
    if args.command in ("push", "pull"):
        from .sharing.transfer import copy_store

        print(copy_store(args.source, args.destination, args.overwrite, args.storage_options,
                         progress=not args.no_progress).url)
        return 0
    if args.command == "convert":
        from .extraction.convert import convert_store
        print(convert_store(args.source, args.destination, args.dtype, args.layers, args.backend, args.compression,
                            args.overwrite, args.storage_options, progress=not args.no_progress).url)
        return 0
    if args.command in ("ls", "gc"):
        return _catalog_command(args)
    if args.command in ("serve", "submit", "jobs", "job"):
        return _service_command(args)
    if args.command == "verify":
        from .store.verify import verify_store

        problems = verify_store(args.store, deep=not args.quick, storage_options=args.storage_options)
        for problem in problems:
            print(f"FAIL {args.store}: {problem}", file=sys.stderr)
        if not problems:
            print(f"OK {args.store}")
        return 1 if problems else 0
    if args.command in plugin_commands():
        return plugin_commands()[args.command].run(args)
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
        spec = given_values(args, ExtractSpec, submit_only=True)
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
        found = []
        for entry, why, heads in catalog.collectable(args.unused):
            if heads and not args.include_named:  # say what a head's lineage kept from being collected
                print(f"kept {entry.location.url}: {why}; --include-named collects it too")
            else:
                found.append((entry, why))
        for entry, why in found:
            print(f"{'deleting' if args.delete else 'found'} {entry.location.url}: {why}")
            if args.delete:
                catalog.remove(entry)
        if not found:
            print(f"nothing to clean under {catalog.root.url}")
        return 0
    rows = [entry.summary(catalog.root) for entry in catalog.entries()]
    if args.heads:
        records = catalog.head_records()
        for row in rows:
            row["heads"] = [record.name for record in catalog.consumers(row["fingerprint"], records)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    columns = ("status", "encoder", "corpus", "split", "layers", "dtype", "tokens", "size", "created", "fingerprint",
               *(("heads",) if args.heads else ()), "path")
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
    if name == "heads":
        return ",".join(value) or "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _human_bytes(size: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while size >= 1024 and power < len(units) - 1:
        size, power = size / 1024, power + 1
    return f"{size:.0f} B" if power == 0 else f"{size:.1f} {units[power]}"


if __name__ == "__main__":
    sys.exit(main())
