"""The index over gRPC: datasets, items, collections, vectors, search, snapshots, restarts,
and a clear status for every bad request with nothing stored changed."""

import types

import grpc
import numpy as np
import pytest

from convsearch.common.v1 import common_pb2
from convsearch.grpc_errors import error_from_call
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.tensors import from_tensor, to_tensor
from tests.conftest import start_index
from tests.test_index_collection import clustered

COLLECTION = "lite0/_conv_head/avg/cosine"


def open_index(path):
    service, channel = start_index(path)
    return types.SimpleNamespace(service=service, channel=channel, stub=index_pb2_grpc.IndexServiceStub(channel))


def close_index(handle):
    handle.channel.close()
    handle.service.stop(1.0)


@pytest.fixture
def index(tmp_path):
    handle = open_index(tmp_path / "data")
    yield handle
    close_index(handle)


def fill(stub, n=60, dim=8, dataset="shoes"):
    """A dataset of n labeled items (3 labels) with a cosine collection holding their vectors."""
    stub.CreateDataset(pb.CreateDatasetRequest(name=dataset, description="test"))
    items = [pb.Item(id=f"i{i:03d}", label="abc"[i % 3], metadata={"n": str(i)}, image=b"img%d" % i)
             for i in range(n)]
    stub.PutItems(pb.PutItemsRequest(dataset=dataset, items=items))
    stub.CreateCollection(pb.CreateCollectionRequest(dataset=dataset, spec=pb.CollectionSpec(
        model="lite0", layer="_conv_head", pooling=common_pb2.POOLING_AVG, metric=common_pb2.METRIC_COSINE,
        dimension=dim)))
    vectors = clustered(n, dim, clusters=3)
    stub.UpsertVectors(pb.UpsertVectorsRequest(dataset=dataset, collection=COLLECTION,
                                               ids=[item.id for item in items], vectors=to_tensor(vectors)))
    return vectors


def search(stub, queries, k=5, dataset="shoes", **options):
    reply = stub.Search(pb.SearchRequest(dataset=dataset, collection=COLLECTION, queries=to_tensor(queries), k=k,
                                         **options))
    hits = [list(zip(result.ids, result.labels, result.distances, strict=True)) for result in reply.results]
    return hits, reply.exact


def test_datasets_items_and_collections(index):
    stub = index.stub
    vectors = fill(stub)
    dataset = stub.GetDataset(pb.GetDatasetRequest(name="shoes")).dataset
    assert (dataset.item_count, dataset.collection_count, dataset.description) == (60, 1, "test")
    assert [d.name for d in stub.ListDatasets(pb.ListDatasetsRequest()).datasets] == ["shoes"]
    got = stub.GetItems(pb.GetItemsRequest(dataset="shoes", ids=["i002", "zzz"], include_images=True))
    assert [(i.id, i.label, i.metadata["n"], i.image) for i in got.items] == [("i002", "c", "2", b"img2")]
    assert list(got.missing_ids) == ["zzz"]
    pages, token = [], ""
    while True:
        page = stub.ScanItems(pb.ScanItemsRequest(dataset="shoes", page_size=25, page_token=token))
        pages.append([item.id for item in page.items])
        assert all(not item.image for item in page.items)
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [25, 25, 10] and sum(pages, []) == sorted(sum(pages, []))
    labeled = stub.ScanItems(pb.ScanItemsRequest(dataset="shoes", label="b", page_size=1000))
    assert len(labeled.items) == 20 and {i.label for i in labeled.items} == {"b"}
    stats = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)).collection
    assert (stats.count, stats.deleted, stats.approximate, stats.spec.dimension, stats.spec.m) == (60, 0, True, 8, 16)
    assert stats.capacity >= 60 and stats.memory_bytes > 60 * 8 * 4
    hits, exact = search(stub, vectors[:2])
    assert hits[0][0][0] == "i000" and hits[1][0][0] == "i001" and not exact
    fetched = stub.GetVectors(pb.GetVectorsRequest(dataset="shoes", collection=COLLECTION, ids=["i005", "no"]))
    np.testing.assert_allclose(from_tensor(fetched.vectors), vectors[[5]], rtol=1e-6)
    assert list(fetched.missing_ids) == ["no"]
    which = stub.GetVectors(pb.GetVectorsRequest(dataset="shoes", collection=COLLECTION, ids=["i005", "no"],
                                                 ids_only=True))
    assert (list(which.ids), list(which.missing_ids), which.vectors.data) == (["i005"], ["no"], b"")


