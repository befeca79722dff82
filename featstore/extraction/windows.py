"""Splitting sequences longer than the encoder's maximum into overlapping windows.

The rule (format spec, "Windows"), versioned as `WINDOW_RULE`:

1. Content tokens (special tokens excluded) are grouped into *units*: the subword
   tokens of one word. Windows start and end on unit boundaries, so every word lies
   wholly inside at least one window.
2. Window 0 starts at the first token and takes as many whole units as fit in the
   content budget (max length minus the tokenizer's special tokens). Each next window
   starts at the first unit boundary at or after ``end - stride`` (``stride`` is the
   number of overlapping tokens, as in Hugging Face tokenizers) that is past the
   previous start.
3. Each word takes its vectors from exactly one window: the one where it has the
   most context, i.e. the largest ``min(tokens before it, tokens after it)`` inside
   the window; ties go to the earlier window.
4. Leading special tokens come from the first window, trailing ones from the last.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, CorpusError

WINDOW_RULE = "word-aligned-max-context/1"


def word_units(word_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open token spans of consecutive tokens that share a word id."""
    units: list[tuple[int, int]] = []
    start = 0
    for position in range(1, len(word_ids) + 1):
        if position == len(word_ids) or word_ids[position] != word_ids[start]:
            units.append((start, position))
            start = position
    return units


def plan_windows(word_ids: Sequence[int], budget: int, stride: int, truncate: bool = False
                 ) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Windows over a sequence's content tokens and the window each token is taken from.

    Returns ``(windows, token_window)``: half-open content-token spans, and for every
    kept content token the index of its window. With ``truncate`` only the first window
    is kept and tokens past it are dropped (``token_window`` is then shorter).
    """
    if budget < 1:
        raise ConfigError(f"max length leaves no room for content tokens (budget {budget})")
    if not 0 <= stride < budget:
        raise ConfigError(f"stride (overlap) must be in 0..{budget - 1} tokens for a window of {budget} "
                             f"content tokens, got {stride}")
    units = word_units(word_ids)
    n_tokens = len(word_ids)
    windows: list[tuple[int, int]] = []
    first_unit = 0
    while True:
        start = units[first_unit][0]
        last_unit = first_unit
        while last_unit < len(units) and units[last_unit][1] - start <= budget:
            last_unit += 1
        if last_unit == first_unit:
            length = units[first_unit][1] - units[first_unit][0]
            raise CorpusError(f"a single word of {length} subword tokens does not fit in a window of "
                                 f"{budget} content tokens; raise --max-length or clean the input")
        end = units[last_unit - 1][1]
        windows.append((start, end))
        if end == n_tokens or truncate:
            break
        next_unit = first_unit + 1
        while units[next_unit][0] < end - stride:
            next_unit += 1
        first_unit = next_unit
    if truncate:
        return windows, np.zeros(windows[0][1], dtype=np.int16)
    return windows, _assign(units, windows, n_tokens)


def _assign(units: list[tuple[int, int]], windows: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
    token_window = np.empty(n_tokens, dtype=np.int16)
    first_candidate = 0
    for unit_start, unit_end in units:
        while windows[first_candidate][1] < unit_end:
            first_candidate += 1
        best, best_context = first_candidate, -1
        for index in range(first_candidate, len(windows)):
            window_start, window_end = windows[index]
            if window_start > unit_start:
                break
            context = min(unit_start - window_start, window_end - unit_end)
            if context > best_context:
                best, best_context = index, context
        token_window[unit_start:unit_end] = best
    return token_window
