"""The gateway over an index primary and a follower (`--index-replicas`): searches and listings are
answered by the follower, each right after this gateway's own writes (read-your-writes through
min_version); writes and image reads go to the primary; with the follower gone, reads fall back to
the primary and nothing fails."""

import types
import urllib.request

import grpc
import numpy as np
import pytest

from convsearch.client import Client
from convsearch.datasets import encode_png
from convsearch.embedding import Configuration
from convsearch.errors import NotFound
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.tensors import to_tensor
from convsearch_gateway.config import GatewayConfig
from tests.conftest import damage_collection, running_gateway, serve_extractor, serve_index

pytestmark = pytest.mark.slow
LAST = pb.Configuration(model="efficientnet_lite0", layers=["_conv_head"])


def reads(service, by: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    prefix = f'convsearch_gateway_index_reads_total{{by="{by}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A gateway over an index primary and a follower of it, in this process."""
    extractor, extractor_channel, extractor_address = serve_extractor()
    primary, primary_channel, primary_address = serve_index(tmp_path_factory.mktemp("primary"))
    follower, follower_channel, follower_address = serve_index(tmp_path_factory.mktemp("follower"),
                                                               follow=primary_address, max_lag_wait=5.0)
    stopped = []  # the follower, once a test has stopped it
    with running_gateway(extractor_address, primary_address, index_replicas=follower_address) as (service, channel,
                                                                                                   address):
        yield types.SimpleNamespace(
            service=service, gateway=gateway_pb2_grpc.GatewayServiceStub(channel), address=address,
            stop_follower=lambda: stopped.append(follower.stop(0.5)), follower_service=follower,
            follower=index_pb2_grpc.IndexServiceStub(follower_channel), follower_address=follower_address,
            extractor_address=extractor_address, primary_address=primary_address)
    running = [(primary, primary_channel), (extractor, extractor_channel)]
    for service, channel in running if stopped else [(follower, follower_channel), *running]:
        channel.close()
        service.stop(1.0)


def test_each_write_is_read_back_through_the_follower(stack, chelsea_jpeg, coffee_jpeg):
    service, gateway, follower = stack.service, stack.gateway, stack.follower
    gateway.CreateDataset(pb.CreateDatasetRequest(name="pets"))
    assert gateway.GetDataset(pb.GetDatasetRequest(name="pets")).dataset.name == "pets"
    before = reads(service, "follower")
    for number, image in enumerate([chelsea_jpeg, coffee_jpeg, chelsea_jpeg, coffee_jpeg]):
        item = pb.Item(id=f"pet{number}", label="cat" if image is chelsea_jpeg else "cup", image=image)
        [result] = gateway.Ingest(iter([pb.IngestRequest(dataset="pets", items=[item], configurations=[LAST])]))
        assert result.indexed, result
        # At once, through the follower: the dataset counts the item and a search finds it.
        assert gateway.GetDataset(pb.GetDatasetRequest(name="pets")).dataset.item_count == number + 1
        hits = gateway.Search(pb.SearchRequest(dataset="pets", configuration=LAST, image=image, k=10,
                                               exact=True)).hits
        assert f"pet{number}" in [hit.id for hit in hits]
    assert reads(service, "follower") - before >= 12
    # The follower holds the data itself: it answered, not the primary behind it.
    listed = follower.ListCollections(index_pb2.ListCollectionsRequest(dataset="pets")).collections
    assert [(c.name, c.count) for c in listed] == [("efficientnet_lite0/_conv_head/avg/cosine", 4)]
    # Images stay on the primary: GetImage still works through the gateway.
    assert gateway.GetImage(pb.GetImageRequest(dataset="pets", item_id="pet1")).mime_type == "image/jpeg"


def test_a_labeled_search_by_id_and_the_listing_come_from_the_follower(stack):
    service, gateway = stack.service, stack.gateway
    before = reads(service, "follower")
    reply = gateway.Search(pb.SearchRequest(dataset="pets", configuration=LAST, item_id="pet0", k=3))
    assert reply.HasField("search_score") and [hit.id for hit in reply.hits][0] == "pet2"
    assert "pets" in [d.name for d in gateway.ListDatasets(pb.ListDatasetsRequest()).datasets]
    assert reads(service, "follower") > before


def test_a_collection_damaged_at_the_follower_is_read_from_the_primary(stack):
    service, gateway = stack.service, stack.gateway
    damage_collection(stack.follower_service, "pets", "efficientnet_lite0/_conv_head/avg/cosine")
    before = reads(service, "primary")
    reply = gateway.Search(pb.SearchRequest(dataset="pets", configuration=LAST, item_id="pet0", k=3))
    assert reply.HasField("search_score") and [hit.id for hit in reply.hits][0] == "pet2"
    assert reads(service, "primary") > before


def test_an_evaluation_is_scored_from_the_data_whose_version_it_is_kept_with(stack):
    """Evaluate read the collection's version from the primary but scored with searches at a
    follower that had not applied the latest writes (another gateway's): the score of the old
    vectors was kept under the new version, and served as current from then on."""
    config = Configuration("efficientnet_lite0", ("_conv_head",))
    collection = "efficientnet_lite0/_conv_head/avg/cosine"
    ids = [f"n{n}" for n in range(6)]
    noise = [encode_png(np.random.default_rng(n).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for n in range(6)]
    with Client(stack.address) as client:
        client.create_dataset("drift")
        list(client.ingest("drift", [(item, "ab"[n % 2], noise[n]) for n, item in enumerate(ids)]))
        list(client.index("drift", [config]))
        assert client.dataset("drift").item_count == 6  # through the follower: it holds all of it
    stack.follower_service.follower.stop()  # it applies nothing more, serving what it has
    clustered = np.zeros((6, 1280), np.float32)
    clustered[np.arange(6), np.arange(6) % 2] = 1.0  # each class one point: a perfect score
    primary = index_pb2_grpc.IndexServiceStub(grpc.insecure_channel(stack.primary_address))
    primary.UpsertVectors(index_pb2.UpsertVectorsRequest(dataset="drift", collection=collection, ids=ids,
                                                         vectors=to_tensor(clustered)))  # as another gateway would
    with Client(stack.address) as client:
        scored, = list(client.evaluate("drift", [config]))[-1].results
        kept, = list(client.evaluate("drift", [config]))[-1].results
    with running_gateway(stack.extractor_address, stack.primary_address) as (_, _, primary_only), \
            Client(primary_only) as client:
        truth, = list(client.evaluate("drift", [config], recompute=True))[-1].results
    assert kept.cached and scored.mean_score == kept.mean_score == truth.mean_score


def test_a_session_reads_its_own_writes_through_another_gateway(stack):
    with running_gateway(stack.extractor_address, stack.primary_address,
                         index_replicas=stack.follower_address) as (_, _, other):
        stack.follower_service.follower.stop()  # it applies nothing more, serving what it has
        with Client(stack.address) as writer:
            writer.create_dataset("late")
            assert writer.session_version > 0
        with Client(other) as stranger, pytest.raises(NotFound):  # no session: the follower answers
            stranger.dataset("late")
        with Client(other, session_version=writer.session_version) as reader:
            assert reader.dataset("late").name == "late"  # the follower is behind: from the primary
            assert reader.session_version == writer.session_version
            for bad in ("soon", "-1", " +1_0 ", str(1 << 63)):
                with pytest.raises(grpc.RpcError) as caught:
                    gateway_pb2_grpc.GatewayServiceStub(reader._channel).ListDatasets(
                        pb.ListDatasetsRequest(), metadata=(("convsearch-min-version", bad),))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
                assert "convsearch-min-version" in caught.value.details()
        with Client(stack.address) as failing:  # a failed call carries the version too
            with pytest.raises(NotFound):
                failing.delete_collection("late", "no/such/avg/cosine")
            assert failing.session_version == writer.session_version


def test_without_the_follower_reads_fall_back_to_the_primary(stack, chelsea_jpeg):
    service, gateway = stack.service, stack.gateway
    stack.stop_follower()
    before = reads(service, "primary")
    hits = gateway.Search(pb.SearchRequest(dataset="pets", configuration=LAST, image=chelsea_jpeg, k=2)).hits
    assert {hit.id for hit in hits} == {"pet0", "pet2"}
    assert gateway.GetDataset(pb.GetDatasetRequest(name="pets")).dataset.item_count == 4
    assert reads(service, "primary") > before


def test_followers_follow_one_primary():
    with pytest.raises(ValueError, match="index_replicas follow one primary"):
        GatewayConfig(index="a:50053,b:50053", index_replicas="c:50053").validate()
