"""Completeness and consistency checks (`featstore verify`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FeatstoreError
from ..sharing.location import Location, resolve
from . import format as fmt
from .backends import StoreBackend, open_backend
from .chunks import ChunkVerifier
from .encoding import decode_hidden
from .integrity import checksum_problems, metadata_problems
from .manifest import ChunkChecksums, CorpusInfo, StoreManifest
from .reader import Store

REQUIRED_ARRAYS = (fmt.HIDDEN_STATES, fmt.INPUT_IDS, fmt.WORD_IDS, fmt.TOKEN_WINDOW, fmt.TOKEN_OFFSETS,
                   fmt.WORD_OFFSETS, fmt.SEQUENCE_INDEX, fmt.PROGRESS)


def verify_store(path: str | Path | Location, deep: bool = True, expect_complete: bool = True,
                 storage_options: dict[str, Any] | None = None) -> list[str]:
    """Problems found in the store at `path` (empty when it is sound). `deep` reads every byte and checks
    the per-block checksums; `expect_complete=False` accepts a fully written store not yet marked complete."""
    location = resolve(path, storage_options)
    try:
        backend = open_backend(location, "r")
    except FeatstoreError as error:
        return [str(error)]
    except Exception as error:  # a store too damaged for its library to open
        return [f"{location.url} cannot be opened: {type(error).__name__}: {error}"]
    # Every byte through the storage library and its own checks, not the direct local fast path.
    backend.direct_reads = False
    try:
        return _problems(backend, deep, expect_complete)
    except Exception as error:  # damage the structural checks trip over
        return [f"{location.url} cannot be read: {type(error).__name__}: {error}"]
    finally:
        backend.close()


def _problems(backend: StoreBackend, deep: bool, expect_complete: bool) -> list[str]:
    try:
        manifest = backend.get_manifest()
    except FeatstoreError as error:
        return [str(error)]
    problems: list[str] = []
    names = backend.array_names()
    counts = manifest.counts
    n_seq, n_tok, n_words = counts.num_sequences, counts.num_tokens, counts.num_words
    progress = backend.read(fmt.PROGRESS) if fmt.PROGRESS in names else None
    if not manifest.complete and expect_complete:
        committed = f"{int(progress[0])} of {n_seq} sequences committed" if progress is not None else "no progress"
        problems.append(f"incomplete: status {manifest.status!r}, {committed}; re-run the extract (or copy) that "
                        "was writing it to finish it")
    elif progress is not None and (int(progress[0]), int(progress[1])) != (n_seq, n_tok):
        problems.append(f"written but progress is {progress.tolist()}, expected [{n_seq}, {n_tok}]")
    missing = [name for name in REQUIRED_ARRAYS if name not in names]
    if missing:
        return [*problems, f"arrays missing: {', '.join(missing)}"]
    problems += metadata_problems(backend, manifest)
    expected = manifest.expected_arrays()
    if any(backend.shape(name) != shape for name, (shape, _) in expected.items() if name in names):
        return problems  # the data checks below index by these shapes
    integrity = manifest.integrity
    checksummed = deep and integrity is not None
    nonfinite: list[str] = []
    if checksummed:
        storage_dtype = manifest.extraction.storage_dtype
        chunk_check = _chunk_checker(backend, manifest, problems)

        def inspect(name: str, start: int, stop: int, rows: np.ndarray) -> None:
            if name == fmt.HIDDEN_SCALES and not nonfinite and not np.isfinite(rows).all():
                nonfinite.append(f"hidden_scales tokens {start}..{stop} hold NaN or infinite values")
            if name != fmt.HIDDEN_STATES:
                return
            if chunk_check is not None:
                chunk_check(start, rows)
            unit_scales = np.ones(rows.shape[:2], np.float32) if manifest.encoding.scaled else None
            if not nonfinite and not np.isfinite(decode_hidden(rows, storage_dtype, unit_scales)).all():
                nonfinite.append(f"hidden_states tokens {start}..{stop} hold NaN or infinite values")

        # First: the most specific finding (which block is damaged) before what the damage breaks. The chunk
        # checksums and the finiteness check ride on the same read of every block.
        problems += checksum_problems(backend, integrity, inspect=inspect)

    token_offsets, word_offsets = backend.read(fmt.TOKEN_OFFSETS), backend.read(fmt.WORD_OFFSETS)
    if token_offsets[0] != 0 or token_offsets[-1] != n_tok or np.any(np.diff(token_offsets) <= 0):
        problems.append("token_offsets are not strictly increasing from 0 to num_tokens")
    if word_offsets[0] != 0 or word_offsets[-1] != n_words or np.any(np.diff(word_offsets) <= 0):
        problems.append("word_offsets are not strictly increasing from 0 to num_words")
    order = backend.read(fmt.SEQUENCE_INDEX)
    if not np.array_equal(np.sort(order), np.arange(n_seq)):
        problems.append("sequence_index is not a permutation of the corpus rows")
    if not problems:
        problems += _alignment_problems(backend.read(fmt.WORD_IDS), token_offsets, word_offsets)
    problems += _label_problems(backend, manifest.corpus, names, n_seq, n_words)

    block = manifest.layout.block_tokens
    for index in backend.missing_blocks(fmt.HIDDEN_STATES):
        where = backend.object_at(fmt.HIDDEN_STATES, index * block)
        problems.append(f"hidden_states block {index} (tokens {index * block}..{min((index + 1) * block, n_tok)}"
                        + (f", object {where}" if where else "") + ") is missing")
    stored, minimum = backend.nbytes_stored(fmt.HIDDEN_STATES), counts.hidden_bytes
    if stored < minimum and manifest.layout.compression is None:  # compressed chunks are smaller by design
        problems.append(f"hidden_states hold {stored} bytes in storage, fewer than the {minimum} they need "
                        "(truncated or missing data)")
    if deep and not problems:
        problems += nonfinite if checksummed else _scan_hidden_states(backend)
    return list(dict.fromkeys(problems))


def _chunk_checker(backend: StoreBackend, manifest: StoreManifest, problems: list[str]
                   ) -> Callable[[int, np.ndarray], None] | None:
    """A check of the hidden states against every level of chunk checksums readers use, fed the blocks in order
    as the block digests are checked (None: none recorded)."""
    levels = manifest.integrity.chunk_levels if manifest.integrity is not None else []
    present = backend.array_names()
    checkers = [_level_checker(backend, manifest, level, problems) for level in levels if level.array in present]
    if not checkers:
        return None

    def check(start: int, rows: np.ndarray) -> None:
        for checker in checkers:
            checker(start, rows)

    return check


def _level_checker(backend: StoreBackend, manifest: StoreManifest, level: ChunkChecksums, problems: list[str]
                   ) -> Callable[[int, np.ndarray], None]:
    """Checked chunks need not align with blocks: rows of a chunk that straddles two blocks wait for the next."""
    verifier = ChunkVerifier(backend.path, level, backend.read(level.array), manifest.counts.num_tokens,
                             lambda start, stop: backend.objects_in(fmt.HIDDEN_STATES, start, stop))
    rows_per_chunk, total = level.chunk_rows, manifest.counts.num_tokens
    pending: list[np.ndarray] = []
    pending_start = 0  # first row of `pending`, always a chunk boundary

    def check(start: int, rows: np.ndarray) -> None:
        nonlocal pending, pending_start
        if not pending or pending_start + sum(map(len, pending)) != start:  # a gap (an unreadable block)
            skip = -start % rows_per_chunk
            pending, pending_start, rows = [], start + skip, rows[skip:]
        pending.append(rows)
        held = np.concatenate(pending) if len(pending) > 1 else pending[0]
        end = pending_start + len(held)
        whole = len(held) if end == total else len(held) // rows_per_chunk * rows_per_chunk
        problems.extend(f"{where} does not match its chunk checksum ({level.array})"
                        for where in verifier.mismatches(held[:whole], pending_start, None))
        pending, pending_start = [held[whole:]] if whole < len(held) else [], pending_start + whole

    return check


def _alignment_problems(word_ids: np.ndarray, token_offsets: np.ndarray, word_offsets: np.ndarray) -> list[str]:
    words_per_sequence = np.diff(word_offsets)
    highest = np.maximum.reduceat(word_ids, token_offsets[:-1])
    bad = np.nonzero(highest + 1 != words_per_sequence)[0]
    if len(bad):
        return [f"word alignment of stored sequence {int(bad[0])} (and {len(bad) - 1} more) does not cover its "
                "words"]
    if np.any(word_ids < -1):
        return ["word_ids hold values below -1"]
    return []


def _label_problems(backend: StoreBackend, corpus: CorpusInfo, names: list[str], n_seq: int,
                    n_words: int) -> list[str]:
    if not corpus.labeled:
        return []
    label_names = corpus.label_names
    if fmt.WORD_LABELS in names:
        labels, expected = backend.read(fmt.WORD_LABELS), n_words
    elif fmt.LABELS in names:
        labels, expected = backend.read(fmt.LABELS), n_seq
    else:
        return ["the corpus is labeled but the store holds no labels array"]
    if len(labels) != expected:
        return [f"{len(labels)} labels stored, expected {expected}"]
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        return [f"label of stored row {int(np.nonzero(~np.isfinite(labels))[0][0])} is NaN or infinite"]
    if label_names is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(label_names)):
        return [f"labels outside 0..{len(label_names) - 1}"]
    return []


def _scan_hidden_states(backend: StoreBackend) -> list[str]:
    store = Store(backend, allow_incomplete=True)
    for span in store.spans():
        start, stop = int(store.token_offsets[span.start]), int(store.token_offsets[span.stop])
        try:
            block = store.read_hidden(start, stop)
        except Exception as error:
            return [f"hidden_states tokens {start}..{stop} cannot be read: {type(error).__name__}: {error}"]
        if not np.isfinite(block).all():
            return [f"hidden_states tokens {start}..{stop} hold NaN or infinite values"]
    return []
