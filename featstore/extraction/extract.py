"""Extraction: corpus + frozen encoder -> a complete, verified-on-finalize store.

Pipeline: tokenize everything up front (so every array's final shape is known and
written before any hidden state), order sequences longest first, cut batches under a
token budget, run the encoder, and hand each batch to a background writer through a
bounded queue so encoder compute overlaps store writes. The writer writes whole
blocks and then records progress at the last batch boundary inside them; a killed run
resumes from there and recomputes identical batches.
"""

from __future__ import annotations

import logging
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import FeatstoreError
from ..sharing.catalog import Catalog
from ..sharing.lease import DEFAULT_TTL_SECONDS, Lease
from ..sharing.location import Location, resolve
from ..store import format as fmt
from ..store.backends import BACKENDS, ArraySpec, StoreBackend, detect_backend, open_backend
from ..store.integrity import block_digests, compute_checksums
from .corpus import TOKEN_CLASSIFICATION, Corpus, CorpusSpec, load_corpus
from .encoder import FrozenEncoder, TokenizedSequence, default_stride, numpy_storage_dtype
from .windows import WINDOW_RULE

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 4096
DEFAULT_BLOCK_BYTES = 64 * 2**20
WRITE_QUEUE_DEPTH = 4


@dataclass
class ExtractConfig:
    """Everything `featstore extract` takes. None means the documented default."""

    out: str | None = None  # a path or URL (s3://...); None only with `catalog`: a path inside it
    catalog: str | None = None  # reuse a complete store with the same fingerprint from this root
    model: str | None = None  # None: the packaged all-MiniLM-L6-v2
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    layers: list[int] | None = None  # None: all hidden states, embeddings included
    dtype: str | None = None  # storage dtype; default float16
    compute_dtype: str | None = None  # default: float32 on CPU, the storage dtype on CUDA
    backend: str = "zarr"
    device: str | None = None
    max_batch_tokens: int = 8192  # padded tokens per forward pass
    max_length: int | None = None  # default: the model's maximum
    stride: int | None = None  # overlap between windows, in tokens
    truncate: bool = False
    overwrite: bool = False
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    block_tokens: int | None = None  # default: DEFAULT_BLOCK_BYTES worth of tokens
    progress: bool = True
    lock_wait: float = 0.0  # seconds to wait for another writer of the same store
    lease_ttl: float = DEFAULT_TTL_SECONDS
    storage_options: dict[str, Any] | None = None  # fsspec options for remote locations
    on_progress: Callable[[ExtractProgress], None] | None = None  # called once the target is known, per batch, at end
    engine: str = "local"  # "local": this process; "ray": Ray actors (featstore/distributed.py)
    workers: int | None = None  # Ray actors; default: one per GPU, else one per CPU of the cluster
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or ray://... for a cluster


@dataclass
class ExtractProgress:
    """Where an extraction stands; `state` is "extracting", "complete" or "reused"."""

    path: str
    state: str
    sequences_done: int
    sequences_total: int
    tokens_done: int
    tokens_total: int
    tokens_per_second: float = 0.0


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