def test_filters_exclusions_and_deletes(index):
    stub = index.stub
    vectors = fill(stub)
    hits, _ = search(stub, vectors[:1], k=10, include_labels=["b"], exclude_ids=["i001"])
    assert len(hits[0]) == 10 and all(label == "b" for _, label, _ in hits[0])
    assert "i001" not in {item_id for item_id, _, _ in hits[0]}
    hits, _ = search(stub, vectors[:1], k=100, exclude_labels=["a", "b"])
    assert len(hits[0]) == 20 and {label for _, label, _ in hits[0]} == {"c"}
    reply = stub.DeleteItems(pb.DeleteItemsRequest(dataset="shoes", ids=["i000", "i003", "nope"]))
    assert (reply.deleted, reply.not_found) == (2, 1)
    for exact in (False, True):
        hits, _ = search(stub, vectors[:1], k=100, exact=exact)
        assert len(hits[0]) == 58 and not {"i000", "i003"} & {item_id for item_id, _, _ in hits[0]}
    assert stub.GetDataset(pb.GetDatasetRequest(name="shoes")).dataset.item_count == 58


def test_replacing_an_items_image_drops_its_stale_vectors(index):
    stub = index.stub
    fill(stub)
    reply = stub.PutItems(pb.PutItemsRequest(dataset="shoes", items=[
        pb.Item(id="i001", label="b", image=b"img1"), pb.Item(id="i002", label="z", image=b"new"),
        pb.Item(id="new", label="a", image=b"x")]))
    assert (reply.inserted, reply.replaced) == (1, 2)
    fetched = stub.GetVectors(pb.GetVectorsRequest(dataset="shoes", collection=COLLECTION, ids=["i001", "i002"]))
    assert list(fetched.ids) == ["i001"] and list(fetched.missing_ids) == ["i002"]


def bad_requests(stub):
    good = to_tensor(np.ones((1, 8), np.float32))
    nan = np.ones((1, 8), np.float32)
    nan[0, 2] = np.nan
    return [
        (lambda: stub.CreateDataset(pb.CreateDatasetRequest(name="../x")), "INVALID_ARGUMENT", "invalid dataset name"),
        (lambda: stub.CreateDataset(pb.CreateDatasetRequest(name="shoes")), "ALREADY_EXISTS", "exists already"),
        (lambda: stub.GetDataset(pb.GetDatasetRequest(name="boots")), "NOT_FOUND", "does not exist"),
        (lambda: stub.PutItems(pb.PutItemsRequest(dataset="shoes")), "INVALID_ARGUMENT", "no items"),
        (lambda: stub.PutItems(pb.PutItemsRequest(dataset="shoes", items=[pb.Item(id="x" * 257)])),
         "INVALID_ARGUMENT", "use 1 to 256"),
        (lambda: stub.PutItems(pb.PutItemsRequest(dataset="shoes", items=[pb.Item(id="")])),
         "INVALID_ARGUMENT", "empty"),
        (lambda: stub.UpsertVectors(pb.UpsertVectorsRequest(
            dataset="shoes", collection=COLLECTION, ids=["i001"], vectors=to_tensor(np.ones((1, 9), np.float32)))),
         "INVALID_ARGUMENT", "[N, 8]"),
        (lambda: stub.UpsertVectors(pb.UpsertVectorsRequest(
            dataset="shoes", collection=COLLECTION, ids=["i001"], vectors=to_tensor(nan))), "INVALID_ARGUMENT", "NaN"),
        (lambda: stub.UpsertVectors(pb.UpsertVectorsRequest(
            dataset="shoes", collection=COLLECTION, ids=["ghost"], vectors=good)), "NOT_FOUND", "'ghost'"),
        (lambda: stub.UpsertVectors(pb.UpsertVectorsRequest(
            dataset="shoes", collection=COLLECTION, ids=[], vectors=to_tensor(np.ones((0, 8), np.float32)))),
         "INVALID_ARGUMENT", "no vectors"),
        (lambda: stub.UpsertVectors(pb.UpsertVectorsRequest(
            dataset="shoes", collection=COLLECTION, ids=["i001"],
            vectors=common_pb2.FloatTensor(data=b"123", shape=[1, 8]))), "INVALID_ARGUMENT", "3 bytes"),
        (lambda: search(stub, np.ones((1, 8), np.float32), k=0), "INVALID_ARGUMENT", "k = 0"),
        (lambda: search(stub, np.ones((1, 8), np.float32), k=5000), "INVALID_ARGUMENT", "use 1 to 1000"),
        (lambda: search(stub, np.ones((0, 8), np.float32)), "INVALID_ARGUMENT", "0 queries"),
        (lambda: search(stub, np.ones((1, 4), np.float32)), "INVALID_ARGUMENT", "[Q, 8]"),
        (lambda: stub.Search(pb.SearchRequest(dataset="shoes", collection="x/y/avg/cosine", queries=good, k=1)),
         "NOT_FOUND", "it has: " + COLLECTION),
        (lambda: stub.CreateCollection(pb.CreateCollectionRequest(dataset="shoes", spec=pb.CollectionSpec(
            model="lite0", layer="_conv_head", dimension=8))), "ALREADY_EXISTS", "exists already"),
        (lambda: stub.CreateCollection(pb.CreateCollectionRequest(dataset="shoes", spec=pb.CollectionSpec(
            model="lite0", layer="x", dimension=0))), "INVALID_ARGUMENT", "dimension 0"),
        (lambda: stub.CreateCollection(pb.CreateCollectionRequest(dataset="shoes", spec=pb.CollectionSpec(
            model="lite0", layer="x", dimension=8, metric=common_pb2.METRIC_MINKOWSKI, minkowski_p=0.5))),
         "INVALID_ARGUMENT", "p must be >= 1"),
        (lambda: stub.RestoreDataset(pb.RestoreDatasetRequest(snapshot="nothing", dataset="copy")),
         "NOT_FOUND", "no snapshot"),
    ]


