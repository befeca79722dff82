"""Sequence-context blocks between a head's layer mixer and its classifier: each token's vector is recomputed
from the whole sentence. `bilstm` is the feature-based recipe of the BERT paper (a BiLSTM over frozen layers,
within 0.3 dev F1 of fine-tuning on CoNLL-2003 NER); `transformer` is one or two small encoder layers.

Both take a batch's packed tokens (heads.packing) and return them recomputed; each lays them out as it needs: the
LSTM on the padded grid (packed sequences), the transformer on the batch's bins (a token attends only to its
own sequence's). Either way a sentence gets the same output in any batch: store-trained heads predict the same
on the live encoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .layers import Linear
from .packing import Packing


class ConcatLayers(nn.Module):
    """The head's layers side by side: packed (N, L, H) -> (N, L*H) (the BERT paper's best: the top four)."""

    def forward(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        return hidden.flatten(1)


class BiLSTMContext(nn.Module):
    def __init__(self, input_size: int, width: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, width, num_layers=num_layers, batch_first=True, bidirectional=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.output_size = 2 * width

    def forward(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """tokens (N, D), each sequence's real tokens first in its row of the padded grid -> (N, 2 * width)."""
        grid = packing.unpack(tokens)
        sequences = pack_padded_sequence(grid, packing.lengths.clamp(min=1).cpu(), batch_first=True,
                                         enforce_sorted=False)
        output, _ = pad_packed_sequence(self.lstm(sequences)[0], batch_first=True, total_length=grid.shape[1])
        return self.dropout(packing.pack(output))


class TransformerContext(nn.Module):
    def __init__(self, input_size: int, model_size: int, num_layers: int, num_heads: int, feedforward: int,
                 dropout: float) -> None:
        super().__init__()
        # concatenated layers are projected to the encoder's width first
        self.projection = Linear(input_size, model_size) if input_size != model_size else nn.Identity()
        layer = nn.TransformerEncoderLayer(model_size, num_heads, feedforward, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.output_size = model_size

    def forward(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        """tokens (N, D) -> (N, model_size)."""
        bins = packing.bins
        heads = self.encoder.layers[0].self_attn.num_heads
        hidden = self.encoder(bins.unpack(self.projection(tokens)),
                              mask=~bins.mask.repeat_interleave(heads, dim=0))  # True: may not attend
        return bins.pack(hidden)
