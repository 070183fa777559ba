"""The primary's side of replication: the Replicate stream a follower reads (see follower.py).

A stream starts where the follower's position is: right there when it is in this process's
change log (same epoch, not dropped) or is where the log this one continues ended (a clean stop
and start), else with a whole copy of every dataset. A dataset copy is
its items (without images), attachments (a message each) and the files of each collection (a
checkpoint and the log after it), so the follower opens the collection as it is instead of
rebuilding its graph.
The items are read from a SQLite snapshot taken with the files (writes to the dataset wait only
for that, not for the reading), and item pages and file chunks take turns on the stream, so the
follower stores items while the files arrive.
The change log cursor is taken before the copies: every change after it follows them, and the
follower skips those a copy already holds (each copy names the position it is consistent with).
After that the stream sends the changes in order as they are applied, in batches, and an empty
batch every second when there are none (liveness, and the primary's latest position). A clean
stop seals the log: each stream ends once it has sent every change.
"""

import contextlib
import itertools
import json
import logging
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from google.protobuf.timestamp_pb2 import Timestamp

from convsearch.enums import METRIC_ENUMS, POOLING_ENUMS, metric_name, pooling_name
from convsearch.errors import FailedPrecondition, NotFound
from convsearch.index.v1 import index_pb2 as pb
from convsearch.naming import collection_name
from convsearch.tensors import to_tensor
from convsearch_index.changes import Change, Compacted, DatasetCopy
from convsearch_index.engine import Index
from convsearch_index.records import ItemRecord

log = logging.getLogger("convsearch.index.replication")
FILE_CHUNK = 2 << 20  # bytes of a collection file per message
ITEMS_PER_MESSAGE = 5000  # items of a dataset copy per message (no images: ~100 bytes each)
BATCH_BYTES = 4 << 20  # changes per message, about
HEARTBEAT_S = 1.0
PROTOCOL = 2
"""The stream's format: 2 sends a copy's attachments one a message. A primary and its followers
speak the same (a mismatch is refused at the start, never half understood)."""


def spec_message(spec: dict) -> pb.CollectionSpec:
    """A collection's spec (as the engine keeps it) as a message."""
    return pb.CollectionSpec(model=spec["model"], layer=spec["layer"], pooling=POOLING_ENUMS[spec["pooling"]],
                             metric=METRIC_ENUMS[spec["metric"]], minkowski_p=spec["minkowski_p"],
                             dimension=spec["dimension"], m=spec["m"], ef_construction=spec["ef_construction"],
                             ef=spec["ef"], weights=spec.get("weights", ""), id=spec.get("id", ""))


def spec_dict(message: pb.CollectionSpec) -> dict:
    """The engine's spec of a CollectionSpec sent by a primary (complete: no defaults to fill in)."""
    return {"model": message.model, "layer": message.layer, "pooling": pooling_name(message.pooling, "pooling"),
            "metric": metric_name(message.metric, "metric"), "minkowski_p": message.minkowski_p,
            "dimension": message.dimension, "m": message.m, "ef_construction": message.ef_construction,
            "ef": message.ef, "weights": message.weights, "id": message.id}


def spec_name(spec: dict) -> str:
    return collection_name(spec["model"], spec["layer"], spec["pooling"], spec["metric"], spec["minkowski_p"])


def item_message(item: ItemRecord) -> pb.Item:
    """An item without its image (digest and size kept)."""
    return pb.Item(id=item.id, label=item.label, metadata=item.metadata, image_digest=item.digest,
                   image_size=item.image_size)


