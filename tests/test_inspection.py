"""Looking inside a layer: overlays decode at the image's size, the top channel is the one with
the largest mean activation, and bad requests are named."""

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch_extractor.imaging import Preprocess, crop_box, decode


def test_top_channels_and_overlays(extractor, chelsea_jpeg):
    reply = extractor.stub.InspectLayer(pb.InspectLayerRequest(layer="_blocks.4._project_conv", image=chelsea_jpeg,
                                                               top_channels=4))
    assert reply.model == "efficientnet_lite0" and reply.pretrained
    assert list(reply.output_shape) == [40, 28, 28] and reply.parameter_count > 0
    assert (reply.width, reply.height) == (451, 300)  # skimage's chelsea
    means = [channel.mean_activation for channel in reply.channels]
    assert len(means) == 4 and means == sorted(means, reverse=True)
    for channel in reply.channels:
        picture = Image.open(io.BytesIO(channel.overlay_png))
        assert picture.format == "PNG" and picture.size == (451, 300)
    # Independently: the layer's output for the same pixels, strongest channel by mean.
    pool = extractor.service.extractor.pool
    spec = pool.spec("efficientnet_lite0")
    maps = pool.acquire("efficientnet_lite0").feature_maps(decode(chelsea_jpeg, spec.preprocess, 10**8)[None],
                                                           "_blocks.4._project_conv")
    assert reply.channels[0].channel == int(np.argmax(maps.mean(axis=(1, 2))))
    assert reply.channels[0].mean_activation == pytest.approx(float(maps.mean(axis=(1, 2)).max()), rel=1e-4)


def test_crop_box_is_the_centre_square():
    assert crop_box(400, 200, Preprocess(resize_size=256, crop_size=224)) == (112.5, 12.5, 287.5, 187.5)


@pytest.mark.parametrize("request_fields, words", [
    ({"layer": "_fc"}, "no (C, H, W) feature map"),
    ({"layer": "_conv_head", "top_channels": 5000}, "out of range"),
    ({"layer": "_conv_head", "image": b"nope"}, "not a recognised image"),
])
def test_bad_inspection_requests(extractor, chelsea_jpeg, request_fields, words):
    fields = {"image": chelsea_jpeg, **request_fields}
    with pytest.raises(grpc.RpcError) as error:
        extractor.stub.InspectLayer(pb.InspectLayerRequest(**fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.value.details()


def test_overlays_of_a_large_photo_are_scaled_down_and_their_count_is_bounded(extractor):
    """Each overlay was a PNG at the photo's own size, and any number of them was drawn: 8
    channels of a 12-megapixel photo took 27 s and made a 38 MiB answer, all 1280 an hour of
    CPU, and past the message limit only once all of that was done."""
    rows, columns = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([rows % 256, columns % 256, (rows + columns) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    reply = extractor.stub.InspectLayer(pb.InspectLayerRequest(layer="_conv_head", image=buffer.getvalue()),
                                        timeout=60)
    assert (reply.width, reply.height) == (1024, 768) and len(reply.channels) == 8
    assert {Image.open(io.BytesIO(channel.overlay_png)).size for channel in reply.channels} == {(1024, 768)}
    with pytest.raises(grpc.RpcError) as error:
        extractor.stub.InspectLayer(pb.InspectLayerRequest(layer="_conv_head", image=buffer.getvalue(),
                                                           top_channels=65))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_channels 65 is out of range; use 1 to 64 (the layer has 1280 channels)" in error.value.details()
