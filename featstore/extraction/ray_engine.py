"""Scale-out extraction on Ray (`featstore extract --engine ray`).

The driver plans and creates the store as usual (extract.py), then cuts the remaining rows
into shares on write-block boundaries and hands them to Ray actors: one per GPU, or CPU
actors when the cluster has none. Each actor loads the encoder once and, for its share,
runs exactly the planned batches that overlap it (a batch straddling two shares is computed
by both) and writes only its share's rows through a `BlockWriter`. Shares never share a
block (a Zarr shard), so writers never touch the same object, and a share written twice
holds the same bytes: when an actor dies, Ray restarts it and re-runs its share, with no
duplicates. After every block, the actor reports it to the driver (a Ray queue), whose
`ProgressLedger` commits progress as the written prefix grows, so a killed driver resumes
like a killed local run. The store must be reachable from every node: a shared filesystem
path or an s3:// URL.
"""

from __future__ import annotations

import itertools
import logging
import queue
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import install_hint
from ..errors import ConfigError, FeatstoreError, ModelError
from ..sharing.location import resolve
from ..store.backends import StoreBackend, open_backend
from .encoder import FrozenEncoder, TokenizedSequence
from .plan import ExtractionPlan
from .progress import Reporter
from .writer import BlockWriter, ProgressLedger

logger = logging.getLogger(__name__)

SHARES_PER_WORKER = 4  # smaller shares balance load and make a retried share cheaper
ACTOR_RESTARTS = 3
POLL_SECONDS = 0.2


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


@dataclass
class ShareJob:
    """What every share of one extraction needs besides the share itself."""

    store: str
    storage_options: dict[str, Any]
    layers: list[int]
    block_tokens: int
    check_levels: dict[str, int]
    max_batch_tokens: int
    total_rows: int


class ShareWriter:
    """A Ray actor body (wrapped with ray.remote at run time): loads the encoder once, writes shares."""

    def __init__(self, spec: EncoderSpec) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.encoder = FrozenEncoder.load(spec.model, spec.device, spec.storage_dtype, spec.compute_dtype)
        if self.encoder.weights_sha256 != spec.weights_sha256:
            raise ModelError(f"the encoder at {spec.model} on this node differs from the driver's (weights "
                             "hash); every node needs the same model files")

    def write(self, job: ShareJob, share: Share, reports: Any) -> int:
        """Write the share, reporting each block written to the driver's queue; returns its row count."""
        backend = open_backend(resolve(job.store, job.storage_options), "r+")

        try:
            writer = BlockWriter(backend, job.block_tokens, job.check_levels, share.start, share.stop, job.total_rows,
                                 reports.put)
            for batch_start, sequences in zip(share.batch_starts, share.batches):
                hidden = self.encoder.forward(sequences, job.layers, job.max_batch_tokens).cpu().numpy()
                first, last = max(share.start, batch_start), min(share.stop, batch_start + len(hidden))
                writer.append(hidden[first - batch_start: last - batch_start])
            writer.finish()
        finally:
            backend.close()
        return share.stop - share.start


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


def fill_with_ray(backend: StoreBackend, encoder: FrozenEncoder, plan: ExtractionPlan, batches: list[range],
                  ledger: ProgressLedger, report: Reporter) -> None:
    """Ray actors compute the batches and write their shares; the driver commits progress as blocks land."""
    try:
        import ray
        from ray.util.queue import Queue
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray: {install_hint('ray')} (or pip install ray)") from None
    spec = plan.spec
    if not ray.is_initialized():
        ray.init(address=spec.ray_address, include_dashboard=False, log_to_driver=False,
                 **({"num_cpus": spec.workers} if spec.ray_address is None and spec.workers else {}))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = spec.workers or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    device = "cuda" if gpus else "cpu"
    options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    encoder_spec = EncoderSpec(encoder.name_or_path, device, encoder.storage_dtype, encoder.compute_dtype,
                               encoder.weights_sha256)
    actor_class = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS, **options)(ShareWriter)
    actors = [actor_class.remote(encoder_spec) for _ in range(count)]
    reports = Queue(actor_options={"num_cpus": 0})  # takes no CPU slot from the writers
    shares = plan_shares(plan.token_offsets, batches, ledger.committed, plan.block_tokens, count * SHARES_PER_WORKER,
                         plan.sequences)
    logger.info("ray: %d shares of %s over %d %s actors", len(shares), backend.path, count, device.upper())
    job = ShareJob(backend.path, backend.location.storage_options, plan.layers, plan.block_tokens,
                   plan.check_levels, spec.max_batch_tokens, plan.num_tokens)
    pending = {actors[share.index % count].write.remote(job, share, reports): share for share in shares}

    def drain() -> None:
        while True:
            try:
                ledger.written(reports.get_nowait())
            except queue.Empty:  # ray.util.queue.Empty subclasses it
                return

    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            drain()
            for ref in done:
                share = pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as error:
                    raise FeatstoreError(f"share {share.index} (rows {share.start}..{share.stop}) failed after "
                                         f"{ACTOR_RESTARTS} retries: {error}") from None
                logger.debug("ray: share %d (rows %d..%d) written", share.index, share.start, share.stop)
            report("extracting", ledger.committed)
        drain()
    finally:
        for actor in actors:
            ray.kill(actor)
        reports.shutdown()
    if ledger.committed != len(plan.sequences):
        raise FeatstoreError(f"internal error: Ray shares reported rows up to {ledger.frontier} of "
                             f"{plan.num_tokens}")
