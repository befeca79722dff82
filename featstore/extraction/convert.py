"""`featstore convert`: a new store from a complete one, re-encoded and/or with fewer layers, without the encoder.

Teams extract once in float16 and keep cheap copies (int8, a subset of layers). The copy is
written like an extraction (the same block writer, checksums and finalize, under the
destination's lease) from the source's checked reads, then verified in full before it is
reported done. Its metadata is the source's with the new encoding and layers (so a new
fingerprint) and `extraction.converted_from` naming the source; its values are the source's
decoded values encoded again, so they equal a direct extraction's up to the source encoding's
rounding (for float16 sources, one float16 rounding before the 8-bit one).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, CorruptStoreError
from ..sharing.catalog import check_store_location
from ..sharing.lease import Lease
from ..sharing.location import Location, resolve
from ..sharing.transfer import reuse_or_clear
from ..store import format as fmt
from ..store.backends import BACKENDS, StoreBackend
from ..store.chunks import level_rows
from ..store.integrity import check_rows
from ..store.manifest import StoreManifest
from ..store.reader import Store, open_store
from ..store.verify import verify_store
from .encoder import to_storage
from .plan import array_specs, now
from .spec import canonical_compression
from .writer import BlockWriter, ProgressLedger, finalize

logger = logging.getLogger(__name__)


def convert_store(source: str | Path | Location, destination: str | Path | Location, dtype: str | None = None,
                  layers: Sequence[int] | None = None, backend: str | None = None, compression: str | None = None,
                  overwrite: bool = False, storage_options: dict[str, Any] | None = None, progress: bool = True
                  ) -> Location:
    """Write `destination` from the complete store at `source` with storage encoding `dtype` and the stored
    `layers` (negatives count back; default: the source's), in `backend` and under `compression` ("zstd[:LEVEL]"
    or "none"; defaults: the source's). Returns where the new store is, once verified."""
    if dtype is not None and dtype not in fmt.STORAGE_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(fmt.STORAGE_DTYPES)}")
    if backend is not None and backend not in fmt.BACKEND_NAMES:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(fmt.BACKEND_NAMES)}")
    keep_compression = compression is None
    compression = None if keep_compression else canonical_compression(compression)
    dst = resolve(destination, storage_options)
    check_store_location(dst)
    with open_store(source, storage_options=storage_options) as src:
        manifest = converted_manifest(src, dtype, layers, backend, compression, keep_compression)
        if dst.url == src.path:
            raise ConfigError(f"convert writes a new store: the destination {dst.url} is the source")
        with Lease(dst, "featstore convert") as lease:
            if reuse_or_clear(dst, manifest, overwrite):
                logger.info("%s already holds this conversion (fingerprint %s, complete); nothing to do", dst.url,
                            manifest.fingerprint[:12])
                return dst
            target = _create(dst, src, manifest)
            try:
                _fill(target, src, manifest, lease, progress)
            finally:
                target.close()
    problems = verify_store(dst, storage_options=storage_options)
    if problems:
        raise CorruptStoreError(f"the converted store {dst.url} failed verification: {'; '.join(problems)}")
    logger.info("converted %s -> %s (%s, layers %s; verified)", src.path, dst.url, manifest.extraction.storage_dtype,
                manifest.extraction.layers)
    return dst


def converted_manifest(src: Store, dtype: str | None, layers: Sequence[int] | None, backend: str | None,
                       compression: str | None = None, keep_compression: bool = True) -> StoreManifest:
    """The source's attributes with the new encoding, layers, backend and (unless `keep_compression`) compression
    (canonical; None: raw): a store being written."""
    old = src.manifest
    manifest = copy.deepcopy(old)
    kept = list(old.extraction.layers)
    if layers is not None:
        kept = sorted(src.stored_layers(layers))
        if len(set(kept)) != len(kept):
            raise ConfigError(f"layers {list(layers)} name the same hidden state twice")
    storage_dtype = dtype or old.extraction.storage_dtype
    for section in (manifest.extraction, manifest.fingerprint_inputs):
        section.storage_dtype, section.layers = storage_dtype, kept
    manifest.fingerprint_inputs.format_major = fmt.format_major(fmt.FORMAT_VERSION)
    manifest.fingerprint = manifest.fingerprint_inputs.fingerprint()
    manifest.format_version, manifest.status, manifest.integrity = fmt.FORMAT_VERSION, fmt.STATUS_WRITING, None
    manifest.extraction.created_at, manifest.extraction.completed_at = now(), None
    manifest.extraction.extra["converted_from"] = {"fingerprint": old.fingerprint, "path": src.path,
                                                   "storage_dtype": old.extraction.storage_dtype,
                                                   "layers": list(old.extraction.layers)}
    manifest.layout.backend = backend or old.layout.backend
    if not keep_compression:
        manifest.layout.compression = compression
    manifest.counts.hidden_bytes = old.counts.num_tokens * fmt.code_bytes_per_token(storage_dtype, len(kept),
                                                                                    old.encoder.hidden_size)
    if manifest.fingerprint == old.fingerprint and manifest.layout.compression == old.layout.compression:
        raise ConfigError(f"nothing to convert: {src.path} is already {storage_dtype} with layers {kept} and "
                          f"compression {old.layout.compression or 'none'}; use `featstore push` to copy a store")
    return manifest


def _create(dst: Location, src: Store, manifest: StoreManifest) -> StoreBackend:
    """The new store's arrays (everything but the hidden states copied from the source, checked) and its
    attributes, last, saying "writing"."""
    target = BACKENDS[manifest.layout.backend].create(dst)
    integrity = src.manifest.integrity
    for spec in array_specs(manifest):
        data = None
        if spec.name == fmt.PROGRESS:
            data = np.zeros(2, np.int64)
        elif spec.name not in (fmt.HIDDEN_STATES, fmt.HIDDEN_SCALES):
            data = src.backend.read(spec.name)
            if integrity is not None:
                check_rows(src.path, integrity, spec.name, data)
        target.create_array(spec, data)
    target.set_manifest(manifest)
    return target


def _fill(target: StoreBackend, src: Store, manifest: StoreManifest, lease: Lease, progress: bool) -> None:
    """The hidden states, span by span in storage order, then finalize."""
    total = manifest.counts.num_tokens
    spans = src.spans()
    ledger = ProgressLedger(target, src.token_offsets, spans, 0, lease.check)
    writer = BlockWriter(target, manifest.layout.block_tokens, level_rows(manifest, target.checksum_per_layer), 0,
                         total, total, ledger.written)
    columns = src.layer_columns(manifest.extraction.layers)
    bounds = src.token_offsets
    with tqdm(total=total, unit="tok", unit_scale=True, desc="convert", disable=not progress) as bar:
        for span in spans:
            start, stop = int(bounds[span.start]), int(bounds[span.stop])
            hidden = torch.from_numpy(np.ascontiguousarray(src.read_hidden(start, stop, columns)))
            writer.append(to_storage(hidden, manifest.extraction.storage_dtype).numpy())
            bar.update(stop - start)
    writer.finish()
    finalize(target, lease, ledger)
