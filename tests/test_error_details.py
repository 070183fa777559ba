"""Errors carry google.rpc.Status details (ErrorInfo always; BadRequest, ResourceInfo, RetryInfo
where they apply) from the backend through the gateway to any gRPC client, and the Python client's
exceptions expose them; error messages speak of the user's input, never of our objects."""

import contextlib
import io
import re
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from convsearch.client import Client
from convsearch.common.v1 import common_pb2
from convsearch.errors import DOMAIN, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from convsearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from convsearch.grpc_errors import MAX_DETAILS, details_of, to_rpc_status
from convsearch.image_limits import ImageError, describe, load_checked, open_checked
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch_gateway.auth import RETRY_AFTER_MS
from tests.conftest import running_backends, running_gateway, serve_index

LITE0 = gateway_pb2.Configuration(model="efficientnet_lite0", layers=["_conv_head"])


@pytest.fixture(scope="module")
def backends(tmp_path_factory, chelsea_jpeg):
    """(extractor address, index address, index service); the index holds dataset `cats` with item `c1`."""
    with running_backends(tmp_path_factory.mktemp("index")) as addresses:
        with served_gateway(*addresses) as (stub, _):
            stub.CreateDataset(gateway_pb2.CreateDatasetRequest(name="cats"))
            items = [gateway_pb2.Item(id="c1", label="cat", image=chelsea_jpeg)]
            assert list(stub.Ingest(iter([gateway_pb2.IngestRequest(dataset="cats", items=items)])))[0].status \
                == gateway_pb2.INGEST_STATUS_STORED
        yield addresses


@contextlib.contextmanager
def served_gateway(extractor_address: str, index_address: str, **overrides):
    """A gateway over these backends: (raw stub, address)."""
    with running_gateway(extractor_address, index_address, **overrides) as (_, channel, address):
        yield gateway_pb2_grpc.GatewayServiceStub(channel), address


@pytest.fixture(scope="module")
def gateway(backends):
    with served_gateway(*backends) as served:
        yield served


def failed(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        result = call(*args, timeout=30, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return error.value


def details(error: grpc.RpcError) -> dict[type, object]:
    """The details of a failed call as a plain gRPC client reads them: {message type: message}."""
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} without details: {error.details()}"
    assert status.code == error.code().value[0] and status.message == error.details()
    found = {}
    for packed in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                     error_details_pb2.RetryInfo):
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                found[kind] = message
    return found


