"""Layer mixers: from a token's per-layer hidden states (B, T, L, H) to one vector per token (B, T, H).

- `SelectLayer` — a single layer (linear probe, MLP probe).
- `ScalarMix` — softmax-weighted sum of layers times a scale (ELMo).
- `AttentionFusion` — one learned query over layers (design notes section 4, after Cao et al. 2022).
- `LayerAttention` + `Tailor` — the adapter of Basirat 2024 (design notes sections 1-2).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import AttentionWeights, Dropout


class SelectLayer(nn.Module):
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden[:, :, 0]


class ScalarMix(nn.Module):
    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.einsum("btlh,l->bth", hidden, self.weights.softmax(0))


class AttentionFusion(nn.Module):
    """LayerNorm over each token's L x H block, dropout, a[t, l] = softmax_l(X[t, l] . q), GELU(sum_l a X)."""

    def __init__(self, num_layers: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm([num_layers, hidden_size])
        self.dropout = Dropout(dropout)
        self.query = nn.Parameter(torch.randn(hidden_size) / hidden_size**0.5)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        normed = self.dropout(self.norm(hidden))
        weights = (normed @ self.query).softmax(dim=-1)  # (B, T, L)
        return nn.functional.gelu(torch.einsum("btl,btlh->bth", weights, normed))


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

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = self.query_projection(hidden.mean(dim=2))  # (B, T, d)
        weights = mask.to(hidden.dtype)
        layer_means = torch.einsum("bt,btlh->blh", weights, hidden) / weights.sum(1).clamp(min=1)[:, None, None]
        keys = self.key_projection(layer_means)  # (B, L, d)
        attention = self.attention(queries, keys) * mask[:, :, None]  # padded tokens get zero weight
        if not self.training:  # inspected on trained heads (heads.report); training may run batched under vmap
            self.last_weights = attention.detach()
        return torch.einsum("btl,btlh->bth", attention, hidden)


class Tailor(nn.Module):
    """Residual feed-forward, then (optionally) token self-attention mixing full vectors; added back to r."""

    def __init__(self, hidden_size: int, attention_dim: int, num_heads: int, dropout: float,
                 attention: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Linear(hidden_size, hidden_size)
        self.dropout = Dropout(dropout)
        if attention:
            self.query_projection = nn.Linear(hidden_size, attention_dim)
            self.key_projection = nn.Linear(hidden_size, attention_dim)
            self.attention = AttentionWeights(attention_dim, num_heads)
        else:
            self.attention = None

    def forward(self, r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = r + torch.relu(self.dropout(self.feed_forward(self.norm(r))))
        if self.attention is not None:
            x = self.dropout(x)
            weights = self.attention(self.query_projection(x), self.key_projection(x), key_mask=mask)
            x = weights @ x
        return r + x


class AdapterMixer(nn.Module):
    def __init__(self, hidden_size: int, attention_dim: int, num_heads: int, dropout: float, enable_tailor: bool,
                 tailor_attention: bool) -> None:
        super().__init__()
        self.aggregator = LayerAttention(hidden_size, attention_dim, num_heads)
        self.tailor = Tailor(hidden_size, attention_dim, num_heads, dropout, tailor_attention) if enable_tailor \
            else None

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r = self.aggregator(hidden, mask)
        return self.tailor(r, mask) if self.tailor is not None else r
