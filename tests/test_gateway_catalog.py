"""The gateway's resolution of configurations and the errors around it, as a client meets them:
what needs only stored vectors keeps working while the extractor is stopped (the last model
catalogue the gateway got stands in), a minkowski configuration without its p is refused, k
has one limit, and INVALID_ARGUMENT / NOT_FOUND carry their reason, field and resource."""

import contextlib
import logging

import grpc
import prometheus_client as prom
import pytest
from google.rpc import error_details_pb2

from convsearch.client import Client
from convsearch.datasets import encode_png, fashion_mnist_sample
from convsearch.embedding import MAX_K, Configuration
from convsearch.errors import InvalidArgument, Unavailable
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.local import EXTRACTOR
from convsearch.processes import start_service, stop_service
from convsearch.serving import create_server
from convsearch_gateway.backends import Backends
from convsearch_gateway.servicer import GatewayServicer
from tests.conftest import running_backends, running_gateway, serve_index
from tests.test_error_details import details, failed

pytestmark = pytest.mark.slow
MODEL = "pixels"  # the extractor's baseline model: no weights, embeds in no time
PIXELS = Configuration(MODEL, ("8x8",))
WIRE_PIXELS = pb.Configuration(model=MODEL, layers=["8x8"])
DATASET = "shoes"


def fashion_items(per_class: int = 2) -> list[tuple[str, str, bytes]]:
    return [(item_id, label, encode_png(pixels)) for item_id, label, pixels in fashion_mnist_sample(per_class)]


