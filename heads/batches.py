"""From a store's sequences to the tensors a head steps on: batching, label mapping, device placement.

Batches reach the heads' device once per step (`on_device`), whatever the number of heads. Training batches
can be grouped by length (`--group-by-length`): a head computes every padded position of a batch,
and shuffled batches of short and long sentences hold more padding than real tokens (CoNLL-2003, 32
sentences: 2.6 padded positions per real token). Sorting pools of a few dozen batches drawn from the
shuffled stream, then yielding the pool's batches in random order, keeps the epoch random while cutting
the padding to a few percent (the recipe of AllenNLP's bucket iterator and HF's `group_by_length`). It is
off by default: on CoNLL-2003 the adapter trained on grouped batches scored lower (BENCHMARKS.md, "Defaults").
Evaluation batches are always grouped (results do not depend on the batching). Either way the batches are
packed (heads.packing): the heads compute only the real tokens, and attention runs on the sequences side by
side, so only the bilstm and tail blocks pay for a batch's padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch

from featstore import Store, collate_features
from featstore.errors import IncompatibleHeadError
from featstore.store.reader import SequenceFeatures

from .packing import Layout, layout_tensors

POOL_BATCHES = 50  # batches per sorted pool: wide enough for near-equal lengths, small enough to stay random


def collated_batches(items: Iterable[SequenceFeatures], batch_size: int, group_by_length: bool = False,
                     rng: np.random.Generator | None = None, as_stored: bool = False) -> Iterator[dict[str, Any]]:
    """Packed batches (collate_features, with their heads.packing layout) of `batch_size` sequences, streamed: the
    store is never held whole.
    `group_by_length`: batches of similar lengths (pools sorted; pool's batches in an order drawn from `rng`,
    or shortest first without one). Either way every sequence comes exactly once, in ceil(N / batch_size)
    batches. `as_stored`: float16 features stay float16 until `on_device` (collate_features)."""
    groups = _length_grouped(items, batch_size, rng) if group_by_length else _consecutive(items, batch_size)
    for group in groups:
        batch = collate_features(group, packed=True, as_stored=as_stored)
        yield {**batch, **layout_tensors(batch)}  # found here on the CPU, so a step on a GPU never waits for it


def training_batches(store: Store, layers: list[int], batch_size: int, seed: int, epoch: int,
                     group_by_length: bool = False, keep_in_memory: bool = False, as_stored: bool = False
                     ) -> Iterator[dict[str, Any]]:
    """One training epoch's batches of a store: shuffled (deterministic for seed and epoch), grouped by length
    when asked; `keep_in_memory`: the store keeps what it read for the next epochs (Store.iter_epoch);
    `as_stored`: float16 features travel as float16 (collated_batches)."""
    items = store.iter_epoch(layers=layers, seed=seed, epoch=epoch, keep_in_memory=keep_in_memory)
    batch_order = np.random.default_rng([seed, epoch, 1])  # a stream apart from the reader's shuffle
    return collated_batches(items, batch_size, group_by_length, batch_order, as_stored)


def _consecutive(items: Iterable[SequenceFeatures], size: int) -> Iterator[list[SequenceFeatures]]:
    iterator = iter(items)
    while group := list(islice(iterator, size)):
        yield group


def _length_grouped(items: Iterable[SequenceFeatures], batch_size: int, rng: np.random.Generator | None
                    ) -> Iterator[list[SequenceFeatures]]:
    for pool in _consecutive(items, batch_size * POOL_BATCHES):
        pool.sort(key=lambda item: len(item.hidden_states))
        groups = [pool[start: start + batch_size] for start in range(0, len(pool), batch_size)]
        order = rng.permutation(len(groups)) if rng is not None else range(len(groups))
        for index in order:
            yield groups[index]


def padding_ratio(batches: Iterable[dict[str, Any]]) -> float:
    """Positions a head computes per real token over these batches (1.0: no padding)."""
    positions = tokens = 0
    for batch in batches:
        positions += batch["mask"].numel()
        tokens += int(batch["mask"].sum())
    return positions / max(tokens, 1)


def head_inputs(batch: dict[str, Any], columns: slice | list[int], layout: Layout | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Layout]:
    """A head's layers (columns of the packed batch's layers), mask, word ids and the batch's layout (`layout`:
    read from the batch once for all its heads; else read now)."""
    layout = layout if layout is not None else Layout.of_batch(batch)
    return batch["hidden_states"][:, columns], batch["mask"], batch.get("word_ids"), layout


def on_device(batches: Iterable[dict[str, Any]], device: str | torch.device) -> Iterator[dict[str, Any]]:
    """The batches on `device` with float32 features, each copied there once for all the heads that step on it.
    On CUDA the copies come from pinned memory on a side stream, issued one batch ahead, so they overlap the
    heads' work on the batch before, and float16 features (`as_stored` batches: half the bytes to pin and move)
    are widened there; elsewhere a plain copy (none on the CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        for batch in batches:
            yield _widened(batch)
        return
    if device.type != "cuda":
        for batch in batches:
            yield _widened(_copied(batch, device, non_blocking=False))
        return
    stream = torch.cuda.Stream(device)
    pending: tuple[dict[str, Any], torch.cuda.Event] | None = None
    for batch in batches:
        with torch.cuda.stream(stream):
            moved = _widened(_copied({key: _pinned(value) for key, value in batch.items()}, device,
                                     non_blocking=True))
            copied = torch.cuda.Event()
            copied.record(stream)
        if pending is not None:
            yield _ready(*pending, device)
        pending = moved, copied
    if pending is not None:
        yield _ready(*pending, device)


def _widened(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with float32 features, the heads' input (float16 -> float32 is exact)."""
    hidden = batch["hidden_states"]
    return batch if hidden.dtype == torch.float32 else {**batch, "hidden_states": hidden.float()}


def _pinned(value: Any) -> Any:
    return value.pin_memory() if isinstance(value, torch.Tensor) and not value.is_pinned() else value


def _copied(batch: dict[str, Any], device: torch.device, non_blocking: bool) -> dict[str, Any]:
    return {key: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def _ready(batch: dict[str, Any], copied: torch.cuda.Event, device: torch.device) -> dict[str, Any]:
    """A prefetched batch, once usable on the compute stream: it waits for the copy, and the caching allocator
    is told the tensors are used there (so their memory is not reused while the heads still read it)."""
    compute = torch.cuda.current_stream(device)
    compute.wait_event(copied)
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            value.record_stream(compute)
    return batch


def label_map(head_labels: list[str] | None, store: Store) -> np.ndarray | None:
    """Store label id -> head label id, by name, so stores extracted with different label orders agree."""
    if head_labels is None or store.label_names is None:
        return None
    unknown = [name for name in store.label_names if name not in head_labels]
    if unknown:
        raise IncompatibleHeadError(f"store {store.path} has labels {unknown} the head was not trained on "
                                    f"(head labels: {head_labels})")
    return np.array([head_labels.index(name) for name in store.label_names])


def remap_labels(labels: torch.Tensor, mapping: np.ndarray | None) -> torch.Tensor:
    """Store label ids as the head's (label_map), padding kept."""
    if mapping is None:
        return labels
    table = torch.as_tensor(mapping)
    return torch.where(labels >= 0, table[labels.clamp(min=0)], labels)
