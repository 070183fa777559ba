"""The extractor over gRPC: catalogue, real pretrained embeddings, one-pass layers, batching."""

import concurrent.futures
import re
import urllib.request

import grpc
import numpy as np
import pytest
import torchvision
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from convsearch.common.v1 import common_pb2
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.tensors import from_tensor
from convsearch_extractor.server import SERVICE_NAME

IMAGENET_CLASSES = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def embed(stub, images, model="", layers=(), pooling=common_pb2.POOLING_AVG, normalize=False):
    reply = stub.Embed(pb.EmbedRequest(
        config=pb.EmbedConfig(model=model, layers=list(layers), pooling=pooling, normalize=normalize),
        images=images))
    return reply, {entry.layer: from_tensor(entry.vectors) for entry in reply.layers}


def test_list_models_describes_weights_and_featured_layers(extractor):
    stub = extractor.stub
    reply = stub.ListModels(pb.ListModelsRequest())
    names = [m.name for m in reply.models]
    assert reply.default_model == "efficientnet_lite0" == names[0]
    for expected in ("efficientnet_lite1", "efficientnet_lite2", "vgg16", "vgg19", "resnet50",
                     "mobilenet_v2", "mobilenet_v3_large", "densenet121", "inception_v3",
                     "efficientnet_b0", "efficientnet_b5"):
        assert expected in names
    lite0 = reply.models[0]
    assert lite0.pretrained and lite0.available and lite0.input_size == 224
    assert lite0.parameter_count == 4_652_008
    assert [layer.featured_index for layer in lite0.layers] == list(range(8))
    assert lite0.layers[0].name == "_conv_stem" and list(lite0.layers[0].output_shape) == [32, 112, 112]
    assert lite0.layers[-1].name == "_conv_head" and list(lite0.layers[-1].output_shape) == [1280, 7, 7]
    counts = [layer.parameter_count for layer in lite0.layers]
    assert counts == sorted(counts) and counts[0] == 32 * 3 * 3 * 3
    vgg = next(m for m in reply.models if m.name == "vgg16")
    assert not vgg.pretrained and vgg.available  # random weights allowed in this fixture
    assert vgg.weights_path.endswith("checkpoints/vgg16-397923af.pth")


def test_list_models_all_layers_includes_every_graph_node(extractor):
    stub = extractor.stub
    reply = stub.ListModels(pb.ListModelsRequest(include_all_layers=True))
    lite0 = reply.models[0]
    names = [layer.name for layer in lite0.layers]
    assert len(names) == len(set(names)) == 145
    assert "_fc" in names and "_blocks.15._bn2" in names
    assert next(layer for layer in lite0.layers if layer.name == "_fc").parameter_count == 4_652_008


