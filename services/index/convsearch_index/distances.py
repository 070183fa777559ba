"""Distances: which metrics hnswlib serves, and exact k-nearest search for every metric in
blocks, so memory stays bounded whatever the collection's size."""

from collections.abc import Callable, Sequence

import numpy as np

from convsearch.embedding import minkowski_p_of
from convsearch.errors import InvalidArgument, shown

METRICS = ("cosine", "euclidean", "sqeuclidean", "ip", "manhattan", "chebyshev", "minkowski")
# Metrics hnswlib can index, and the space it knows them by.
HNSW_SPACES = {"cosine": "cosine", "euclidean": "l2", "sqeuclidean": "l2", "ip": "ip"}
_BLOCK_VALUES = 1 << 23  # float64s per temporary array of the elementwise metrics (64 MiB)


def check_metric(metric: str, p: float) -> None:
    """INVALID_ARGUMENT for an unknown metric or a minkowski p that is not a finite number from 1
    to MAX_MINKOWSKI_P (NaN, infinite, 0, 1e300)."""
    if metric not in METRICS:
        raise InvalidArgument(f"unknown metric {shown(metric)}; use one of {', '.join(METRICS)}",
                              reason="METRIC_UNKNOWN", metadata={"metric": metric})
    minkowski_p_of(metric, p)


def from_hnsw(distances: np.ndarray, metric: str) -> np.ndarray:
    """hnswlib's distances in the metric's own units (its l2 is squared), never below zero
    (float32 rounding makes near-parallel vectors come out slightly negative)."""
    if metric == "ip":
        return distances
    distances = np.maximum(distances, 0) + 0.0  # + 0.0 turns -0.0 into 0.0
    return np.sqrt(distances) if metric == "euclidean" else distances


def pairwise(queries: np.ndarray, vectors: np.ndarray, metric: str, p: float = 2.0) -> np.ndarray:
    """(Q, N) float64 distances between every query and every vector; never negative, but for
    ip (1 - dot product), which is negative where the dot product exceeds 1."""
    queries, vectors = queries.astype(np.float64), vectors.astype(np.float64)
    if metric in ("cosine", "ip"):
        if metric == "cosine":
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
            return np.clip(1.0 - queries @ vectors.T, 0.0, 2.0) + 0.0
        return 1.0 - queries @ vectors.T
    if metric in ("euclidean", "sqeuclidean"):
        squared = ((queries**2).sum(1)[:, None] + (vectors**2).sum(1)[None, :] - 2.0 * queries @ vectors.T)
        squared = np.maximum(squared, 0.0) + 0.0
        return np.sqrt(squared) if metric == "euclidean" else squared
    out = np.empty((len(queries), len(vectors)), np.float64)
    rows = max(1, _BLOCK_VALUES // max(1, len(vectors) * queries.shape[1]))
    for start in range(0, len(queries), rows):
        diff = np.abs(queries[start:start + rows, None, :] - vectors[None, :, :])
        if metric == "manhattan":
            out[start:start + rows] = diff.sum(-1)
        elif metric == "chebyshev":
            out[start:start + rows] = diff.max(-1)
        else:  # in units of each pair's largest difference: diff ** p neither underflows nor overflows
            top = diff.max(-1)
            scaled = diff / np.where(top > 0, top, 1.0)[..., None]
            out[start:start + rows] = top * (scaled ** p).sum(-1) ** (1.0 / p)
    return out


def _select(rows: np.ndarray, dist: np.ndarray, k: int, names: Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest of each row of `dist` with their `rows`, nearest first; equal distances in
    the order of `names[row]` (where given), also where a tie straddles the k-th place."""
    if dist.shape[1] > k:
        keep = np.argpartition(dist, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(dist, keep, 1).max(axis=1, keepdims=True)
        straddling = np.flatnonzero((dist <= kth).sum(axis=1) > k) if names is not None else []
        for q in straddling:  # rare: keep the tied ones that come first by name
            tied = np.flatnonzero(dist[q] <= kth[q, 0])
            keep[q] = sorted(tied, key=lambda c: (dist[q, c], names[rows[q, c]]))[:k]
        dist, rows = np.take_along_axis(dist, keep, 1), np.take_along_axis(rows, keep, 1)
    order = np.argsort(dist, axis=1, kind="stable")
    dist, rows = np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
    if names is not None:
        for q in np.flatnonzero((dist[:, 1:] == dist[:, :-1]).any(axis=1)):
            order = sorted(range(dist.shape[1]), key=lambda c: (dist[q, c], names[rows[q, c]]))
            dist[q], rows[q] = dist[q, order], rows[q, order]
    return rows, dist


def exact_knn(queries: np.ndarray, vectors: np.ndarray | Callable[[np.ndarray], np.ndarray], rows: np.ndarray,
              k: int, metric: str, p: float = 2.0, block: int = 8192,
              names: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest among the `rows` of `vectors` (an array, or a function from row numbers
    to their vectors): (row indices, float64 distances), each (Q, min(k, len(rows))).

    Ranks by float64 distances; with `names` (a name per row), equal distances rank by name.
    Scans the candidates in blocks and keeps a running top k, so memory is O(Q * (k + block)).
    """
    fetch = vectors.__getitem__ if isinstance(vectors, np.ndarray) else vectors
    k = min(k, len(rows))
    best_rows = np.empty((len(queries), 0), np.int64)
    best_dist = np.empty((len(queries), 0), np.float64)
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        dist = pairwise(queries, fetch(chunk), metric, p)
        best_rows, best_dist = _select(
            np.concatenate([best_rows, np.broadcast_to(chunk, dist.shape)], axis=1),
            np.concatenate([best_dist, dist], axis=1), k, names)
    return best_rows, best_dist
