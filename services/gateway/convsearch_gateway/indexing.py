"""Indexing: embed every stored item that a collection lacks and upsert its vectors.

Items are grouped by (model, pooling) so one forward pass fills every layer of a model. Images
stream to the extractor through BulkEmbed while the vectors of the previous batch are being
upserted. What is already in a collection is never embedded again, so an interrupted run,
started again, continues where it stopped.
"""

import dataclasses
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from convsearch.enums import METRIC_ENUMS, POOLING_ENUMS
from convsearch.errors import AlreadyExists
from convsearch.extractor.v1 import extractor_pb2
from convsearch.index.v1 import index_pb2
from convsearch.tensors import from_tensor, to_tensor
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import Target

_CHECK_CHUNK = 5000
_MAX_ERRORS = 20


@dataclasses.dataclass
class Progress:
    """Where an indexing run stands."""

    total: int = 0
    done: int = 0
    failed: int = 0
    images_per_second: float = 0.0
    collections: list[str] = dataclasses.field(default_factory=list)
    finished: bool = False
    errors: deque = dataclasses.field(default_factory=lambda: deque(maxlen=_MAX_ERRORS))
    failed_ids: dict[str, str] = dataclasses.field(default_factory=dict)


def ensure_collections(backends: Backends, dataset: str, targets: Sequence[Target]) -> None:
    """Creates the collections that do not exist yet."""
    existing = {c.name for c in backends.index.call(
        "ListCollections", index_pb2.ListCollectionsRequest(dataset=dataset)).collections}
    for target in targets:
        if target.collection in existing:
            continue
        spec = index_pb2.CollectionSpec(
            model=target.model, layer=target.layer, pooling=POOLING_ENUMS[target.pooling],
            metric=METRIC_ENUMS[target.metric], minkowski_p=target.minkowski_p, dimension=target.dimension)
        try:
            backends.index.call("CreateCollection", index_pb2.CreateCollectionRequest(dataset=dataset, spec=spec))
        except AlreadyExists:
            pass  # another run made it meanwhile


def all_items(backends: Backends, dataset: str) -> list[tuple[str, str]]:
    """(id, label) of every item, in id order."""
    items, token = [], ""
    while True:
        page = backends.index.call("ScanItems", index_pb2.ScanItemsRequest(dataset=dataset, page_size=1000,
                                                                           page_token=token))
        items += [(item.id, item.label) for item in page.items]
        token = page.next_page_token
        if not token:
            return items


def missing_ids(backends: Backends, dataset: str, collection: str, ids: Sequence[str]) -> set[str]:
    missing: set[str] = set()
    for start in range(0, len(ids), _CHECK_CHUNK):
        reply = backends.index.call("GetVectors", index_pb2.GetVectorsRequest(
            dataset=dataset, collection=collection, ids=ids[start:start + _CHECK_CHUNK], ids_only=True))
        missing.update(reply.missing_ids)
    return missing


def index_items(backends: Backends, dataset: str, targets: Sequence[Target], batch_size: int = 32,
                ids: Sequence[str] | None = None) -> Iterator[Progress]:
    """Fills the targets' collections for `ids` (default: every item); yields progress after each batch."""
    ensure_collections(backends, dataset, targets)
    ids = [item_id for item_id, _ in all_items(backends, dataset)] if ids is None else list(ids)
    groups: dict[tuple[str, str], list[Target]] = defaultdict(list)
    for target in targets:
        groups[target.model, target.pooling].append(target)
    work: dict[tuple[str, str], list[str]] = {}
    for group, members in groups.items():
        needed: set[str] = set()
        for target in members:
            needed |= missing_ids(backends, dataset, target.collection, ids)
        work[group] = [item_id for item_id in ids if item_id in needed]
    progress = Progress(total=sum(len(need) for need in work.values()),
                        collections=[target.collection for target in targets])
    started = time.monotonic()
    yield progress
    with ThreadPoolExecutor(1, thread_name_prefix="upsert") as upserter:
        for (model, pooling), need in work.items():
            if need:
                yield from _embed_group(backends, dataset, model, pooling, groups[model, pooling], need,
                                        batch_size, progress, started, upserter)
    progress.finished = True
    yield progress


def _embed_group(backends: Backends, dataset: str, model: str, pooling: str, targets: Sequence[Target],
                 need: Sequence[str], batch_size: int, progress: Progress, started: float,
                 upserter: ThreadPoolExecutor) -> Iterator[Progress]:
    layers = [target.layer for target in targets]
    feed_errors: list[Exception] = []

    def requests():
        yield extractor_pb2.BulkEmbedRequest(config=extractor_pb2.EmbedConfig(
            model=model, layers=layers, pooling=POOLING_ENUMS[pooling]))
        for start in range(0, len(need), batch_size):
            try:
                found = backends.index.call("GetItems", index_pb2.GetItemsRequest(
                    dataset=dataset, ids=need[start:start + batch_size], include_images=True))
            except Exception as exc:  # noqa: BLE001 - re-raised by the reading side
                feed_errors.append(exc)
                return
            gone = len(need[start:start + batch_size]) - len(found.items)
            progress.done += gone  # deleted since the run began: nothing to do
            yield extractor_pb2.BulkEmbedRequest(images=[
                extractor_pb2.ImageInput(id=item.id, data=item.image) for item in found.items])

    pending: Future | None = None
    batch_ids: list[str] = []
    batch_vectors: dict[str, list] = {layer: [] for layer in layers}

    def flush() -> Future:
        ids, vectors = list(batch_ids), {layer: list(rows) for layer, rows in batch_vectors.items()}
        batch_ids.clear()
        for rows in batch_vectors.values():
            rows.clear()
        return upserter.submit(_upsert, backends, dataset, targets, ids, vectors)

    try:
        for answer in backends.extractor.stub.BulkEmbed(requests()):
            if answer.WhichOneof("result") == "error":
                progress.failed += 1
                progress.done += 1
                progress.failed_ids[answer.id] = answer.error.message
                progress.errors.append(f"{answer.id}: {answer.error.message}")
                continue
            batch_ids.append(answer.id)
            for entry in answer.vectors.layers:
                batch_vectors[entry.layer].append(from_tensor(entry.vector))
            if len(batch_ids) >= batch_size:
                if pending is not None:
                    progress.done += pending.result()
                    progress.images_per_second = progress.done / max(1e-9, time.monotonic() - started)
                    yield progress
                pending = flush()
    except grpc.RpcError as exc:
        raise backends.extractor.error(exc) from None
    if feed_errors:
        raise feed_errors[0]
    for future in itertools.chain([pending] if pending else [], [flush()] if batch_ids else []):
        progress.done += future.result()
    progress.images_per_second = progress.done / max(1e-9, time.monotonic() - started)
    yield progress


def _upsert(backends: Backends, dataset: str, targets: Sequence[Target], ids: list[str], vectors: dict) -> int:
    for target in targets:
        backends.index.call("UpsertVectors", index_pb2.UpsertVectorsRequest(
            dataset=dataset, collection=target.collection, ids=ids, vectors=to_tensor(np.stack(vectors[target.layer]))))
    return len(ids)