def evaluated_dataset(client: Client, extra=()) -> None:
    """DATASET with labeled fashion items (and `extra`), indexed and evaluated at PIXELS."""
    client.create_dataset(DATASET)
    assert all(r.status == "stored" for r in client.ingest(DATASET, [*fashion_items(), *extra]))
    assert list(client.evaluate(DATASET, [PIXELS]))[-1].results


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(raw stub, address) of a gateway over an in-process extractor and index, with DATASET
    evaluated at PIXELS; its item `unlabeled` has no label."""
    with running_backends(tmp_path_factory.mktemp("index")) as addresses:
        with running_gateway(*addresses) as (_, channel, address):
            with Client(address, timeout_s=60) as client:
                evaluated_dataset(client, [("unlabeled", "", fashion_items(1)[0][2])])
            yield gateway_pb2_grpc.GatewayServiceStub(channel), address


@contextlib.contextmanager
def gateway_with_catalog_ttl(extractor: str, index: str, catalog_ttl_s: float):
    """An in-process gateway servicer over these backends that asks the extractor for its catalogue
    again after `catalog_ttl_s` (the real one waits a minute): its address."""
    backends = Backends(extractor, index, deadline_s=30.0, max_message_mb=64, registry=prom.CollectorRegistry())
    server = create_server(8, 64)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
        GatewayServicer(backends, batch_size=32, catalog_ttl_s=catalog_ttl_s), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0.5)
        backends.close()


# ---- 1. a stopped extractor stops only what must embed ---------------------------------------

def test_with_the_extractor_stopped_stored_vectors_still_answer_and_embedding_is_unavailable(tmp_path, caplog):
    extractor, extractor_address = start_service("convsearch-extractor", "--metrics-port", "-1", service=EXTRACTOR)
    index, index_channel, index_address = serve_index(tmp_path)
    try:
        with gateway_with_catalog_ttl(extractor_address, index_address, 0.0) as address, \
                Client(address, timeout_s=60) as client:
            evaluated_dataset(client)
            query = fashion_items()[0]
            before = client.search(DATASET, item_id=query[0], configuration=PIXELS, k=5)
            stop_service(extractor)
            with caplog.at_level(logging.WARNING, "convsearch.gateway.configurations"):
                assert client.search(DATASET, item_id=query[0], configuration=PIXELS, k=5).hits == before.hits
                assert client.project(DATASET, PIXELS).total == 20
                assert list(client.evaluate(DATASET, [PIXELS]))[-1].results[0].cached
                assert client.compare(DATASET, item_id=query[0]).item_scores
            stale = [r for r in caplog.records if "cannot answer ListModels" in r.getMessage()]
            assert len(stale) == 1, caplog.text  # once per outage, not once per call
            for must_embed in (lambda: client.search(DATASET, image=query[2], configuration=PIXELS),
                               lambda: list(client.index(DATASET, [Configuration(MODEL, ("16x16",))])),
                               client.models):
                with pytest.raises(Unavailable) as raised:
                    must_embed()
                assert raised.value.reason == "BACKEND_UNAVAILABLE"
                assert raised.value.metadata == {"backend": "extractor"}
    finally:
        if extractor.poll() is None:
            stop_service(extractor)
        index_channel.close()
        index.stop(1.0)


# ---- 2. error details where the README promises them -----------------------------------------

def assert_details(error: grpc.RpcError, code: grpc.StatusCode, reason: str, metadata: dict[str, str],
                   field: str = "", resource: tuple[str, str] | None = None) -> None:
    """The code, ErrorInfo reason and metadata, BadRequest field and ResourceInfo a plain gRPC client reads."""
    found = details(error)
    info = found[error_details_pb2.ErrorInfo]
    assert (error.code(), info.reason, dict(info.metadata)) == (code, reason, metadata), error.details()
    if field:
        assert [v.field for v in found[error_details_pb2.BadRequest].field_violations] == [field]
    if resource:
        found_resource = found[error_details_pb2.ResourceInfo]
        assert (found_resource.resource_type, found_resource.resource_name) == resource


def test_comparing_an_unscored_item_says_why_and_names_it(gateway):
    stub, _ = gateway
    error = failed(stub.Compare, pb.CompareRequest(dataset=DATASET, item_id="unlabeled"))
    assert_details(error, grpc.StatusCode.NOT_FOUND, "ITEM_NOT_SCORED", {"dataset": DATASET, "item": "unlabeled"},
                   resource=("item", "unlabeled"))
    assert "has no label" in error.details()
    error = failed(stub.Compare, pb.CompareRequest(dataset=DATASET, item_id="ghost"))
    assert_details(error, grpc.StatusCode.NOT_FOUND, "ITEM_NOT_FOUND", {"dataset": DATASET, "item": "ghost"},
                   resource=("item", "ghost"))


def test_a_model_name_that_could_address_a_path_names_its_field(gateway):
    stub, _ = gateway
    error = failed(stub.Search, pb.SearchRequest(dataset=DATASET, item_id="unlabeled",
                                                 configuration=pb.Configuration(model="a/b")))
    assert_details(error, grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NAME_INVALID", {"model": "a/b"},
                   field="configuration.model")
    error = failed(stub.Evaluate, pb.EvaluateRequest(dataset=DATASET, models=["../x"]))
    assert_details(error, grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NAME_INVALID", {"model": "../x"}, field="models")


@pytest.mark.parametrize("rpc", ["Search", "Project"])
def test_two_layers_where_one_is_used_name_the_layers_field(gateway, rpc):
    stub, _ = gateway
    configuration = pb.Configuration(model=MODEL, layers=["8x8", "16x16"])
    request = (pb.SearchRequest(dataset=DATASET, item_id="unlabeled", configuration=configuration) if rpc == "Search"
               else pb.ProjectRequest(dataset=DATASET, configuration=configuration))
    error = failed(getattr(stub, rpc), request)
    assert_details(error, grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_LAYERS", {"layers": "2"},
                   field="configuration.layers")


def test_an_unknown_projection_method_names_its_field(gateway):
    stub, _ = gateway
    error = failed(stub.Project, pb.ProjectRequest(dataset=DATASET, configuration=WIRE_PIXELS, method=99))
    assert_details(error, grpc.StatusCode.INVALID_ARGUMENT, "PROJECTION_METHOD_UNKNOWN", {"method": "99"},
                   field="method")


# ---- 3. minkowski without its p is refused, never a silent 2 ----------------------------------

def test_a_python_minkowski_configuration_without_p_is_refused(gateway):
    _, address = gateway
    unset = Configuration(MODEL, ("8x8",), metric="minkowski")
    with Client(address, timeout_s=60) as client:
        for call in (lambda: client.search(DATASET, item_id="t10k-00001", configuration=unset),
                     lambda: list(client.evaluate(DATASET, [unset]))):
            with pytest.raises(InvalidArgument) as raised:
                call()
            assert raised.value.reason == "MINKOWSKI_P_OUT_OF_RANGE"
            assert [field for field, _ in raised.value.field_violations] == ["configuration.minkowski_p"]
        # Other metrics ignore p: their collections keep their names.
        assert client.search(DATASET, item_id="t10k-00001", configuration=PIXELS).collection == "pixels/8x8/avg/cosine"


# ---- 4. one limit of k ------------------------------------------------------------------------

def test_the_gateway_limits_k_at_the_shared_max_k(gateway):
    stub, address = gateway
    for call, request in ((stub.Search, pb.SearchRequest(dataset=DATASET, item_id="t10k-00001",
                                                          configuration=WIRE_PIXELS, k=MAX_K + 1)),
                          (stub.Evaluate, pb.EvaluateRequest(dataset=DATASET, configurations=[WIRE_PIXELS],
                                                             k=MAX_K + 1))):
        assert_details(failed(call, request), grpc.StatusCode.INVALID_ARGUMENT, "K_OUT_OF_RANGE",
                       {"k": str(MAX_K + 1), "max_k": str(MAX_K)}, field="k")
    with Client(address, timeout_s=60) as client:
        assert len(client.search(DATASET, item_id="t10k-00001", configuration=PIXELS, k=MAX_K).hits) == 20


def test_while_the_extractor_is_down_the_catalogue_is_asked_for_again_only_now_and_then(monkeypatch):
    """Each call resolving a configuration asked the extractor again (a failing call, retried)."""
    from convsearch.extractor.v1 import extractor_pb2
    from convsearch_gateway import configurations

    clock = [100.0]
    monkeypatch.setattr(configurations.time, "monotonic", lambda: clock[0])
    asked = []

    class Extractor:
        def call(self, method, request, remaining=None):
            asked.append(method)
            if len(asked) > 1:
                raise Unavailable("the extractor is unavailable")
            return extractor_pb2.ListModelsResponse()

    catalog = configurations.ModelCatalog(Extractor(), ttl_s=0)
    catalog.models()
    for _ in range(5):
        catalog.models(stale_ok=True)  # the last catalogue, the extractor asked once
    assert len(asked) == 2
    clock[0] += configurations.STALE_RETRY_S
    catalog.models(stale_ok=True)
    assert len(asked) == 3
    with pytest.raises(Unavailable):  # ListModels itself wants a current catalogue
        catalog.models()
