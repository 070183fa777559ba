"""Indexing: embed every stored item that a collection lacks and upsert its vectors.

Items are grouped by (model, pooling) so one forward pass fills every layer of a model; each
layer is asked for once, however many metrics it is indexed under, and its vectors go to every
collection of it that lacks them. Images stream to the extractor through BulkEmbed while the
vectors of the previous batch are being upserted. What is already in a collection is never
embedded again, so an interrupted run, started again, continues where it stopped.

Images are fetched from the index in pages bounded by bytes, not counts: their sizes are asked
for first (without the images) and each page stays under the gRPC message limit; an image too
large for any message is a failed item saying so, never a failed run.

A new collection is bound to the extractor's weights, and vectors of other weights are refused
(FAILED_PRECONDITION) before any is upserted. A run that fails deletes the collections it
created that are still empty, unless another run of this gateway is filling them. Vectors go to
the index with the digest of the image they were made from, so those of an image replaced
meanwhile are never stored; an item deleted meanwhile is left out. A damaged collection is
DATA_LOSS, unless the run is asked to rebuild it.
"""

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from convsearch.enums import METRIC_ENUMS, POOLING_ENUMS
from convsearch.errors import AlreadyExists, ConvsearchError, DataLoss, NotFound
from convsearch.extractor.v1 import extractor_pb2
from convsearch.index.v1 import index_pb2
from convsearch.tensors import from_tensor, to_tensor
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import Target, check_weights

log = logging.getLogger("convsearch.gateway.indexing")
_CHECK_CHUNK = 5000
_MAX_ERRORS = 20
_SIZE_CHUNK = 1000  # ids whose image sizes are asked for at once
_MESSAGE_MARGIN = 1 << 20  # bytes of a message left for its framing
_ITEM_FRAMING = 64  # bytes of an item's own framing in a message, at most


@dataclasses.dataclass
class Progress:
    """Where an indexing run stands. The thread that feeds the extractor counts beside the one
    reading its answers, so counts change only through `count` and `fail`."""

    total: int = 0
    done: int = 0
    failed: int = 0
    images_per_second: float = 0.0
    collections: list[str] = dataclasses.field(default_factory=list)
    finished: bool = False
    errors: deque = dataclasses.field(default_factory=lambda: deque(maxlen=_MAX_ERRORS))
    failed_ids: dict[str, str] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, done: int) -> None:
        """Counts `done` more items as done."""
        with self._lock:
            self.done += done

    def fail(self, item_id: str, message: str) -> None:
        """Counts an item as done and failed, for `message`."""
        with self._lock:
            self.failed += 1
            self.done += 1
            self.failed_ids[item_id] = message
            self.errors.append(f"{item_id}: {message}")


def _ensure_collections(backends: Backends, dataset: str, targets: Sequence[Target], created: list[str],
                        rebuild_damaged: bool = False) -> dict[str, str]:
    """Creates the collections that do not exist yet (appending their names to `created`), and
    damaged ones again when asked to; returns the weights fingerprint of every target's collection."""
    listed = backends.index.call("ListCollections", index_pb2.ListCollectionsRequest(dataset=dataset)).collections
    existing = {c.name: c.spec.weights for c in listed}
    wanted = {target.collection for target in targets}
    for damaged in (c for c in listed if c.damage and c.name in wanted):
        if not rebuild_damaged:
            raise DataLoss(damaged.damage, reason="COLLECTION_DAMAGED", resource_type="collection",
                           resource_name=damaged.name, metadata={"dataset": dataset, "collection": damaged.name})
        log.warning("rebuilding damaged collection %s of %s: %s", damaged.name, dataset, damaged.damage)
        backends.index.call("DeleteCollection", index_pb2.DeleteCollectionRequest(dataset=dataset,
                                                                                  collection=damaged.name))
        del existing[damaged.name]
    for target in targets:
        if target.collection in existing:
            continue
        spec = index_pb2.CollectionSpec(
            model=target.model, layer=target.layer, pooling=POOLING_ENUMS[target.pooling],
            metric=METRIC_ENUMS[target.metric], minkowski_p=target.minkowski_p, dimension=target.dimension,
            weights=target.weights)
        try:
            backends.index.call("CreateCollection", index_pb2.CreateCollectionRequest(dataset=dataset, spec=spec))
            created.append(target.collection)
            existing[target.collection] = target.weights
        except AlreadyExists:  # another run made it meanwhile
            existing[target.collection] = backends.index.call("GetCollectionStats", index_pb2.GetCollectionStatsRequest(
                dataset=dataset, collection=target.collection)).collection.spec.weights
    return {target.collection: existing[target.collection] for target in targets}


