"""Evaluation: how well each configuration captures what a labeled dataset's images have in
common. Every labeled item queries the index (in batches, itself left out); its ranked labels
give the ConvNet Playground search score, precision@k and average precision@k. In datasets of up
to `exact_up_to` items the queries go by exact search, so the ranking is a brute force's: float64
distances, equal ones by item id. Above, they go through the graph, whose cost grows far more
slowly: it ranks by float32 distances and ties by where each vector was inserted, so duplicates
and near-parallel vectors may score by the order the data came in. Results are kept
with the collection (as an attachment with the collection's version and a digest of the dataset's
ids and labels) and reused until either changes: a relabeled item changes no vector, but it
changes every score.

Edge cases, as the API states them: unlabeled items are not queries, but they are among the
others' results, where they count as misses; an item alone in its class can only score 0 and
still counts in the means; with fewer than 16 items the search score is renormalised over the
ranks there are, while precision@k still divides by k.
"""

import collections
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence

from convsearch.errors import FailedPrecondition, NotFound
from convsearch.index.v1 import index_pb2
from convsearch.scoring import TOP, search_score
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import Target
from convsearch_gateway.indexing import all_items, fill_collections, missing_ids, prepared_collections
from convsearch_gateway.replicas import reading_from
from convsearch_gateway.stored_results import keep

ATTACHMENT = "evaluation/4"  # 4: by exact search; 3: with labels_digest; results stored before are recomputed
QUERY_BATCH = 256  # queries a Search through the graph
EXACT_QUERY_BATCH = 1024  # queries an exact Search: each reads every vector of the collection once
EXACT_UP_TO = 5000  # the gateway's --evaluate-exact-up-to default


@dataclasses.dataclass
class Score:
    """The scores of one configuration on one dataset."""

    collection: str
    model: str
    layer: str
    pooling: str
    metric: str
    mean_score: float
    precision_at_k: float
    map_at_k: float
    k: int
    per_label_score: dict[str, float]
    queries: int
    unlabeled: int
    dimension: int
    parameter_count: int
    small_dataset: bool
    single_item_classes: int
    weights: str  # fingerprint of the weights that made the collection's vectors
    per_query: dict[str, float]
    labels_digest: str  # of the dataset's (id, label) pairs when it was scored
    cached: bool = False


@dataclasses.dataclass
class EvaluationProgress:
    phase: str
    done: int
    total: int
    finished: bool = False
    results: list[Score] = dataclasses.field(default_factory=list)


def query_metrics(label: str, ranked: Sequence[str], k: int, relevant: int) -> tuple[float, float, float]:
    """(search score, precision@k, average precision@k) of one query's ranked result labels;
    `relevant` is how many other items share its label."""
    hits = [other == label for other in ranked[:k]]
    precision = sum(hits) / k
    found, total = 0, 0.0
    for rank, hit in enumerate(hits, 1):
        if hit:
            found += 1
            total += found / rank
    denominator = min(k, relevant)
    return search_score(label, ranked[:TOP]), precision, total / denominator if denominator else 0.0


def labels_digest(items: Sequence[tuple[str, str]]) -> str:
    """What identifies a dataset's (id, label) pairs, in id order."""
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]


def score_target(backends: Backends, dataset: str, target: Target, items: Sequence[tuple[str, str]], k: int,
                 weights: str, exact_up_to: int = EXACT_UP_TO) -> Score:
    """Queries the index in batches of labeled items, by exact search where the dataset has up to
    `exact_up_to` items, and scores the configuration; the items without a vector in it (their
    image could not be embedded) are left out."""
    exact = len(items) <= exact_up_to
    batch = EXACT_QUERY_BATCH if exact else QUERY_BATCH
    labeled = {item_id: label for item_id, label in items if label}
    without = missing_ids(backends, dataset, target.collection, list(labeled))
    labeled = {item_id: label for item_id, label in labeled.items() if item_id not in without}
    sizes = collections.Counter(labeled.values())
    ids = list(labeled)
    per_query, precisions, aps = {}, [], []
    for start in range(0, len(ids), batch):
        chunk, results = _queried(backends, dataset, target.collection, ids[start:start + batch], k, exact)
        for item_id, result in zip(chunk, results, strict=True):
            label = labeled[item_id]
            score, precision, ap = query_metrics(label, list(result.labels), k, sizes[label] - 1)
            per_query[item_id] = score
            precisions.append(precision)
            aps.append(ap)
    by_label = collections.defaultdict(list)
    for item_id, score in per_query.items():
        by_label[labeled[item_id]].append(score)
    count = max(1, len(per_query))
    return Score(
        collection=target.collection, model=target.model, layer=target.layer, pooling=target.pooling,
        metric=target.metric, mean_score=sum(per_query.values()) / count, precision_at_k=sum(precisions) / count,
        map_at_k=sum(aps) / count, k=k,
        per_label_score={label: sum(scores) / len(scores) for label, scores in sorted(by_label.items())},
        queries=len(per_query), unlabeled=sum(not label for _, label in items), dimension=target.dimension,
        parameter_count=target.parameter_count, small_dataset=len(items) <= TOP,
        single_item_classes=sum(size == 1 for size in sizes.values()), weights=weights, per_query=per_query,
        labels_digest=labels_digest(items))