def extract(config: ExtractConfig) -> ExtractResult:
    """Run (or resume, or reuse) an extraction; returns once the store is complete."""
    if config.backend not in BACKENDS:
        raise FeatstoreError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    if config.max_batch_tokens < 1:
        raise FeatstoreError("--max-batch-tokens must be positive")
    if config.out is None and config.catalog is None:
        raise FeatstoreError("give --out (where to write the store) or --catalog ROOT")
    if config.engine not in ("local", "ray"):
        raise FeatstoreError(f"unknown engine {config.engine!r}; choose local or ray")
    corpus = load_corpus(config.corpus)
    encoder = FrozenEncoder.load(config.model, config.device, config.dtype, config.compute_dtype)
    layers = encoder.resolve_layers(config.layers)
    max_length = config.max_length or encoder.max_length
    if max_length > encoder.max_length:
        raise FeatstoreError(f"--max-length {max_length} exceeds what {encoder.name_or_path} accepts "
                             f"({encoder.max_length})")
    budget = max_length - len(encoder.prefix_ids) - len(encoder.suffix_ids)
    stride = default_stride(budget) if config.stride is None else config.stride
    sequences = encoder.tokenize(corpus.examples, max_length, stride, config.truncate)
    plan = StoragePlan.build(sequences)
    attrs = _initial_attrs(config, corpus, encoder, layers, max_length, stride, plan)

    location, reused = _target(config, attrs)
    result = ExtractResult(location.url, attrs["fingerprint"], len(plan.sequences), plan.num_tokens)
    report = _reporter(config, location.url, plan)
    if reused:
        logger.info("reusing %s: the catalog %s already holds a complete store with fingerprint %s",
                    location.url, config.catalog, attrs["fingerprint"][:12])
        result.reused = result.already_complete = True
        report("reused", len(plan.sequences))
        return result
    lease = Lease(location, "featstore extract", config.lease_ttl)
    try:
        lease.acquire(config.lock_wait)
    except PermissionError as error:
        raise FeatstoreError(f"cannot write to {location.url}: permission denied ({error}); use credentials or a "
                             "location that allow writing") from None
    try:
        backend = _open_or_create(location, config, attrs, plan, labels_array(corpus, plan))
        try:
            if backend.get_attrs()["status"] == fmt.STATUS_COMPLETE:
                logger.info("%s is already complete (fingerprint %s); nothing to do", location.url,
                            attrs["fingerprint"][:12])
                result.already_complete = True
                report("complete", len(plan.sequences))
                return result
            result.resumed_from = int(backend.read(fmt.PROGRESS)[0])
            started = time.perf_counter()
            if config.engine == "ray":
                from .ray_engine import fill_with_ray

                batches = list(plan.batches(result.resumed_from, config.max_batch_tokens))
                digests = fill_with_ray(backend, encoder, plan.token_offsets, batches, plan.sequences, layers,
                                        config, lease, report)
            else:
                digests = _fill_hidden_states(backend, encoder, plan, layers, config, lease, report)
            _finalize(backend, lease, digests)
            result.encode_seconds = time.perf_counter() - started
            report("complete", len(plan.sequences))
        finally:
            backend.close()
    finally:
        lease.release()
    logger.info("extraction complete: %s (%d tokens in %.1f s)", location.url, plan.num_tokens,
                result.encode_seconds)
    return result


def _reporter(config: ExtractConfig, path: str, plan: StoragePlan) -> Callable[..., None]:
    started, first = time.perf_counter(), None

    def report(state: str, sequences_done: int) -> None:
        nonlocal first
        if config.on_progress is None:
            return
        tokens_done = int(plan.token_offsets[sequences_done])
        first = tokens_done if first is None else first  # rate over this run's tokens, not resumed ones
        rate = (tokens_done - first) / max(time.perf_counter() - started, 1e-9)
        config.on_progress(ExtractProgress(path, state, sequences_done, len(plan.sequences), tokens_done,
                                           plan.num_tokens, rate))

    return report


def _target(config: ExtractConfig, attrs: dict[str, Any]) -> tuple[Location, bool]:
    """Where the store is: --out, or with --catalog a complete store with the same fingerprint (reused = True)
    or else --out or the catalog's default path for it."""
    if config.catalog is None:
        return resolve(config.out, config.storage_options), False  # type: ignore[arg-type] - checked above
    catalog = Catalog(config.catalog, config.storage_options)
    twin = catalog.find_complete(attrs["fingerprint"])
    if twin is not None:
        return twin.location, True
    location = resolve(config.out, config.storage_options) if config.out else catalog.default_location(attrs)
    logger.info("no complete store with fingerprint %s in %s; extracting into %s", attrs["fingerprint"][:12],
                config.catalog, location.url)
    return location, False


