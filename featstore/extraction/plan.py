"""`ExtractionPlan`: what an extraction will write, resolved once, without touching any store.

`ExtractionPlan.build(spec, corpus, encoder)` tokenizes every example (so every array's
final shape is known before any hidden state is computed), resolves layers, window length
and stride, orders sequences longest first (little padding per batch), computes offsets,
labels, the storage layout and the fingerprint, and cuts the deterministic batches that
every engine runs: a resumed run, or a Ray actor, recomputes exactly the same batches.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from ..errors import ConfigError
from ..store import format as fmt
from ..store.backends import BACKENDS, ArraySpec
from ..store.chunks import level_rows
from ..store.manifest import (
    CorpusInfo,
    Counts,
    ExtractionInfo,
    FingerprintInputs,
    LayoutInfo,
    StoreManifest,
)
from .corpus import REGRESSION, TOKEN_CLASSIFICATION, Corpus
from .encoder import FrozenEncoder, TokenizedSequence, default_stride
from .spec import ExtractSpec
from .windows import WINDOW_RULE

DEFAULT_BLOCK_BYTES = 64 * 2**20


@dataclass
class ExtractionPlan:
    spec: ExtractSpec
    sequences: list[TokenizedSequence]  # in storage order (longest first)
    order: np.ndarray  # storage position -> corpus row
    token_offsets: np.ndarray  # (n + 1,)
    word_offsets: np.ndarray  # (n + 1,)
    labels: tuple[str, np.ndarray] | None  # (array name, values in storage order)
    manifest: StoreManifest  # the store's attributes, status "writing"

    @classmethod
    def build(cls, spec: ExtractSpec, corpus: Corpus, encoder: FrozenEncoder) -> ExtractionPlan:
        layers = encoder.resolve_layers(spec.layers)
        max_length = spec.max_length or encoder.max_length
        if max_length > encoder.max_length:
            raise ConfigError(f"--max-length {max_length} exceeds what {encoder.name_or_path} accepts "
                              f"({encoder.max_length})")
        budget = max_length - len(encoder.prefix_ids) - len(encoder.suffix_ids)
        stride = default_stride(budget) if spec.stride is None else spec.stride
        tokenized = encoder.tokenize(corpus.examples, max_length, stride, spec.truncate)
        order = np.array(sorted(range(len(tokenized)), key=lambda row: (-tokenized[row].num_tokens, row)),
                         dtype=np.int64)
        sequences = [tokenized[row] for row in order]
        token_offsets = _offsets([sequence.num_tokens for sequence in sequences])
        word_offsets = _offsets([sequence.num_words for sequence in sequences])
        manifest = _manifest(spec, corpus, encoder, layers, max_length, stride, sequences, int(token_offsets[-1]))
        return cls(spec, sequences, order, token_offsets, word_offsets, _labels(corpus, order, sequences), manifest)

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def layers(self) -> list[int]:
        return self.manifest.extraction.layers

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    @property
    def block_tokens(self) -> int:
        return self.manifest.layout.block_tokens

    @property
    def chunk_tokens(self) -> int:
        return self.manifest.layout.chunk_tokens

    @property
    def check_levels(self) -> dict[str, int]:
        """Checksum array -> tokens per checked chunk of the hidden states (store/chunks.py), by the backend's
        checksum unit."""
        return level_rows(self.manifest, BACKENDS[self.spec.backend].checksum_per_layer)

    def batches(self, start: int = 0) -> list[range]:
        """Greedy batches of storage positions from `start`, each under the padded-token budget.
        Deterministic: from any batch boundary they repeat the batches a run from 0 makes."""
        budget = self.spec.max_batch_tokens
        batches, batch_start, width, count = [], start, 0, 0
        for position in range(start, len(self.sequences)):
            windows = self.sequences[position].windows
            longest = max(len(window) for window in windows)
            if position > batch_start and max(width, longest) * (count + len(windows)) > budget:
                batches.append(range(batch_start, position))
                batch_start, width, count = position, 0, 0
            width, count = max(width, longest), count + len(windows)
        if batch_start < len(self.sequences):
            batches.append(range(batch_start, len(self.sequences)))
        return batches

    def arrays(self) -> list[tuple[ArraySpec, np.ndarray | None]]:
        """Every array to create with its content; the hidden states' content comes later, from an engine."""
        sequences = self.sequences
        contents = {
            fmt.INPUT_IDS: np.concatenate([s.input_ids for s in sequences]),
            fmt.WORD_IDS: np.concatenate([s.word_ids for s in sequences]),
            fmt.TOKEN_WINDOW: np.concatenate([s.token_window for s in sequences]),
            fmt.TOKEN_OFFSETS: self.token_offsets,
            fmt.WORD_OFFSETS: self.word_offsets,
            fmt.SEQUENCE_INDEX: self.order,
            fmt.PROGRESS: np.zeros(2, np.int64),
        }
        if self.labels is not None:
            contents[self.labels[0]] = self.labels[1]
        return [(spec, contents[spec.name].astype(spec.dtype) if spec.name in contents else None)
                for spec in array_specs(self.manifest)]


