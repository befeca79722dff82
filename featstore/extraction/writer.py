"""Writing hidden states: whole blocks, hashed from memory, and progress committed per block.

Both engines use these pieces. The local engine runs one `BlockWriter` over every row on a
background thread; the Ray engine runs one per share inside its actors. Either way, each
block written is reported to the driver's `ProgressLedger`, which commits progress as soon as
the contiguous prefix of written rows passes a batch boundary, so a killed run (local or a
Ray driver) resumes from the last block it wrote and recomputes exactly the same batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptStoreError, FeatstoreError
from ..sharing.lease import Lease
from ..store import format as fmt
from ..store.backends import StoreBackend
from ..store.chunks import chunk_checksums
from ..store.encoding import split_wire
from ..store.integrity import block_digests, record_integrity
from .plan import now

WRITE_QUEUE_DEPTH = 4


@dataclass
class Written:
    """One write: rows first..end, with the digests of the blocks and the checksums of the chunks it covered
    whole, taken from the data in memory (finalize reads back only what an interrupted run wrote)."""

    first: int
    end: int
    block_digests: dict[int, str]
    chunk_checksums: dict[str, dict[int, np.ndarray]]  # checksum array -> chunk -> checksums


WrittenCallback = Callable[[Written], None]


class BlockWriter:
    """Writes rows [start, stop) of `hidden_states`, appended in order, in whole blocks.

    A write covers whole blocks (one Zarr shard each) except where the range starts or ends
    inside one, so no block is written twice in one pass. The digest of every block written
    whole is taken from the data in memory, so finalize reads back only blocks that an earlier,
    interrupted run wrote.
    """

    def __init__(self, backend: StoreBackend, block_tokens: int, check_levels: dict[str, int], start: int,
                 stop: int, total_rows: int, on_written: WrittenCallback) -> None:
        self.backend, self.block_tokens, self.stop, self.total_rows = backend, block_tokens, stop, total_rows
        self.check_levels = check_levels  # checksum array -> tokens per checked chunk (store/chunks.py)
        self.on_written = on_written
        self.codes_dtype = backend.dtype(fmt.HIDDEN_STATES)
        self.scaled = fmt.HIDDEN_SCALES in backend.array_names()  # a scaled encoding: codes and scales
        self.position = start  # first row not yet written
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def append(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows)
        end = self.position + self.pending_rows
        if end > self.stop:
            raise FeatstoreError(f"internal error: rows up to {end} appended to a writer of rows up to {self.stop}")
        aligned = end // self.block_tokens * self.block_tokens
        if aligned > self.position:
            self._write(aligned - self.position)

    def finish(self) -> None:
        if self.pending_rows:
            self._write(self.pending_rows)
        if self.position != self.stop:
            raise FeatstoreError(f"internal error: rows written up to {self.position}, expected {self.stop}")

    def _write(self, count: int) -> None:
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        rows, scales = split_wire(data[:count], self.codes_dtype, self.scaled)
        if scales is not None:  # before the codes: a block whose codes are written has its scales
            self.backend.write(fmt.HIDDEN_SCALES, self.position, scales)
        self.backend.write(fmt.HIDDEN_STATES, self.position, rows)
        written = Written(self.position, self.position + count,
                          block_digests(self.position, rows, self.block_tokens, self.total_rows),
                          {array: chunk_checksums(self.position, rows, chunk_rows, self.total_rows,
                                                  self.backend.checksum_per_layer)
                           for array, chunk_rows in self.check_levels.items()})
        rest = data[count:]
        self.pending = [rest] if len(rest) else []
        self.pending_rows = len(rest)
        self.position = written.end
        self.on_written(written)


class ProgressLedger:
    """Records which rows are written (in any order) and commits the `progress` array: the last batch
    boundary inside the contiguous written prefix. Collects the writers' block digests and chunk checksums."""

    def __init__(self, backend: StoreBackend, token_offsets: np.ndarray, batches: Sequence[range], start: int,
                 before_commit: Callable[[], None]) -> None:
        self.backend, self.token_offsets, self.before_commit = backend, token_offsets, before_commit
        self.batch_ends = [batch.stop for batch in batches]
        self.committed = start  # sequences
        self.frontier = int(token_offsets[start])  # rows below it are all written
        self.written_ranges: dict[int, int] = {}  # start row -> end row, beyond the frontier
        self.digests: dict[int, str] = {}
        self.chunk_checksums: dict[str, dict[int, np.ndarray]] = {}
        self.lock = threading.Lock()

    def written(self, written: Written) -> None:
        first, end = written.first, written.end
        with self.lock:
            self.digests.update(written.block_digests)
            for array, sums in written.chunk_checksums.items():
                self.chunk_checksums.setdefault(array, {}).update(sums)
            if end <= self.frontier:
                return  # a retried share re-reporting rows already counted
            self.written_ranges[first] = max(end, self.written_ranges.get(first, end))
            advanced = True
            while advanced:
                advanced = False
                for range_start, range_end in list(self.written_ranges.items()):
                    if range_start <= self.frontier:
                        self.frontier = max(self.frontier, range_end)
                        del self.written_ranges[range_start]
                        advanced = True
            self._commit()

    def _commit(self) -> None:
        done = [end for end in self.batch_ends if end > self.committed and self.token_offsets[end] <= self.frontier]
        if not done:
            return
        self.before_commit()
        self.committed = done[-1]
        progress = np.array([self.committed, self.token_offsets[self.committed]], dtype=np.int64)
        self.backend.write(fmt.PROGRESS, 0, progress)


class BackgroundWriter:
    """Runs a BlockWriter on a thread fed by a bounded queue, so encoder compute overlaps store writes;
    re-raises the thread's errors in the caller."""

    def __init__(self, writer: BlockWriter) -> None:
        self.writer = writer
        self.queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featstore-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                hidden, ready = item
                if ready is not None:  # a CUDA event: the device-to-host copy has landed
                    ready.synchronize()
                self.writer.append(hidden.numpy())
            self.writer.finish()
        except BaseException as error:  # handed to the main thread
            self.error = error
            while self.queue.get() is not None:  # unblock the producer
                pass

    def put(self, hidden: Any, ready: Any = None) -> None:
        self._raise_if_failed()
        self.queue.put((hidden, ready))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            if isinstance(self.error, FeatstoreError):
                raise self.error
            raise FeatstoreError(f"writing the store failed: {self.error}") from self.error


def finalize(backend: StoreBackend, lease: Lease, ledger: ProgressLedger) -> None:
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
