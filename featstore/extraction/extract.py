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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, StoreConflictError, StoreFormatError
from ..sharing.catalog import REPLACEMENT_SUFFIX, RETIRED_SUFFIX, Catalog, check_store_location
from ..sharing.lease import Lease
from ..sharing.location import Location, resolve
from ..store import format as fmt
from ..store.backends import BACKENDS, StoreBackend, detect_backend, open_backend, read_manifest
from ..store.manifest import StoreManifest
from .corpus import load_corpus
from .encoder import FrozenEncoder
from .plan import ExtractionPlan
from .progress import ExtractProgress, Reporter
from .spec import ExtractSpec
from .writer import BackgroundWriter, BlockWriter, ProgressLedger, finalize

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
    existing = None
    if spec.out is not None:  # refuse a bad target before anything heavy loads
        out = resolve(spec.out, spec.storage_options)
        check_store_location(out)
        if spec.catalog is None and _existing(out) == STORE and not spec.overwrite:
            existing = _existing_manifest(out)
    corpus = load_corpus(spec.corpus)
    if existing is not None:
        _refuse_a_different_store_early(spec, corpus.fingerprint(), existing, out)
    encoder = FrozenEncoder.load(spec.model, spec.device, spec.dtype, spec.compute_dtype, progress=spec.progress)
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
        backend, building = _open_or_create(location, plan)
        try:
            if backend.get_manifest().complete:
                if building is None:
                    logger.info("%s is already complete (fingerprint %s); nothing to do", location.url,
                                plan.fingerprint[:12])
                    result.already_complete = True
                    report("complete", total)
                    return result
            else:
                _fill(backend, encoder, plan, lease, result, report)
        finally:
            backend.close()
        if building is not None:
            lease.check()
            _swap_in(building, location)
        report("complete", total)
    finally:
        lease.release()
    logger.info("extraction complete: %s (%d tokens in %.1f s)", location.url, plan.num_tokens,
                result.encode_seconds)
    return result


def _fill(backend: StoreBackend, encoder: FrozenEncoder, plan: ExtractionPlan, lease: Lease,
          result: ExtractResult, report: Reporter) -> None:
    """Compute and write the hidden states from the committed progress on, then finalize."""
    start = result.resumed_from = int(backend.read(fmt.PROGRESS)[0])
    batches = plan.batches(start)
    ledger = ProgressLedger(backend, plan.token_offsets, batches, start, lease.check)
    started = time.perf_counter()
    report("extracting", start)
    if plan.spec.engine == "ray":
        from .ray_engine import fill_with_ray

        fill_with_ray(backend, encoder, plan, batches, ledger, report)
    else:
        fill_local(backend, encoder, plan, batches, ledger, report)
    finalize(backend, lease, ledger)
    result.encode_seconds = time.perf_counter() - started


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


ABSENT, SHELL, STORE = "absent", "shell", "store"


def _existing(location: Location) -> str:
    """What is at `location`: nothing (or an empty directory), an empty shell that a killed writer left before
    writing any attributes (started over, --overwrite or not), or a store. Anything else is never replaced."""
    if not location.exists() or (location.isdir() and not location.fs.ls(location.path)):
        return ABSENT
    if location.isfile() and int(location.fs.size(location.path)) == 0:
        return SHELL  # killed before the HDF5 library wrote its superblock
    backend = detect_backend(location)
    if backend is None:
        raise StoreConflictError(f"{location.url} exists and is not a featstore store; choose another --out or "
                                 "remove it")
    try:
        opened = BACKENDS[backend].open(location, "r")
    except Exception as error:  # too damaged for its library to open: someone should look at it
        raise StoreConflictError(f"{location.url} exists and cannot be opened ({type(error).__name__}: {error}); "
                                 "choose another --out or remove it") from None
    try:
        return SHELL if opened.is_empty_shell() else STORE
    finally:
        opened.close()