@dataclass
class StoragePlan:
    """Sequences in storage order (longest first) and their token offsets."""

    sequences: list[TokenizedSequence]
    order: np.ndarray  # storage position -> corpus row
    token_offsets: np.ndarray  # (n + 1,)

    @classmethod
    def build(cls, sequences: Sequence[TokenizedSequence]) -> StoragePlan:
        order = np.array(sorted(range(len(sequences)), key=lambda row: (-sequences[row].num_tokens, row)),
                         dtype=np.int64)
        ordered = [sequences[row] for row in order]
        offsets = np.concatenate([[0], np.cumsum([sequence.num_tokens for sequence in ordered])]).astype(np.int64)
        return cls(ordered, order, offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.token_offsets[-1])

    def batches(self, start: int, max_batch_tokens: int) -> Iterator[range]:
        """Greedy batches from storage position `start`; deterministic, so a resume repeats them."""
        batch_start, width, count = start, 0, 0
        for position in range(start, len(self.sequences)):
            sequence = self.sequences[position]
            new_width = max(width, max(len(window) for window in sequence.windows))
            new_count = count + len(sequence.windows)
            if position > batch_start and new_width * new_count > max_batch_tokens:
                yield range(batch_start, position)
                batch_start, new_width, new_count = position, max(len(w) for w in sequence.windows), len(
                    sequence.windows)
            width, count = new_width, new_count
        if batch_start < len(self.sequences):
            yield range(batch_start, len(self.sequences))


def _initial_attrs(config: ExtractConfig, corpus: Corpus, encoder: FrozenEncoder, layers: list[int],
                   max_length: int, stride: int, plan: StoragePlan) -> dict[str, Any]:
    encoder_info = encoder.describe()
    fingerprint_inputs = {
        "format_major": fmt.format_major(fmt.FORMAT_VERSION),
        "encoder_weights_sha256": encoder_info["weights_sha256"],
        "encoder_config_sha256": encoder_info["config_sha256"],
        "tokenizer_sha256": encoder_info["tokenizer_sha256"],
        "corpus_fingerprint": corpus.fingerprint(),
        "layers": layers,
        "compute_dtype": encoder.compute_dtype,
        "storage_dtype": encoder.storage_dtype,
        "max_length": max_length,
        "stride": stride,
        "truncation": config.truncate,
        "window_rule": WINDOW_RULE,
    }
    hidden_bytes_per_token = len(layers) * encoder.hidden_size * numpy_storage_dtype(encoder.storage_dtype).itemsize
    chunk_tokens, block_tokens = _layout(config, plan.num_tokens, hidden_bytes_per_token)
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "status": fmt.STATUS_WRITING,
        "fingerprint": fmt.fingerprint(fingerprint_inputs),
        "fingerprint_inputs": fingerprint_inputs,
        "encoder": encoder_info,
        "corpus": {
            "source": corpus.source, "name": corpus.name, "split": corpus.split, "columns": corpus.spec,
            "fingerprint": corpus.fingerprint(), "task": corpus.task, "label_names": corpus.label_names,
            "labeled": corpus.labeled, "num_examples": len(corpus),
        },
        "extraction": {
            "layers": layers, "compute_dtype": encoder.compute_dtype, "storage_dtype": encoder.storage_dtype,
            "max_length": max_length, "stride": stride, "truncation": config.truncate, "window_rule": WINDOW_RULE,
            "device": str(encoder.device), "max_batch_tokens": config.max_batch_tokens,
            "created_at": _now(), "completed_at": None, "versions": _versions(), "host": platform.node(),
        },
        "layout": {"backend": config.backend, "order": "token-major", "chunk_tokens": chunk_tokens,
                   "block_tokens": block_tokens, "storage_order": "longest-first"},
        "counts": {
            "num_sequences": len(plan.sequences), "num_tokens": plan.num_tokens,
            "num_words": int(sum(sequence.num_words for sequence in plan.sequences)),
            "num_windowed_sequences": sum(len(sequence.windows) > 1 for sequence in plan.sequences),
            "num_truncated_sequences": sum(sequence.truncated for sequence in plan.sequences),
            "hidden_bytes": plan.num_tokens * hidden_bytes_per_token,
        },
    }


