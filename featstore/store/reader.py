"""Reading a store back: per-sequence features, word pooling, and fast epoch iteration.

Sequences are addressed by their corpus row (the order of the input file), whatever
order they were stored in. `Store.iter_epoch` is the fast path for training: it reads
large contiguous spans of the store in a random order and shuffles sequences within a
bounded buffer, so an epoch is a handful of big sequential reads, not one seek per
sequence.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, CorruptStoreError, IncompleteStoreError
from ..sharing.location import Location, resolve
from . import format as fmt
from .backends import StoreBackend, open_backend
from .chunks import ChunkVerifier
from .encoding import decode_hidden, decoded_dtype
from .integrity import check_block, check_rows, metadata_problems
from .manifest import StoreManifest

if TYPE_CHECKING:
    from .dataset import FeatureDataset

logger = logging.getLogger(__name__)

POOLINGS = ("first", "mean")
DEFAULT_SPAN_BYTES = 64 * 2**20
SCALE_BLOCKS_CACHED = 64  # checked blocks of hidden_scales kept (a block is ~1/100 of its hidden states' bytes)


@dataclass
class _RawRead:
    """Hidden states read for rows start..stop: `raw` holds rows first.. (widened to checked chunks) of the
    stored layers `read_columns` (None: as asked, unchecked); `columns` is what the caller asked for. `scales`:
    a scaled encoding's scales of rows start..stop, every stored layer (checked)."""

    raw: np.ndarray
    scales: np.ndarray | None
    first: int
    start: int
    stop: int
    columns: slice | list[int]
    read_columns: list[int] | None
    verifier: ChunkVerifier | None


@dataclass
class SequenceFeatures:
    """One sequence's features. With pooling, `hidden_states` is per word (W, L, H) instead of per token."""

    index: int  # corpus row
    hidden_states: np.ndarray  # (T, L, H) or (W, L, H)
    input_ids: np.ndarray  # (T,)
    word_ids: np.ndarray  # (T,), -1 for special tokens
    num_words: int
    labels: np.ndarray | None  # (W,) word labels, or a 0-d array holding the sequence label
    pooled: str | None = None


