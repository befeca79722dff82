"""Extraction: spec -> plan -> target store -> an engine fills it -> finalize.

`extract(spec)` checks the spec, loads the corpus and the encoder, builds the
`ExtractionPlan` (pure), picks the target (`--out`, or a complete twin in the catalog),
creates or reopens the store under its lease, lets an engine compute and write the hidden
states from the committed progress on, and finalizes (checksums, status "complete"). An
engine only decides who computes which planned batches: this process (`fill_local`, encoder
compute overlapping store writes through a background writer) or Ray actors
(`ray_engine.fill_with_ray`); both write through `BlockWriter` and commit progress per block
through `ProgressLedger`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, CorruptStoreError, StoreConflictError, StoreFormatError
from ..sharing.catalog import Catalog
from ..sharing.lease import Lease
from ..sharing.location import Location, resolve
from ..store import format as fmt
from ..store.backends import BACKENDS, StoreBackend, detect_backend, open_backend
from ..store.integrity import record_integrity
from .corpus import load_corpus
from .encoder import FrozenEncoder
from .plan import ExtractionPlan, now
from .progress import ExtractProgress, Reporter
from .spec import ExtractSpec
from .writer import BackgroundWriter, BlockWriter, ProgressLedger

logger = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    """What an extraction produced. `encode_seconds` covers the encoder + write phase only."""

    path: str
    fingerprint: str
    num_sequences: int
    num_tokens: int
    resumed_from: int = 0  # sequences already committed by an earlier run
    already_complete: bool = False
    reused: bool = False  # found complete in the catalog; nothing was computed
    encode_seconds: float = 0.0


def extract(spec: ExtractSpec, on_progress: Callable[[ExtractProgress], None] | None = None) -> ExtractResult:
    """Run (or resume, or reuse) an extraction; returns once the store is complete. `on_progress` is called
    once the target is known, after every batch, and at the end."""
    spec.validate()
    if spec.out is not None and spec.catalog is None:
        _refuse_foreign_target(resolve(spec.out, spec.storage_options))  # before anything heavy is loaded
    corpus = load_corpus(spec.corpus)
    encoder = FrozenEncoder.load(spec.model, spec.device, spec.dtype, spec.compute_dtype)
    plan = ExtractionPlan.build(spec, corpus, encoder)
    location, reused = _target(spec, plan)
    total = len(plan.sequences)
    result = ExtractResult(location.url, plan.fingerprint, total, plan.num_tokens)
    report = _reporter(on_progress, location.url, plan)
    if reused:
        logger.info("reusing %s: the catalog %s already holds a complete store with fingerprint %s",
                    location.url, spec.catalog, plan.fingerprint[:12])
        result.reused = result.already_complete = True
        report("reused", total)
        return result
    lease = Lease(location, "featstore extract", spec.lease_ttl)
    try:
        lease.acquire(spec.lock_wait)
    except PermissionError as error:
        raise ConfigError(f"cannot write to {location.url}: permission denied ({error}); use credentials or a "
                          "location that allow writing") from None
    try:
        backend = _open_or_create(location, plan)
        try:
            if backend.get_manifest().complete:
                logger.info("%s is already complete (fingerprint %s); nothing to do", location.url,
                            plan.fingerprint[:12])
                result.already_complete = True
                report("complete", total)
                return result
            start = result.resumed_from = int(backend.read(fmt.PROGRESS)[0])
            batches = plan.batches(start)
            ledger = ProgressLedger(backend, plan.token_offsets, batches, start, lease.check)
            started = time.perf_counter()
            report("extracting", start)
            if spec.engine == "ray":
                from .ray_engine import fill_with_ray

                fill_with_ray(backend, encoder, plan, batches, ledger, report)
            else:
                fill_local(backend, encoder, plan, batches, ledger, report)
            _finalize(backend, lease, ledger)
            result.encode_seconds = time.perf_counter() - started
            report("complete", total)
        finally:
            backend.close()
    finally:
        lease.release()
    logger.info("extraction complete: %s (%d tokens in %.1f s)", location.url, plan.num_tokens,
                result.encode_seconds)
    return result


def _reporter(on_progress: Callable[[ExtractProgress], None] | None, path: str, plan: ExtractionPlan) -> Reporter:
    started, first = time.perf_counter(), None

    def report(state: str, sequences_done: int) -> None:
        nonlocal first
        if on_progress is None:
            return
        tokens_done = int(plan.token_offsets[sequences_done])
        first = tokens_done if first is None else first  # rate over this run's tokens, not resumed ones
        rate = (tokens_done - first) / max(time.perf_counter() - started, 1e-9)
        on_progress(ExtractProgress(path, state, sequences_done, len(plan.sequences), tokens_done,
                                    plan.num_tokens, rate))

    return report


def _target(spec: ExtractSpec, plan: ExtractionPlan) -> tuple[Location, bool]:
    """Where the store is: --out, or with --catalog a complete store with the same fingerprint (reused = True)
    or else --out or the catalog's default path for it."""
    if spec.catalog is None:
        return resolve(spec.out, spec.storage_options), False  # type: ignore[arg-type] - validated
    catalog = Catalog(spec.catalog, spec.storage_options)
    twin = catalog.find_complete(plan.fingerprint)
    if twin is not None:
        return twin.location, True
    location = resolve(spec.out, spec.storage_options) if spec.out else catalog.default_location(plan.manifest)
    logger.info("no complete store with fingerprint %s in %s; extracting into %s", plan.fingerprint[:12],
                spec.catalog, location.url)
    return location, False


