"""The human summary of a store (`featstore info`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..sharing.lease import read_lease
from ..sharing.location import Location, resolve
from . import format as fmt
from .backends import open_backend
from .manifest import Integrity
from .reader import Store


def describe_store(path: str | Path | Location, storage_options: dict[str, Any] | None = None) -> str:
    """The human summary printed by `featstore info`."""
    store = Store(open_backend(resolve(path, storage_options), "r"), allow_incomplete=True)
    try:
        manifest = store.manifest
        counts, encoder, extraction, corpus = manifest.counts, manifest.encoder, manifest.extraction, manifest.corpus
        hidden_arrays = [name for name in (fmt.HIDDEN_STATES, fmt.HIDDEN_SCALES) if name in store.backend.array_names()]
        hidden_bytes = sum(store.backend.nbytes_stored(name) for name in hidden_arrays)
        total_bytes = store.backend.nbytes_stored()
        minimum = fmt.stored_bytes_per_token(store.storage_dtype, len(store.layers), store.hidden_size)
        progress = store.backend.read(fmt.PROGRESS)
        status = store.status if store.status == fmt.STATUS_COMPLETE else (
            f"{store.status} ({int(progress[0])}/{store.num_sequences} sequences committed)")
        labels = corpus.label_names
        rows = [
            ("store", f"{store.path} ({manifest.layout.backend}, format {manifest.format_version})"),
            ("status", status),
            ("fingerprint", store.fingerprint),
            ("encoder", f"{encoder.name_or_path} ({encoder.model_class}, revision "
                        f"{encoder.revision or 'n/a'}, weights sha256 {encoder.weights_sha256[:12]})"),
            ("layers", f"{store.layers} of {encoder.num_hidden_states} hidden states"),
            ("hidden size", str(store.hidden_size)),
            ("dtype", f"stored {_encoding_summary(store.storage_dtype)}, computed {extraction.compute_dtype} on "
                      f"{extraction.device}"),
            ("compression", "none" if manifest.layout.compression is None else
             f"{manifest.layout.compression} (Blosc zstd, byte shuffle): hidden states at "
             f"{hidden_bytes / max(counts.num_tokens * minimum, 1):.3f} of their raw bytes"),
            ("corpus", f"{corpus.source} ({corpus.task}, {corpus.num_examples} examples, "
                       f"fingerprint {corpus.fingerprint[:12]})"),
            ("labels", ", ".join(labels) if labels else ("numeric" if corpus.labeled else "none")),
            ("sequences", f"{counts.num_sequences:,} ({counts.num_windowed_sequences} windowed, "
                          f"{counts.num_truncated_sequences} truncated)"),
            ("tokens", f"{counts.num_tokens:,} ({counts.num_words:,} words)"),
            ("max length", f"{extraction.max_length} (stride {extraction.stride}, "
                           f"truncation {'on' if extraction.truncation else 'off'})"),
            ("bytes on disk", f"{total_bytes:,} ({hidden_bytes:,} hidden states"
                              + (" and scales)" if len(hidden_arrays) > 1 else ")")),
            ("bytes/token", f"{hidden_bytes / max(counts.num_tokens, 1):,.1f} hidden states (raw minimum "
                            f"{minimum:,}), {total_bytes / max(counts.num_tokens, 1):,.1f} in all"),
            ("checksums", _checksum_summary(manifest.integrity)),
            ("writer", lease.describe() if (lease := read_lease(store.backend.location)) else "none (no lease held)"),
            ("created", f"{extraction.created_at}, completed {extraction.completed_at or '-'}"),
            ("versions", ", ".join(f"{k} {v}" for k, v in extraction.versions.items())),
        ]
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
    finally:
        store.close()


def _encoding_summary(storage_dtype: str) -> str:
    encoding = fmt.ENCODINGS[storage_dtype]
    if not encoding.scaled:
        return storage_dtype
    return f"{storage_dtype} (absmax scale per token and layer, float32, in {fmt.HIDDEN_SCALES})"


def _checksum_summary(integrity: Integrity | None) -> str:
    if integrity is None:
        return "none (written before format 1.1, or not finalized)"
    blocks = sum(len(digests) for digests in integrity.arrays.values())
    summary = f"{integrity.algorithm} per {integrity.block_rows:,} rows, {blocks} blocks"
    if not integrity.chunk_levels:
        return summary + "; reads unchecked (written before format 1.2)"
    levels = " and ".join(f"{level.chunk_rows:,} tokens" + (" x layer" if level.per_layer else "")
                          for level in integrity.chunk_levels)
    return summary + f"; every read checked ({integrity.chunk_levels[0].algorithm} per {levels})"
