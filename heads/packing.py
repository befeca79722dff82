"""Packed tokens: a batch's real tokens side by side, without the padding.

A padded batch (B, T, ...) of short and long sequences holds mostly padding: shuffled batches of 32 CoNLL-2003
sentences have 2.6 positions per real token, and a head computes every one. Packed, the same batch is the
(N, ...) rows of its real tokens in row-major order (sequence by sequence), and the padded mask (B, T) says
where each came from. Everything that acts on one token at a time (layer mixing, feed-forward blocks,
dropout, the classifier) runs on the packed rows; what mixes tokens of a sequence (a layer's mean over the
sentence, token self-attention, an LSTM) either reduces by sequence (`segment_mean`) or unpacks to the padded
grid for just that step. The batch's sequences stay what they were, so results are those of the padded batch.
"""

from __future__ import annotations

import torch


class Packing:
    """Where a batch's real tokens sit in its padded (B, T) grid: `mask` True on real tokens."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.index = mask.reshape(-1).nonzero().squeeze(1)  # (N,): b * T + t of each real token
        self.segment = self.index // mask.shape[1]  # (N,): the sequence b each real token belongs to
        self.lengths = mask.sum(1)  # (B,)

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


def is_packed(hidden: torch.Tensor) -> bool:
    """Head inputs are (B, T, L, H) padded or (N, L, H) packed."""
    return hidden.dim() == 3