def array_specs(manifest: StoreManifest) -> list[ArraySpec]:
    """Every array of a store with these attributes, as created. Shapes and dtypes come from the manifest
    (`StoreManifest.expected_arrays`, which readers check); the hidden states and their scales are written block
    by block, in write blocks of `layout.block_tokens`, the hidden states in inner chunks of `layout.chunk_tokens`
    (each compressed alone under `layout.compression`)."""
    block = manifest.layout.block_tokens
    sequence_block = max(1, min(manifest.counts.num_sequences + 1, 1 << 16))
    per_token = (fmt.INPUT_IDS, fmt.WORD_IDS, fmt.TOKEN_WINDOW, fmt.HIDDEN_SCALES)
    arrays = manifest.expected_arrays()
    hidden_shape, hidden_dtype = arrays.pop(fmt.HIDDEN_STATES)
    specs = [ArraySpec(name, shape, dtype, block if name in per_token else 2 if name == fmt.PROGRESS else
                       sequence_block) for name, (shape, dtype) in arrays.items()]
    # the hidden states last: the one array the engines fill later
    return [*specs, ArraySpec(fmt.HIDDEN_STATES, hidden_shape, hidden_dtype, block,
                              (manifest.layout.chunk_tokens, 1, hidden_shape[2]), manifest.layout.compression)]


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _labels(corpus: Corpus, order: np.ndarray, sequences: list[TokenizedSequence]
            ) -> tuple[str, np.ndarray] | None:
    """Word labels for tagging (of the words kept), one label per sequence otherwise; storage order."""
    if not corpus.labeled:
        return None
    ordered = [corpus.examples[row] for row in order]
    if corpus.task == TOKEN_CLASSIFICATION:
        per_sequence = [example.label[: sequence.num_words] for example, sequence in zip(ordered, sequences)]
        return fmt.WORD_LABELS, np.concatenate([np.asarray(labels, np.int32) for labels in per_sequence])
    dtype = np.float32 if corpus.task == REGRESSION else np.int64
    return fmt.LABELS, np.asarray([example.label for example in ordered], dtype=dtype)


def _manifest(spec: ExtractSpec, corpus: Corpus, encoder: FrozenEncoder, layers: list[int], max_length: int,
              stride: int, sequences: list[TokenizedSequence], num_tokens: int) -> StoreManifest:
    encoder_info = encoder.describe()
    inputs = FingerprintInputs(
        format_major=fmt.format_major(fmt.FORMAT_VERSION), encoder_weights_sha256=encoder_info.weights_sha256,
        encoder_config_sha256=encoder_info.config_sha256, tokenizer_sha256=encoder_info.tokenizer_sha256,
        corpus_fingerprint=corpus.fingerprint(), layers=layers, compute_dtype=encoder.compute_dtype,
        storage_dtype=encoder.storage_dtype, max_length=max_length, stride=stride, truncation=spec.truncate,
        window_rule=WINDOW_RULE)
    bytes_per_token = fmt.code_bytes_per_token(encoder.storage_dtype, len(layers), encoder.hidden_size)
    chunk_tokens, block_tokens = _layout(spec, num_tokens, bytes_per_token)
    return StoreManifest(
        format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION, status=fmt.STATUS_WRITING,
        fingerprint=inputs.fingerprint(), fingerprint_inputs=inputs, encoder=encoder_info,
        corpus=CorpusInfo(source=corpus.source, name=corpus.name, split=corpus.split, columns=corpus.spec,
                          fingerprint=inputs.corpus_fingerprint, task=corpus.task, label_names=corpus.label_names,
                          labeled=corpus.labeled, num_examples=len(corpus)),
        extraction=ExtractionInfo(layers=layers, compute_dtype=encoder.compute_dtype,
                                  storage_dtype=encoder.storage_dtype, max_length=max_length, stride=stride,
                                  truncation=spec.truncate, window_rule=WINDOW_RULE, device=str(encoder.device),
                                  max_batch_tokens=spec.max_batch_tokens, created_at=now(), completed_at=None,
                                  versions=_versions(), host=platform.node()),
        layout=LayoutInfo(backend=spec.backend, order="token-major", chunk_tokens=chunk_tokens,
                          block_tokens=block_tokens, storage_order="longest-first",
                          compression=spec.compression),
        counts=Counts(num_sequences=len(sequences), num_tokens=num_tokens,
                      num_words=int(sum(sequence.num_words for sequence in sequences)),
                      num_windowed_sequences=sum(len(sequence.windows) > 1 for sequence in sequences),
                      num_truncated_sequences=sum(sequence.truncated for sequence in sequences),
                      hidden_bytes=num_tokens * bytes_per_token))


def _layout(spec: ExtractSpec, num_tokens: int, bytes_per_token: int) -> tuple[int, int]:
    """Inner chunk and write block, in tokens. Zarr stores an array's last chunk at full size, so the
    chunk is capped at 1/128 of the store to keep that padding under 1%; a block is a whole number of
    chunks (a zarr shard must be) and no larger than the store, since a shard's index has an entry
    for every chunk it could hold."""
    chunk = max(1, min(spec.chunk_tokens, max(16, num_tokens // 128)))
    wanted = min(spec.block_tokens or DEFAULT_BLOCK_BYTES // bytes_per_token, num_tokens)
    return chunk, max(chunk, -(-wanted // chunk) * chunk)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import h5py
    import torch
    import transformers
    import zarr

    from .. import __version__

    return {"featstore": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "zarr": zarr.__version__, "h5py": h5py.__version__,
            "numpy": np.__version__}
