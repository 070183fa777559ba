"""On a CUDA device: bf16 + channels_last embeddings agree with the CPU's fp32 ones, and the
service runs and batches there."""

import numpy as np
import pytest
import torch

from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.tensors import from_tensor
from tests.conftest import start_extractor

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

LAYERS = ["_conv_stem", "_blocks.9._expand_conv", "_conv_head", "_fc"]


def embed_on(device: str, images: list[bytes]) -> dict[str, np.ndarray]:
    service, channel = start_extractor(device=device, allow_random_weights=False)
    try:
        reply = extractor_pb2_grpc.ExtractorServiceStub(channel).Embed(
            pb.EmbedRequest(config=pb.EmbedConfig(layers=LAYERS), images=images), timeout=120)
        return {entry.layer: from_tensor(entry.vectors) for entry in reply.layers}
    finally:
        channel.close()
        service.stop(1.0)


def test_cuda_embeddings_match_cpu(chelsea_jpeg, coffee_jpeg):
    images = [chelsea_jpeg, coffee_jpeg] * 4
    cpu, cuda = embed_on("cpu", images), embed_on("cuda", images)
    for layer in LAYERS:
        a, b = cpu[layer], cuda[layer]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.98, (layer, cosine)
    assert np.argmax(cuda["_fc"][0]) == np.argmax(cpu["_fc"][0])
