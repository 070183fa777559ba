"""Search: by image bytes (embedded at the collection's layer) or by a stored item (its own
vector, itself left out), with the ConvNet Playground search score for labeled items."""

import dataclasses

from convsearch.embedding import Configuration
from convsearch.enums import POOLING_ENUMS
from convsearch.errors import InvalidArgument, NotFound
from convsearch.extractor.v1 import extractor_pb2
from convsearch.index.v1 import index_pb2
from convsearch.scoring import TOP, search_score
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import ModelCatalog


@dataclasses.dataclass
class SearchResult:
    """Hits nearest first, and for a labeled stored query its score."""

    hits: list[tuple[str, str, float, dict[str, str]]]
    collection: str
    exact: bool
    query_label: str = ""
    search_score: float = -1.0
    same_label_count: int = 0
    scored_results: int = 0


def search(backends: Backends, catalog: ModelCatalog, dataset: str, configuration: Configuration, k: int,
           image: bytes | None = None, item_id: str | None = None, include_labels=(), exclude_labels=(),
           exact: bool = False, remaining: float | None = None) -> SearchResult:
    """The k nearest items to an image or a stored item in the configuration's collection."""
    if not 0 < k <= 1000:
        raise InvalidArgument(f"k = {k} is out of range; use 1 to 1000")
    if len(configuration.layers) > 1:
        raise InvalidArgument("a search uses one layer; name one (or none for the model's last featured layer)")
    if configuration.layers:
        target, = catalog.targets([configuration], remaining)
    else:
        target = catalog.targets([configuration], remaining)[-1]
    query_label, exclude_ids = "", []
    if item_id:
        found = backends.index.call("GetVectors", index_pb2.GetVectorsRequest(
            dataset=dataset, collection=target.collection, ids=[item_id]), remaining)
        if not found.ids:
            items = backends.index.call("GetItems", index_pb2.GetItemsRequest(dataset=dataset, ids=[item_id]),
                                        remaining)
            if not items.items:
                raise NotFound(f"dataset {dataset!r} has no item {item_id!r}")
            raise NotFound(f"item {item_id!r} has no vector in {target.collection}; index the dataset at this "
                           "configuration first")
        queries = found.vectors
        query_label = backends.index.call("GetItems", index_pb2.GetItemsRequest(
            dataset=dataset, ids=[item_id]), remaining).items[0].label
        exclude_ids = [item_id]
    elif image is not None:
        embedded = backends.extractor.call("Embed", extractor_pb2.EmbedRequest(
            config=extractor_pb2.EmbedConfig(model=target.model, layers=[target.layer],
                                             pooling=POOLING_ENUMS[target.pooling]), images=[image]), remaining)
        queries = embedded.layers[0].vectors
    else:
        raise InvalidArgument("a search needs a query: image bytes or a stored item's id")
    wanted = max(k, TOP) if query_label else k
    reply = backends.index.call("Search", index_pb2.SearchRequest(
        dataset=dataset, collection=target.collection, queries=queries, k=wanted,
        include_labels=include_labels, exclude_labels=exclude_labels, exclude_ids=exclude_ids, exact=exact),
        remaining)
    result = reply.results[0]
    metadata = {}
    if result.ids:
        items = backends.index.call("GetItems", index_pb2.GetItemsRequest(dataset=dataset, ids=result.ids[:k]),
                                    remaining)
        metadata = {item.id: dict(item.metadata) for item in items.items}
    hits = [(i, label, distance, metadata.get(i, {}))
            for i, label, distance in zip(result.ids[:k], result.labels[:k], result.distances[:k], strict=True)]
    answer = SearchResult(hits, target.collection, reply.exact, query_label)
    if query_label:
        scored = list(result.labels[:TOP])
        answer.search_score = search_score(query_label, scored)
        answer.same_label_count = sum(label == query_label for label in scored)
        answer.scored_results = len(scored)
    return answer
