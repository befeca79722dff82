import itertools

import numpy as np
import pytest

from featstore.errors import ConfigError, CorpusError
from featstore.extraction.windows import plan_windows, word_units


def _word_ids(lengths):
    return [word for word, length in enumerate(lengths) for _ in range(length)]


@pytest.mark.parametrize("lengths,budget,stride", [
    ([1] * 30, 8, 3), ([2, 1, 3, 1, 1, 2, 2, 1, 3, 1] * 3, 7, 2), ([3] * 10, 6, 0), ([1, 5, 1, 5, 1], 6, 5)])
def test_every_word_takes_all_its_tokens_from_one_window_that_contains_it(lengths, budget, stride):
    word_ids = _word_ids(lengths)
    windows, token_window = plan_windows(word_ids, budget, stride)
    assert windows[0][0] == 0 and windows[-1][1] == len(word_ids)
    assert all(end - start <= budget for start, end in windows)
    assert all(b[0] > a[0] and b[0] <= a[1] for a, b in itertools.pairwise(windows))
    for start, end in word_units(word_ids):
        chosen = set(token_window[start:end].tolist())
        assert len(chosen) == 1
        window_start, window_end = windows[chosen.pop()]
        assert window_start <= start and end <= window_end


def test_word_goes_to_the_window_where_it_has_most_context():
    word_ids = list(range(12))  # one token per word
    windows, token_window = plan_windows(word_ids, budget=8, stride=4)
    assert windows == [(0, 8), (4, 12)]
    # token 5: context min(5, 2)=2 in window 0, min(1, 6)=1 in window 1 -> window 0; token 6 -> window 1
    assert token_window.tolist() == [0] * 6 + [1] * 6


def test_short_sequence_is_one_window():
    windows, token_window = plan_windows([0, 0, 1, 2], budget=10, stride=2)
    assert windows == [(0, 4)]
    assert np.all(token_window == 0)


def test_truncate_keeps_only_the_first_window():
    windows, token_window = plan_windows(list(range(20)), budget=8, stride=2, truncate=True)
    assert windows == [(0, 8)]
    assert len(token_window) == 8


def test_word_longer_than_a_window_is_a_clear_error():
    with pytest.raises(CorpusError, match="single word of 9 subword tokens"):
        plan_windows(_word_ids([2, 9, 1]), budget=8, stride=2)


def test_stride_must_leave_progress():
    with pytest.raises(ConfigError, match="stride"):
        plan_windows(list(range(20)), budget=8, stride=8)