class _Runs:
    """The collections this gateway's runs are filling, and by how many runs each. A failed run
    deletes an empty collection it created only while no other run uses it: the check and the
    delete hold the lock a run takes to join, so no run joins in between; the index deletes only
    a collection still empty, so a run of another gateway that stored vectors meanwhile keeps them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users: Counter[tuple[str, str]] = Counter()

    @contextlib.contextmanager
    def joined(self, dataset: str, names: Iterable[str]) -> Iterator[None]:
        keys = Counter((dataset, name) for name in set(names))
        with self._lock:
            self._users += keys
        try:
            yield
        finally:
            with self._lock:
                self._users -= keys

    def delete_empty(self, backends: Backends, dataset: str, names: Sequence[str]) -> None:
        """Deletes those of the named collections that hold no vectors and no other run uses (the
        index checks for vectors as it deletes, for runs of other gateways); a failure here is
        only logged, so it never hides the run's own error."""
        with self._lock:
            for name in names:
                if self._users[dataset, name] > 1:
                    continue
                try:
                    backends.index.call("DeleteCollection", index_pb2.DeleteCollectionRequest(
                        dataset=dataset, collection=name, only_if_empty=True))
                except ConvsearchError as exc:
                    if exc.reason != "COLLECTION_NOT_EMPTY":
                        log.warning("could not delete the empty collection %s of %s after a failed run: %s", name,
                                    dataset, exc)


_RUNS = _Runs()


@contextlib.contextmanager
def prepared_collections(backends: Backends, dataset: str, targets: Sequence[Target],
                         rebuild_damaged: bool = False) -> Iterator[dict[str, str]]:
    """Creates the targets' missing collections (and damaged ones again, when asked to), bound
    to the extractor's weights, and gives the weights fingerprint of every target's collection.
    When the block fails (or is abandoned), the collections created here that are still empty
    are deleted; never one that existed before, holds vectors, or another run of this gateway
    is filling."""
    created: list[str] = []
    with _RUNS.joined(dataset, (target.collection for target in targets)):
        try:
            yield _ensure_collections(backends, dataset, targets, created, rebuild_damaged)
        except BaseException:
            _RUNS.delete_empty(backends, dataset, created)
            raise


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
                ids: Sequence[str] | None = None, rebuild_damaged: bool = False) -> Iterator[Progress]:
    """Fills the targets' collections (created as needed) for `ids` (default: every item); yields
    progress after each batch. A failed run deletes the collections it created that are still empty."""
    with prepared_collections(backends, dataset, targets, rebuild_damaged) as weights:
        yield from fill_collections(backends, dataset, targets, weights, batch_size, ids)


def fill_collections(backends: Backends, dataset: str, targets: Sequence[Target], weights: Mapping[str, str],
                     batch_size: int = 32, ids: Sequence[str] | None = None) -> Iterator[Progress]:
    """Fills existing collections for `ids` (default: every item), given each one's weights
    fingerprint; yields progress after each batch."""
    ids = [item_id for item_id, _ in all_items(backends, dataset)] if ids is None else list(ids)
    groups: dict[tuple[str, str], list[Target]] = defaultdict(list)
    for target in targets:
        groups[target.model, target.pooling].append(target)
    missing = {target.collection: missing_ids(backends, dataset, target.collection, ids) for target in targets}
    work: dict[tuple[str, str], list[str]] = {}
    for group, members in groups.items():
        needed = set().union(*(missing[target.collection] for target in members))
        work[group] = [item_id for item_id in ids if item_id in needed]
    progress = Progress(total=sum(len(need) for need in work.values()),
                        collections=[target.collection for target in targets])
    started = time.monotonic()
    yield progress
    with ThreadPoolExecutor(1, thread_name_prefix="upsert") as upserter:
        for (model, pooling), need in work.items():
            if need:
                yield from _embed_group(backends, dataset, model, pooling, groups[model, pooling], weights, missing,
                                        need, batch_size, progress, started, upserter)
    progress.finished = True
    yield progress


