"""The ConvNet Playground search score: how many of a query's top 15 results share its class,
weighted by rank.

Rank k (1..15) weighs (16 - k) / 15; the score is 100 * the weighted share of same-class
results. All 15 alike is 100; only rank 1 is 12.5; only rank 15 is 0.833.
"""

from collections.abc import Sequence

TOP = 15


def search_score(query_label: str, ranked_labels: Sequence[str]) -> float:
    """Score in percent for the labels of the results ranked best first, the query excluded.

    Uses the first 15 results; with fewer (a dataset under 16 items), the weights of the ranks
    that exist.
    """
    ranks = list(ranked_labels)[:TOP]
    if not ranks:
        return 0.0
    weights = [(TOP + 1 - k) / TOP for k in range(1, len(ranks) + 1)]
    hits = sum(w for w, label in zip(weights, ranks, strict=True) if label == query_label)
    return 100.0 * hits / sum(weights)
