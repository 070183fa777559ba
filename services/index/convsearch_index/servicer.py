"""IndexService over gRPC: converts messages and leaves the work to the Index core."""

import itertools

from google.protobuf.timestamp_pb2 import Timestamp

from convsearch.embedding import minkowski_p_of
from convsearch.enums import metric_name, pooling_name
from convsearch.errors import InvalidArgument
from convsearch.grpc_errors import map_errors
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.naming import check_model_name
from convsearch.tensors import from_tensor, to_tensor
from convsearch_index.engine import CollectionInfo, CollectionKey, Index
from convsearch_index.records import DatasetRecord, ItemRecord
from convsearch_index.replication import replicate, spec_message
from convsearch_index.snapshot_files import chunks

DEFAULT_PAGE = 100


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _dataset(record: DatasetRecord, version: int) -> pb.Dataset:
    return pb.Dataset(name=record.name, description=record.description, create_time=_timestamp(record.created_at),
                      item_count=record.item_count, collection_count=record.collection_count, version=version)


def _item(record: ItemRecord) -> pb.Item:
    return pb.Item(id=record.id, label=record.label, metadata=record.metadata, image=record.image,
                   image_digest=record.digest, image_size=record.image_size)


def _collection(info: CollectionInfo) -> pb.Collection:
    stats = info.vectors.stats() if info.vectors is not None else {}
    return pb.Collection(name=info.key.name, dataset=info.dataset, spec=spec_message(info.spec_dict()),
                         damage=info.damage, **stats)


