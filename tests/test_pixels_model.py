"""The `pixels` model (the baseline, and the service's identity model) through the real services:
listed like any model, its layers exactly the resized image, and indexed, evaluated and compared
like any model, where its scores equal a brute-force search over independently resized pixels
and Compare marks it as the baseline."""

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from convsearch.cli import main
from convsearch.client import Client
from convsearch.datasets import encode_png, fashion_mnist_sample
from convsearch.embedding import Configuration
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.scoring import TOP, search_score
from convsearch.tensors import from_tensor
from tests.conftest import jpeg_bytes, running_gateway, serve_extractor, serve_index

pytestmark = pytest.mark.slow
MODEL = "pixels"
SIZES = (8, 16, 32, 64)
LAYERS = [f"{size}x{size}" for size in SIZES]
DATASET = "fashion100"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """An extractor whose default model is `pixels` and that allows no random weights (so the
    only models it can run are those with weights, and pixels, which has none), an index and a
    gateway: (extractor stub, gateway address)."""
    extractor, extractor_channel, extractor_address = serve_extractor(
        default_model=MODEL, allow_random_weights=False, weights_dir=str(tmp_path_factory.mktemp("weights")))
    index, index_channel, index_address = serve_index(tmp_path_factory.mktemp("data"))
    try:
        with running_gateway(extractor_address, index_address) as (_, _, gateway_address):
            yield extractor_pb2_grpc.ExtractorServiceStub(extractor_channel), gateway_address
    finally:
        for running, channel in ((index, index_channel), (extractor, extractor_channel)):
            channel.close()
            running.stop(1.0)


def expected_layers(image: Image.Image) -> dict[str, np.ndarray]:
    """Independently: the centre square resized to 64x64 (PIL, bilinear), in [0, 1], then halved
    by 2x2 block means; each size flattened in (channel, row, column) order."""
    width, height = image.size
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    pixels = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR, box=box), np.float64) / 255
    out = {}
    for size in SIZES:
        block = 64 // size
        resized = pixels.reshape(size, block, size, block, 3).mean(axis=(1, 3))
        out[f"{size}x{size}"] = resized.transpose(2, 0, 1).ravel()
    return out


def embed(stub, images: list[bytes], pooling=0) -> dict[str, np.ndarray]:
    reply = stub.Embed(pb.EmbedRequest(config=pb.EmbedConfig(model=MODEL, layers=LAYERS, pooling=pooling),
                                       images=images))
    assert reply.model == MODEL and reply.pretrained and reply.weights == "none"
    return {entry.layer: from_tensor(entry.vectors) for entry in reply.layers}


def test_list_models_lists_pixels_with_its_four_layers(stack):
    stub, _ = stack
    reply = stub.ListModels(pb.ListModelsRequest(include_all_layers=True))
    assert reply.default_model == MODEL
    model = next(m for m in reply.models if m.name == MODEL)
    assert model.available and model.pretrained and not model.unavailable_reason
    assert model.weights == "none" and model.weights_path == "" and model.parameter_count == 0
    assert model.input_size == 64
    featured = [layer for layer in model.layers if layer.featured]
    assert [layer.name for layer in featured] == LAYERS
    assert [list(layer.output_shape) for layer in featured] == [[3 * s * s] for s in SIZES]
    assert [layer.featured_index for layer in featured] == [0, 1, 2, 3]
    # Without random weights, torchvision models are unavailable; pixels never is.
    assert not next(m for m in reply.models if m.name == "resnet18").available


