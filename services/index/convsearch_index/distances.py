"""Distances: which metrics hnswlib serves, and exact k-nearest search for every metric in
blocks, so memory stays bounded whatever the collection's size."""

import numpy as np

from convsearch.errors import InvalidArgument

METRICS = ("cosine", "euclidean", "sqeuclidean", "ip", "manhattan", "chebyshev", "minkowski")
# Metrics hnswlib can index, and the space it knows them by.
HNSW_SPACES = {"cosine": "cosine", "euclidean": "l2", "sqeuclidean": "l2", "ip": "ip"}
_BLOCK_VALUES = 1 << 24  # floats per temporary array of the elementwise metrics (64 MiB)


def check_metric(metric: str, p: float) -> None:
    """INVALID_ARGUMENT for an unknown metric or a minkowski p below 1."""
    if metric not in METRICS:
        raise InvalidArgument(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric == "minkowski" and not p >= 1:
        raise InvalidArgument(f"minkowski p must be >= 1, got {p}")


def from_hnsw(distances: np.ndarray, metric: str) -> np.ndarray:
    """hnswlib's distances in the metric's own units (its l2 is squared)."""
    return np.sqrt(np.maximum(distances, 0)) if metric == "euclidean" else distances


def pairwise(queries: np.ndarray, vectors: np.ndarray, metric: str, p: float = 2.0) -> np.ndarray:
    """(Q, N) distances between every query and every vector."""
    if metric in ("cosine", "ip"):
        if metric == "cosine":
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
        return 1.0 - queries @ vectors.T
    if metric in ("euclidean", "sqeuclidean"):
        # float64: the expansion below cancels badly in float32 for near-identical vectors.
        queries, vectors = queries.astype(np.float64), vectors.astype(np.float64)
        squared = ((queries**2).sum(1)[:, None] + (vectors**2).sum(1)[None, :] - 2.0 * queries @ vectors.T)
        squared = np.maximum(squared, 0.0)
        return np.sqrt(squared) if metric == "euclidean" else squared
    out = np.empty((len(queries), len(vectors)), np.float32)
    rows = max(1, _BLOCK_VALUES // max(1, len(vectors) * queries.shape[1]))
    for start in range(0, len(queries), rows):
        diff = np.abs(queries[start:start + rows, None, :] - vectors[None, :, :])
        if metric == "manhattan":
            out[start:start + rows] = diff.sum(-1)
        elif metric == "chebyshev":
            out[start:start + rows] = diff.max(-1)
        else:
            out[start:start + rows] = (diff.astype(np.float64) ** p).sum(-1) ** (1.0 / p)
    return out


def exact_knn(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray, k: int, metric: str,
              p: float = 2.0, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest among `vectors[rows]`: (row indices, distances), each (Q, min(k, len(rows))).

    Scans the candidates in blocks and keeps a running top k, so memory is O(Q * (k + block)).
    """
    k = min(k, len(rows))
    best_rows = np.empty((len(queries), 0), np.int64)
    best_dist = np.empty((len(queries), 0), np.float32)
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        dist = pairwise(queries, vectors[chunk], metric, p).astype(np.float32)
        all_dist = np.concatenate([best_dist, dist], axis=1)
        all_rows = np.concatenate([best_rows, np.broadcast_to(chunk, dist.shape)], axis=1)
        if all_dist.shape[1] > k:
            keep = np.argpartition(all_dist, k - 1, axis=1)[:, :k]
            all_dist = np.take_along_axis(all_dist, keep, 1)
            all_rows = np.take_along_axis(all_rows, keep, 1)
        best_dist, best_rows = all_dist, all_rows
    order = np.argsort(best_dist, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, 1), np.take_along_axis(best_dist, order, 1)
