"""Every listed model, built with random weights, gives the advertised shape at each featured
layer, and the layer names are exactly torchvision's graph node names."""

import warnings

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.tensors import from_tensor
from convsearch_extractor.catalog import TORCHVISION_MODELS, load_catalog
from convsearch_extractor.graph import FEATURED_COUNT, describe, tracer_kwargs


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return load_catalog(tmp_path_factory.mktemp("weights"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", *TORCHVISION_MODELS])
def test_featured_layers_have_the_advertised_shapes(catalog, name):
    spec = catalog[name]
    torch.manual_seed(0)
    model = spec.build(False)
    graph = describe(model, spec.preprocess.crop_size, spec.tracer_leaf_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs(spec.tracer_leaf_modules))
        assert list(graph.layers) == eval_nodes[1:]  # all but the input placeholder
        extractor = create_feature_extractor(model, list(graph.featured),
                                             tracer_kwargs=tracer_kwargs(spec.tracer_leaf_modules))
    assert len(graph.featured) == FEATURED_COUNT
    size = spec.preprocess.crop_size
    with torch.inference_mode():
        outputs = extractor(torch.randn(1, 3, size, size))
    for layer in graph.featured:
        assert tuple(outputs[layer].shape[1:]) == graph.layers[layer].output_shape, layer
    counts = [graph.layers[layer].parameter_count for layer in graph.featured]
    assert counts == sorted(counts) and counts[-1] <= graph.parameter_count
    assert graph.parameter_count == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_every_model_embeds_at_its_featured_layers_through_the_service(extractor, chelsea_jpeg):
    for model in extractor.stub.ListModels(pb.ListModelsRequest()).models:
        featured = [layer for layer in model.layers if layer.featured]
        reply = extractor.stub.Embed(pb.EmbedRequest(
            config=pb.EmbedConfig(model=model.name, layers=[layer.name for layer in featured]),
            images=[chelsea_jpeg]))
        assert reply.pretrained == model.pretrained
        for layer, vectors in zip(featured, reply.layers, strict=True):
            assert vectors.layer == layer.name
            assert from_tensor(vectors.vectors).shape == (1, layer.output_shape[0]), (model.name, layer.name)
