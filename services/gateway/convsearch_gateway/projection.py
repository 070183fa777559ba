"""2-D pictures of a collection: PCA (fast, deterministic) or UMAP (seeded), over at most
max_points vectors (a seeded sample above that).

The picture at the default seed is kept with the collection until it changes, one per method
(attachment `projection/<method>`, holding the last max_points asked for; its items' labels are
read afresh each time): Project needs only the read role, so what it stores must stay bounded
whatever a caller asks. Other seeds (exploring) are computed each time and never stored."""

import dataclasses
import json

import numpy as np

from convsearch.errors import FailedPrecondition, InvalidArgument, shown
from convsearch.index.v1 import index_pb2
from convsearch.tensors import from_tensor
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import Target
from convsearch_gateway.indexing import all_items
from convsearch_gateway.replicas import reading_from
from convsearch_gateway.stored_results import keep

METHODS = ("pca", "umap")
CACHED_SEED = 0  # the default seed: its pictures are kept
MIN_POINTS, MAX_POINTS = 3, 50_000  # of max_points
_FETCH = 2000


@dataclasses.dataclass
class Projection:
    ids: list[str]
    labels: list[str]
    x: list[float]
    y: list[float]
    sampled: bool
    total: int
    collection: str
    cached: bool = False


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components; each axis's sign fixed so the result is deterministic."""
    centred = vectors.astype(np.float64) - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    axes = components[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])[:, None]
    coordinates = centred @ axes.T
    if coordinates.shape[1] < 2:
        coordinates = np.pad(coordinates, ((0, 0), (0, 2 - coordinates.shape[1])))
    return coordinates


def umap_2d(vectors: np.ndarray, metric: str, seed: int) -> np.ndarray:
    import umap  # imported here: it takes seconds to load

    neighbours = max(2, min(15, len(vectors) - 1))
    # The spectral start needs more points than the picture has dimensions + 1: three start at random.
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed,
                        metric="cosine" if metric in ("cosine", "ip") else "euclidean",
                        init="spectral" if len(vectors) > 3 else "random")
    return reducer.fit_transform(vectors)


def project(backends: Backends, dataset: str, target: Target, method: str, seed: int, max_points: int) -> Projection:
    """Coordinates for the collection's vectors (a seeded sample of max_points when there are more);
    kept and reused at the default seed (see the module)."""
    if method not in METHODS:
        raise InvalidArgument(f"unknown projection method {shown(method)}; use pca or umap")
    if seed < 0:
        raise InvalidArgument(f"seed {seed} is negative; use 0 or more (the same seed gives the same picture)",
                              reason="SEED_OUT_OF_RANGE", field="seed", metadata={"seed": str(seed)})
    if not MIN_POINTS <= max_points <= MAX_POINTS:
        raise InvalidArgument(f"max_points {max_points} is out of range; use {MIN_POINTS} to {MAX_POINTS} (0: 5000)",
                              reason="MAX_POINTS_OUT_OF_RANGE", field="max_points",
                              metadata={"max_points": str(max_points), "max": str(MAX_POINTS)})
    if seed != CACHED_SEED:
        return _computed(backends, dataset, target, method, seed, max_points)
    key = f"projection/{method}"
    stored = backends.index.call("GetAttachment", index_pb2.GetAttachmentRequest(
        dataset=dataset, collection=target.collection, key=key))
    if stored.found and stored.version == stored.current_version:
        kept = json.loads(stored.data)
        if kept.pop("max_points", None) == max_points:
            return _relabeled(backends, dataset, Projection(**{**kept, "cached": True}))
    with reading_from(backends.index, dataset):
        result = _computed(backends, dataset, target, method, seed, max_points)
    keep(backends, index_pb2.PutAttachmentRequest(
        dataset=dataset, collection=target.collection, key=key, version=stored.current_version,
        collection_id=stored.collection_id,
        data=json.dumps({**dataclasses.asdict(result), "max_points": max_points}).encode()))
    return result


def _relabeled(backends: Backends, dataset: str, projection: Projection) -> Projection:
    """A kept picture with its items' labels as they are now: relabeling an item changes no
    vector, so its collection's version (which keeps the picture current) stays."""
    labels = dict(all_items(backends, dataset))
    projection.labels = [labels.get(item_id, "") for item_id in projection.ids]
    return projection


def _computed(backends: Backends, dataset: str, target: Target, method: str, seed: int,
              max_points: int) -> Projection:
    labels = dict(all_items(backends, dataset))
    ids = list(labels)
    found, rows = [], []
    for start in range(0, len(ids), _FETCH):
        reply = backends.reads.call("GetVectors", index_pb2.GetVectorsRequest(
            dataset=dataset, collection=target.collection, ids=ids[start:start + _FETCH]))
        found += list(reply.ids)
        if reply.ids:
            rows.append(from_tensor(reply.vectors))
    if not found:
        raise FailedPrecondition(f"collection {target.collection} of dataset {shown(dataset)} has no vectors to "
                                 "project; index the dataset at this configuration first", reason="NO_VECTORS",
                                 resource_type="collection", resource_name=target.collection,
                                 metadata={"dataset": dataset, "collection": target.collection})
    if method == "umap" and len(found) < 3:
        raise FailedPrecondition(f"collection {target.collection} of dataset {shown(dataset)} has {len(found)} "
                                 "vectors; UMAP needs 3 or more: index more items, or use PCA",
                                 reason="TOO_FEW_VECTORS", resource_type="collection",
                                 resource_name=target.collection,
                                 metadata={"dataset": dataset, "collection": target.collection})
    vectors = np.concatenate(rows)
    total = len(found)
    if total > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(total, max_points, replace=False))
        found, vectors = [found[i] for i in keep], vectors[keep]
    coordinates = pca_2d(vectors) if method == "pca" else umap_2d(vectors, target.metric, seed)
    result = Projection(found, [labels[i] for i in found], coordinates[:, 0].astype(float).tolist(),
                        coordinates[:, 1].astype(float).tolist(), total > max_points, total, target.collection)
    return result