def test_bad_requests_get_clear_statuses_and_change_nothing(index):
    stub = index.stub
    vectors = fill(stub)
    before = search(stub, vectors[:3], k=10)
    for number, (call, code, words) in enumerate(bad_requests(stub)):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code().name == code, (number, error.value.details())
        assert words in error.value.details(), (number, error.value.details())
    assert search(stub, vectors[:3], k=10) == before
    dataset = stub.GetDataset(pb.GetDatasetRequest(name="shoes")).dataset
    assert (dataset.item_count, dataset.collection_count) == (60, 1)


def test_stream_of_items(index):
    stub = index.stub
    stub.CreateDataset(pb.CreateDatasetRequest(name="bulk"))
    requests = [pb.PutItemsStreamRequest(dataset="bulk" if n == 0 else "", items=[
        pb.Item(id=f"{n}-{i}", label="x", image=bytes(200_000)) for i in range(10)]) for n in range(5)]
    reply = stub.PutItemsStream(iter(requests))  # 10 MB in all, over the 4 MiB message limit
    assert (reply.inserted, reply.replaced) == (50, 0)


def test_restart_keeps_everything(tmp_path):
    first = open_index(tmp_path)
    vectors = fill(first.stub)
    first.stub.DeleteItems(pb.DeleteItemsRequest(dataset="shoes", ids=["i004"]))
    before = search(first.stub, vectors[:4], k=10)
    close_index(first)
    reopened = open_index(tmp_path)
    try:
        assert search(reopened.stub, vectors[:4], k=10) == before
        assert reopened.stub.GetDataset(pb.GetDatasetRequest(name="shoes")).dataset.item_count == 59
    finally:
        close_index(reopened)


def test_snapshot_and_restore(index):
    """Items, collections and their stored results (an evaluation, still current: a restore, or
    a rebalance's move, lost them)."""
    stub = index.stub
    vectors = fill(stub)
    version = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)
                                      ).collection.version
    stub.PutAttachment(pb.PutAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation",
                                               version=version, data=b'{"score": 1}'))
    made = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)
                                   ).collection.spec.id
    snap = stub.SnapshotDataset(pb.SnapshotDatasetRequest(dataset="shoes"))
    assert snap.size_bytes > 0 and "/" not in snap.snapshot  # no server paths in replies
    stub.DeleteDataset(pb.DeleteDatasetRequest(name="shoes"))
    restored = stub.RestoreDataset(pb.RestoreDatasetRequest(snapshot=snap.snapshot, dataset="shoes2")).dataset
    assert (restored.item_count, restored.collection_count) == (60, 1)
    hits, _ = search(stub, vectors[:2], dataset="shoes2")
    assert hits[0][0][0] == "i000"
    items = stub.GetItems(pb.GetItemsRequest(dataset="shoes2", ids=["i007"], include_images=True)).items
    assert items[0].image == b"img7" and items[0].label == "b"
    got = stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes2", collection=COLLECTION, key="evaluation"))
    assert got.found and got.data == b'{"score": 1}' and got.version == got.current_version == version
    assert got.collection_id == made  # a copy keeps the collection's id


