"""Ingest: store a stream of items, a result per item, and optionally embed them at once."""

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

from convsearch.errors import ConvsearchError, InvalidArgument, shown
from convsearch.image_limits import DEFAULT_MAX_PIXELS
from convsearch.index.v1 import index_pb2
from convsearch.item_limits import item_problem
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import Target
from convsearch_gateway.images import check_image
from convsearch_gateway.indexing import index_items


@dataclasses.dataclass
class IngestResult:
    """What happened to one item: status is 'stored', 'replaced' or 'failed'."""

    id: str
    status: str
    error: str = ""
    indexed: bool = False


def _problem(item: index_pb2.Item, max_pixels: int) -> str:
    """Why an item cannot be stored ("" if it can): a bad id, label or metadata, or an image over
    the pixel limit (checked on its header, never decoded) or one that does not decode completely."""
    if problem := item_problem(item.id, item.label, item.metadata):
        return problem
    try:
        check_image(item.image, max_pixels)
    except InvalidArgument as exc:
        return f"item {shown(item.id)} {exc}"
    return ""


def ingest_batch(backends: Backends, dataset: str, items: Sequence[index_pb2.Item], targets: Sequence[Target],
                 batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, seen: set[str] | None = None
                 ) -> list[IngestResult]:
    """Stores the good items of one batch (embedding them if targets are given); a result per item.
    An item whose image is refused is never stored, nor one whose id is in `seen` (the ids of its
    message's earlier batches, to which this batch's are added)."""
    results = [IngestResult(item.id, "failed", problem) if (problem := _problem(item, max_pixels)) else None
               for item in items]
    seen = set() if seen is None else seen
    for position, item in enumerate(items):
        if results[position] is None and item.id in seen:
            results[position] = IngestResult(item.id, "failed",
                                             f"item id {shown(item.id)} appears twice in one message")
        seen.add(item.id)
    good = [item for item, result in zip(items, results, strict=True) if result is None]
    if good:
        existing = {i.id for i in backends.index.call("GetItems", index_pb2.GetItemsRequest(
            dataset=dataset, ids=[item.id for item in good])).items}
        backends.index.call("PutItems", index_pb2.PutItemsRequest(dataset=dataset, items=good))
        failures: dict[str, str] = {}
        if targets:
            try:
                for progress in index_items(backends, dataset, targets, batch_size, [item.id for item in good]):
                    failures = progress.failed_ids
            except ConvsearchError as exc:
                if exc.code == "UNAVAILABLE":
                    raise
                failures = {item.id: str(exc) for item in good}  # stored, but not embedded
        for position, item in enumerate(items):
            if results[position] is None:
                results[position] = IngestResult(item.id, "replaced" if item.id in existing else "stored",
                                                 failures.get(item.id, ""), bool(targets) and item.id not in failures)
    return results


def ingest(backends: Backends, messages: Iterable[tuple[str, list, list]], resolve_targets, batch_size: int = 32,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[IngestResult]:
    """Consumes (dataset, configurations, items) messages; yields a result per item in order.

    Errors of the stream itself (no dataset, unknown dataset or configuration, a backend down)
    end it with that error; errors of single items are their results."""
    dataset, targets, first = "", None, []
    for name, configurations, items in messages:
        if name and dataset and name != dataset:
            raise InvalidArgument(f"the stream switched from dataset {shown(dataset)} to {shown(name)}; "
                                  "open one per dataset", field="dataset")
        dataset = dataset or name
        if not dataset:
            raise InvalidArgument("the first message of an ingest stream must name the dataset", field="dataset")
        if targets is None:
            targets = resolve_targets(configurations) if configurations else []
            first = configurations
            backends.index.call("GetDataset", index_pb2.GetDatasetRequest(name=dataset))
        elif configurations and configurations != first:
            raise InvalidArgument("a later message of the ingest stream changes its configurations; "
                                  "send them in the first message only, or open a new stream for others",
                                  field="configurations")
        seen: set[str] = set()  # a message's ids, across its batches
        for start in range(0, len(items), batch_size):
            try:
                yield from ingest_batch(backends, dataset, items[start:start + batch_size], targets, batch_size,
                                        max_pixels, seen)
            except ConvsearchError as exc:
                if exc.code == "UNAVAILABLE":
                    raise
                yield from (IngestResult(item.id, "failed", str(exc)) for item in items[start:start + batch_size])