def _layout(config: ExtractConfig, num_tokens: int, bytes_per_token: int) -> tuple[int, int]:
    """Inner chunk and write block, in tokens. Zarr stores an array's last chunk at full size, so the
    chunk is capped at 1/128 of the store to keep that padding under 1%; a block is a whole number of
    chunks (a zarr shard must be) and no larger than the store, since a shard's index has an entry
    for every chunk it could hold."""
    chunk = max(1, min(config.chunk_tokens, max(16, num_tokens // 128)))
    wanted = min(config.block_tokens or DEFAULT_BLOCK_BYTES // bytes_per_token, num_tokens)
    return chunk, max(chunk, -(-wanted // chunk) * chunk)


def _open_or_create(location: Location, config: ExtractConfig, attrs: dict[str, Any], plan: StoragePlan,
                    labels: tuple[str, np.ndarray] | None) -> StoreBackend:
    """Create the store, or reopen one with the same fingerprint to resume; refuse anything else."""
    if location.exists():
        existing = detect_backend(location)
        is_empty_dir = location.isdir() and not location.fs.ls(location.path)
        if existing is None and not is_empty_dir:
            raise FeatstoreError(f"{location.url} exists and is not a featstore store; choose another --out or "
                                 "remove it")
        if existing is not None:
            backend = open_backend(location, "r+")
            old = backend.get_attrs()
            if old.get("format") != fmt.FORMAT_NAME:
                backend.close()
                raise FeatstoreError(f"{location.url} exists and is not a featstore store; choose another --out or "
                                     "remove it")
            if old.get("fingerprint") == attrs["fingerprint"] and not config.overwrite:
                fmt.check_compatible(old, location.url)
                progress = backend.read(fmt.PROGRESS)
                if old["status"] != fmt.STATUS_COMPLETE:
                    logger.info("resuming %s from sequence %d of %d", location.url, progress[0],
                                attrs["counts"]["num_sequences"])
                return backend
            backend.close()
            if not config.overwrite:
                raise FeatstoreError(_mismatch_message(location.url, old, attrs))
            logger.warning("--overwrite: replacing %s", location.url)
        location.remove(recursive=True)
    backend = BACKENDS[config.backend].create(location)
    _create_arrays(backend, attrs, plan, labels)
    return backend


def _mismatch_message(path: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    old_inputs, new_inputs = old.get("fingerprint_inputs", {}), new["fingerprint_inputs"]
    differing = [name for name in fmt.FINGERPRINT_FIELDS if old_inputs.get(name) != new_inputs.get(name)]
    return (f"{path} already holds a store made with different arguments (differs in: "
            f"{', '.join(differing) or 'format'}); use another --out, or --overwrite to replace it")


def _create_arrays(backend: StoreBackend, attrs: dict[str, Any], plan: StoragePlan,
                   labels: tuple[str, np.ndarray] | None) -> None:
    """Write every array except the hidden states, then attributes saying 'writing'."""
    layout, counts = attrs["layout"], attrs["counts"]
    block = layout["block_tokens"]
    sequences = plan.sequences
    num_tokens, num_sequences = counts["num_tokens"], counts["num_sequences"]

    def token_array(name: str, values: list[np.ndarray], dtype: str) -> None:
        backend.create_array(ArraySpec(name, (num_tokens,), dtype, block), np.concatenate(values).astype(dtype))

    token_array(fmt.INPUT_IDS, [s.input_ids for s in sequences], "int32")
    token_array(fmt.WORD_IDS, [s.word_ids for s in sequences], "int32")
    token_array(fmt.TOKEN_WINDOW, [s.token_window for s in sequences], "int16")
    sequence_block = max(1, min(num_sequences + 1, 1 << 16))
    word_offsets = np.concatenate([[0], np.cumsum([s.num_words for s in sequences])]).astype(np.int64)
    for name, values in ((fmt.TOKEN_OFFSETS, plan.token_offsets), (fmt.WORD_OFFSETS, word_offsets),
                         (fmt.SEQUENCE_INDEX, plan.order)):
        backend.create_array(ArraySpec(name, values.shape, "int64", sequence_block), values)
    if labels is not None:
        name, values = labels
        backend.create_array(ArraySpec(name, values.shape, str(values.dtype), sequence_block), values)
    backend.create_array(ArraySpec(fmt.PROGRESS, (2,), "int64", 2), np.zeros(2, np.int64))
    hidden_shape = (num_tokens, len(attrs["extraction"]["layers"]), attrs["encoder"]["hidden_size"])
    storage = str(numpy_storage_dtype(attrs["extraction"]["storage_dtype"]))
    chunk = min(layout["chunk_tokens"], block)
    backend.create_array(ArraySpec(fmt.HIDDEN_STATES, hidden_shape, storage, block, (chunk, 1, hidden_shape[2])))
    backend.set_attrs(attrs)


class BlockWriter:
    """Appends batches of hidden states in storage order; writes whole blocks, then commits.

    Progress records the last batch boundary that lies inside the written blocks, so a
    resumed run starts at a batch boundary and recomputes exactly the same batches. The
    digest of every block written whole is taken from the data in memory, so finalize only
    reads back blocks an earlier (interrupted) run wrote.
    """

    def __init__(self, backend: StoreBackend, token_offsets: np.ndarray, block_tokens: int,
                 start_sequence: int) -> None:
        self.backend = backend
        self.token_offsets = token_offsets
        self.block_tokens = block_tokens
        self.storage_dtype = backend.dtype(fmt.HIDDEN_STATES)
        self.digests: dict[int, str] = {}
        self.write_position = int(token_offsets[start_sequence])
        self.committed_sequences = start_sequence
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.batch_ends: list[int] = []

    def append(self, batch_end: int, hidden: np.ndarray) -> None:
        self.pending.append(hidden)
        self.pending_tokens += len(hidden)
        self.batch_ends.append(batch_end)
        end = self.write_position + self.pending_tokens
        aligned = end // self.block_tokens * self.block_tokens
        if aligned > self.write_position:
            self._write(aligned - self.write_position)

    def finish(self) -> None:
        if self.pending_tokens:
            self._write(self.pending_tokens)
        self._commit()

    def _write(self, count: int) -> None:
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        rows = np.asarray(data[:count], dtype=self.storage_dtype)
        self.backend.write(fmt.HIDDEN_STATES, self.write_position, rows)
        self.digests.update(block_digests(self.write_position, rows, self.block_tokens, int(self.token_offsets[-1])))
        rest = data[count:]
        self.pending = [rest] if len(rest) else []
        self.pending_tokens = len(rest)
        self.write_position += count
        self._commit()

    def _commit(self) -> None:
        done = [end for end in self.batch_ends if self.token_offsets[end] <= self.write_position]
        if not done:
            return
        self.batch_ends = self.batch_ends[len(done):]
        self.committed_sequences = done[-1]
        progress = np.array([done[-1], self.token_offsets[done[-1]]], dtype=np.int64)
        self.backend.write(fmt.PROGRESS, 0, progress)


class BackgroundWriter:
    """Runs a BlockWriter on a thread fed by a bounded queue; re-raises its errors in the caller."""

    def __init__(self, writer: BlockWriter) -> None:
        self.writer = writer
        self.queue: queue.Queue[tuple[int, torch.Tensor, Any] | None] = queue.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featstore-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                batch_end, hidden, ready = item
                if ready is not None:
                    ready.synchronize()
                self.writer.append(batch_end, hidden.numpy())
            self.writer.finish()
        except BaseException as error:  # handed to the main thread
            self.error = error
            while self.queue.get() is not None:  # unblock the producer
                pass

    def put(self, batch_end: int, hidden: torch.Tensor, ready: Any = None) -> None:
        self._raise_if_failed()
        self.queue.put((batch_end, hidden, ready))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise FeatstoreError(f"writing the store failed: {self.error}") from self.error


def _to_host(hidden: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Device->host copy into pinned memory without blocking the next forward pass."""
    if hidden.device.type != "cuda":
        return hidden, None
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    host.copy_(hidden, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _fill_hidden_states(backend: StoreBackend, encoder: FrozenEncoder, plan: StoragePlan, layers: list[int],
                        config: ExtractConfig, lease: Lease, report: Callable[[str, int], None]) -> dict[int, str]:
    """Encode and write from the committed progress on; returns the digests of the blocks written whole."""
    attrs = backend.get_attrs()
    start = int(backend.read(fmt.PROGRESS)[0])
    writer = BackgroundWriter(BlockWriter(backend, plan.token_offsets, attrs["layout"]["block_tokens"], start))
    total = len(plan.sequences)
    bar = tqdm(total=total, initial=start, unit="seq", desc="extract", disable=not config.progress)
    started, tokens_done = time.perf_counter(), 0
    report("extracting", start)
    try:
        for batch in plan.batches(start, config.max_batch_tokens):
            lease.check()
            hidden = encoder.forward(plan.sequences[batch.start: batch.stop], layers, config.max_batch_tokens)
            writer.put(batch.stop, *_to_host(hidden))
            tokens_done += len(hidden)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - started, 1e-9):,.0f}")
            report("extracting", batch.stop)
    finally:
        bar.close()
        writer.close()
    return writer.writer.digests


def _finalize(backend: StoreBackend, lease: Lease, hidden_digests: dict[int, str]) -> None:
    """Record checksums and mark complete, only after checking that everything was committed."""
    attrs = backend.get_attrs()
    progress = backend.read(fmt.PROGRESS)
    counts = attrs["counts"]
    if int(progress[0]) != counts["num_sequences"] or int(progress[1]) != counts["num_tokens"]:
        raise FeatstoreError(f"internal error: finalize found progress {progress.tolist()} for "
                             f"{counts['num_sequences']} sequences / {counts['num_tokens']} tokens")
    attrs["integrity"] = compute_checksums(backend, attrs["layout"]["block_tokens"],
                                           {fmt.HIDDEN_STATES: hidden_digests})
    attrs["status"] = fmt.STATUS_COMPLETE
    attrs["extraction"]["completed_at"] = _now()
    lease.check()
    backend.set_attrs(attrs)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import h5py
    import transformers
    import zarr

    from .. import __version__

    return {"featstore": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "zarr": zarr.__version__, "h5py": h5py.__version__,
            "numpy": np.__version__}


def labels_array(corpus: Corpus, plan: StoragePlan) -> tuple[str, np.ndarray] | None:
    """The label array in storage order: word labels for tagging, one label per sequence otherwise."""
    if not corpus.labeled:
        return None
    ordered = [corpus.examples[row] for row in plan.order]
    if corpus.task == TOKEN_CLASSIFICATION:
        per_sequence = [example.label[: sequence.num_words] for example, sequence in zip(ordered, plan.sequences)]
        return fmt.WORD_LABELS, np.concatenate([np.asarray(labels, np.int32) for labels in per_sequence])
    dtype = np.float32 if corpus.task == "regression" else np.int64
    return fmt.LABELS, np.asarray([example.label for example in ordered], dtype=dtype)
