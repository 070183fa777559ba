"""On a CUDA device: bf16 + channels_last embeddings agree with the CPU's fp32 ones; JPEGs decoded
on the GPU (nvJPEG) give what the CPU's decoding gives; the warm-up chooses a batch size; two
model workers on their own CUDA streams, and torch.compile, change no answer."""

import concurrent.futures
import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.tensors import from_tensor
from convsearch_extractor.engine import BATCH_CHOICES
from convsearch_extractor.sizing import CUDA_WORKERS
from tests.conftest import serve_extractor, start_extractor

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

LAYERS = ["_conv_stem", "_blocks.9._expand_conv", "_conv_head", "_fc"]


def embed_on(device: str, images: list[bytes], **overrides) -> dict[str, np.ndarray]:
    service, channel = start_extractor(device=device, allow_random_weights=False, **overrides)
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


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], least_cosine: float) -> None:
    for layer in LAYERS:
        cosine = (a[layer] * b[layer]).sum(1) / np.linalg.norm(a[layer], axis=1) / np.linalg.norm(b[layer], axis=1)
        assert cosine.min() > least_cosine, (layer, cosine)


def rotated_jpeg() -> bytes:
    """Chelsea stored sideways with the EXIF orientation that turns it upright (left to the CPU)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("count", [16, 3])  # a full batch; one padded to 4 on the worker's stream
def test_jpegs_decoded_on_the_gpu_give_the_cpu_decoders_vectors(chelsea_jpeg, coffee_jpeg, count):
    images = ([chelsea_jpeg, coffee_jpeg, rotated_jpeg()] * 6)[:count]
    service, channel, _ = serve_extractor(device="cuda", decode_device="cuda", allow_random_weights=False)
    try:
        reply = extractor_pb2_grpc.ExtractorServiceStub(channel).Embed(
            pb.EmbedRequest(config=pb.EmbedConfig(layers=LAYERS), images=images), timeout=120)
        on_gpu = {entry.layer: from_tensor(entry.vectors) for entry in reply.layers}
        rotated = images.count(images[2])
        assert service.extractor.metrics.device_decoded._value.get() == len(images) - rotated
    finally:
        channel.close()
        service.stop(1.0)
    assert_close(on_gpu, embed_on("cuda", images, decode_device="cpu"), 0.99)
    assert_close({layer: v[2:3] for layer, v in on_gpu.items()}, {layer: v[0:1] for layer, v in on_gpu.items()}, 0.95)


def test_the_warm_up_chooses_a_batch_and_concurrent_requests_use_both_streams(chelsea_jpeg, coffee_jpeg):
    service, channel, _ = serve_extractor(device="cuda", allow_random_weights=False)
    stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
    try:
        assert service.extractor.metrics.max_batch._value.get() in {CUDA_WORKERS * b for b in BATCH_CHOICES}
        request = pb.EmbedRequest(config=pb.EmbedConfig(layers=LAYERS), images=[chelsea_jpeg, coffee_jpeg])
        alone = {entry.layer: from_tensor(entry.vectors) for entry in stub.Embed(request, timeout=120).layers}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda _: stub.Embed(request, timeout=120), range(64)))
        for reply in replies:
            assert_close({entry.layer: from_tensor(entry.vectors) for entry in reply.layers}, alone, 0.999)
    finally:
        channel.close()
        service.stop(1.0)


def test_compiled_models_on_the_gpu_give_the_eager_vectors(chelsea_jpeg, coffee_jpeg):
    images = [chelsea_jpeg, coffee_jpeg] * 4
    # A fixed batch size: the warm-up compiles its padded sizes only, not every size it would try.
    assert_close(embed_on("cuda", images, compile=True, max_batch=16), embed_on("cuda", images, max_batch=16), 0.99)
