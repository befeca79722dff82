"""Building blocks shared by the heads: dropout, linear maps (in their training precision), head-averaged attention
weights and pooling.

Shapes: B batch, T tokens, N real (packed) tokens, L layers, H hidden, W words, d attention dim.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from itertools import pairwise

import torch
from torch import nn

from .packing import Words

# While heads step as one batched module (heads/grouped.py): each head's random generator and the head's index
# (a tensor batched over the heads), so every head's dropout masks come from its own stream; `linear` reads
# whether it is set
_BATCHED_HEADS: ContextVar[tuple[Sequence[torch.Generator], torch.Tensor] | None] = ContextVar("batched_heads",
                                                                                               default=None)


@contextmanager
def batched_heads(generators: Sequence[torch.Generator], head_index: torch.Tensor) -> Iterator[None]:
    """The block computes one head's slice of heads batched under vmap: dropout draws head k's masks from
    generators[k] (`head_index`: k, batched under vmap), and narrow linear maps take their batched form
    (`linear`)."""
    token = _BATCHED_HEADS.set((generators, head_index))
    try:
        yield
    finally:
        _BATCHED_HEADS.reset(token)


# Linear maps of batched heads with fewer outputs than this are narrow (`linear`), measured on a 2-core AVX-512 CPU
# (MKL) by tools/bench_linear_layouts.py (BENCHMARKS.md, "Speed"): below 16 outputs (one AVX-512 vector of floats)
# the batched form ran 1.8-3.1x faster where the input needs no gradient (a probe's frozen features) and
# 1.02-1.4x where it does; from 16 to 33 outputs 1.03-1.24x faster where it needs none but 1.07-1.5x slower where
# it does, which a map cannot tell under vmap (a batched input does not show its requires_grad); at 64, no faster
NARROW_OUTPUTS = 16

# On a CPU a lower training precision pays only in wide products: on a 2-core AVX512-BF16 CPU a (N, 384) x (384, 384)
# product ran twice as fast in bfloat16, while the heads' narrow ones (the attention's 16-wide projections: 14x) and
# the layer mixes ran slower, so that under autocast the adapter's epoch took 1.7-2.1x as long (BENCHMARKS.md,
# "Speed", runs 11 and 13). So there `training_precision` applies to the linear maps with at least this many inputs
# and outputs (`linear`), and on a GPU to all that autocast casts.
WIDE_FEATURES = 128
# Rows of such a product are padded to a multiple of this: the CPU's bfloat16 kernels (oneDNN) are built once per
# shape and cached, and a packed batch's token count changes every step.
ROW_MULTIPLE = 16
# The precision of the wide linear maps of a head's forward pass on a CPU (training_precision)
_WIDE_PRECISION: ContextVar[torch.dtype | None] = ContextVar("wide_precision", default=None)


@contextmanager
def training_precision(device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """A head's forward pass with its matrix products in `dtype` (None: float32 throughout): on a GPU, whatever
    torch.autocast casts; on a CPU, the wide linear maps alone (WIDE_FEATURES: the adapter's tailor feed-forward, an
    mlp probe's hidden layer), computed in `dtype` and returned in float32. Weights, losses and gradients stay
    float32 either way."""
    if dtype is None:
        yield
    elif device_type != "cpu":
        with torch.autocast(device_type, dtype):
            yield
    else:
        token = _WIDE_PRECISION.set(dtype)
        try:
            yield
        finally:
            _WIDE_PRECISION.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`nn.functional.linear(x, weight, bias)`, on a CPU computed the faster way where that is known:
    - a wide map in the training precision (`training_precision`): `linear_in`;
    - a narrow map (a classifier's few labels: NARROW_OUTPUTS) of heads batched (`batched_heads`): as
      (weight @ x^T)^T. vmap turns a linear map into a batched product (K, N, H) x (K, H, C), and with C narrow the
      CPU's batched product (and its weight gradient, (K, H, N) x (K, N, C)) ran up to 3x slower than the same
      arithmetic laid out as (K, C, H) x (K, H, N). One head alone is faster as `linear` (a plain matrix product)."""
    # a compiled head reads no context variable (it would break the graph): it steps alone, in float32 on a CPU
    # (the trainer refuses --compile with a lower precision there)
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        return nn.functional.linear(x, weight, bias)
    wide_precision = _WIDE_PRECISION.get()
    if wide_precision is not None and min(weight.shape) >= WIDE_FEATURES:
        return linear_in(wide_precision, x, weight, bias)
    if weight.shape[0] < NARROW_OUTPUTS and _BATCHED_HEADS.get() is not None:
        return linear_by_rows(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def linear_by_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`nn.functional.linear(x, weight, bias)` as (weight @ x^T)^T: `linear`'s form for narrow maps of batched
    heads (and what tools/bench_linear_layouts.py times against `nn.functional.linear`)."""
    rows = (weight @ x.mT).mT
    return rows + bias if bias is not None else rows


def linear_in(dtype: torch.dtype, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`nn.functional.linear(x, weight, bias)` computed in `dtype` (the kernels accumulate in float32) and returned in
    x's dtype, its rows padded with zeros to a multiple of ROW_MULTIPLE for the product (so a few shapes recur);
    the gradients reach x, weight and bias in their own dtypes."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    padded = nn.functional.pad(rows.to(dtype), (0, 0, 0, -count % ROW_MULTIPLE))
    product = nn.functional.linear(padded, weight.to(dtype), bias.to(dtype) if bias is not None else None)
    return product[:count].to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (the same parameters and saved names) computed by `linear`: on the CPU, a wide map in the training
    precision and a narrow map (a classifier) of batched heads in the faster layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


KEEP_LEVELS = 1 << 15  # a dropout mask's keep rate is a multiple of 1/KEEP_LEVELS (15 random bits per element)


def keep_mask(shape: torch.Size, keep: float, device: torch.device, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Inverted-dropout multipliers (0 or 1/rate, rate = `keep` to 1/32768) of `shape`, from `generator`'s stream.

    Each element takes 15 bits of a 64-bit random word, four elements a word: on a CPU, random numbers are drawn
    one at a time, and `bernoulli_` draws one per element (it took a fifth of an adapter's training step)."""
    count = shape.numel()
    words = torch.empty(-(-count // 4), dtype=torch.int64, device=device).random_(generator=generator)
    levels = words.view(torch.int16)[:count].view(shape) & (KEEP_LEVELS - 1)  # 63 random bits: 15 per lane
    threshold = max(round(keep * KEEP_LEVELS), 1)
    if threshold == KEEP_LEVELS:
        return torch.ones(shape, device=device)
    # kept where levels < threshold: the sign of levels - threshold, in int16 arithmetic (a comparison to bool and
    # bool -> float ran 5x slower on the CPU than these integer operations)
    kept = ((levels - threshold) >> 15).neg_()  # 1 kept, 0 dropped
    return kept.float().mul_(KEEP_LEVELS / threshold)


class Dropout(nn.Module):
    """Inverted dropout whose masks are drawn explicitly (`keep_mask`, from the current random stream), so that
    heads batched into one module (heads/grouped.py) draw from each head's own stream exactly the masks it draws
    when it trains alone."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if torch.compiler.is_compiling():  # a compiled head (--compile) steps alone: the compiler's own masks
            return nn.functional.dropout(x, self.p, True)
        keep = 1 - self.p
        streams = _BATCHED_HEADS.get()
        if streams is None:
            return x * keep_mask(x.shape, keep, x.device).to(x.dtype)
        generators, head_index = streams  # x is one head's slice here: draw every head's mask, take this head's
        masks = torch.stack([keep_mask(x.shape, keep, x.device, generator) for generator in generators])
        return x * masks.to(x.dtype)[head_index]

    def extra_repr(self) -> str:
        return f"p={self.p}"


def mix_layers(weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """sum_l weights[n, l] * hidden[n, l] -> (N, H), for weights (N, L) per token or (L,) shared, hidden (N, L, H):
    one batched matrix product. (`einsum` with shared weights copied the (N, L, H) features first: a scalar mix's
    forward and backward took 6x as long, BENCHMARKS.md "Speed".)"""
    rows = weights.expand(hidden.shape[0], -1) if weights.dim() == 1 else weights
    return torch.bmm(rows.unsqueeze(1), hidden).squeeze(1)


def chained_linear(x: torch.Tensor, *maps: nn.Linear) -> torch.Tensor:
    """x through linear maps applied one after another, computed as their product when that is cheaper per row:
    the same function, and each map's gradient is the same (exactly so in exact arithmetic), with the arithmetic
    of one map from the first one's inputs to the last one's outputs. A chain H -> 256 -> C (the adapter's
    classifier) was a tenth of the adapter's training FLOPs (BENCHMARKS.md, "Speed")."""
    sizes = [maps[0].in_features, *(each.out_features for each in maps)]
    chained = sum(width * height for width, height in pairwise(sizes))
    if sizes[0] * sizes[-1] >= chained:
        for each in maps:
            x = linear(x, each.weight, each.bias)
        return x
    weight, bias = maps[0].weight, maps[0].bias
    for each in maps[1:]:
        bias = each(bias) if bias is not None else each.bias
        weight = each.weight @ weight
    return linear(x, weight, bias)


class LinearChain(nn.Sequential):
    """Linear maps with nothing between them (`chained_linear`): a Sequential of nn.Linear, so its parameters and
    saved names are a Sequential's."""

    def __init__(self, *maps: nn.Linear) -> None:
        super().__init__(*maps)

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chained_linear(x, *self)


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

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """queries (B, Q, d), keys (B, K, d), mask (B, Q, K) True = attend -> weights (B, Q, K)."""
        batch, n_queries, dim = queries.shape
        head_dim = dim // self.num_heads
        q = self.query(queries).view(batch, n_queries, self.num_heads, head_dim).transpose(1, 2)
        k = self.key(keys).view(batch, keys.shape[1], self.num_heads, head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / head_dim**0.5  # (B, heads, Q, K)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1).mean(dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over `dim` of the positions where mask is True (mask broadcast to values)."""
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    return (values * weights).sum(dim) / weights.sum(dim).clamp(min=1)


def pool_words(tokens: torch.Tensor, words: Words, pooling: str) -> torch.Tensor:
    """Per-word vectors (Nw, D), packed as `words.packing`, from packed per-token ones (N, D): the first subword
    of each word, or the mean of its subwords."""
    count, rows = len(tokens), len(words.packing.index)
    if pooling == "first":
        positions = torch.arange(count, device=tokens.device)
        first = torch.full((rows + 1,), count, dtype=torch.long, device=tokens.device)
        return tokens.index_select(0, first.scatter_reduce(0, words.of_token, positions, "amin")[:-1])
    if pooling == "mean":
        sums = tokens.new_zeros((rows + 1, tokens.shape[1])).index_add(0, words.of_token, tokens)[:-1]
        counts = tokens.new_zeros(rows + 1).index_add(0, words.of_token, tokens.new_ones(count))[:-1]
        return sums / counts.unsqueeze(1)
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
