"""Scale-out extraction on Ray (`featstore extract --engine ray`).

The driver tokenizes, plans and creates the store as usual, then cuts the remaining tokens
into shares on write-block boundaries and hands them to Ray actors: one per GPU, or CPU
actors when the cluster has none. Each actor loads the encoder once and, for its share,
runs exactly the batches a single process would run (the plan's deterministic batches
that overlap the share; a batch straddling two shares is computed by both) and writes only
its share's rows. Shares never share a block (a Zarr shard), so writers never touch the
same object, and a share written twice holds the same bytes: when an actor dies, Ray
restarts it and re-runs its share, with no duplicates. The driver then records progress
and finalizes (checksums, status) as usual.

The store must be reachable from every node: a shared filesystem path or an s3:// URL.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FeatstoreError
from ..sharing.lease import Lease
from ..sharing.location import resolve
from ..store import format as fmt
from ..store.backends import StoreBackend, open_backend
from ..store.integrity import block_digests
from .encoder import FrozenEncoder, TokenizedSequence

logger = logging.getLogger(__name__)

SHARES_PER_WORKER = 4  # smaller shares balance load and make a retried share cheaper
ACTOR_RESTARTS = 3


@dataclass
class Share:
    """Rows [start, stop) of hidden_states and the batches (lists of sequences) that produce them."""

    index: int
    start: int
    stop: int
    batch_starts: list[int]  # token offset of each batch's first token
    batches: list[list[TokenizedSequence]]


@dataclass
class EncoderSpec:
    model: str
    device: str
    storage_dtype: str
    compute_dtype: str
    weights_sha256: str


class ShareWriter:
    """A Ray actor body (wrapped with ray.remote at run time): loads the encoder once, writes shares."""

    def __init__(self, spec: EncoderSpec) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.encoder = FrozenEncoder.load(spec.model, spec.device, spec.storage_dtype, spec.compute_dtype)
        if self.encoder.weights_sha256 != spec.weights_sha256:
            raise FeatstoreError(f"the encoder at {spec.model} on this node differs from the driver's (weights "
                                 "hash); every node needs the same model files")

    def write(self, store: str, storage_options: dict[str, Any], share: Share, layers: list[int],
              block_tokens: int, max_batch_tokens: int, total_rows: int) -> tuple[int, dict[int, str]]:
        """Write the share; returns its row count and the digests of the blocks it wrote whole."""
        backend = open_backend(resolve(store, storage_options), "r+")
        digests: dict[int, str] = {}
        storage_dtype = backend.dtype(fmt.HIDDEN_STATES)

        def flush(position: int, rows: np.ndarray) -> int:
            rows = np.asarray(rows, dtype=storage_dtype)
            backend.write(fmt.HIDDEN_STATES, position, rows)
            digests.update(block_digests(position, rows, block_tokens, total_rows))
            return position + len(rows)

        try:
            pending: list[np.ndarray] = []
            position = share.start  # first row not yet written
            for batch_start, sequences in zip(share.batch_starts, share.batches):
                hidden = self.encoder.forward(sequences, layers, max_batch_tokens).cpu().numpy()
                first, last = max(share.start, batch_start), min(share.stop, batch_start + len(hidden))
                pending.append(hidden[first - batch_start: last - batch_start])
                buffered = sum(len(part) for part in pending)
                aligned = (position + buffered) // block_tokens * block_tokens
                if aligned > position:  # whole blocks only, so no shard is written twice in one pass
                    data, count = np.concatenate(pending), aligned - position
                    position = flush(position, data[:count])
                    pending = [data[count:]]
            if pending and sum(len(part) for part in pending):
                position = flush(position, np.concatenate(pending))
        finally:
            backend.close()
        if position != share.stop:
            raise FeatstoreError(f"share {share.index} wrote rows up to {position}, expected {share.stop}")
        return share.stop - share.start, digests


def plan_shares(token_offsets: np.ndarray, batches: list[range], start_sequence: int, block_tokens: int,
                count: int, sequences: list[TokenizedSequence]) -> list[Share]:
    """`count` shares (or fewer) over the tokens from `start_sequence` on, cut on block boundaries."""
    first_row, total = int(token_offsets[start_sequence]), int(token_offsets[-1])
    first_block, blocks = first_row // block_tokens, -(-total // block_tokens)
    edges = np.unique(np.linspace(first_block, blocks, min(count, blocks - first_block) + 1).round().astype(int))
    bounds = [max(first_row, int(edge) * block_tokens) for edge in edges[:-1]] + [total]
    shares = []
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        chosen = [batch for batch in batches
                  if int(token_offsets[batch.start]) < stop and int(token_offsets[batch.stop]) > start]
        shares.append(Share(index, start, stop, [int(token_offsets[batch.start]) for batch in chosen],
                            [sequences[batch.start: batch.stop] for batch in chosen]))
    return shares


def fill_with_ray(backend: StoreBackend, encoder: FrozenEncoder, token_offsets: np.ndarray, batches: list[range],
                  sequences: list[TokenizedSequence], layers: list[int], config: Any, lease: Lease,
                  report: Callable[[str, int], None]) -> dict[int, str]:
    """Write every hidden state from the committed progress on with Ray actors, then record progress; returns
    the digests of the blocks written whole."""
    try:
        import ray
    except ImportError:
        raise FeatstoreError("--engine ray needs Ray: pip install 'featstore[ray]' (or pip install ray)") from None
    start = int(backend.read(fmt.PROGRESS)[0])
    block_tokens = int(backend.get_attrs()["layout"]["block_tokens"])
    if not ray.is_initialized():
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False,
                 **({"num_cpus": config.workers} if config.ray_address is None and config.workers else {}))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = config.workers or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    device = "cuda" if gpus else "cpu"
    options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    spec = EncoderSpec(encoder.name_or_path, device, encoder.storage_dtype, encoder.compute_dtype,
                       encoder.weights_sha256)
    actor_class = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS, **options)(ShareWriter)
    actors = [actor_class.remote(spec) for _ in range(count)]
    shares = plan_shares(token_offsets, batches, start, block_tokens, count * SHARES_PER_WORKER, sequences)
    logger.info("ray: %d shares of %s over %d %s actors", len(shares), backend.path, count, device.upper())
    total_rows = int(token_offsets[-1])
    arguments = (layers, block_tokens, config.max_batch_tokens, total_rows)
    pending = {actors[share.index % count].write.remote(backend.path, backend.location.storage_options, share,
                                                        *arguments): share for share in shares}
    written, digests = 0, {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            share = pending.pop(done[0])
            try:
                rows, share_digests = ray.get(done[0])
            except ray.exceptions.RayError as error:
                raise FeatstoreError(f"share {share.index} (rows {share.start}..{share.stop}) failed after "
                                     f"{ACTOR_RESTARTS} retries: {error}") from None
            written += rows
            digests.update(share_digests)
            lease.check()
            report("extracting", int(np.searchsorted(token_offsets, int(token_offsets[start]) + written)))
            logger.debug("ray: share %d (rows %d..%d) written", share.index, share.start, share.stop)
    finally:
        for actor in actors:
            ray.kill(actor)
    backend.write(fmt.PROGRESS, 0, np.array([len(sequences), total_rows], dtype=np.int64))
    return digests
