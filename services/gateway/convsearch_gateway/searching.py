"""Search: by image bytes (embedded at the collection's layer, by the weights that made the
collection, or refused) or by a stored item (its own vector, itself left out), with the ConvNet
Playground search score for labeled items and the weights that made the collection."""

import dataclasses

from convsearch.embedding import MAX_K, Configuration
from convsearch.enums import POOLING_ENUMS
from convsearch.errors import InvalidArgument, NotFound, item_not_found, shown
from convsearch.extractor.v1 import extractor_pb2
from convsearch.index.v1 import index_pb2
from convsearch.scoring import TOP, search_score
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import ModelCatalog, Target, check_weights


@dataclasses.dataclass
class SearchResult:
    """Hits nearest first, the weights that made the collection, and for a labeled stored query its score."""

    hits: list[tuple[str, str, float, dict[str, str]]]
    collection: str
    exact: bool
    weights: str
    query_label: str = ""
    search_score: float | None = None  # only for a labeled stored query
    same_label_count: int | None = None
    scored_results: int = 0


def check_k(k: int) -> None:
    """INVALID_ARGUMENT unless 1 <= k <= MAX_K (Search's and Evaluate's k)."""
    if not 0 < k <= MAX_K:
        raise InvalidArgument(f"k = {k} is out of range; use 1 to {MAX_K}", reason="K_OUT_OF_RANGE", field="k",
                              metadata={"k": str(k), "max_k": str(MAX_K)})


def search_target(catalog: ModelCatalog, configuration: Configuration, remaining: float | None = None) -> Target:
    """The one collection a search or a projection uses: the configuration's layer, or without
    one the model's last featured layer; INVALID_ARGUMENT for several layers."""
    if len(configuration.layers) > 1:
        raise InvalidArgument(f"a search or projection uses one layer, not {len(configuration.layers)}; name one (or "
                              "none for the model's last featured layer)", reason="TOO_MANY_LAYERS",
                              field="configuration.layers", metadata={"layers": str(len(configuration.layers))})
    return catalog.targets([configuration], remaining)[-1]


def search(backends: Backends, catalog: ModelCatalog, dataset: str, configuration: Configuration, k: int,
           image: bytes | None = None, item_id: str | None = None, include_labels=(), exclude_labels=(),
           exact: bool = False, remaining: float | None = None) -> SearchResult:
    """The k nearest items to an image or a stored item in the configuration's collection."""
    check_k(k)
    if not item_id and image is None:
        raise InvalidArgument("a search needs a query: image bytes or a stored item's id", reason="QUERY_MISSING",
                              field="query")
    target = search_target(catalog, configuration, remaining)
    weights = _collection_weights(backends, dataset, target.collection, remaining)
    request = index_pb2.SearchRequest(dataset=dataset, collection=target.collection, k=k,
                                      include_labels=include_labels, exclude_labels=exclude_labels, exact=exact)
    if item_id:
        request.query_ids.append(item_id)
        request.k = max(k, TOP)  # the score needs the top 15
        reply = _search_stored(backends, request, item_id, remaining)
    else:
        embedded = backends.extractor.call("Embed", extractor_pb2.EmbedRequest(
            config=extractor_pb2.EmbedConfig(model=target.model, layers=[target.layer],
                                             pooling=POOLING_ENUMS[target.pooling]), images=[image]), remaining)
        check_weights(dataset, target.collection, weights, embedded.weights)
        request.queries.CopyFrom(embedded.layers[0].vectors)
        reply = backends.reads.call("Search", request, remaining)
    result = reply.results[0]
    # One call for the hits' metadata and the query item's label.
    wanted = ([item_id] if item_id else []) + list(result.ids[:k])
    items = {item.id: item for item in backends.reads.call("GetItems", index_pb2.GetItemsRequest(
        dataset=dataset, ids=wanted), remaining).items} if wanted else {}
    query_label = items[item_id].label if item_id in items else ""
    hits = [(i, label, distance, dict(items[i].metadata) if i in items else {})
            for i, label, distance in zip(result.ids[:k], result.labels[:k], result.distances[:k], strict=True)]
    answer = SearchResult(hits, target.collection, reply.exact, weights, query_label)
    if query_label and not (include_labels or exclude_labels):  # a filtered top 15 would inflate the score
        scored = list(result.labels[:TOP])
        answer.search_score = search_score(query_label, scored)
        answer.same_label_count = sum(label == query_label for label in scored)
        answer.scored_results = len(scored)
    return answer


def _collection_weights(backends: Backends, dataset: str, collection: str, remaining: float | None) -> str:
    """The weights fingerprint of a collection; NOT_FOUND with a hint when the dataset lacks it."""
    collections = backends.reads.call("ListCollections", index_pb2.ListCollectionsRequest(dataset=dataset),
                                      remaining).collections
    for found in collections:
        if found.name == collection:
            return found.spec.weights
    raise NotFound(f"dataset {shown(dataset)} has no collection {collection}; index the dataset at this configuration "
                   "first", reason="COLLECTION_NOT_FOUND", resource_type="collection", resource_name=collection,
                   metadata={"dataset": dataset, "collection": collection})


def _search_stored(backends: Backends, request: index_pb2.SearchRequest, item_id: str, remaining: float | None):
    """Searches with a stored item's vector; NOT_FOUND says whether the item or its vector is missing
    (the dataset's or the collection's own NOT_FOUND, deleted meanwhile, passes through)."""
    try:
        return backends.reads.call("Search", request, remaining)
    except NotFound as exc:
        if exc.reason != "VECTOR_NOT_FOUND":
            raise
        items = backends.reads.call("GetItems", index_pb2.GetItemsRequest(dataset=request.dataset, ids=[item_id]),
                                    remaining)
        if not items.items:
            raise NotFound(f"dataset {shown(request.dataset)} has no item {shown(item_id)}",
                           **item_not_found(request.dataset, item_id)) from None
        raise NotFound(f"item {shown(item_id)} has no vector in {request.collection}; index the dataset at this "
                       "configuration first", reason="VECTOR_NOT_FOUND", resource_type="item", resource_name=item_id,
                       metadata={"dataset": request.dataset, "collection": request.collection,
                                 "item": item_id}) from None
