"""Every bad input gets its own status and an actionable message, and the service keeps serving."""

import time
import types

import grpc
import pytest

from convsearch.common.v1 import common_pb2
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from tests.conftest import start_extractor
from tests.test_imaging import _png_declaring


@pytest.fixture(scope="module")
def strict():
    """An extractor with small limits and no random weights."""
    service, channel = start_extractor(allow_random_weights=False, max_images=8, max_message_mb=1)
    yield types.SimpleNamespace(service=service, stub=extractor_pb2_grpc.ExtractorServiceStub(channel))
    channel.close()
    service.stop(1.0)


def request(images, model="", layers=(), pooling=common_pb2.POOLING_AVG):
    return pb.EmbedRequest(config=pb.EmbedConfig(model=model, layers=list(layers), pooling=pooling),
                           images=images)


def bad_requests(good: bytes):
    big = b"\xff" * (3 << 20)
    return [
        ("empty image", request([good, b""]), grpc.StatusCode.INVALID_ARGUMENT, "image 1 is empty"),
        ("not an image", request([b"GIF89a-no", good]), grpc.StatusCode.INVALID_ARGUMENT, "image 0 is"),
        ("truncated", request([good, good, good[: len(good) // 2]]), grpc.StatusCode.INVALID_ARGUMENT,
         "image 2 is truncated"),
        ("bomb", request([_png_declaring(9000, 9000)]), grpc.StatusCode.INVALID_ARGUMENT,
         "over the limit of 40,000,000"),
        ("zero size", request([_png_declaring(0, 0)]), grpc.StatusCode.INVALID_ARGUMENT, "zero size"),
        ("no images", request([]), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
        ("unknown model", request([good], model="alexnet9"), grpc.StatusCode.NOT_FOUND,
         "known models: efficientnet_lite0"),
        ("unknown layer", request([good], layers=["_blocks.99"]), grpc.StatusCode.INVALID_ARGUMENT,
         "featured layers are _conv_stem"),
        ("not a tensor", request([good], layers=["size"]), grpc.StatusCode.INVALID_ARGUMENT,
         "does not output a feature map"),
        ("twice", request([good], layers=["_conv_head", "_conv_head"]), grpc.StatusCode.INVALID_ARGUMENT,
         "twice"),
        ("flatten too big", request([good], layers=["_conv_stem"], pooling=common_pb2.POOLING_FLATTEN),
         grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 100,000"),
        ("bad pooling", request([good], pooling=7), grpc.StatusCode.INVALID_ARGUMENT, "unknown pooling"),
        ("too many images", request([good] * 9), grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit of 8"),
        ("answer too big", request([good] * 8, layers=["_conv_head"], pooling=common_pb2.POOLING_FLATTEN),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "use BulkEmbed"),
        ("message too big", request([big]), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("weights missing", request([good], model="vgg16"), grpc.StatusCode.FAILED_PRECONDITION,
         "checkpoints/vgg16-397923af.pth"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_input_gets_its_status_and_the_next_request_succeeds(strict, chelsea_jpeg, case):
    name, bad, code, words = bad_requests(chelsea_jpeg)[case]
    with pytest.raises(grpc.RpcError) as error:
        strict.stub.Embed(bad, timeout=60)
    assert error.value.code() == code, (name, error.value.details())
    assert words in error.value.details(), (name, error.value.details())
    reply = strict.stub.Embed(request([chelsea_jpeg]), timeout=60)
    assert reply.pretrained and reply.layers[0].vectors.shape == [1, 1280]


def bulk(stub, *messages: tuple[pb.EmbedConfig | None, list[bytes]]) -> list[pb.BulkEmbedResponse]:
    requests, count = [], 0
    for config, images in messages:
        requests.append(pb.BulkEmbedRequest(config=config, images=[
            pb.ImageInput(id=str(count + n), data=data) for n, data in enumerate(images)]))
        count += len(images)
    return list(stub.BulkEmbed(iter(requests), timeout=60))


def test_a_stream_message_of_too_many_images_says_how_many_a_message_may_hold(strict, chelsea_jpeg):
    with pytest.raises(grpc.RpcError) as error:  # it said "split it or use BulkEmbed", to a BulkEmbed
        bulk(strict.stub, (pb.EmbedConfig(), [chelsea_jpeg] * 9))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "9 images, over the limit of 8; send at most 8 images a message" in error.value.details()


def test_a_stream_is_refused_at_its_config_when_an_image_answer_could_not_be_sent(chelsea_jpeg):
    """Only Embed checked the size of its answer: a BulkEmbed stream whose answer for one image
    was over the message limit ended at that image with gRPC's 'Sent message larger than max',
    the images after it unanswered."""
    service, channel = start_extractor(max_message_mb=1, max_flatten=500_000)
    try:
        stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
        wide = pb.EmbedConfig(layers=["_conv_stem"], pooling=common_pb2.POOLING_FLATTEN)  # 1.53 MiB an image
        with pytest.raises(grpc.RpcError) as error:
            bulk(stub, (wide, [chelsea_jpeg]))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "an image's answer would be 1.53 MiB, over the message limit of 1 MiB" in error.value.details()
        # The same settings spelled otherwise (the defaults named) are no change of config; they were refused.
        spelled = pb.EmbedConfig(model="efficientnet_lite0", layers=["_conv_head"], pooling=common_pb2.POOLING_AVG)
        answers = bulk(stub, (pb.EmbedConfig(layers=["_conv_head"]), [chelsea_jpeg]), (spelled, [chelsea_jpeg]))
        assert [answer.WhichOneof("result") for answer in answers] == ["vectors", "vectors"]
        with pytest.raises(grpc.RpcError) as changed:
            bulk(stub, (pb.EmbedConfig(), [chelsea_jpeg]), (pb.EmbedConfig(layers=["_conv_stem"]), [chelsea_jpeg]))
        assert "stream message holding image 1 changes the config" in changed.value.details()
    finally:
        channel.close()
        service.stop(1.0)


def test_unavailable_models_say_why(strict):
    models = {m.name: m for m in strict.stub.ListModels(pb.ListModelsRequest()).models}
    assert models["efficientnet_lite0"].available
    vgg = models["vgg16"]
    assert not vgg.available and not vgg.pretrained
    assert "vgg16-397923af.pth" in vgg.unavailable_reason and "--allow-random-weights" in vgg.unavailable_reason


def test_decoding_in_processes_gives_the_same_vectors_and_errors(extractor, chelsea_jpeg):
    service, channel = start_extractor(decode_processes=2)
    try:
        stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
        forked = stub.Embed(request([chelsea_jpeg] * 3), timeout=60)
        threaded = extractor.stub.Embed(request([chelsea_jpeg] * 3), timeout=60)
        assert forked.layers[0].vectors.data == threaded.layers[0].vectors.data
        with pytest.raises(grpc.RpcError) as error:
            stub.Embed(request([chelsea_jpeg, chelsea_jpeg[:300]]), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 1 is truncated" in error.value.details()
    finally:
        channel.close()
        service.stop(1.0)


def _images_run(service) -> float:
    """Images the service has run through its model once its batches stop (no change for 1 s)."""
    count, since = -1.0, time.monotonic()
    while time.monotonic() - since < 1.0:
        now = service.extractor.metrics.registry.get_sample_value("convsearch_extractor_images_total")
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.1)
    return count


@pytest.fixture(scope="module")
def small_batches():
    """An extractor running batches of 8, so that a request of many images takes seconds."""
    service, channel = start_extractor(max_batch=8)
    yield types.SimpleNamespace(service=service, stub=extractor_pb2_grpc.ExtractorServiceStub(channel))
    channel.close()
    service.stop(1.0)


def test_an_embed_past_its_deadline_stops_its_work_and_the_service_keeps_serving(small_batches, chelsea_jpeg):
    before = _images_run(small_batches.service)
    with pytest.raises(grpc.RpcError) as error:
        small_batches.stub.Embed(request([chelsea_jpeg] * 256), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    run = _images_run(small_batches.service) - before
    assert run < 128, f"{run:.0f} of 256 images embedded for a client that was gone"
    assert small_batches.stub.Embed(request([chelsea_jpeg]), timeout=60).layers[0].vectors.shape[0] == 1


def test_a_cancelled_bulk_stream_stops_the_work_it_had_started(small_batches, chelsea_jpeg):
    before = _images_run(small_batches.service)

    def messages():
        yield pb.BulkEmbedRequest(config=pb.EmbedConfig())
        for first in range(0, 256, 64):
            yield pb.BulkEmbedRequest(images=[pb.ImageInput(id=str(first + i), data=chelsea_jpeg) for i in range(64)])

    answers = small_batches.stub.BulkEmbed(messages(), timeout=60)
    time.sleep(0.5)  # the service reads the messages and starts on them
    answers.cancel()
    run = _images_run(small_batches.service) - before
    assert run < 128, f"{run:.0f} of 256 images embedded for a stream the client had cancelled"
    assert small_batches.stub.Embed(request([chelsea_jpeg]), timeout=60).layers[0].vectors.shape[0] == 1