@pytest.mark.parametrize("encode", ["png", "jpeg"])
def test_embed_returns_exactly_the_resized_image(stack, encode):
    stub, _ = stack
    photo = skdata.chelsea()  # 451 x 300, landscape: the centre square is cut from it
    data = encode_png(photo) if encode == "png" else jpeg_bytes(photo)
    image = Image.open(io.BytesIO(data))
    if encode == "jpeg":
        image.draft("RGB", (64, 64))  # the decoder's reduced-scale JPEG decode, at least 64 on each side
    expected = expected_layers(image)
    layers = embed(stub, [data, data])
    for name in LAYERS:
        assert layers[name].shape == (2, expected[name].size)
        np.testing.assert_allclose(layers[name][0], expected[name], rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(layers[name][0], layers[name][1])


def test_every_pooling_gives_the_flattened_vector(stack, chelsea_jpeg):
    stub, _ = stack
    by_pooling = [embed(stub, [chelsea_jpeg], pooling) for pooling in (1, 2, 3)]
    for name in LAYERS:
        for other in by_pooling[1:]:
            np.testing.assert_array_equal(by_pooling[0][name], other[name])


def test_inspect_layer_points_from_a_vector_layer_to_the_feature_maps(stack, chelsea_jpeg):
    stub, _ = stack
    with pytest.raises(grpc.RpcError) as raised:
        stub.InspectLayer(pb.InspectLayerRequest(model=MODEL, layer="64x64", image=chelsea_jpeg))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "try one of halve" in raised.value.details()
    reply = stub.InspectLayer(pb.InspectLayerRequest(model=MODEL, layer="halve", image=chelsea_jpeg, top_channels=3))
    assert list(reply.output_shape) == [3, 32, 32] and len(reply.channels) == 3
    # The default (0: 8) gives every channel of a layer with fewer; it was refused as out of range.
    default = stub.InspectLayer(pb.InspectLayerRequest(model=MODEL, layer="halve", image=chelsea_jpeg))
    assert [c.channel for c in default.channels] == [c.channel for c in reply.channels]


def brute_force_scores(vectors: np.ndarray, labels: list[str]) -> list[float]:
    """Each item's search score over cosine distances to all the others (numpy, float64)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    distances = 1.0 - unit @ unit.T
    scores = []
    for query, row in enumerate(distances):
        order = [i for i in np.argsort(row, kind="stable") if i != query][:TOP]
        scores.append(search_score(labels[query], [labels[i] for i in order]))
    return scores


@pytest.fixture(scope="module")
def evaluated(stack):
    """100 Fashion-MNIST items (10 a class) evaluated with pixels (4 layers) and one lite0 layer."""
    _, gateway = stack
    sample = fashion_mnist_sample(per_class=10)
    with Client(gateway) as client:
        # Evaluate with no models names every available model: pixels is one, always.
        assert MODEL in [m.name for m in client.models() if m.available]
        client.create_dataset(DATASET)
        results = list(client.ingest(DATASET, [(item_id, label, encode_png(pixels))
                                               for item_id, label, pixels in sample]))
        assert all(r.status == "stored" for r in results)
        configurations = [Configuration(MODEL, metric="cosine"),
                          Configuration("efficientnet_lite0", ("_conv_stem",), metric="cosine")]
        progress = list(client.evaluate(DATASET, configurations=configurations))
        assert progress[-1].finished
        yield client, sample, progress[-1].results


def test_evaluated_scores_equal_a_brute_force_search_over_the_pixels(evaluated):
    _, sample, results = evaluated
    labels = [label for _, label, _ in sample]
    by_layer = {score.layer: score for score in results if score.model == MODEL}
    assert sorted(by_layer, key=LAYERS.index) == LAYERS
    independent = [expected_layers(Image.fromarray(pixels)) for _, _, pixels in sample]
    for layer, score in by_layer.items():
        assert score.collection == f"{MODEL}/{layer}/avg/cosine" and score.weights == "none"
        assert score.pretrained and score.baseline and score.queries == 100 and score.parameter_count == 0
        assert score.dimension == independent[0][layer].size
        expected = brute_force_scores(np.stack([vectors[layer] for vectors in independent]), labels)
        assert score.mean_score == pytest.approx(np.mean(expected), abs=1e-9), layer
    lite0 = next(score for score in results if score.model == "efficientnet_lite0")
    assert lite0.pretrained and not lite0.baseline


def test_compare_marks_pixels_as_the_baseline(evaluated, stack, capsys):
    client, _, _ = evaluated
    comparison = client.compare(DATASET)
    assert not comparison.stale and len(comparison.ranked) == 5
    assert {s.layer for s in comparison.ranked if s.baseline} == set(LAYERS)
    assert all(s.model == MODEL for s in comparison.ranked if s.baseline)
    assert comparison.best_layer_per_model[MODEL].baseline
    assert not comparison.best_layer_per_model["efficientnet_lite0"].baseline
    gateway = ["--gateway", stack[1]]
    assert main([*gateway, "compare", "--dataset", DATASET]) == 0
    table = capsys.readouterr().out
    assert "pixels (baseline)" in table and "efficientnet_lite0 (baseline)" not in table
    assert "warning" not in table and "RANDOM" not in table
    assert main([*gateway, "evaluate", "--dataset", DATASET, "--models", MODEL]) == 0
    table = capsys.readouterr().out
    assert table.count("pixels (baseline)") == 4 and "(!)" not in table
    assert main([*gateway, "--json", "compare", "--dataset", DATASET]) == 0
    ranked = json.loads(capsys.readouterr().out)["ranked"]
    assert sorted(s["layer"] for s in ranked if s["baseline"]) == sorted(LAYERS)