class IndexServicer(index_pb2_grpc.IndexServiceServicer):
    """Thin gRPC edge of the index."""

    def __init__(self, index: Index):
        self.index = index

    @map_errors
    def CreateDataset(self, request, context):
        record = self.index.create_dataset(request.name, request.description)
        version = self.index.version(request.name)
        return pb.CreateDatasetResponse(dataset=_dataset(record, version), version=version)

    @map_errors
    def GetDataset(self, request, context):
        return pb.GetDatasetResponse(dataset=_dataset(self.index.dataset(request.name),
                                                      self.index.version(request.name)))

    @map_errors
    def ListDatasets(self, request, context):
        return pb.ListDatasetsResponse(datasets=[_dataset(record, self.index.version(record.name))
                                                 for record in self.index.datasets()])

    @map_errors
    def DeleteDataset(self, request, context):
        self.index.delete_dataset(request.name)
        return pb.DeleteDatasetResponse(version=self.index.version(request.name))

    @staticmethod
    def _records(request) -> list[ItemRecord]:
        return [ItemRecord(item.id, item.label, dict(item.metadata), item.image) for item in request.items]

    @map_errors
    def PutItems(self, request, context):
        inserted, replaced = self.index.put_items(request.dataset, self._records(request))
        return pb.PutItemsResponse(inserted=inserted, replaced=replaced, version=self.index.version(request.dataset))

    @map_errors
    def PutItemsStream(self, request_iterator, context):
        dataset, inserted, replaced = "", 0, 0
        for request in request_iterator:
            if request.dataset and dataset and request.dataset != dataset:
                raise InvalidArgument(f"the stream switched from dataset {dataset!r} to {request.dataset!r}; "
                                      "open a stream per dataset")
            dataset = dataset or request.dataset
            if not dataset:
                raise InvalidArgument("the first message of the stream must name the dataset")
            if request.items:
                counts = self.index.put_items(dataset, self._records(request))
                inserted, replaced = inserted + counts[0], replaced + counts[1]
        return pb.PutItemsStreamResponse(inserted=inserted, replaced=replaced,
                                         version=self.index.version(dataset) if dataset else 0)

    @map_errors
    def GetItems(self, request, context):
        found, missing = self.index.get_items(request.dataset, list(request.ids), request.include_images)
        return pb.GetItemsResponse(items=[_item(i) for i in found], missing_ids=missing)

    @map_errors
    def ScanItems(self, request, context):
        size = request.page_size or DEFAULT_PAGE
        items = self.index.scan_items(request.dataset, request.page_token, size, request.include_images,
                                      request.label)
        token = items[-1].id if len(items) == size else ""
        return pb.ScanItemsResponse(items=[_item(i) for i in items], next_page_token=token)

    @map_errors
    def DeleteItems(self, request, context):
        deleted, not_found = self.index.delete_items(request.dataset, list(request.ids))
        return pb.DeleteItemsResponse(deleted=deleted, not_found=not_found, version=self.index.version(request.dataset))

    @map_errors
    def CreateCollection(self, request, context):
        spec = request.spec
        metric = metric_name(spec.metric, "spec.metric")
        check_model_name(spec.model)
        key = CollectionKey(spec.model, spec.layer, pooling_name(spec.pooling, "spec.pooling"), metric,
                            minkowski_p_of(metric, spec.minkowski_p, "spec.minkowski_p"))
        info = self.index.create_collection(request.dataset, key, spec.dimension, spec.m or 16,
                                            spec.ef_construction or 200, spec.ef or 64, weights=spec.weights)
        return pb.CreateCollectionResponse(collection=_collection(info), version=self.index.version(request.dataset))

    @map_errors
    def ListCollections(self, request, context):
        return pb.ListCollectionsResponse(collections=[_collection(i) for i in self.index.collections(request.dataset)])

    @map_errors
    def DeleteCollection(self, request, context):
        self.index.delete_collection(request.dataset, request.collection, request.only_if_empty)
        return pb.DeleteCollectionResponse(version=self.index.version(request.dataset))

    @map_errors
    def GetCollectionStats(self, request, context):
        info = self.index.collection(request.dataset, request.collection)
        info.healthy()
        return pb.GetCollectionStatsResponse(collection=_collection(info))

    @map_errors
    def UpsertVectors(self, request, context):
        vectors = from_tensor(request.vectors, "vectors")
        inserted, replaced, stale = self.index.upsert_vectors(request.dataset, request.collection,
                                                              list(request.ids), vectors, list(request.image_digests))
        return pb.UpsertVectorsResponse(inserted=inserted, replaced=replaced, stale_ids=stale,
                                        version=self.index.version(request.dataset))

    @map_errors
    def Search(self, request, context):
        if request.query_ids:
            if request.queries.shape:
                raise InvalidArgument("send either queries or query_ids, not both")
            queries = list(request.query_ids)
        else:
            queries = from_tensor(request.queries, "queries")
            if queries.ndim != 2:
                raise InvalidArgument(f"queries have shape {list(queries.shape)}; send [Q, dimension]")
        results, exact = self.index.search(
            request.dataset, request.collection, queries, request.k, request.ef, list(request.include_labels),
            list(request.exclude_labels), list(request.exclude_ids), request.exact)
        return pb.SearchResponse(exact=exact, results=[
            pb.QueryResult(ids=ids, labels=labels, distances=distances.tolist()) for ids, labels, distances in results])

    @map_errors
    def GetVectors(self, request, context):
        vectors = self.index.collection(request.dataset, request.collection).healthy()
        if request.ids_only:
            found, missing = vectors.has(list(request.ids))
            return pb.GetVectorsResponse(ids=found, missing_ids=missing)
        found, values, missing = vectors.get(list(request.ids))
        return pb.GetVectorsResponse(ids=found, vectors=to_tensor(values), missing_ids=missing)

    @map_errors
    def SnapshotDataset(self, request, context):
        info, deleted = self.index.snapshot(request.dataset, retention=not request.skip_retention)
        return pb.SnapshotDatasetResponse(snapshot=info.name, size_bytes=info.size_bytes, deleted=deleted,
                                          create_time=_timestamp(info.created_at))

    @map_errors
    def ListSnapshots(self, request, context):
        return pb.ListSnapshotsResponse(snapshots=[
            pb.Snapshot(name=i.name, dataset=i.dataset, create_time=_timestamp(i.created_at), size_bytes=i.size_bytes)
            for i in self.index.snapshots(request.dataset)])

    @map_errors
    def DeleteSnapshot(self, request, context):
        self.index.delete_snapshot(request.snapshot)
        return pb.DeleteSnapshotResponse()

    @map_errors
    def ReadSnapshot(self, request, context):
        with self.index.open_snapshot(request.snapshot) as file:
            for data, size, sha256 in chunks(file):
                yield pb.ReadSnapshotResponse(data=data, size_bytes=size, sha256=sha256)

    @map_errors
    def WriteSnapshot(self, request_iterator, context):
        requests = iter(request_iterator)
        first = next(requests, None)
        if first is None or not first.snapshot:
            raise InvalidArgument("the first message of the stream must name the snapshot", field="snapshot")
        parts = ((r.data, r.sha256) for r in itertools.chain([first], requests))
        info = self.index.store_snapshot(first.snapshot, parts)
        return pb.WriteSnapshotResponse(snapshot=pb.Snapshot(
            name=info.name, dataset=info.dataset, create_time=_timestamp(info.created_at), size_bytes=info.size_bytes))

    @map_errors
    def RestoreDataset(self, request, context):
        record = self.index.restore(request.snapshot, request.dataset, request.fence_ttl_s)
        version = self.index.version(request.dataset)
        return pb.RestoreDatasetResponse(dataset=_dataset(record, version), version=version)

    @map_errors
    def FenceDataset(self, request, context):
        self.index.fence(request.dataset, request.ttl_s)
        return pb.FenceDatasetResponse(version=self.index.version(request.dataset))

    @map_errors
    def PutAttachment(self, request, context):
        self.index.put_attachment(request.dataset, request.collection, request.key, request.version, request.data,
                                  request.collection_id)
        return pb.PutAttachmentResponse(version=self.index.version(request.dataset))

    @map_errors
    def GetAttachment(self, request, context):
        info, stored = self.index.attachment(request.dataset, request.collection, request.key)
        reply = pb.GetAttachmentResponse(current_version=info.healthy().version, collection_id=info.id)
        if stored is not None:
            reply.found, reply.version, reply.data = True, stored[0], stored[1]
        return reply

    @map_errors
    def Replicate(self, request, context):
        yield from replicate(self.index, request, context)
