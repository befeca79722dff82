"""Building blocks shared by the heads: dropout, head-averaged attention weights and pooling.

Shapes: B batch, T tokens, L layers, H hidden, W words, d attention dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

# While heads step as one batched module (heads/grouped.py): each head's random generator and the head's index
# (a tensor batched over the heads), so every head's dropout masks come from its own stream
_MASK_STREAMS: ContextVar[tuple[Sequence[torch.Generator], torch.Tensor] | None] = ContextVar("mask_streams",
                                                                                              default=None)


@contextmanager
def mask_streams(generators: Sequence[torch.Generator], head_index: torch.Tensor) -> Iterator[None]:
    """Dropout inside the block draws head k's masks from generators[k] (`head_index`: k, batched under vmap)."""
    token = _MASK_STREAMS.set((generators, head_index))
    try:
        yield
    finally:
        _MASK_STREAMS.reset(token)


class Dropout(nn.Module):
    """Inverted dropout whose masks are drawn explicitly (`bernoulli_` from the current random stream), so that
    heads batched into one module (heads/grouped.py) draw from each head's own stream exactly the masks it draws
    when it trains alone."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        streams = _MASK_STREAMS.get()
        if streams is None:
            return x * torch.empty_like(x).bernoulli_(keep).div_(keep)
        generators, head_index = streams  # x is one head's slice here: draw every head's mask, take this head's
        masks = torch.empty((len(generators), *x.shape), dtype=x.dtype, device=x.device)
        for mask, generator in zip(masks, generators):
            mask.bernoulli_(keep, generator=generator)
        return x * masks.div_(keep)[head_index]

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AttentionWeights(nn.Module):
    """Multi-head scaled dot-product attention that returns only the head-averaged weights.

    The adapter uses the weights directly to mix full H-dim vectors (no value projection).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """queries (B, Q, d), keys (B, K, d), key_mask (B, K) True = attend -> weights (B, Q, K)."""
        batch, n_queries, dim = queries.shape
        head_dim = dim // self.num_heads
        q = self.query(queries).view(batch, n_queries, self.num_heads, head_dim).transpose(1, 2)
        k = self.key(keys).view(batch, keys.shape[1], self.num_heads, head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / head_dim**0.5  # (B, heads, Q, K)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1).mean(dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over `dim` of the positions where mask is True (mask broadcast to values)."""
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    return (values * weights).sum(dim) / weights.sum(dim).clamp(min=1)


def pool_words(tokens: torch.Tensor, word_ids: torch.Tensor, num_words: int, pooling: str) -> torch.Tensor:
    """Per-word vectors (B, W, D) from per-token ones (B, T, D) by word id (-1 = no word):
    the first subword of each word, or the mean of its subwords."""
    batch, _, dim = tokens.shape
    valid = word_ids >= 0
    index = word_ids.clamp(min=0)
    if pooling == "first":
        positions = torch.arange(word_ids.shape[1], device=tokens.device).expand_as(word_ids)
        first = torch.full((batch, num_words), word_ids.shape[1] - 1, device=tokens.device, dtype=torch.long)
        first = first.scatter_reduce(1, index, positions.masked_fill(~valid, word_ids.shape[1] - 1), "amin")
        return tokens.gather(1, first.unsqueeze(-1).expand(batch, num_words, dim))
    if pooling == "mean":
        sums = tokens.new_zeros(batch, num_words, dim)
        sums.scatter_add_(1, index.unsqueeze(-1).expand_as(tokens), tokens * valid.unsqueeze(-1))
        counts = tokens.new_zeros(batch, num_words).scatter_add_(1, index, valid.to(tokens.dtype))
        return sums / counts.clamp(min=1).unsqueeze(-1)
    raise ValueError(f"unknown word pooling {pooling!r}; choose first or mean")


class SequencePooling(nn.Module):
    """One vector per sequence from its tokens: the first token, the mean, or learned attention."""

    def __init__(self, pooling: str, dim: int) -> None:
        super().__init__()
        if pooling not in ("first", "mean", "attention"):
            raise ValueError(f"unknown sequence pooling {pooling!r}; choose first, mean or attention")
        self.pooling = pooling
        self.scorer = nn.Linear(dim, 1) if pooling == "attention" else None

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "first":
            return tokens[:, 0]
        if self.pooling == "mean":
            return masked_mean(tokens, mask, dim=1)
        scores = self.scorer(tokens).squeeze(-1).masked_fill(~mask, torch.finfo(tokens.dtype).min)
        return (scores.softmax(dim=-1).unsqueeze(-1) * tokens).sum(dim=1)
