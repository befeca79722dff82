"""Layer mixers: from each real token's per-layer hidden states, packed (N, L, H), to one vector per token (N, H)
(heads.packing: the batch's tokens without its padding; `packing` says which sequence each belongs to).

- `SelectLayer` — a single layer (linear probe, MLP probe).
- `ScalarMix` — softmax-weighted sum of layers times a scale (ELMo).
- `AttentionFusion` — one learned query over layers (design notes section 4, after Cao et al. 2022).
- `LayerAttention` + `Tailor` — the adapter of Basirat 2024 (design notes sections 1-2).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import AttentionWeights, Dropout, Linear, mix_layers
from .packing import Packing


class SelectLayer(nn.Module):
    def forward(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        return hidden[:, 0]


class ScalarMix(nn.Module):
    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        return self.scale * mix_layers(self.weights.softmax(0), hidden)


class AttentionFusion(nn.Module):
    """LayerNorm over each token's L x H block, dropout, a[t, l] = softmax_l(X[t, l] . q), GELU(sum_l a X)."""

    def __init__(self, num_layers: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm([num_layers, hidden_size])
        self.dropout = Dropout(dropout)
        self.query = nn.Parameter(torch.randn(hidden_size) / hidden_size**0.5)

    def forward(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        normed = self.dropout(self.norm(hidden))
        weights = (normed @ self.query).softmax(dim=-1)  # (N, L)
        return nn.functional.gelu(mix_layers(weights, normed))


class LayerAttention(nn.Module):
    """Token-layer attention: each token picks its own mixture of layers, conditioned on the sentence.

    Query per token = mean of its L layer vectors; key per layer = masked mean of that layer over the
    sentence's real tokens (so results do not depend on batch padding); both projected H -> d. The
    head-averaged weights a[t, l] mix the full vectors: r[t] = sum_l a[t, l] X[t, l].
    """

    def __init__(self, hidden_size: int, attention_dim: int, num_heads: int) -> None:
        super().__init__()
        self.query_projection = nn.Linear(hidden_size, attention_dim)
        self.key_projection = nn.Linear(hidden_size, attention_dim)
        self.attention = AttentionWeights(attention_dim, num_heads)
        self.last_weights: torch.Tensor | None = None  # (B, T, L) of the last forward in eval mode

    def forward(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        layer_mean = mix_layers(hidden.new_full((hidden.shape[1],), 1 / hidden.shape[1]), hidden)
        queries = self.query_projection(layer_mean)  # (N, d)
        keys = self.key_projection(packing.segment_mean(hidden))  # (B, L, d)
        # each token's query against its own sequence's layer keys: a one-query attention per token
        attention = self.attention(queries[:, None], keys.index_select(0, packing.segment))[:, 0]  # (N, L)
        if not self.training:  # inspected on trained heads (heads.report); training may run batched under vmap
            self.last_weights = packing.unpack(attention.detach())
        return mix_layers(attention, hidden)


class Tailor(nn.Module):
    """Residual feed-forward, then (optionally) token self-attention mixing full vectors; added back to r."""

    def __init__(self, hidden_size: int, attention_dim: int, num_heads: int, dropout: float,
                 attention: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.feed_forward = Linear(hidden_size, hidden_size)  # wide: in the training precision on a CPU too
        self.dropout = Dropout(dropout)
        if attention:
            self.query_projection = nn.Linear(hidden_size, attention_dim)
            self.key_projection = nn.Linear(hidden_size, attention_dim)
            self.attention = AttentionWeights(attention_dim, num_heads)
        else:
            self.attention = None

    def forward(self, r: torch.Tensor, packing: Packing) -> torch.Tensor:
        x = r + torch.relu(self.dropout(self.feed_forward(self.norm(r))))
        if self.attention is not None:  # tokens attend within their sequence, the sequences side by side in bins
            x = self.dropout(x)
            bins = packing.bins
            queries, keys = bins.unpack(self.query_projection(x)), bins.unpack(self.key_projection(x))
            weights = self.attention(queries, keys, bins.mask)  # (R, width, width), zero across sequences
            x = bins.pack(weights @ bins.unpack(x))
        return r + x


class AdapterMixer(nn.Module):
    def __init__(self, hidden_size: int, attention_dim: int, num_heads: int, dropout: float, enable_tailor: bool,
                 tailor_attention: bool) -> None:
        super().__init__()
        self.aggregator = LayerAttention(hidden_size, attention_dim, num_heads)
        self.tailor = Tailor(hidden_size, attention_dim, num_heads, dropout, tailor_attention) if enable_tailor \
            else None

    def forward(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        r = self.aggregator(hidden, packing)
        return self.tailor(r, packing) if self.tailor is not None else r