def test_a_missing_dataset_names_its_resource_and_reason(gateway):
    stub, address = gateway
    error = failed(stub.GetDataset, gateway_pb2.GetDatasetRequest(name="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    found = details(error)
    info = found[error_details_pb2.ErrorInfo]
    assert (info.reason, info.domain, dict(info.metadata)) == ("DATASET_NOT_FOUND", DOMAIN, {"dataset": "nope"})
    resource = found[error_details_pb2.ResourceInfo]
    assert (resource.resource_type, resource.resource_name) == ("dataset", "nope")
    with Client(address, timeout_s=30) as client, pytest.raises(NotFound) as raised:
        client.dataset("nope")
    assert raised.value.reason == "DATASET_NOT_FOUND" and raised.value.metadata == {"dataset": "nope"}
    assert raised.value.resource == ("dataset", "nope") and raised.value.retry_after_s is None


def test_a_missing_item_and_collection_name_theirs(gateway):
    stub, address = gateway
    error = failed(stub.GetImage, gateway_pb2.GetImageRequest(dataset="cats", item_id="ghost"))
    found = details(error)
    assert found[error_details_pb2.ErrorInfo].reason == "ITEM_NOT_FOUND"
    assert dict(found[error_details_pb2.ErrorInfo].metadata) == {"dataset": "cats", "item": "ghost"}
    assert found[error_details_pb2.ResourceInfo].resource_name == "ghost"
    with Client(address, timeout_s=30) as client, pytest.raises(NotFound) as raised:
        client.search("cats", item_id="c1")  # never indexed: no collection
    assert raised.value.reason == "COLLECTION_NOT_FOUND" and raised.value.resource[0] == "collection"
    assert raised.value.metadata["dataset"] == "cats"


def test_invalid_arguments_name_the_field(gateway):
    stub, address = gateway
    error = failed(stub.Search, gateway_pb2.SearchRequest(dataset="cats", item_id="c1", configuration=LITE0, k=5000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = details(error)
    assert found[error_details_pb2.ErrorInfo].reason == "K_OUT_OF_RANGE"
    violations = found[error_details_pb2.BadRequest].field_violations
    assert [(v.field, v.description) for v in violations] == [("k", error.details())]
    bad_p = gateway_pb2.Configuration(model="efficientnet_lite0", metric=common_pb2.METRIC_MINKOWSKI)
    with Client(address, timeout_s=30) as client:
        with pytest.raises(InvalidArgument) as raised:
            client.search("cats", item_id="c1", k=5000)
        assert raised.value.field_violations[0][0] == "k" and raised.value.reason == "K_OUT_OF_RANGE"
    error = failed(stub.Search, gateway_pb2.SearchRequest(dataset="cats", item_id="c1", configuration=bad_p, k=3))
    found = details(error)
    assert found[error_details_pb2.ErrorInfo].reason == "MINKOWSKI_P_OUT_OF_RANGE"
    assert found[error_details_pb2.BadRequest].field_violations[0].field == "configuration.minkowski_p"
    bad_metric = gateway_pb2.Configuration(model="efficientnet_lite0", metric=99)
    error = failed(stub.Search, gateway_pb2.SearchRequest(dataset="cats", item_id="c1", configuration=bad_metric, k=3))
    assert details(error)[error_details_pb2.BadRequest].field_violations[0].field == "configuration.metric"


def test_the_rate_limiter_says_when_to_retry(backends):
    with served_gateway(*backends, rate_limit_per_s=0.5, rate_burst=1) as (stub, address):
        stub.ListDatasets(gateway_pb2.ListDatasetsRequest(), timeout=30)
        error = failed(stub.ListDatasets, gateway_pb2.ListDatasetsRequest())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_ms = int(dict(error.trailing_metadata())[RETRY_AFTER_MS])  # the plain trailer is kept
        found = details(error)
        assert found[error_details_pb2.ErrorInfo].reason == "RATE_LIMITED"
        delay = found[error_details_pb2.RetryInfo].retry_delay.ToMilliseconds()
        assert 0 < delay == wait_ms <= 2000
        with Client(address, timeout_s=30) as client, pytest.raises(ResourceExhausted) as raised:
            client.datasets()
        assert raised.value.reason == "RATE_LIMITED" and 0 < raised.value.retry_after_s <= 2.0


def test_a_backend_that_is_down_is_unavailable_with_a_retry_delay(backends, tmp_path):
    extractor_address, _ = backends
    index, index_channel, index_address = serve_index(tmp_path)
    index_channel.close()
    with served_gateway(extractor_address, index_address) as (stub, address):
        index.stop(0)  # after the gateway is up: it serves only once its backends are
        error = failed(stub.GetDataset, gateway_pb2.GetDatasetRequest(name="cats"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        found = details(error)
        assert found[error_details_pb2.ErrorInfo].reason == "BACKEND_UNAVAILABLE"
        assert found[error_details_pb2.ErrorInfo].metadata["backend"] == "index"
        assert found[error_details_pb2.RetryInfo].retry_delay.ToMilliseconds() > 0
        with Client(address, timeout_s=30) as client, pytest.raises(Exception) as raised:
            client.dataset("cats")
        assert raised.value.reason == "BACKEND_UNAVAILABLE" and raised.value.retry_after_s > 0


def test_a_backends_own_unavailable_passes_through_with_its_reason(backends, tmp_path):
    """The gateway turned every UNAVAILABLE into BACKEND_UNAVAILABLE "check that it is running",
    so a dataset being moved (DATASET_MOVING, with its retry delay) read as a dead index."""
    extractor_address, _ = backends
    index, index_channel, index_address = serve_index(tmp_path)
    ix_stub = index_pb2_grpc.IndexServiceStub(index_channel)
    ix_stub.CreateDataset(index_pb2.CreateDatasetRequest(name="moving"))
    ix_stub.FenceDataset(index_pb2.FenceDatasetRequest(dataset="moving", ttl_s=60))
    try:
        with served_gateway(extractor_address, index_address) as (stub, address):
            error = failed(stub.DeleteItems, gateway_pb2.DeleteItemsRequest(dataset="moving", ids=["a"]))
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "being moved" in error.details()
            found = details(error)
            assert found[error_details_pb2.ErrorInfo].reason == "DATASET_MOVING"
            assert found[error_details_pb2.RetryInfo].retry_delay.ToMilliseconds() > 0
            with Client(address, timeout_s=30) as client, pytest.raises(Unavailable) as raised:
                client.delete_items("moving", ["a"])  # not "the gateway ... is unavailable; is it running?"
            assert raised.value.reason == "DATASET_MOVING" and raised.value.retry_after_s > 0
    finally:
        index_channel.close()
        index.stop(0)


def test_an_ingested_non_image_is_described_without_our_objects(gateway):
    stub, _ = gateway
    items = [gateway_pb2.Item(id="junk", image=b"this is not an image at all"),
             gateway_pb2.Item(id="half", image=b"\x89PNG\r\n\x1a\n" + bytes(40))]
    results = list(stub.Ingest(iter([gateway_pb2.IngestRequest(dataset="cats", items=items)]), timeout=30))
    for result in results:
        assert result.status == gateway_pb2.INGEST_STATUS_FAILED
        assert "object at" not in result.error and "BytesIO" not in result.error
        assert not re.search(r"0x[0-9a-f]{6,}", result.error)
    assert "is not a recognised image" in results[0].error


def test_decoder_complaints_never_echo_our_buffers():
    from PIL import UnidentifiedImageError

    buffer = io.BytesIO()
    leak = OSError(f"cannot identify image file {buffer!r}")
    assert "object at" not in describe(leak) and "BytesIO" not in describe(leak)
    assert describe(UnidentifiedImageError(f"cannot identify image file {buffer!r}")) == "not a recognised image"

    class NestedOpen:  # a decoder that opens an embedded image, and Pillow's message about it
        def load(self):
            raise UnidentifiedImageError(f"cannot identify image file {io.BytesIO()!r}")

    with pytest.raises(ImageError) as raised:
        load_checked(NestedOpen())
    assert "BytesIO" not in str(raised.value) and "not a recognised image" in str(raised.value)
    with pytest.raises(ImageError) as raised:
        open_checked(b"plain text", 1000)
    assert "BytesIO" not in str(raised.value)


def test_every_error_has_an_error_info_and_plain_raises_keep_working():
    status = to_rpc_status(NotFound("dataset 'x' does not exist"))
    fields = details_of(status)
    assert fields == {"reason": "NOT_FOUND", "metadata": {}}
    assert details_of(to_rpc_status(ValueError("boom")))["reason"] == "INTERNAL"
    huge = to_rpc_status(InvalidArgument("é" * 5000, field="name" * 200, metadata={"k" * 500: "v" * 5000}))
    assert len(huge.message.encode()) <= MAX_DETAILS
    # The message travels percent-encoded (3x at worst) and the details base64 (4/3x): under 8 KiB.
    assert 3 * len(huge.message.encode()) + 4 * len(huge.SerializeToString()) // 3 < 8 * 1024 - 512


def test_a_stream_its_client_cancelled_is_not_logged_as_an_unexpected_error(gateway, chelsea_jpeg, caplog):
    """The request iterator of a cancelled Ingest raises grpc.RpcError in the handler; it was
    logged as "unexpected error" with its trace, each time a client cancelled."""
    stub, _ = gateway
    more = threading.Event()

    def requests():
        yield gateway_pb2.IngestRequest(dataset="cats", items=[gateway_pb2.Item(id="c2", image=chelsea_jpeg)])
        more.wait(10)

    for _ in range(3):  # the handler's reader may see the cancellation as the stream's end, or as an error
        call = stub.Ingest(requests())
        assert next(call).id == "c2"
        call.cancel()
    deadline = time.monotonic() + 3.0  # the handler sees the cancellation within a poll of its reader
    while time.monotonic() < deadline and "unexpected error" not in caplog.text:
        time.sleep(0.1)
    more.set()
    assert "unexpected error" not in caplog.text
