"""The search score formula on hand-made rankings."""

import pytest

from convsearch.scoring import search_score


@pytest.mark.parametrize("ranked, expected", [
    (["a"] * 15, 100.0),
    (["b"] * 15, 0.0),
    (["a"] + ["b"] * 14, 12.5),
    (["b"] * 14 + ["a"], 100 / 120),
    (["a"] * 15 + ["b"] * 5, 100.0),  # only the top 15 count
    (["a", "b"], 100 * 1 / (1 + 14 / 15)),  # fewer than 16 items: the ranks there are
    ([], 0.0),
])
def test_search_score(ranked, expected):
    assert search_score("a", ranked) == pytest.approx(expected)
