"""Packed tokens: a batch's real tokens side by side, without the padding.

A padded batch (B, T, ...) of short and long sequences holds mostly padding: shuffled batches of 32 CoNLL-2003
sentences have 2.6 positions per real token, and a head computes every one. Packed, the same batch is the
(N, ...) rows of its real tokens in row-major order (sequence by sequence), and the padded mask (B, T) says
where each came from. Everything that acts on one token at a time (layer mixing, feed-forward blocks,
dropout, the classifier) runs on the packed rows; what mixes tokens of a sequence either reduces by sequence
(`segment_mean`: a layer's mean over the sentence) or lays the tokens out on a grid for just that step: the
padded grid (an LSTM), or, for attention, `Bins`: the sequences side by side in rows as wide as the longest, a
mask keeping each token to its own sequence (a third of the padded grid's positions for those CoNLL batches).
The batch's sequences stay what they were, so results are those of the padded batch.

Finding the real tokens and words (`nonzero`) sizes the packed tensors, which on an accelerator makes the host
wait for the device. The trainer's batches therefore carry their `Layout`, found once on the CPU when the batch
is collated (`layout_tensors`), and a step on the device reads it (`Layout.of_batch`) without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class Packing:
    """Where a batch's real tokens sit in its padded (B, T) grid: `mask` True on real tokens."""

    def __init__(self, mask: torch.Tensor, index: torch.Tensor | None = None, bins: Bins | None = None
                 ) -> None:
        self.mask = mask
        # (N,): b * T + t of each real token (`index`: found already, e.g. on the CPU)
        self.index = mask.reshape(-1).nonzero().squeeze(1) if index is None else index
        self.segment = self.index // mask.shape[1]  # (N,): the sequence b each real token belongs to
        self.lengths = mask.sum(1)  # (B,)
        self._bins = bins

    @property
    def bins(self) -> Bins:
        """The sequences side by side in as few rows as fit them (`Bins`; found when first asked for, unless
        given)."""
        if self._bins is None:
            self._bins = Bins.of(self)
        return self._bins

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the real tokens' rows."""
        return padded.flatten(0, 1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros on padding."""
        batch, width = self.mask.shape
        grid = packed.new_zeros((batch * width, *packed.shape[1:]))
        return grid.index_copy(0, self.index, packed).unflatten(0, (batch, width))

    def segment_mean(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, ...): the mean of each sequence's real tokens (zeros for an empty sequence)."""
        sums = packed.new_zeros((len(self.lengths), *packed.shape[1:])).index_add(0, self.segment, packed)
        counts = self.lengths.clamp(min=1).to(packed.dtype)
        return sums / counts.view(-1, *[1] * (packed.dim() - 1))


class Bins:
    """A packed batch's sequences side by side in rows ("bins") as wide as its longest sequence, in as few rows
    as first-fit decreasing finds (longest first, each into the first row with room). Attention among a sequence's
    tokens runs on this grid with `mask` (a token sees only its own sequence's tokens) instead of on the padded
    (B, T) grid: its size follows the real tokens, not B times the longest. Shuffled batches of 32 CoNLL-2003
    sentences fill a third as many rows; corpora with a long tail of lengths save more."""

    def __init__(self, slot: torch.Tensor, segments: torch.Tensor) -> None:
        self.segments = segments  # (R, width): the sequence at each position of the grid, -1 where none
        self.grid = Packing(segments >= 0, slot)  # slot (N,): each packed token's position in the flattened grid

    @classmethod
    def of(cls, packing: Packing) -> Bins:
        # laid out on the host (a handful of sequences: numpy beats tensor ops' overhead), as the trainer's
        # batches are when collated (layout_tensors)
        lengths = np.array(packing.lengths.tolist(), dtype=np.int64)
        width = int(lengths.max(initial=0)) or 1
        starts, rows = _first_fit(lengths.tolist(), width)
        sequence = np.repeat(np.arange(len(lengths)), lengths)  # of each packed token
        first = np.cumsum(lengths) - lengths  # each sequence's first row among the packed tokens
        slot = np.array(starts)[sequence] + np.arange(len(sequence)) - first[sequence]
        segments = np.full(rows * width, -1)
        segments[slot] = sequence
        device = packing.index.device
        return cls(torch.from_numpy(slot).to(device), torch.from_numpy(segments.reshape(rows, width)).to(device))

    @property
    def mask(self) -> torch.Tensor:
        """(R, width, width): True where a query position and a key position hold the same sequence."""
        return self.segments[:, :, None] == self.segments[:, None, :]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (R, width, ...), zeros where no token is."""
        return self.grid.unpack(packed)

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """(R, width, ...) -> (N, ...): the tokens' rows, in the packed order."""
        return self.grid.pack(grid)


def _first_fit(lengths: list[int], width: int) -> tuple[list[int], int]:
    """Each sequence's first position in rows of `width` (first-fit decreasing), and the number of rows."""
    room: list[int] = []  # left in each row
    starts = [0] * len(lengths)
    for sequence in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        length = lengths[sequence]
        row = next((row for row, left in enumerate(room) if left >= length), len(room))
        if row == len(room):
            room.append(width)
        starts[sequence] = row * width + width - room[row]
        room[row] -= length
    return starts, len(room)


def is_packed(hidden: torch.Tensor) -> bool:
    """Head inputs are (B, T, L, H) padded or (N, L, H) packed."""
    return hidden.dim() == 3


class Words:
    """The words of a packed batch's tokens: each token's row among the packed words (`of_token`, (N,); the
    number of words for a token of no word) and the words' own packing in the (B, W) grid of `num_words` words
    per sequence, a word being there when some token belongs to it."""

    def __init__(self, packing: Packing, of_token: torch.Tensor) -> None:
        self.packing, self.of_token = packing, of_token

    @classmethod
    def of(cls, tokens: Packing, word_ids: torch.Tensor, num_words: int) -> Words:
        """From the packed tokens' word ids (N,), -1 for no word."""
        device = word_ids.device
        valid = (word_ids >= 0) & (word_ids < num_words)
        spare = len(tokens.lengths) * num_words  # the slot of tokens that belong to no word
        slot = torch.where(valid, tokens.segment * num_words + word_ids, spare)
        present = torch.zeros(spare + 1, dtype=torch.bool, device=device).index_fill(0, slot, True)[:-1]
        words = Packing(present.view(len(tokens.lengths), num_words))
        row_of_slot = torch.full((spare + 1,), len(words.index), dtype=torch.long, device=device)
        row_of_slot = row_of_slot.index_copy(0, words.index, torch.arange(len(words.index), device=device))
        return cls(words, row_of_slot[slot])


@dataclass
class Layout:
    """Where a batch's real tokens sit in its (B, T) grid, and for per-word outputs its words."""

    tokens: Packing
    words: Words | None = None

    @classmethod
    def of(cls, mask: torch.Tensor, word_ids: torch.Tensor | None = None, num_words: int | None = None) -> Layout:
        """From the token mask (B, T) and, for `num_words` words per sequence, the padded word ids (B, T)."""
        tokens = Packing(mask)
        if word_ids is None or num_words is None:
            return cls(tokens)
        return cls(tokens, Words.of(tokens, tokens.pack(word_ids), num_words))

    @classmethod
    def of_batch(cls, batch: dict[str, Any]) -> Layout:
        """A collated batch's layout: the one it carries (`layout_tensors`), else found now."""
        if TOKEN_INDEX not in batch:
            return cls(Packing(batch["mask"]))
        tokens = Packing(batch["mask"], batch[TOKEN_INDEX], Bins(batch[BIN_SLOT], batch[BIN_SEGMENTS]))
        if WORD_MASK not in batch:
            return cls(tokens)
        return cls(tokens, Words(Packing(batch[WORD_MASK], batch[WORD_INDEX]), batch[TOKEN_WORD]))


TOKEN_INDEX, BIN_SLOT, BIN_SEGMENTS = "token_index", "bin_slot", "bin_segments"
WORD_MASK, WORD_INDEX, TOKEN_WORD = "word_mask", "word_index", "token_word"
# a batch's entries that hold its layout
LAYOUT_KEYS = (TOKEN_INDEX, BIN_SLOT, BIN_SEGMENTS, WORD_MASK, WORD_INDEX, TOKEN_WORD)


def layout_tensors(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The layout of a collated batch as tensors to carry in it (found here, on the batch's device: the CPU),
    its words' too when its labels are per word."""
    labels = batch.get("labels")
    per_word = labels is not None and labels.dim() == 2 and "word_ids" in batch
    layout = Layout.of(batch["mask"], batch.get("word_ids"), labels.shape[1] if per_word else None)
    bins = layout.tokens.bins
    tensors = {TOKEN_INDEX: layout.tokens.index, BIN_SLOT: bins.grid.index, BIN_SEGMENTS: bins.segments}
    if layout.words is not None:
        tensors.update({WORD_MASK: layout.words.packing.mask, WORD_INDEX: layout.words.packing.index,
                        TOKEN_WORD: layout.words.of_token})
    return tensors
