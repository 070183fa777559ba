"""The gateway does what gateway.proto and the README promise a client coding against them:
defaults and ranges of request fields (a value out of range is INVALID_ARGUMENT naming its field,
never silently read as another), fields that cannot take effect are refused rather than ignored,
NOT_FOUND for a missing item whatever else the dataset holds, one rule for an id repeated in an
Ingest message, and the gateway's own pixel limit on every image a request sends. Through
in-process services and the cheap `pixels` model, with the generated stubs, as any gRPC client."""

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from convsearch.common.v1 import common_pb2
from convsearch.datasets import encode_png
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc
from tests.conftest import running_backends, running_gateway

PIXELS = pb.Configuration(model="pixels", layers=["8x8"])


def image(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """(extractor address, index address): an extractor (pixels only) and an index."""
    with running_backends(tmp_path_factory.mktemp("data"), default_model="pixels", allow_random_weights=False,
                          weights_dir=str(tmp_path_factory.mktemp("weights"))) as addresses:
        yield addresses


@pytest.fixture(scope="module")
def stub(backends):
    """A gateway's stub; dataset `labeled` holds 6 labeled items indexed at PIXELS."""
    with running_gateway(*backends) as (_, channel, _):
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        stub.CreateDataset(pb.CreateDatasetRequest(name="labeled"))
        items = [pb.Item(id=f"i{n}", label="ab"[n % 2], image=image(n)) for n in range(6)]
        list(stub.Ingest(iter([pb.IngestRequest(dataset="labeled", configurations=[PIXELS], items=items)])))
        yield stub


def failed(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        reply = call(request, timeout=60, **kwargs)
        if hasattr(reply, "__next__"):
            list(reply)
    return error.value


def reason_and_fields(error: grpc.RpcError) -> tuple[str, list[str]]:
    """The ErrorInfo reason and the BadRequest fields of a failed call."""
    reason, fields = "", []
    for packed in rpc_status.from_call(error).details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason = info.reason
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            fields = [violation.field for violation in bad.field_violations]
    return reason, fields


def test_a_negative_thumbnail_size_is_refused(stub):
    """thumbnail_size is 'when > 0 a thumbnail; 0: the original': a negative one was silently
    read as 0 and answered the original image."""
    error = failed(stub.GetImage, pb.GetImageRequest(dataset="labeled", item_id="i0", thumbnail_size=-5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "-5" in error.details()
    assert reason_and_fields(error) == ("THUMBNAIL_SIZE_OUT_OF_RANGE", ["thumbnail_size"])


@pytest.mark.parametrize("extra, field", [(dict(models=["no-such-model"]), "models"),
                                          (dict(metrics=[common_pb2.METRIC_EUCLIDEAN]), "metrics")])
def test_evaluate_refuses_models_or_metrics_beside_configurations(stub, extra, field):
    """EvaluateRequest's models and metrics are the alternative to configurations ('Or: these
    models'): given beside configurations they were silently ignored, and the answer scored
    something other than what was asked."""
    error = failed(stub.Evaluate, pb.EvaluateRequest(dataset="labeled", configurations=[PIXELS], **extra))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_and_fields(error) == ("CONFIGURATIONS_AND_MODELS", [field])


@pytest.mark.parametrize("request_fields, reason, field", [
    (dict(max_points=2), "MAX_POINTS_OUT_OF_RANGE", "max_points"),
    (dict(max_points=50_001), "MAX_POINTS_OUT_OF_RANGE", "max_points"),
    (dict(seed=-1), "SEED_OUT_OF_RANGE", "seed")])
def test_project_range_errors_name_their_field(stub, request_fields, reason, field):
    """Project's max_points (3 to 50000, 0: 5000) and seed (0 or more) out of range were
    INVALID_ARGUMENT without a reason or the field at fault (the README: a BadRequest with the
    field where it is known)."""
    error = failed(stub.Project, pb.ProjectRequest(dataset="labeled", configuration=PIXELS, **request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_and_fields(error) == (reason, [field])


def test_project_over_a_collection_without_enough_vectors_is_a_failed_precondition(stub):
    """A valid Project request over a collection whose items were all deleted (or UMAP over 2)
    answered INVALID_ARGUMENT, as if the request were malformed, without a reason a program
    could act on; the dataset is what is not ready."""
    stub.CreateDataset(pb.CreateDatasetRequest(name="emptied"))
    items = [pb.Item(id=f"e{n}", label="a", image=image(n)) for n in range(2)]
    list(stub.Ingest(iter([pb.IngestRequest(dataset="emptied", configurations=[PIXELS], items=items)])))
    umap = failed(stub.Project, pb.ProjectRequest(dataset="emptied", configuration=PIXELS,
                                                     method=pb.PROJECTION_METHOD_UMAP))
    stub.DeleteItems(pb.DeleteItemsRequest(dataset="emptied", ids=["e0", "e1"]))
    empty = failed(stub.Project, pb.ProjectRequest(dataset="emptied", configuration=PIXELS))
    for error, reason in ((umap, "TOO_FEW_VECTORS"), (empty, "NO_VECTORS")):
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert reason_and_fields(error)[0] == reason
        assert "pixels/8x8/avg/cosine" in error.details() and "emptied" in error.details()


def test_umap_over_three_vectors_draws_them(stub):
    """UMAP is documented from 3 vectors, but its spectral start failed under 4 (scipy's
    "k >= N"), answered as INTERNAL with the exception's text."""
    stub.CreateDataset(pb.CreateDatasetRequest(name="three"))
    items = [pb.Item(id=f"t{n}", label="a", image=image(n)) for n in range(3)]
    list(stub.Ingest(iter([pb.IngestRequest(dataset="three", configurations=[PIXELS], items=items)])))
    reply = stub.Project(pb.ProjectRequest(dataset="three", configuration=PIXELS, method=pb.PROJECTION_METHOD_UMAP,
                                           seed=1), timeout=120)
    assert sorted(reply.ids) == ["t0", "t1", "t2"] and len(reply.x) == len(reply.y) == 3


def test_compare_says_an_item_is_missing_before_any_evaluation(stub):
    """Compare with item_id of an item the dataset lacks answered NOT_FOUND ITEM_NOT_FOUND once
    the dataset had evaluations, but an empty OK before: the same wrong id looked valid."""
    stub.CreateDataset(pb.CreateDatasetRequest(name="unevaluated"))
    error = failed(stub.Compare, pb.CompareRequest(dataset="unevaluated", item_id="ghost"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert reason_and_fields(error)[0] == "ITEM_NOT_FOUND"
    assert not stub.Compare(pb.CompareRequest(dataset="labeled", item_id="i0"), timeout=60).item_scores


def test_an_id_repeated_in_one_ingest_message_fails_wherever_it_is(stub):
    """An id repeated in one Ingest message is a FAILED result 'appears twice in one message' for
    the repeat: only within the gateway's batch of 32 items; further apart it silently REPLACED
    the first, so the answer depended on where in the message the repeat stood."""
    stub.CreateDataset(pb.CreateDatasetRequest(name="repeats"))
    items = [pb.Item(id=f"r{n}", image=image(n)) for n in range(40)] + [pb.Item(id="r0", image=image(99))]
    results = list(stub.Ingest(iter([pb.IngestRequest(dataset="repeats", items=items)]), timeout=60))
    assert [r.status for r in results[:40]] == [pb.INGEST_STATUS_STORED] * 40
    assert results[40].status == pb.INGEST_STATUS_FAILED and "appears twice" in results[40].error


@pytest.mark.parametrize("messages", [
    [pb.IngestRequest(items=[pb.Item(id="x", image=image(1))])],
    [pb.IngestRequest(dataset="labeled"), pb.IngestRequest(dataset="repeats")]])
def test_ingest_stream_errors_name_the_dataset_field(stub, messages):
    """An Ingest stream without a dataset, or switching datasets, was INVALID_ARGUMENT without the
    field at fault, though it is known: `dataset`."""
    error = failed(stub.Ingest, iter(messages))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_and_fields(error)[1] == ["dataset"]


def test_query_images_meet_the_gateways_pixel_limit_and_name_their_field(backends, stub):
    """The README: the gateway reads each image's header and refuses more than its --max-pixels.
    A Search or InspectLayer image went to the extractor unchecked (only the extractor's own limit
    held), and an empty one was 'image 0 is empty', the extractor's batch position, without a field."""
    with running_gateway(*backends, max_pixels=100) as (_, channel, _):
        small = gateway_pb2_grpc.GatewayServiceStub(channel)
        for call, request in ((small.Search, pb.SearchRequest(dataset="labeled", configuration=PIXELS,
                                                               image=image(1))),
                              (small.InspectLayer, pb.InspectLayerRequest(model="pixels", layer="halve",
                                                                          image=image(1)))):
            error = failed(call, request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 100" in error.details()
            assert reason_and_fields(error)[1] == ["image"]
    error = failed(stub.Search, pb.SearchRequest(dataset="labeled", configuration=PIXELS, image=b""))
    assert error.details().startswith("the image is empty") and reason_and_fields(error)[1] == ["image"]
    assert stub.Search(pb.SearchRequest(dataset="labeled", configuration=PIXELS, image=image(1), k=1),
                       timeout=60).hits[0].id == "i1"


@pytest.mark.parametrize("call, request_, reason, field", [
    ("InspectLayer", pb.InspectLayerRequest(model="pixels", layer="nope", image=image(1)), "LAYER_UNKNOWN", "layer"),
    ("InspectLayer", pb.InspectLayerRequest(model="pixels", layer="8x8", image=image(1)), "LAYER_NOT_A_FEATURE_MAP",
     "layer"),
    ("InspectLayer", pb.InspectLayerRequest(model="pixels", layer="halve", image=image(1), top_channels=4),
     "TOP_CHANNELS_OUT_OF_RANGE", "top_channels"),
    ("RestoreDataset", pb.RestoreDatasetRequest(snapshot="../../etc", dataset="copy"), "SNAPSHOT_NAME_INVALID",
     "snapshot")])
def test_errors_the_backends_answer_carry_their_reason_and_field(stub, call, request_, reason, field):
    """Errors made by the extractor or the index and passed on by the gateway (an unknown layer,
    one without a feature map, top_channels past the layer's channels, a malformed snapshot name)
    carried only the generic reason INVALID_ARGUMENT, and most no field."""
    error = failed(getattr(stub, call), request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert reason_and_fields(error) == (reason, [field])