def test_pretrained_lite0_sees_a_cat_in_chelsea(extractor, chelsea_jpeg):
    stub = extractor.stub
    reply, layers = embed(stub, [chelsea_jpeg], layers=["_fc"])
    assert reply.pretrained and reply.model == "efficientnet_lite0"
    top5 = [IMAGENET_CLASSES[i] for i in np.argsort(-layers["_fc"][0])[:5]]
    assert {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"} & set(top5), top5


def test_several_layers_in_one_request_equal_one_at_a_time(extractor, chelsea_jpeg, coffee_jpeg):
    stub = extractor.stub
    layers = ["_conv_stem", "_blocks.7._expand_conv", "_conv_head"]
    images = [chelsea_jpeg, coffee_jpeg]
    _, together = embed(stub, images, layers=layers, pooling=common_pb2.POOLING_MAX)
    for layer in layers:
        _, alone = embed(stub, images, layers=[layer], pooling=common_pb2.POOLING_MAX)
        np.testing.assert_allclose(together[layer], alone[layer], rtol=1e-4, atol=1e-5)
    assert together["_conv_head"].shape == (2, 1280)
    assert not np.allclose(together["_conv_head"][0], together["_conv_head"][1])


def test_pooling_and_normalisation(extractor, chelsea_jpeg):
    stub = extractor.stub
    _, flat = embed(stub, [chelsea_jpeg], layers=["_conv_head"], pooling=common_pb2.POOLING_FLATTEN)
    _, avg = embed(stub, [chelsea_jpeg], layers=["_conv_head"])
    _, unit = embed(stub, [chelsea_jpeg], layers=["_conv_head"], normalize=True)
    maps = flat["_conv_head"].reshape(1280, 7, 7)
    np.testing.assert_allclose(avg["_conv_head"][0], maps.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(unit["_conv_head"][0]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(unit["_conv_head"][0] * np.linalg.norm(avg["_conv_head"][0]),
                               avg["_conv_head"][0], rtol=1e-4, atol=1e-5)


def test_default_layer_is_the_last_featured_one(extractor, chelsea_jpeg):
    stub = extractor.stub
    reply, layers = embed(stub, [chelsea_jpeg])
    assert list(layers) == ["_conv_head"] and reply.pooling == common_pb2.POOLING_AVG


def test_random_weights_are_announced(extractor, chelsea_jpeg):
    stub = extractor.stub
    reply, layers = embed(stub, [chelsea_jpeg], model="resnet18", layers=["layer4.1.conv2", "fc"])
    assert reply.model == "resnet18" and not reply.pretrained
    assert layers["layer4.1.conv2"].shape == (1, 512) and layers["fc"].shape == (1, 1000)


def test_concurrent_single_image_clients_are_batched(extractor, chelsea_jpeg):
    service, stub = extractor.service, extractor.stub
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"

    def batch_stats():
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        total = float(re.search(r"^convsearch_extractor_batch_size_sum (\S+)$", text, re.M).group(1))
        count = float(re.search(r"^convsearch_extractor_batch_size_count (\S+)$", text, re.M).group(1))
        return total, count

    images_before, batches_before = batch_stats()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: embed(stub, [chelsea_jpeg])[1]["_conv_head"], range(48)))
    images_after, batches_after = batch_stats()
    assert images_after - images_before == 48
    assert batches_after - batches_before < 48 / 2, "concurrent requests were not coalesced"
    for vector in replies[1:]:
        np.testing.assert_allclose(vector, replies[0], rtol=1e-4, atol=1e-5)


def test_bulk_stream_answers_every_image_past_bad_ones(extractor, chelsea_jpeg, coffee_jpeg):
    stub = extractor.stub
    images = [chelsea_jpeg, b"not an image", coffee_jpeg] * 30  # ~10 MiB in all, over 4 MiB

    def requests():
        yield pb.BulkEmbedRequest(config=pb.EmbedConfig(layers=["_conv_head", "_conv_stem"]))
        for start in range(0, len(images), 7):
            yield pb.BulkEmbedRequest(images=[pb.ImageInput(id=f"img-{i}", data=images[i])
                                              for i in range(start, min(len(images), start + 7))])

    answers = list(stub.BulkEmbed(requests()))
    assert [a.index for a in answers] == list(range(len(images)))
    assert [a.id for a in answers] == [f"img-{i}" for i in range(len(images))]
    _, reference = embed(stub, [chelsea_jpeg], layers=["_conv_head"])
    for answer in answers:
        if answer.index % 3 == 1:
            assert answer.WhichOneof("result") == "error"
            assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert f"image {answer.index} ('img-{answer.index}')" in answer.error.message
        else:
            assert [layer.layer for layer in answer.vectors.layers] == ["_conv_head", "_conv_stem"]
            assert from_tensor(answer.vectors.layers[0].vector).shape == (1280,)
    np.testing.assert_allclose(from_tensor(answers[0].vectors.layers[0].vector), reference["_conv_head"][0],
                               rtol=1e-4, atol=1e-5)


def test_bulk_stream_without_config_is_refused(extractor, chelsea_jpeg):
    stub = extractor.stub
    with pytest.raises(grpc.RpcError) as error:
        list(stub.BulkEmbed(iter([pb.BulkEmbedRequest(images=[pb.ImageInput(id="a", data=chelsea_jpeg)])])))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry a config" in error.value.details()


def test_bulk_stream_with_unknown_model_is_not_found(extractor):
    stub = extractor.stub
    with pytest.raises(grpc.RpcError) as error:
        list(stub.BulkEmbed(iter([pb.BulkEmbedRequest(config=pb.EmbedConfig(model="alexnet9"))])))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_and_health(extractor):
    reflection = reflection_pb2_grpc.ServerReflectionStub(extractor.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = reflection.ServerReflectionInfo(iter([ask]))
    services = {s.name for s in next(replies).list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    health = health_pb2_grpc.HealthStub(extractor.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == \
        health_pb2.HealthCheckResponse.SERVING