def _copied_item(row: tuple[str, str, str, str, int]) -> pb.Item:
    """An item of a dataset copy from its stored row (Records.item_rows)."""
    item_id, label, metadata, digest, size = row
    return pb.Item(id=item_id, label=label, metadata=json.loads(metadata) if metadata != "{}" else None,
                   image_digest=digest, image_size=size)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def change_message(change: Change) -> pb.Change:
    """A logged change as the stream sends it (a copy_dataset change went as a copy before it,
    so it is sent bare: only its position)."""
    message, fields, dataset = pb.Change(position=change.position), change.fields, change.dataset
    if change.kind == "create_dataset":
        message.create_dataset.CopyFrom(pb.Dataset(name=dataset, description=fields["description"],
                                                   create_time=_timestamp(fields["created_at"])))
    elif change.kind == "delete_dataset":
        message.delete_dataset.name = dataset
    elif change.kind == "put_items":
        message.put_items.CopyFrom(pb.PutItemsRequest(dataset=dataset, items=map(item_message, fields["items"])))
    elif change.kind == "delete_items":
        message.delete_items.CopyFrom(pb.DeleteItemsRequest(dataset=dataset, ids=fields["ids"]))
    elif change.kind == "create_collection":
        message.create_collection.CopyFrom(pb.CreateCollectionRequest(dataset=dataset,
                                                                      spec=spec_message(fields["spec"])))
    elif change.kind == "delete_collection":
        message.delete_collection.CopyFrom(pb.DeleteCollectionRequest(dataset=dataset, collection=fields["name"]))
    elif change.kind == "upsert_vectors":
        message.upsert_vectors.CopyFrom(pb.UpsertVectorsRequest(
            dataset=dataset, collection=fields["collection"], ids=fields["ids"], vectors=to_tensor(fields["vectors"]),
            image_digests=fields["digests"]))
    elif change.kind == "put_attachment":
        message.put_attachment.CopyFrom(pb.PutAttachmentRequest(
            dataset=dataset, collection=fields["collection"], key=fields["key"], version=fields["version"],
            data=fields["data"]))
    return message


def _copy(index: Index, dataset: str) -> Iterator[pb.ReplicateResponse]:
    """The messages of a whole copy of a dataset; none when it was deleted meanwhile (its
    deletion follows in the log)."""
    work = index.data_dir / "replication"
    work.mkdir(exist_ok=True)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="copy-", dir=work))  # on the data dir's file system: hard links
    try:
        try:
            copy = index.copy_dataset(dataset, folder)
        except NotFound:
            return
        try:
            yield from _copy_messages(dataset, copy)
        finally:
            copy.items.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_messages(dataset: str, copy: DatasetCopy) -> Iterator[pb.ReplicateResponse]:
    """The messages of a dataset copy: its header (collections, their files' sizes), its
    attachments, its items, its files, its end."""
    record = copy.record
    yield pb.ReplicateResponse(dataset_copy=pb.DatasetCopy(
        dataset=pb.Dataset(name=dataset, description=record.description, create_time=_timestamp(record.created_at),
                           item_count=record.item_count, collection_count=record.collection_count),
        position=copy.position,
        collections=[*(pb.CollectionCopy(spec=spec_message(spec), files=[
            pb.CopiedFile(path=path, size_bytes=(files / path).stat().st_size) for path in paths])
            for spec, files, paths in copy.collections),
            *(pb.CollectionCopy(spec=spec_message(spec), damage=damage) for spec, damage in copy.damaged)]))
    for collection, key, version, data in copy.attachments:
        yield pb.ReplicateResponse(attachment=pb.PutAttachmentRequest(dataset=dataset, collection=collection,
                                                                      key=key, version=version, data=data))
    items = (pb.ReplicateResponse(items=pb.PutItemsRequest(dataset=dataset, items=map(_copied_item, page)))
             for page in copy.items.pages(ITEMS_PER_MESSAGE))
    # Item pages and file chunks take turns, so a follower stores items while the files arrive.
    for pair in itertools.zip_longest(items, _file_chunks(copy)):
        yield from filter(None, pair)
    yield pb.ReplicateResponse(dataset_copy_end=pb.DatasetCopyEnd(dataset=dataset))
    log.info("copied dataset %s (%d items, %d collections) to a follower at position %d", dataset,
             record.item_count, len(copy.collections), copy.position)