class Store:
    """A read-only view of a featstore store (Zarr or HDF5, same API)."""

    def __init__(self, backend: StoreBackend, allow_incomplete: bool = False) -> None:
        self.backend = backend
        self.manifest = backend.get_manifest()
        if not self.manifest.complete and not allow_incomplete:
            try:
                state = f"{int(backend.read(fmt.PROGRESS)[0])} of {self.num_sequences} sequences committed"
            except Exception:  # an interrupted copy may not hold the progress array yet
                state = f"status {self.manifest.status!r}"
            raise IncompleteStoreError(f"{backend.path} is incomplete ({state}); re-run the `featstore extract` or "
                                       "copy that was writing it to finish it, or pass allow_incomplete=True to "
                                       "inspect it")
        # Nothing is used before it is checked: the metadata that gives the bytes their meaning first, then
        # every array read whole here against its block digests; hidden-state reads chunk by chunk.
        problems = metadata_problems(backend, self.manifest)
        if problems:
            raise CorruptStoreError(f"{backend.path} is damaged: {'; '.join(problems)}. Nothing from it was used; "
                                    f"run `featstore verify {backend.path}` for a full report")
        integrity = self.manifest.integrity if self.manifest.complete else None
        # Small checked chunks for random access, large ones for streaming (store/chunks.py).
        self._verifier: ChunkVerifier | None = None
        self._span_verifier: ChunkVerifier | None = None
        # iter_epoch(keep_in_memory=True): checked, decoded span blocks by (columns, span bytes), then span start
        self._kept_spans: dict[tuple[str, int], dict[int, np.ndarray]] = {}
        if integrity is None or not integrity.chunk_levels:
            _warn_unchecked(backend.path, self.manifest)

        def read_checked(name: str) -> np.ndarray:
            rows = backend.read(name)
            if integrity is not None:
                check_rows(backend.path, integrity, name, rows)
            return rows

        self.token_offsets = read_checked(fmt.TOKEN_OFFSETS)
        self.word_offsets = read_checked(fmt.WORD_OFFSETS)
        # Python-int copies: indexing them is much cheaper than numpy scalars in the per-sequence path.
        self._token_bounds = self.token_offsets.tolist()
        self._word_bounds = self.word_offsets.tolist()
        self.sequence_index = read_checked(fmt.SEQUENCE_INDEX)
        self._rows = self.sequence_index.tolist()
        self.position_of_row = np.empty_like(self.sequence_index)
        self.position_of_row[self.sequence_index] = np.arange(len(self.sequence_index))
        self.input_ids = read_checked(fmt.INPUT_IDS)
        self.word_ids = read_checked(fmt.WORD_IDS)
        names = backend.array_names()
        self.word_labels = read_checked(fmt.WORD_LABELS) if fmt.WORD_LABELS in names else None
        self.sequence_labels = read_checked(fmt.LABELS) if fmt.LABELS in names else None
        verifiers = [ChunkVerifier(backend.path, level, read_checked(level.array), self.num_tokens,
                                   lambda start, stop: backend.objects_in(fmt.HIDDEN_STATES, start, stop))
                     for level in (integrity.chunk_levels if integrity is not None else [])]
        if verifiers:
            self._verifier, self._span_verifier = verifiers[0], verifiers[-1]
        self._integrity = integrity
        self._scale_block = functools.lru_cache(maxsize=SCALE_BLOCKS_CACHED)(self._read_scale_block)

    # --- description -------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.backend.path

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def status(self) -> str:
        return self.manifest.status

    @property
    def layers(self) -> list[int]:
        """Encoder hidden-state indices stored, in stored order (0 = embeddings)."""
        return list(self.manifest.extraction.layers)

    @property
    def hidden_size(self) -> int:
        return self.manifest.encoder.hidden_size

    @property
    def storage_dtype(self) -> str:
        return self.manifest.extraction.storage_dtype

    @property
    def task(self) -> str:
        return self.manifest.corpus.task

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.corpus.label_names

    @property
    def num_sequences(self) -> int:
        return self.manifest.counts.num_sequences

    @property
    def num_tokens(self) -> int:
        return self.manifest.counts.num_tokens

    @property
    def labeled(self) -> bool:
        return self.word_labels is not None or self.sequence_labels is not None

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, {self.num_sequences} sequences, {self.num_tokens} tokens, "
                f"layers={self.layers}, {self.status})")

    def close(self) -> None:
        self._kept_spans.clear()
        self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- selection ------------------------------------------------------------------------------------
    def stored_layers(self, layers: Sequence[int]) -> list[int]:
        """Encoder layer indices of `layers` (negative = counted back from the encoder's last layer), each checked
        to be in the store."""
        resolved = []
        for layer in layers:
            index = self.manifest.encoder.resolve_layer(layer)
            if index not in self.layers:
                raise ConfigError(f"layer {layer} is not in store {self.path}; it holds layers {self.layers}")
            resolved.append(index)
        return resolved

    def layer_columns(self, layers: Sequence[int] | None) -> slice | list[int]:
        """Stored positions of encoder layers (negative = counted back from the encoder's last layer)."""
        if layers is None:
            return slice(None)
        return compact_columns([self.layers.index(layer) for layer in self.stored_layers(layers)])

    # --- random access --------------------------------------------------------------------------------
    def sequence(self, row: int, layers: Sequence[int] | None = None, pooling: str | None = None
                 ) -> SequenceFeatures:
        """Features of corpus row `row`."""
        if not -self.num_sequences <= row < self.num_sequences:
            raise IndexError(f"row {row} out of range for a store of {self.num_sequences} sequences")
        position = int(self.position_of_row[row])
        start, stop = int(self.token_offsets[position]), int(self.token_offsets[position + 1])
        hidden = self.read_hidden(start, stop, self.layer_columns(layers))
        return self._features(position, hidden, pooling)

    def read_hidden(self, start: int, stop: int, columns: slice | list[int] = slice(None)) -> np.ndarray:
        """Hidden states of tokens start..stop (stored layer positions `columns`) as numpy floats (`decode_hidden`:
        float16 stores give float16, the others float32), checked against the store's checksums first."""
        return self._checked(self._read_raw(start, stop, columns, self._verifier))

    def _scales(self, start: int, stop: int) -> np.ndarray | None:
        """A scaled encoding's scales of tokens start..stop (every stored layer), each block checked against its
        digest when first read (None: an unscaled encoding)."""
        if not self.manifest.encoding.scaled:
            return None
        if self._integrity is None:  # an incomplete store: nothing recorded to check against yet
            return self.backend.read(fmt.HIDDEN_SCALES, start, stop)
        if stop <= start:
            return np.zeros((0, len(self.layers)), np.float32)
        block_rows = self._integrity.block_rows
        first, last = start // block_rows, (stop - 1) // block_rows
        blocks = [self._scale_block(index) for index in range(first, last + 1)]
        joined = np.concatenate(blocks) if len(blocks) != 1 else blocks[0]
        return joined[start - first * block_rows: stop - first * block_rows]

    def _read_scale_block(self, index: int) -> np.ndarray:
        block_rows = self._integrity.block_rows
        rows = self.backend.read(fmt.HIDDEN_SCALES, index * block_rows, (index + 1) * block_rows)
        check_block(self.path, self._integrity, fmt.HIDDEN_SCALES, index, rows)
        return rows

    def _read_raw(self, start: int, stop: int, columns: slice | list[int], verifier: ChunkVerifier | None
                  ) -> _RawRead:
        """The read half of `read_hidden`: whole checked chunks (and whole rows where checksums cover them)."""
        scales = self._scales(start, stop)
        if verifier is None:
            return _RawRead(self.backend.read(fmt.HIDDEN_STATES, start, stop, columns), scales, start, start, stop,
                            columns, None, None)
        first, last = verifier.widen(start, stop)
        positions = list(range(len(self.layers)))
        # Checksums over whole rows need whole rows (HDF5 reads them anyway); per-layer ones only those read.
        read_columns = (positions[columns] if isinstance(columns, slice) else list(columns)) if verifier.per_layer \
            else positions
        raw = self.backend.read(fmt.HIDDEN_STATES, first, last, compact_columns(read_columns))
        return _RawRead(raw, scales, first, start, stop, columns, read_columns, verifier)

    def _checked(self, read: _RawRead) -> np.ndarray:
        """The check half of `read_hidden`: verify, cut back to what was asked for, decode."""
        verifier, raw = read.verifier, read.raw
        if verifier is not None:
            verifier.check(raw, read.first, read.read_columns)
            raw = raw[read.start - read.first: read.stop - read.first]
            raw = raw if verifier.per_layer else raw[:, read.columns]
        scales = None if read.scales is None else read.scales[:, read.columns]
        return decode_hidden(raw, self.storage_dtype, scales)

    def __getitem__(self, row: int) -> SequenceFeatures:
        return self.sequence(row)

    def _features(self, position: int, hidden: np.ndarray, pooling: str | None) -> SequenceFeatures:
        start, stop = self._token_bounds[position], self._token_bounds[position + 1]
        first_word, last_word = self._word_bounds[position], self._word_bounds[position + 1]
        word_ids = self.word_ids[start:stop]
        if self.word_labels is not None:
            labels = self.word_labels[first_word:last_word]
        elif self.sequence_labels is not None:
            labels = np.asarray(self.sequence_labels[position])
        else:
            labels = None
        if pooling is not None:
            hidden = pool_words(hidden, word_ids, last_word - first_word, pooling)
        return SequenceFeatures(self._rows[position], hidden, self.input_ids[start:stop], word_ids,
                                last_word - first_word, labels, pooling)

    # --- streaming ------------------------------------------------------------------------------------
    def spans(self, span_bytes: int = DEFAULT_SPAN_BYTES) -> list[range]:
        """Runs of consecutive stored sequences of about `span_bytes` hidden-state bytes each."""
        bytes_per_token = self.backend.dtype(fmt.HIDDEN_STATES).itemsize * len(self.layers) * self.hidden_size
        span_tokens = max(1, span_bytes // bytes_per_token)
        spans, start = [], 0
        while start < self.num_sequences:
            limit = self.token_offsets[start] + span_tokens
            stop = max(start + 1, int(np.searchsorted(self.token_offsets, limit, side="right")) - 1)
            spans.append(range(start, min(stop, self.num_sequences)))
            start = spans[-1].stop
        return spans

    def decoded_bytes(self, layers: Sequence[int] | None = None) -> int:
        """Bytes of these layers' hidden states once read and decoded (what `keep_in_memory` holds)."""
        return self.num_tokens * len(self.stored_layers(layers if layers is not None else self.layers)) \
            * self.hidden_size * decoded_dtype(self.storage_dtype).itemsize

    def iter_epoch(self, layers: Sequence[int] | None = None, pooling: str | None = None, shuffle: bool = True,
                   seed: int = 0, epoch: int = 0, buffer_sequences: int = 4096,
                   span_bytes: int = DEFAULT_SPAN_BYTES, keep_in_memory: bool = False) -> Iterator[SequenceFeatures]:
        """Every sequence exactly once. Shuffled: spans in random order, sequences drawn at random from a
        buffer of at most `buffer_sequences` (plus one span). Deterministic for a given seed and epoch.
        `keep_in_memory`: keep each span once read and checked (`decoded_bytes(layers)` in all, until `close`),
        so that later epochs over the same layers read nothing; the sequences and their order are the same."""
        rng = np.random.default_rng([seed, epoch])
        spans = self.spans(span_bytes)
        if shuffle:
            spans = [spans[index] for index in rng.permutation(len(spans))]
        columns = self.layer_columns(layers)
        kept = self._kept_spans.setdefault((repr(columns), span_bytes), {}) if keep_in_memory else {}
        buffer: list[SequenceFeatures] = []
        bounds = self._token_bounds

        # A pipeline of threads (both stages release the GIL in their heavy parts): the next span is read while
        # this one is checked, while the caller works through the one before.
        with ThreadPoolExecutor(1, thread_name_prefix="featstore-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="featstore-check") as checker:
            reads: dict[int, Future[_RawRead]] = {}
            checks: dict[int, Future[np.ndarray]] = {}
            for index, span in enumerate(spans):
                for ahead in range(index, min(index + 2, len(spans))):
                    if spans[ahead].start in kept:
                        continue
                    if ahead not in reads:
                        reads[ahead] = reader.submit(self._read_raw, bounds[spans[ahead].start],
                                                     bounds[spans[ahead].stop], columns, self._span_verifier)
                    if ahead not in checks:
                        checks[ahead] = checker.submit(lambda ahead=ahead: self._checked(reads[ahead].result()))
                block = kept.get(span.start)
                if block is None:
                    block = checks.pop(index).result()
                    del reads[index]
                    if keep_in_memory:
                        kept[span.start] = block
                yield from self._emit(span, block, pooling, shuffle, buffer, buffer_sequences, rng)
        for index in rng.permutation(len(buffer)):
            yield buffer[index]

    def _emit(self, span: range, block: np.ndarray, pooling: str | None, shuffle: bool,
              buffer: list[SequenceFeatures], buffer_sequences: int, rng: np.random.Generator
              ) -> Iterator[SequenceFeatures]:
        bounds, base = self._token_bounds, self._token_bounds[span.start]
        for position in span:
            item = self._features(position, block[bounds[position] - base: bounds[position + 1] - base], pooling)
            if not shuffle:
                yield item
                continue
            buffer.append(item)
            if len(buffer) > buffer_sequences:
                pick = int(rng.integers(len(buffer)))
                buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                yield buffer.pop()

    def torch_dataset(self, layers: Sequence[int] | None = None, pooling: str | None = None) -> FeatureDataset:
        """A map-style PyTorch dataset over this store (pair it with `featstore.collate_features`)."""
        from .dataset import FeatureDataset

        return FeatureDataset(self, layers, pooling)


_warned_unchecked: set[str] = set()


def _warn_unchecked(path: str, manifest: StoreManifest) -> None:
    """Once per store and process: reads from a store without chunk checksums cannot be checked."""
    if path in _warned_unchecked:
        return
    _warned_unchecked.add(path)
    if not manifest.complete:
        reason = "it is not complete (checksums are recorded when it is finalized)"
    else:
        reason = f"it was written in store format {manifest.format_version}, before checked reads (1.2)"
    logger.warning("%s: hidden-state reads are not checked against checksums: %s. `featstore verify` checks it in "
                   "full; re-extracting it with this version gives it per-chunk checks", path, reason)


def compact_columns(columns: list[int]) -> slice | list[int]:
    """A run of consecutive column indices as a slice (a view, and one contiguous read); others unchanged."""
    if columns and columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return columns


def open_store(path: str | Path | Location, allow_incomplete: bool = False,
               storage_options: dict[str, Any] | None = None) -> Store:
    """Open a Zarr or HDF5 store (a local path or a URL such as s3://bucket/prefix/store.zarr) for reading.
    Never writes to it, so read-only mounts and read-only credentials work."""
    return Store(open_backend(resolve(path, storage_options), "r"), allow_incomplete=allow_incomplete)


def pool_words(hidden: np.ndarray, word_ids: np.ndarray, num_words: int, pooling: str) -> np.ndarray:
    """Per-word vectors from per-token ones: the word's first subword, or the mean of its subwords."""
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    content = np.nonzero(word_ids >= 0)[0]
    words = word_ids[content]
    # Tokens of a word are contiguous, so a word starts wherever the word id changes.
    starts = content[np.concatenate([[True], words[1:] != words[:-1]])] if len(content) else content
    if len(starts) != num_words:
        raise CorruptStoreError(f"word alignment covers {len(starts)} words, expected {num_words}")
    if pooling == "first":
        return hidden[starts]
    sums = np.add.reduceat(hidden[content].astype(np.float32), starts - content[0], axis=0)
    counts = np.diff(np.append(starts - content[0], len(content)))
    return (sums / counts[:, None, None]).astype(hidden.dtype)
