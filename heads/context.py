"""Sequence-context blocks between a head's layer mixer and its classifier: each token's vector is recomputed
from the whole sentence. `bilstm` is the feature-based recipe of the BERT paper (a BiLSTM over frozen layers,
within 0.3 dev F1 of fine-tuning on CoNLL-2003 NER); `transformer` is one or two small encoder layers.

Both are padding-invariant (packed LSTM; attention masks padded keys), so a sentence gets the same output in
any batch: store-trained heads predict the same on the live encoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, D), mask (B, T) with real tokens first -> (B, T, 2 * width), zeros on padding."""
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(tokens, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=tokens.shape[1])
        return self.dropout(output)


class TransformerContext(nn.Module):
    def __init__(self, input_size: int, model_size: int, num_layers: int, num_heads: int, feedforward: int,
                 dropout: float) -> None:
        super().__init__()
        # concatenated layers are projected to the encoder's width first
        self.projection = nn.Linear(input_size, model_size) if input_size != model_size else nn.Identity()
        layer = nn.TransformerEncoderLayer(model_size, num_heads, feedforward, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.output_size = model_size

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.projection(tokens), src_key_padding_mask=~mask)
