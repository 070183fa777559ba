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
