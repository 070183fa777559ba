"""--compile: models run through torch.compile give the eager vectors, and the warm-up that
compiles them is exported."""

import numpy as np
import pytest

from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.tensors import from_tensor
from convsearch_extractor import pixels
from tests.conftest import serve_extractor

pytestmark = pytest.mark.slow


def vectors(service_channel, images: list[bytes]) -> dict[str, np.ndarray]:
    reply = extractor_pb2_grpc.ExtractorServiceStub(service_channel).Embed(
        pb.EmbedRequest(config=pb.EmbedConfig(model=pixels.NAME, layers=list(pixels.LAYERS)), images=images),
        timeout=300)
    return {entry.layer: from_tensor(entry.vectors) for entry in reply.layers}


def test_compiled_models_give_the_eager_vectors(chelsea_jpeg, coffee_jpeg):
    images = [chelsea_jpeg, coffee_jpeg, chelsea_jpeg]
    results, warm_up = [], []
    for compile_ in (True, False):
        service, channel, _ = serve_extractor(default_model=pixels.NAME, compile=compile_)
        try:
            results.append(vectors(channel, images))
            results.append(vectors(channel, images[:2]))  # another batch size: compiled for it too
            warm_up.append(service.extractor.metrics.warm_up_seconds._value.get())
            assert service.extractor.pool.acquire(pixels.NAME).compile is compile_
        finally:
            channel.close()
            service.stop(1.0)
    compiled, compiled_two, eager, eager_two = results
    for layer in pixels.LAYERS:
        np.testing.assert_allclose(compiled[layer], eager[layer], atol=1e-6)
        np.testing.assert_allclose(compiled_two[layer], eager_two[layer], atol=1e-6)
    assert warm_up[0] > 0 and warm_up[1] > 0
