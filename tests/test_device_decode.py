"""JPEGs decoded on the model's device (nvJPEG on CUDA): the same code runs here on the CPU
device, so what it gives (pixels, order, errors, fallbacks) is checked without a GPU; the GPU
itself is in tests/test_gpu.py."""

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.tensors import from_tensor
from convsearch_extractor import pixels
from convsearch_extractor.catalog import load_catalog
from convsearch_extractor.config import ExtractorConfig
from convsearch_extractor.device_decode import BATCH_PIXELS, DeviceDecoder, device_decoder, device_pixels
from convsearch_extractor.engine import _device_batches
from convsearch_extractor.imaging import Preprocess, decode
from tests.conftest import jpeg_bytes, serve_extractor

CPU = torch.device("cpu")


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [jpeg_bytes(skdata.chelsea()), jpeg_bytes(skdata.coffee()), jpeg_bytes(skdata.astronaut()),
            jpeg_bytes(skdata.rocket())]


@pytest.mark.parametrize("model", ["efficientnet_lite0", "resnet50", "pixels"])
def test_device_decoding_gives_the_cpu_decoders_pixels(tmp_path, photos, model):
    preprocess = load_catalog(tmp_path)[model].preprocess
    on_device = DeviceDecoder(CPU).decode(photos, preprocess)
    on_cpu = np.stack([decode(data, preprocess, 10**8) for data in photos])
    assert on_device.dtype == torch.uint8 and tuple(on_device.shape) == on_cpu.shape
    difference = np.abs(on_device.numpy().astype(int) - on_cpu.astype(int))
    assert difference.mean() < 3.0, difference.mean()  # Pillow's draft mode and rounding: a few levels


def test_only_whole_rgb_or_grey_jpegs_within_the_limit_go_to_the_device(photos):
    pattern = Image.fromarray(skdata.chelsea())
    assert device_pixels(photos[0], 10**8) == 300 * 451
    assert device_pixels(encoded(pattern.convert("L"), "JPEG"), 10**8) == 300 * 451
    assert not device_pixels(encoded(pattern.convert("CMYK"), "JPEG"), 10**8)
    assert not device_pixels(encoded(pattern, "PNG"), 10**8)
    assert not device_pixels(photos[0][:len(photos[0]) // 2], 10**8)  # cut short: the CPU decoder says so
    assert not device_pixels(photos[0], 1000)  # over the pixel limit: the CPU decoder words the error
    assert not device_pixels(b"not an image", 10**8)


def test_grey_jpegs_come_out_as_three_channels_and_rotated_ones_go_to_the_cpu(services):
    half = np.zeros((60, 80, 3), np.uint8)
    half[:, :40] = (230, 20, 20)
    half[:, 40:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: nvJPEG would not turn it
    stored = encoded(Image.fromarray(half).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)
    grey = encoded(Image.fromarray(half).convert("L"), "JPEG")
    assert device_pixels(grey, 10**8) == 60 * 80 and device_pixels(stored, 10**8) == 0
    three = DeviceDecoder(CPU).decode([grey], Preprocess(resize_size=56, crop_size=56))[0].numpy()
    assert (three[..., 0] == three[..., 1]).all() and (three[..., 1] == three[..., 2]).all()
    device_stub, _, _ = services
    reply = device_stub.Embed(pb.EmbedRequest(config=pb.EmbedConfig(model=pixels.NAME, layers=["64x64"]),
                                              images=[stored, grey]))
    upright = from_tensor(reply.layers[0].vectors)[0].reshape(3, 64, 64)  # (channel, row, column)
    assert upright[0, :, :20].mean() > 0.8 and upright[2, :, -20:].mean() > 0.8  # red left, blue right


def test_device_batches_hold_at_most_a_batch_of_images_and_of_pixels():
    sizes = [0, 10, 10, 0, 10, 10, 10, BATCH_PIXELS, 5]
    assert list(_device_batches(sizes, 2)) == [[1, 2], [4, 5], [6], [7], [8]]
    assert list(_device_batches(sizes, 8)) == [[1, 2, 4, 5, 6], [7], [8]]


def test_decode_device_choices():
    assert device_decoder("cpu", CPU) is None and device_decoder("auto", CPU) is None
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        device_decoder("cuda", CPU)
    with pytest.raises(ValueError, match="decode_device 'gpu'"):
        ExtractorConfig(decode_device="gpu", device="cpu").validate()
    with pytest.raises(ValueError, match="decode_device cuda needs the model on CUDA"):
        ExtractorConfig(decode_device="cuda", device="cpu").validate()


@pytest.fixture(scope="module")
def services():
    """Two extractors: one decoding JPEGs with the device decoder (on the CPU device here), one
    with Pillow only."""
    on_device, device_channel, _ = serve_extractor(max_batch=4)
    on_device.extractor.device_decoder = DeviceDecoder(CPU)
    on_cpu, cpu_channel, _ = serve_extractor(max_batch=4)
    stub = extractor_pb2_grpc.ExtractorServiceStub
    yield stub(device_channel), stub(cpu_channel), on_device.extractor
    for service, channel in ((on_device, device_channel), (on_cpu, cpu_channel)):
        channel.close()
        service.stop(1.0)


def mixed(photos: list[bytes]) -> list[bytes]:
    """JPEGs with a PNG and a cut-short JPEG among them (both decoded on the CPU)."""
    png = encoded(Image.fromarray(skdata.astronaut()), "PNG")
    return [photos[0], png, photos[1], photos[2], photos[3], photos[1][:len(photos[1]) - 10], photos[0]]


def test_embed_keeps_the_images_order_when_some_decode_on_the_cpu(services, photos):
    device_stub, cpu_stub, extractor = services
    images = [image for image in mixed(photos) if image != mixed(photos)[5]]
    config = pb.EmbedConfig(model=pixels.NAME, layers=list(pixels.LAYERS))
    decoded_before = extractor.metrics.device_decoded._value.get()
    got = device_stub.Embed(pb.EmbedRequest(config=config, images=images))
    expected = cpu_stub.Embed(pb.EmbedRequest(config=config, images=images))
    assert extractor.metrics.device_decoded._value.get() - decoded_before == 5
    for mine, theirs in zip(got.layers, expected.layers, strict=True):
        a, b = from_tensor(mine.vectors), from_tensor(theirs.vectors)
        assert a.shape == b.shape == (6, 3 * int(mine.layer.split("x")[0]) ** 2)
        assert np.abs(a - b).mean() < 2.0 / 255, mine.layer  # each image next to its own CPU-decoded twin


def test_a_bad_image_among_device_decoded_ones_is_named_as_on_the_cpu(services, photos):
    device_stub, cpu_stub, _ = services
    config = pb.EmbedConfig(model=pixels.NAME, layers=["8x8"])
    images = mixed(photos)
    errors = []
    for stub in (device_stub, cpu_stub):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(pb.EmbedRequest(config=config, images=images))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        errors.append(raised.value.details())
    assert errors[0] == errors[1] and errors[0].startswith("image 5 ")

    def stream(stub):
        requests = [pb.BulkEmbedRequest(config=config),
                    pb.BulkEmbedRequest(images=[pb.ImageInput(id=f"i{n}", data=data) for n, data in enumerate(images)])]
        return [(answer.id, answer.WhichOneof("result"), answer.error.message)
                for answer in stub.BulkEmbed(iter(requests))]

    assert stream(device_stub) == stream(cpu_stub)
    assert [kind for _, kind, _ in stream(device_stub)] == ["vectors"] * 5 + ["error", "vectors"]