def page_budget(max_message_bytes: int) -> int:
    """Bytes of items (images and the rest) one page of a fetch may hold: under the message
    limit, with room for the message's own framing."""
    return max(max_message_bytes * 3 // 4, max_message_bytes - _MESSAGE_MARGIN)


def _pages(backends: Backends, dataset: str, need: Sequence[str], batch_size: int,
           progress: Progress) -> Iterator[list[str]]:
    """The ids of `need` in pages of at most `batch_size` items whose images (sizes asked of the
    index first, without the images) fit in one message each way: a fetch is bounded by bytes,
    not by a count. An item too large for any message is a failed item with the reason."""
    budget = page_budget(backends.max_message_bytes)
    for start in range(0, len(need), _SIZE_CHUNK):
        chunk = need[start:start + _SIZE_CHUNK]
        sized = backends.index.call("GetItems", index_pb2.GetItemsRequest(dataset=dataset, ids=chunk)).items
        progress.count(len(chunk) - len(sized))  # deleted since the run began: nothing to do
        page: list[str] = []
        page_bytes = 0
        for item in sized:
            size = item.image_size + item.ByteSize() + _ITEM_FRAMING
            if size > budget:
                message = (f"its image is {item.image_size:,} bytes, more than fit in one message "
                           f"({budget:,} bytes under --max-message-mb {backends.max_message_bytes >> 20}); raise "
                           "--max-message-mb of the gateway, index and extractor, or store a smaller image")
                progress.fail(item.id, message)
                continue
            if page and (len(page) >= batch_size or page_bytes + size > budget):
                yield page
                page, page_bytes = [], 0
            page.append(item.id)
            page_bytes += size
        if page:
            yield page


def _embed_group(backends: Backends, dataset: str, model: str, pooling: str, targets: Sequence[Target],
                 weights: Mapping[str, str], missing: Mapping[str, set[str]], need: Sequence[str], batch_size: int,
                 progress: Progress, started: float, upserter: ThreadPoolExecutor) -> Iterator[Progress]:
    layers = list(dict.fromkeys(target.layer for target in targets))  # once each, whatever the metrics
    feed_errors: list[Exception] = []
    digests: dict[str, str] = {}  # of the image each item was embedded from

    def requests():
        yield extractor_pb2.BulkEmbedRequest(config=extractor_pb2.EmbedConfig(
            model=model, layers=layers, pooling=POOLING_ENUMS[pooling]))
        try:
            for ids in _pages(backends, dataset, need, batch_size, progress):
                found = backends.index.call("GetItems", index_pb2.GetItemsRequest(
                    dataset=dataset, ids=ids, include_images=True))
                progress.count(len(ids) - len(found.items))  # deleted since the run began: nothing to do
                digests.update((item.id, item.image_digest) for item in found.items)
                yield extractor_pb2.BulkEmbedRequest(images=[
                    extractor_pb2.ImageInput(id=item.id, data=item.image) for item in found.items])
        except Exception as exc:  # noqa: BLE001 - re-raised by the reading side
            feed_errors.append(exc)

    pending: Future | None = None
    batch_ids: list[str] = []
    batch_vectors: dict[str, list] = {layer: [] for layer in layers}

    def flush() -> Future:
        ids, vectors = list(batch_ids), {layer: list(rows) for layer, rows in batch_vectors.items()}
        batch_ids.clear()
        for rows in batch_vectors.values():
            rows.clear()
        # In this RPC's context, so the upserts carry its request id.
        return upserter.submit(contextvars.copy_context().run, _upsert, backends, dataset, targets, missing, ids,
                               vectors, [digests.pop(item_id) for item_id in ids], progress)

    accepted_weights = None
    with backends.extractor.opened():
        answers = backends.extractor.stub.BulkEmbed(requests())
    try:
        for answer in answers:
            if answer.WhichOneof("result") == "error":
                progress.fail(answer.id, answer.error.message)
                continue
            if answer.weights != accepted_weights:  # each answer says which weights made it
                for target in targets:
                    check_weights(dataset, target.collection, weights[target.collection], answer.weights)
                accepted_weights = answer.weights
            batch_ids.append(answer.id)
            for entry in answer.vectors.layers:
                batch_vectors[entry.layer].append(from_tensor(entry.vector))
            if len(batch_ids) >= batch_size:
                if pending is not None:
                    progress.count(pending.result())
                    progress.images_per_second = progress.done / max(1e-9, time.monotonic() - started)
                    yield progress
                pending = flush()
    except grpc.RpcError as exc:
        raise backends.extractor.error(exc) from None
    finally:
        answers.cancel()  # the stream ends here when this run stops early; a no-op once it has ended
    if feed_errors:
        raise feed_errors[0]
    if pending is not None:
        progress.count(pending.result())  # first: a failed upsert ends the run before another one starts
    if batch_ids:
        progress.count(flush().result())
    progress.images_per_second = progress.done / max(1e-9, time.monotonic() - started)
    yield progress


def _upsert(backends: Backends, dataset: str, targets: Sequence[Target], missing: Mapping[str, set[str]],
            ids: list[str], vectors: dict, digests: list[str], progress: Progress) -> int:
    """Upserts each item's vector of a layer into the collections of that layer that lacked it,
    with the digest of the image it was made from; in messages under the message limit."""
    stale: set[str] = set()
    budget = page_budget(backends.max_message_bytes)
    for target in targets:
        rows = [row for row, item_id in enumerate(ids) if item_id in missing[target.collection]]
        if not rows:
            continue
        row_bytes = vectors[target.layer][rows[0]].nbytes + max(len(ids[row]) + len(digests[row]) for row in rows)
        step = max(1, budget // (row_bytes + 2 * _ITEM_FRAMING))
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            stale.update(_upsert_chunk(backends, dataset, target.collection, [ids[row] for row in chunk],
                                       np.stack([vectors[target.layer][row] for row in chunk]),
                                       [digests[row] for row in chunk]))
    for item_id in sorted(stale):
        message = "its image was replaced while it was embedded; index again to embed the new one"
        progress.failed_ids[item_id] = message  # not indexed: an ingest says so for the item
        progress.errors.append(f"{item_id}: {message}")
    return len(ids)


def _upsert_chunk(backends: Backends, dataset: str, collection: str, ids: list[str], vectors: np.ndarray,
                  digests: list[str]) -> list[str]:
    """Upserts one message of vectors; answers the stale ids. Items deleted since their images
    were fetched (ITEM_NOT_FOUND) are left out, as deleted items are everywhere in a run: there
    is nothing to do for them."""
    while True:
        try:
            return list(backends.index.call("UpsertVectors", index_pb2.UpsertVectorsRequest(
                dataset=dataset, collection=collection, ids=ids, vectors=to_tensor(vectors),
                image_digests=digests)).stale_ids)
        except NotFound as exc:
            if exc.reason != "ITEM_NOT_FOUND":
                raise
            present = {item.id for item in backends.index.call("GetItems", index_pb2.GetItemsRequest(
                dataset=dataset, ids=ids)).items}
            if len(present) == len(ids):
                raise
            rows = [row for row, item_id in enumerate(ids) if item_id in present]
            if not rows:
                return []
            ids, vectors, digests = [ids[row] for row in rows], vectors[rows], [digests[row] for row in rows]
