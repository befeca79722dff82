"""PyTorch adapters for a store: a map-style `Dataset` and the collate function (padded or packed batches).

Kept apart from the reader (like safetensors' framework modules) so that reading, verifying
and listing stores never import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .reader import SequenceFeatures, Store

LABEL_PADDING = -100  # word labels of padded positions (PyTorch's cross-entropy ignore_index default)


class FeatureDataset(torch.utils.data.Dataset):
    """Map-style PyTorch dataset over a store, indexed by corpus row; pair with `collate_features`."""

    def __init__(self, store: Store, layers: Sequence[int] | None = None, pooling: str | None = None) -> None:
        self.store, self.layers, self.pooling = store, layers, pooling

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, row: int) -> SequenceFeatures:
        return self.store.sequence(row, self.layers, self.pooling)


def _as_tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor over the array's own memory when torch has its dtype (float16 or float32: the batch's copy converts
    it, without a float32 copy of every layer first), strided as it is (a kept store's sequence is a view across
    its layers; a contiguous copy first cost a third of the collate); float32 for the dtypes torch cannot view
    (ml_dtypes)."""
    if values.dtype in (np.float16, np.float32):
        return torch.from_numpy(values if min(values.strides, default=0) >= 0 else np.ascontiguousarray(values))
    return torch.from_numpy(np.asarray(values, np.float32))


def collate_features(items: Sequence[SequenceFeatures], packed: bool = False, as_stored: bool = False
                     ) -> dict[str, Any]:
    """Pad a batch: hidden (B, T, L, H) float32, mask (B, T) bool, labels (B, W) padded with LABEL_PADDING or (B,),
    word_ids (B, T) with -1 on padding (token-level items only), index (B,) corpus rows. `packed`: hidden holds only
    the real tokens, (N, L, H) sequence after sequence (the rows where mask is True, in row-major order), which is
    what featstore's heads take without computing the padding. `as_stored`: float16 items stay float16 (half the
    bytes to move to a GPU, which widens them there; float16 -> float32 is exact); others are float32 anyway."""
    lengths = [len(item.hidden_states) for item in items]
    width, first = max(lengths), items[0].hidden_states
    dtype = torch.float16 if as_stored and first.dtype == np.float16 else torch.float32
    mask = _first_of_rows(lengths, width)
    if packed:
        hidden = torch.empty((sum(lengths), *first.shape[1:]), dtype=dtype)
        for start, length, item in zip(np.cumsum([0, *lengths[:-1]]).tolist(), lengths, items):
            hidden[start: start + length] = _as_tensor(item.hidden_states)
    else:
        hidden = torch.empty((len(items), width, *first.shape[1:]), dtype=dtype)
        for row, item in enumerate(items):
            hidden[row, :lengths[row]] = _as_tensor(item.hidden_states)
            hidden[row, lengths[row]:] = 0  # only the padding needs zeroing
    batch: dict[str, Any] = {"hidden_states": hidden, "mask": mask,
                             "index": torch.tensor([item.index for item in items])}
    if items[0].pooled is None:
        batch["word_ids"] = _padded_rows([item.word_ids for item in items], width, -1)
    if items[0].labels is not None:
        if items[0].labels.ndim == 0:
            batch["labels"] = torch.tensor(np.stack([item.labels for item in items]))
        else:
            batch["labels"] = _padded_rows([item.labels for item in items], max(item.num_words for item in items),
                                           LABEL_PADDING)
    return batch


def _first_of_rows(lengths: Sequence[int], width: int) -> torch.Tensor:
    """(B, width) bool: True on the first `lengths[b]` positions of row b."""
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def _padded_rows(rows: Sequence[np.ndarray], width: int, padding: int) -> torch.Tensor:
    """(B, width) int64: each row's values, then `padding`; filled in one copy (a copy per row was half the
    collate of a one-layer batch)."""
    values = torch.full((len(rows), width), padding, dtype=torch.long)
    values[_first_of_rows([len(row) for row in rows], width)] = torch.from_numpy(np.concatenate(rows).astype(np.int64))
    return values