def test_search_by_stored_items(index):
    stub = index.stub
    vectors = fill(stub)
    reply = stub.Search(pb.SearchRequest(dataset="shoes", collection=COLLECTION, query_ids=["i000", "i007"], k=5,
                                         exclude_ids=["i003"]))
    by_vector, _ = search(stub, vectors[[0, 7]], k=8)
    for result, expected, query in zip(reply.results, by_vector, ("i000", "i007"), strict=True):
        assert list(result.ids) == [i for i, _, _ in expected if i not in (query, "i003")][:5]
    with pytest.raises(grpc.RpcError) as error:
        stub.Search(pb.SearchRequest(dataset="shoes", collection=COLLECTION, query_ids=["ghost"], k=5))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "'ghost' has no vector" in error.value.details()


def test_a_collection_created_again_has_a_new_id_and_refuses_the_old_ones_results(index):
    """Versions count a collection's batches since its creation, so one deleted and created again
    repeats the old one's versions: a result computed from the old one was stored as current for
    the new one. A result stored with the id read beside the version now needs that collection."""
    stub = index.stub
    fill(stub)
    old = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)).collection
    assert old.spec.id
    assert stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation")
                              ).collection_id == old.spec.id
    stub.DeleteCollection(pb.DeleteCollectionRequest(dataset="shoes", collection=COLLECTION))
    stub.CreateCollection(pb.CreateCollectionRequest(dataset="shoes", spec=old.spec))  # its id: the index's to make
    new = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)).collection
    assert new.spec.id not in ("", old.spec.id)
    with pytest.raises(grpc.RpcError) as refused:
        stub.PutAttachment(pb.PutAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation",
                                                   version=new.version, collection_id=old.spec.id, data=b"old"))
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert error_from_call(refused.value).reason == "COLLECTION_REPLACED"
    assert "deleted and created again" in refused.value.details() and "compute it again" in refused.value.details()
    assert not stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation")
                                  ).found
    stub.PutAttachment(pb.PutAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation",
                                               version=new.version, collection_id=new.spec.id, data=b"new"))
    assert stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation")
                              ).data == b"new"


def test_a_collection_is_deleted_only_if_empty_when_asked_so(index):
    """A failed run deleted the collection it created once a stats call found it empty, and a
    run of another gateway could store vectors between the call and the delete: they were lost."""
    stub = index.stub
    fill(stub)
    with pytest.raises(grpc.RpcError) as refused:
        stub.DeleteCollection(pb.DeleteCollectionRequest(dataset="shoes", collection=COLLECTION, only_if_empty=True))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_from_call(refused.value).reason == "COLLECTION_NOT_EMPTY" and "holds 60 vectors" in \
        refused.value.details()
    assert stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)
                                   ).collection.count == 60
    spec = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)).collection.spec
    stub.DeleteCollection(pb.DeleteCollectionRequest(dataset="shoes", collection=COLLECTION))
    stub.CreateCollection(pb.CreateCollectionRequest(dataset="shoes", spec=spec))
    stub.DeleteCollection(pb.DeleteCollectionRequest(dataset="shoes", collection=COLLECTION, only_if_empty=True))
    assert not stub.ListCollections(pb.ListCollectionsRequest(dataset="shoes")).collections


def test_attachments_follow_the_collection_version(tmp_path):
    handle = open_index(tmp_path)
    stub = handle.stub
    vectors = fill(stub)
    stats = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="shoes", collection=COLLECTION)).collection
    stub.PutAttachment(pb.PutAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation",
                                               version=stats.version, data=b"{}"))
    got = stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation"))
    assert got.found and got.data == b"{}" and got.version == got.current_version == stats.version
    close_index(handle)
    handle = open_index(tmp_path)  # the version survives a restart (checkpoint, then log replay)
    got = handle.stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation"))
    assert got.current_version == stats.version
    handle.stub.UpsertVectors(pb.UpsertVectorsRequest(dataset="shoes", collection=COLLECTION, ids=["i001"],
                                                      vectors=to_tensor(vectors[:1])))
    got = handle.stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes", collection=COLLECTION, key="evaluation"))
    assert got.found and got.current_version > got.version
    missing = handle.stub.GetAttachment(pb.GetAttachmentRequest(dataset="shoes", collection=COLLECTION, key="other"))
    assert not missing.found
    close_index(handle)
