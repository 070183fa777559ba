"""The gateway under interleavings with other clients' calls, through in-process services and
the cheap `pixels` model: items deleted while IndexDataset or Evaluate runs (a run that found
them, then lost them, must skip them, not fail), kept projections after a relabel (the picture's
labels must be the items' labels now), a cancelled IndexDataset beside another run of the same
configuration (its clean-up must not delete the collection the other fills), an image replaced
while Ingest embeds it (its result must not say indexed), a collection deleted under a search
(its NOT_FOUND must say so), and a collection deleted and created again while Evaluate scored the
old one (the old score must not pass for the new one's). Hooks in the gateway's modules make each call land at the
moment that used to break the run."""

import concurrent.futures
import itertools
import threading

import grpc
import numpy as np
import pytest

from convsearch.client import Client
from convsearch.common.v1 import common_pb2
from convsearch.datasets import encode_png
from convsearch.embedding import Configuration
from convsearch.errors import NotFound
from convsearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.tensors import to_tensor
from convsearch_gateway import evaluation, indexing, searching, servicer
from tests.conftest import running_backends, running_gateway

PIXELS = Configuration("pixels", ("8x8",))
COLLECTION = "pixels/8x8/avg/cosine"


def image(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def items(count: int) -> list[tuple[str, str, bytes]]:
    return [(f"i{n:03d}", "ab"[n % 2], image(n)) for n in range(count)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """An extractor (pixels only), an index and a gateway: (gateway address, index stub)."""
    with running_backends(tmp_path_factory.mktemp("data"), default_model="pixels", allow_random_weights=False,
                          weights_dir=str(tmp_path_factory.mktemp("weights"))) as (extractor_address, index_address), \
            grpc.insecure_channel(index_address) as index_channel, \
            running_gateway(extractor_address, index_address) as (_, _, gateway_address):
        yield gateway_address, index_pb2_grpc.IndexServiceStub(index_channel)


def stored_ids(index, dataset: str, ids: list[str]) -> set[str]:
    reply = index.GetVectors(index_pb2.GetVectorsRequest(dataset=dataset, collection=COLLECTION, ids=ids,
                                                         ids_only=True))
    return set(ids) - set(reply.missing_ids)


def test_an_item_deleted_while_its_vectors_are_made_is_skipped(stack, monkeypatch):
    """An item deleted between the fetch of its image and the upsert of its vectors made the
    index refuse the whole batch (ITEM_NOT_FOUND), and IndexDataset failed with NOT_FOUND 'put
    the items first', the other items of the batch not indexed."""
    address, index = stack
    upsert = indexing._upsert

    def deleting_first(backends, dataset, targets, missing, ids, *rest):
        index.DeleteItems(index_pb2.DeleteItemsRequest(dataset=dataset, ids=[ids[0]]))
        return upsert(backends, dataset, targets, missing, ids, *rest)

    monkeypatch.setattr(indexing, "_upsert", deleting_first)
    with Client(address) as client:
        client.create_dataset("deleted-while-indexed")
        list(client.ingest("deleted-while-indexed", items(6)))
        last = list(client.index("deleted-while-indexed", [PIXELS]))[-1]
    assert last.finished and (last.done, last.total, last.failed) == (6, 6, 0)
    assert stored_ids(index, "deleted-while-indexed", [f"i{n:03d}" for n in range(6)]) == {
        f"i{n:03d}" for n in range(1, 6)}


def test_an_item_deleted_while_evaluating_is_left_out(stack, monkeypatch):
    """An item deleted after Evaluate listed the collection's vectors and before it queried
    with them failed the whole evaluation with NOT_FOUND 'item ... has no vector'."""
    address, index = stack
    missing = evaluation.missing_ids

    def deleting(backends, dataset, collection, ids):
        found = missing(backends, dataset, collection, ids)
        index.DeleteItems(index_pb2.DeleteItemsRequest(dataset=dataset, ids=["i001"]))
        return found

    with Client(address) as client:
        client.create_dataset("deleted-while-evaluated")
        list(client.ingest("deleted-while-evaluated", items(6)))
        list(client.index("deleted-while-evaluated", [PIXELS]))
        monkeypatch.setattr(evaluation, "missing_ids", deleting)
        score, = list(client.evaluate("deleted-while-evaluated", [PIXELS]))[-1].results
        monkeypatch.undo()
        assert score.queries == 5 and not score.cached
        assert COLLECTION in client.compare("deleted-while-evaluated").stale
        again, = list(client.evaluate("deleted-while-evaluated", [PIXELS]))[-1].results
        assert again.queries == 5 and not again.cached


def test_a_kept_projection_shows_the_labels_items_have_now(stack):
    """Relabeling an item changes no vector, so the collection's version stayed and Project
    answered its kept picture with the item's old label."""
    address, _ = stack
    with Client(address) as client:
        client.create_dataset("relabeled-projection")
        list(client.ingest("relabeled-projection", items(6)))
        list(client.index("relabeled-projection", [PIXELS]))
        first = client.project("relabeled-projection", PIXELS)
        assert dict(zip(first.ids, first.labels, strict=True))["i000"] == "a"
        list(client.ingest("relabeled-projection", [("i000", "c", image(0))]))  # the same image
        again = client.project("relabeled-projection", PIXELS)
    assert dict(zip(again.ids, again.labels, strict=True))["i000"] == "c"
    assert (again.x, again.y) == (first.x, first.y)


def test_a_cancelled_run_leaves_the_collection_another_run_fills(stack, monkeypatch):
    """Two IndexDataset runs of one configuration: the first created the collection, the second
    found it; the first one's client cancelled before any vector was stored, and its clean-up
    deleted the 'empty collection it created' under the second, which then failed with NOT_FOUND
    'dataset ... has no collection'."""
    address, index = stack
    arrived, release, ended = ([threading.Event(), threading.Event()] for _ in range(3))
    runs = itertools.count()
    missing, index_items = indexing.missing_ids, servicer.index_items

    def held(*args):  # each run waits here, its collection created or found, until released
        run = next(runs)
        arrived[run].set()
        assert release[run].wait(30)
        return missing(*args)

    def noted(*args, **kwargs):
        run = len([event for event in arrived if event.is_set()])
        try:
            yield from index_items(*args, **kwargs)
        finally:  # the run's clean-up has run
            ended[run].set()

    with Client(address) as client:
        client.create_dataset("two-runs")
        list(client.ingest("two-runs", items(6)))
    monkeypatch.setattr(indexing, "missing_ids", held)
    monkeypatch.setattr(servicer, "index_items", noted)
    request = gateway_pb2.IndexDatasetRequest(dataset="two-runs", configurations=[gateway_pb2.Configuration(
        model="pixels", layers=["8x8"], metric=common_pb2.METRIC_COSINE)])
    with grpc.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        first = stub.IndexDataset(request)
        assert arrived[0].wait(30)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(lambda: list(stub.IndexDataset(request))[-1])
            assert arrived[1].wait(30)
            first.cancel()
            release[0].set()
            assert ended[0].wait(30)
            release[1].set()
            last = second.result(60)
    assert last.finished and (last.done, last.total, last.failed) == (6, 6, 0)
    assert stored_ids(index, "two-runs", [f"i{n:03d}" for n in range(6)]) == {f"i{n:03d}" for n in range(6)}


def test_an_ingested_item_whose_image_is_replaced_while_embedded_is_not_indexed(stack, monkeypatch):
    """Ingest with configurations: another client replaced an item's image while it was being
    embedded, so the index refused its vector as stale, yet the item's result said indexed, with
    no error."""
    address, index = stack
    upsert = indexing._upsert

    def replacing_first(backends, dataset, targets, missing, ids, *rest):
        index.PutItems(index_pb2.PutItemsRequest(dataset=dataset, items=[
            index_pb2.Item(id=ids[0], label="a", image=image(1000))]))
        return upsert(backends, dataset, targets, missing, ids, *rest)

    monkeypatch.setattr(indexing, "_upsert", replacing_first)
    with Client(address) as client:
        client.create_dataset("replaced-while-ingested")
        first, *others = list(client.ingest("replaced-while-ingested", items(3), [PIXELS]))
    assert not first.indexed and "replaced while it was embedded" in first.error
    assert all(result.indexed and not result.error for result in others)
    assert stored_ids(index, "replaced-while-ingested", ["i000", "i001", "i002"]) == {"i001", "i002"}


def test_a_search_by_id_in_a_collection_deleted_meanwhile_says_so(stack, monkeypatch):
    """DeleteCollection between the gateway's look-up of the collection and its search: the
    index's COLLECTION_NOT_FOUND was turned into VECTOR_NOT_FOUND, 'item ... has no vector; index
    the dataset at this configuration first', about an item that had one until its collection went."""
    address, index = stack
    weights_of = searching._collection_weights

    def deleting(backends, dataset, collection, remaining):
        weights = weights_of(backends, dataset, collection, remaining)
        index.DeleteCollection(index_pb2.DeleteCollectionRequest(dataset=dataset, collection=collection))
        return weights

    with Client(address) as client:
        client.create_dataset("searched-while-deleted")
        list(client.ingest("searched-while-deleted", items(4)))
        list(client.index("searched-while-deleted", [PIXELS]))
        monkeypatch.setattr(searching, "_collection_weights", deleting)
        with pytest.raises(NotFound) as refused:
            client.search("searched-while-deleted", item_id="i000", configuration=PIXELS)
    assert refused.value.reason == "COLLECTION_NOT_FOUND"
    assert refused.value.metadata["collection"] == COLLECTION


def test_a_score_of_a_collection_replaced_while_evaluating_is_not_kept_for_the_new_one(stack, monkeypatch):
    """A collection's version counts its batches since its creation, so one deleted and created
    again reaches the versions of the old one again: Evaluate stored the old collection's score
    under the version it read, which the new collection had too, and every later Evaluate and
    Compare served that score as current."""
    address, index = stack
    score_target = evaluation.score_target

    def replacing(backends, dataset, target, *rest):
        score = score_target(backends, dataset, target, *rest)
        spec = index.GetCollectionStats(index_pb2.GetCollectionStatsRequest(
            dataset=dataset, collection=COLLECTION)).collection.spec
        index.DeleteCollection(index_pb2.DeleteCollectionRequest(dataset=dataset, collection=COLLECTION))
        index.CreateCollection(index_pb2.CreateCollectionRequest(dataset=dataset, spec=spec))
        ids = [f"i{n:03d}" for n in range(6)]
        index.UpsertVectors(index_pb2.UpsertVectorsRequest(  # other vectors, as many batches as before
            dataset=dataset, collection=COLLECTION, ids=ids,
            vectors=to_tensor(np.random.default_rng(7).random((6, 192), np.float32))))
        return score

    with Client(address) as client:
        client.create_dataset("replaced-while-evaluated")
        list(client.ingest("replaced-while-evaluated", items(6)))
        list(client.index("replaced-while-evaluated", [PIXELS]))
        monkeypatch.setattr(evaluation, "score_target", replacing)
        first, = list(client.evaluate("replaced-while-evaluated", [PIXELS]))[-1].results
        monkeypatch.undo()
        again, = list(client.evaluate("replaced-while-evaluated", [PIXELS]))[-1].results
    assert not first.cached and not again.cached