def _refuse_foreign_target(location: Location) -> str | None:
    """The backend of the store at `location` (None: nothing there, or an empty directory); something that is
    not a featstore store is never replaced, --overwrite or not."""
    if not location.exists():
        return None
    backend = detect_backend(location)
    if backend is not None or (location.isdir() and not location.fs.ls(location.path)):
        return backend  # a store, or an empty directory (fine to write into)
    raise StoreConflictError(f"{location.url} exists and is not a featstore store; choose another --out or "
                             "remove it")


def _open_or_create(location: Location, plan: ExtractionPlan) -> StoreBackend:
    """Create the store, or reopen one with the same fingerprint to resume; refuse anything else."""
    spec = plan.spec
    if location.exists():
        if _refuse_foreign_target(location) is not None:
            backend = open_backend(location, "r+")
            try:
                old = backend.get_manifest()
            except StoreFormatError:
                backend.close()
                raise StoreConflictError(f"{location.url} exists and is not a readable featstore store; choose "
                                         "another --out or remove it") from None
            if old.fingerprint == plan.fingerprint and not spec.overwrite:
                if not old.complete:
                    logger.info("resuming %s from sequence %d of %d", location.url,
                                int(backend.read(fmt.PROGRESS)[0]), len(plan.sequences))
                return backend
            backend.close()
            if not spec.overwrite:
                differing = old.fingerprint_inputs.differing(plan.manifest.fingerprint_inputs)
                raise StoreConflictError(f"{location.url} already holds a store made with different arguments "
                                         f"(differs in: {', '.join(differing) or 'format'}); use another --out, "
                                         "or --overwrite to replace it")
            logger.warning("--overwrite: replacing %s", location.url)
        location.remove(recursive=True)
    backend = BACKENDS[spec.backend].create(location)
    for array, data in plan.arrays():
        backend.create_array(array, data)
    backend.set_manifest(plan.manifest)  # attributes last, saying "writing": the arrays are all there
    return backend


def fill_local(backend: StoreBackend, encoder: FrozenEncoder, plan: ExtractionPlan, batches: list[range],
               ledger: ProgressLedger, report: Reporter) -> None:
    """This process computes the batches; a background thread writes them."""
    start = ledger.committed
    writer = BackgroundWriter(BlockWriter(backend, plan.block_tokens, plan.chunk_tokens,
                                          int(plan.token_offsets[start]), plan.num_tokens, plan.num_tokens,
                                          ledger.written))
    bar = tqdm(total=len(plan.sequences), initial=start, unit="seq", desc="extract", disable=not plan.spec.progress)
    started, tokens_done = time.perf_counter(), 0
    try:
        for batch in batches:
            hidden = encoder.forward(plan.sequences[batch.start: batch.stop], plan.layers, plan.spec.max_batch_tokens)
            writer.put(*_to_host(hidden))
            tokens_done += len(hidden)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - started, 1e-9):,.0f}")
            report("extracting", batch.stop)
    finally:
        bar.close()
        writer.close()


def _to_host(hidden: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Device->host copy into pinned memory without blocking the next forward pass."""
    if hidden.device.type != "cuda":
        return hidden, None
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    host.copy_(hidden, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _finalize(backend: StoreBackend, lease: Lease, ledger: ProgressLedger) -> None:
    """Record checksums and mark complete, only after checking that everything was committed."""
    manifest = backend.get_manifest()
    progress = backend.read(fmt.PROGRESS)
    counts = manifest.counts
    if int(progress[0]) != counts.num_sequences or int(progress[1]) != counts.num_tokens:
        raise CorruptStoreError(f"internal error: finalize found progress {progress.tolist()} for "
                               f"{counts.num_sequences} sequences / {counts.num_tokens} tokens")
    manifest.format_version = fmt.FORMAT_VERSION  # a store begun by an older featstore gets today's checks
    manifest.extraction.completed_at = now()
    lease.check()
    manifest.integrity = record_integrity(backend, manifest, ledger.digests, ledger.chunk_checksums)
    manifest.status = fmt.STATUS_COMPLETE
    lease.check()
    backend.set_manifest(manifest)