def _file_chunks(copy: DatasetCopy) -> Iterator[pb.ReplicateResponse]:
    for spec, files, paths in copy.collections:
        name = spec_name(spec)
        for path in paths:
            with open(files / path, "rb") as handle:
                while data := handle.read(FILE_CHUNK):
                    yield pb.ReplicateResponse(file_chunk=pb.FileChunk(collection=name, path=path, data=data))


def _full_copy(index: Index, position: int) -> Iterator[pb.ReplicateResponse]:
    yield pb.ReplicateResponse(start=pb.ReplicationStart(epoch=index.changes.epoch, position=position,
                                                         full_sync=True, protocol=PROTOCOL))
    for dataset in index.records.dataset_names():
        yield from _copy(index, dataset)
    yield pb.ReplicateResponse(sync_done=pb.SyncDone(position=position))


def replicate(index: Index, request: pb.ReplicateRequest, context) -> Iterator[pb.ReplicateResponse]:
    """The Replicate stream of this primary to one follower, until the follower goes."""
    changes = index.changes
    if changes is None:
        raise FailedPrecondition("this index keeps no change log, so it cannot be followed",
                                 reason="NOT_A_PRIMARY")
    who = request.follower or context.peer()
    if request.protocol != PROTOCOL:
        raise FailedPrecondition(f"follower {who} speaks replication protocol {request.protocol}, this primary "
                                 f"{PROTOCOL}: run the same release on both", reason="REPLICATION_PROTOCOL_MISMATCH",
                                 metadata={"primary_protocol": str(PROTOCOL),
                                           "follower_protocol": str(request.protocol)})
    with contextlib.ExitStack() as pinned:  # a whole copy's later changes, until the follower has them
        yield from _stream(index, request, context, who, pinned)


def _stream(index: Index, request: pb.ReplicateRequest, context, who: str,
            pinned: contextlib.ExitStack) -> Iterator[pb.ReplicateResponse]:
    changes = index.changes
    position = request.position
    full = not changes.continues(request.epoch, position)
    pin = None
    if full:
        position = changes.last  # the cursor: taken before the copies, so no change is missed
        log.info("follower %s: copying everything (its epoch %s, position %d; this epoch %s)", who,
                 request.epoch or "none", request.position, changes.epoch)
        pin = pinned.enter_context(changes.pinned(position))
        yield from _full_copy(index, position)
    else:
        log.info("follower %s: resuming after position %d", who, position)
        yield pb.ReplicateResponse(start=pb.ReplicationStart(epoch=changes.epoch, position=position,
                                                             protocol=PROTOCOL))
    while context.is_active():
        try:
            batch = changes.after(position, BATCH_BYTES, HEARTBEAT_S)
        except Compacted:
            position = changes.last
            log.warning("follower %s fell behind the change log (--replication-log-mb); copying everything", who)
            pinned.close()
            pin = pinned.enter_context(changes.pinned(position))
            yield from _full_copy(index, position)
            continue
        messages = []
        for change in batch:
            if change.kind == "copy_dataset":
                if messages:
                    yield pb.ReplicateResponse(changes=pb.ChangeBatch(changes=messages,
                                                                      primary_position=changes.last))
                    messages = []
                yield from _copy(index, change.dataset)
            messages.append(change_message(change))
        if batch:
            position = batch[-1].position
        if pin is not None and position >= changes.last:
            pinned.close()  # caught up: from now on the log keeps what its bound allows
            pin = None
        elif pin is not None:
            changes.move_pin(pin, position)
        yield pb.ReplicateResponse(changes=pb.ChangeBatch(changes=messages, primary_position=changes.last))
        if changes.sealed and position >= changes.last:
            log.info("follower %s has every change up to %d; this primary is stopping", who, position)
            return