def _queried(backends: Backends, dataset: str, collection: str, ids: list[str], k: int,
             exact: bool) -> tuple[list[str], list]:
    """(the ids queried, their results): those whose vector is gone since (their item deleted, or
    its image replaced, meanwhile) are left out, not a failed evaluation; the collection's version
    changed with them, so the score is stored as stale."""
    while ids:
        try:
            return ids, list(backends.reads.call("Search", index_pb2.SearchRequest(
                dataset=dataset, collection=collection, query_ids=ids, k=max(k, TOP), exact=exact)).results)
        except NotFound as exc:
            if exc.reason != "VECTOR_NOT_FOUND":
                raise
            without = missing_ids(backends, dataset, collection, ids)
            if not without:
                raise
            ids = [item_id for item_id in ids if item_id not in without]
    return [], []


def stored_evaluation(backends: Backends, dataset: str, collection: str) -> index_pb2.GetAttachmentResponse:
    """The stored evaluation of a collection, with the collection's version and id now."""
    return backends.index.call("GetAttachment", index_pb2.GetAttachmentRequest(
        dataset=dataset, collection=collection, key=ATTACHMENT))


def stored_score(reply: index_pb2.GetAttachmentResponse, digest: str) -> tuple[Score | None, bool]:
    """(the stored evaluation or None, whether it is current: its collection unchanged since, and
    the dataset's ids and labels those of `digest`)."""
    if not reply.found:
        return None, False
    score = Score(**json.loads(reply.data))
    return score, reply.version == reply.current_version and score.labels_digest == digest


def labeled_items(backends: Backends, dataset: str) -> list[tuple[str, str]]:
    """(id, label) of every item, in id order; FAILED_PRECONDITION when none has a label."""
    items = all_items(backends, dataset)
    if not any(label for _, label in items):
        raise FailedPrecondition(
            f"dataset {dataset!r} has no labeled items ({len(items)} items): an evaluation scores how well "
            "labeled items find their own class; give the items labels (e.g. ingest a folder of class folders)",
            reason="NO_LABELED_ITEMS", resource_type="dataset", resource_name=dataset,
            metadata={"dataset": dataset, "items": str(len(items))})
    return items


def _rank(score: Score) -> tuple[float, str]:
    """Best mean score first; equal scores in collection order, the same in every answer."""
    return -score.mean_score, score.collection


def evaluate(backends: Backends, dataset: str, targets: Sequence[Target], k: int = 15, recompute: bool = False,
             batch_size: int = 32, exact_up_to: int = EXACT_UP_TO) -> Iterator[EvaluationProgress]:
    """Indexes what is missing, then scores every target (reusing current stored results; see
    score_target for `exact_up_to`). A failed run deletes the collections it created that are
    still empty."""
    items = labeled_items(backends, dataset)
    digest = labels_digest(items)
    with prepared_collections(backends, dataset, targets) as weights:
        for progress in fill_collections(backends, dataset, targets, weights, batch_size):
            yield EvaluationProgress("indexing", progress.done, progress.total)
        results = []
        for done, target in enumerate(targets, 1):
            reply = stored_evaluation(backends, dataset, target.collection)
            stored, current = stored_score(reply, digest)
            if stored is not None and current and stored.k == k and not recompute:
                stored.cached = True
                results.append(stored)
            else:
                with reading_from(backends.index, dataset):
                    score = score_target(backends, dataset, target, items, k, weights[target.collection],
                                         exact_up_to)
                keep(backends, index_pb2.PutAttachmentRequest(
                    dataset=dataset, collection=target.collection, key=ATTACHMENT, version=reply.current_version,
                    collection_id=reply.collection_id, data=json.dumps(dataclasses.asdict(score)).encode()))
                results.append(score)
            yield EvaluationProgress("evaluating", done, len(targets))
    results.sort(key=_rank)
    yield EvaluationProgress("evaluating", len(targets), len(targets), finished=True, results=results)


def compare(backends: Backends, dataset: str) -> tuple[list[Score], list[str]]:
    """(current stored evaluations, best first; collections whose evaluation is stale or missing)."""
    collections_ = backends.index.call("ListCollections", index_pb2.ListCollectionsRequest(dataset=dataset))
    digest = labels_digest(all_items(backends, dataset))
    ranked, stale = [], []
    for collection in collections_.collections:
        stored, current = stored_score(stored_evaluation(backends, dataset, collection.name), digest)
        if stored is not None and current:
            ranked.append(stored)
        else:
            stale.append(collection.name)
    ranked.sort(key=_rank)
    return ranked, stale