def _refuse_a_different_store_early(spec: ExtractSpec, corpus_fingerprint: str, existing: StoreManifest,
                                    location: Location) -> None:
    """What can be compared before the encoder loads (the corpus, the options given explicitly): a store made
    differently is refused now rather than after loading the model. The rest is compared by fingerprint."""
    inputs = existing.fingerprint_inputs
    differing = [name for name, mine, theirs in (
        ("corpus_fingerprint", corpus_fingerprint, inputs.corpus_fingerprint),
        ("storage_dtype", spec.dtype, inputs.storage_dtype),
        ("truncation", spec.truncate, inputs.truncation),
        ("max_length", spec.max_length, inputs.max_length),
        ("stride", spec.stride, inputs.stride)) if mine is not None and mine != theirs]
    if differing:
        raise _made_differently(location, differing)


def _existing_manifest(location: Location) -> StoreManifest:
    try:
        return read_manifest(location)
    except StoreFormatError:
        raise StoreConflictError(f"{location.url} exists and is not a readable featstore store; choose another "
                                 "--out or remove it") from None


def _made_differently(location: Location, differing: list[str]) -> StoreConflictError:
    return StoreConflictError(f"{location.url} already holds a store made with different arguments (differs in: "
                              f"{', '.join(differing) or 'format'}); use another --out, or --overwrite to replace it")


def _open_or_create(location: Location, plan: ExtractionPlan) -> tuple[StoreBackend, Location | None]:
    """The store to write: a new one, or one with the same fingerprint to resume; refuse anything else. With
    --overwrite of a local store the new store is built beside it (`NAME.replacement`) and swapped in when
    complete; the second value is then where it is built."""
    spec = plan.spec
    state = _existing(location)
    if state == SHELL:
        logger.warning("%s holds an empty store that a killed extraction left (no attributes, no data); "
                       "starting over", location.url)
        location.remove(recursive=True)
    if state != STORE:
        return _create(location, plan), None
    old = _existing_manifest(location)
    if old.fingerprint == plan.fingerprint and not spec.overwrite:
        backend = open_backend(location, "r+")
        if not old.complete:
            logger.info("resuming %s from sequence %d of %d", location.url, int(backend.read(fmt.PROGRESS)[0]),
                        len(plan.sequences))
        return backend, None
    if not spec.overwrite:
        raise _made_differently(location, old.fingerprint_inputs.differing(plan.manifest.fingerprint_inputs))
    if not location.is_local:
        # Object storage has no rename: the old store is deleted first. A reader that still has it open gets
        # checksum errors from then on, never other data (checked reads).
        logger.warning("--overwrite: deleting %s to write its replacement in place", location.url)
        location.remove(recursive=True)
        return _create(location, plan), None
    building = location.sibling(REPLACEMENT_SUFFIX)
    logger.warning("--overwrite: building the replacement of %s at %s; it is swapped in when complete",
                   location.url, building.url)
    if _existing(building) == STORE and read_manifest(building).fingerprint == plan.fingerprint:
        return open_backend(building, "r+"), building  # an interrupted --overwrite of this extraction
    if building.exists():
        building.remove(recursive=True)
    return _create(building, plan), building


def _create(location: Location, plan: ExtractionPlan) -> StoreBackend:
    backend = BACKENDS[plan.spec.backend].create(location)
    for array, data in plan.arrays():
        backend.create_array(array, data)
    backend.set_manifest(plan.manifest)  # attributes last, saying "writing": the arrays are all there
    return backend


def _swap_in(building: Location, target: Location) -> None:
    """Put the finished replacement in the old store's place. An HDF5 file is replaced atomically and readers
    that have the old file open keep reading the old bytes; a Zarr directory is moved aside first and deleted,
    and a reader that still has it open gets checksum errors from its next read, never the new data."""
    if target.isfile():
        os.replace(building.path, target.path)
        return
    retired = target.sibling(RETIRED_SUFFIX)
    if retired.exists():
        retired.remove(recursive=True)
    os.rename(target.path, retired.path)
    os.rename(building.path, target.path)
    retired.remove(recursive=True)


def fill_local(backend: StoreBackend, encoder: FrozenEncoder, plan: ExtractionPlan, batches: list[range],
               ledger: ProgressLedger, report: Reporter) -> None:
    """This process computes the batches; a background thread writes them."""
    start = ledger.committed
    writer = BackgroundWriter(BlockWriter(backend, plan.block_tokens, plan.check_levels,
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
