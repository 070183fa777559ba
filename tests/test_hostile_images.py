"""A hostile caller of the extractor: images that get past the pixel limit, float images with
no-data pixels, and names long enough to push an error's advice out of its message. After each,
the service keeps answering."""

import io
import struct
import subprocess
import sys
import textwrap
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from convsearch.common.v1 import common_pb2
from convsearch.extractor.v1 import extractor_pb2 as pb


def ico_bomb(side: int) -> bytes:
    """A 16x16 icon by its directory, holding a blank side x side 1-bit PNG (tens of KB, written
    row by row, so the test itself never holds the pixels)."""
    rows, packed = zlib.compressobj(9), []
    row = bytes(1 + -(-side // 8))  # filter byte, then the row's bits
    packed.extend(rows.compress(row) for _ in range(side))
    packed.append(rows.flush())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", b"".join(packed)) + chunk(b"IEND", b""))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def embed(stub, images, **config):
    return stub.Embed(pb.EmbedRequest(config=pb.EmbedConfig(**config), images=images), timeout=60)


def assert_still_serving(stub, good: bytes) -> None:
    assert embed(stub, [good]).layers[0].vectors.shape == [1, 1280]


@pytest.mark.parametrize("check", [
    "from convsearch_extractor.imaging import Preprocess, decode; decode(data, Preprocess(256, 224), 40_000_000)",
    "from convsearch.image_limits import verify_image; verify_image(data, 40_000_000)",  # the gateway's Ingest
], ids=["extractor", "gateway"])
def test_an_icon_holding_a_huge_png_is_refused_without_being_decoded(tmp_path, check):
    """ICO is none of the formats taken, yet Pillow opened it, and its opening decodes the PNG
    inside whatever size it is (with Pillow's own bomb check off, as the services' limit
    replaces it): 100 KB decoded to 900 MB before the size was checked."""
    bomb = tmp_path / "bomb.ico"
    bomb.write_bytes(ico_bomb(30000))
    code = textwrap.dedent(f"""
        import pathlib, re
        from convsearch.image_limits import ImageError
        data = pathlib.Path({str(bomb)!r}).read_bytes()
        try:
            {check}
        except ImageError as exc:
            print(exc)
        print(int(re.search(r"VmHWM:\\s+(\\d+)", pathlib.Path("/proc/self/status").read_text())[1]) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    message, peak_mib = out.stdout.strip().splitlines()
    assert int(peak_mib) < 300, f"{peak_mib} MiB used to refuse a 100 KB icon ({message})"
    assert "not a recognised image" in message and "JPEG, PNG, WebP, BMP, GIF or TIFF" in message


def test_embed_names_an_icon_bomb_by_its_index_and_keeps_serving(extractor, chelsea_jpeg):
    with pytest.raises(grpc.RpcError) as error:
        embed(extractor.stub, [chelsea_jpeg, ico_bomb(12000)])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1 is not a recognised image" in error.value.details()
    assert_still_serving(extractor.stub, chelsea_jpeg)


def _float_tiff(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.float32), "F").save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("odd", [np.nan, np.inf, -np.inf])
def test_one_no_data_pixel_of_a_float_image_leaves_the_rest_of_it(extractor, odd):
    """A single NaN or infinite pixel (no-data in a float TIFF) turned the whole image black."""
    rows, columns = np.mgrid[0:120, 0:160]
    values = (rows + columns) / 300.0  # 0 to 0.93: shown as it is
    damaged = values.copy()
    damaged[0, 0] = odd  # a corner the centre crop leaves out
    reply = embed(extractor.stub, [_float_tiff(values), _float_tiff(damaged)], model="pixels", layers=["8x8"])
    vectors = np.frombuffer(reply.layers[0].vectors.data, np.float32).reshape(2, -1)
    assert vectors[0].mean() > 0.3
    np.testing.assert_allclose(vectors[1], vectors[0], atol=0.01)


def test_a_layer_named_twice_among_many_is_named_with_the_advice(extractor, chelsea_jpeg):
    """The message listed every layer of the request, so with a model's many layers it was cut
    (status messages are capped) before naming the repeated one or saying what to do."""
    models = extractor.stub.ListModels(pb.ListModelsRequest(include_all_layers=True)).models
    layers = [layer.name for layer in models[0].layers if layer.output_shape]
    assert len(layers) > 100
    with pytest.raises(grpc.RpcError) as error:
        embed(extractor.stub, [chelsea_jpeg], layers=[*layers, "_conv_head"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details()
    assert "'_conv_head' twice" in details and "name each once" in details and len(details) < 300
    assert_still_serving(extractor.stub, chelsea_jpeg)


def test_a_long_unknown_layer_is_cut_and_the_advice_kept(extractor, chelsea_jpeg):
    """An unknown layer's name was echoed whole: a long one pushed the featured layers, the
    advice of the message, past the cap of status messages."""
    long_name = "conv" * 2000
    with pytest.raises(grpc.RpcError) as error:
        embed(extractor.stub, [chelsea_jpeg], layers=[long_name])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "featured layers are _conv_stem" in error.value.details() and len(error.value.details()) < 600
    with pytest.raises(grpc.RpcError) as inspected:
        extractor.stub.InspectLayer(pb.InspectLayerRequest(layer=long_name, image=chelsea_jpeg), timeout=60)
    assert inspected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "try one of _conv_stem" in inspected.value.details() and len(inspected.value.details()) < 600
    assert_still_serving(extractor.stub, chelsea_jpeg)


def test_a_bulk_image_error_cuts_a_long_id(extractor, chelsea_jpeg):
    """The error of a bad image echoed its id whole (the answer's `id` carries it already)."""
    long_id = "photo" * 20000
    answers = list(extractor.stub.BulkEmbed(iter([pb.BulkEmbedRequest(
        config=pb.EmbedConfig(pooling=common_pb2.POOLING_AVG),
        images=[pb.ImageInput(id=long_id, data=b"junk"), pb.ImageInput(id="good", data=chelsea_jpeg)])]),
        timeout=60))
    assert [answer.WhichOneof("result") for answer in answers] == ["error", "vectors"]
    assert answers[0].id == long_id
    message = answers[0].error.message
    assert message.startswith("image 0 ('photo") and "is not a recognised image" in message and len(message) < 300


def test_formats_outside_the_list_are_not_opened(extractor, chelsea_jpeg):
    """Only the documented formats are read; a PCX (one Pillow reads) is named as unrecognised."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PCX")
    with pytest.raises(grpc.RpcError) as error:
        embed(extractor.stub, [buffer.getvalue()])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0 is not a recognised image" in error.value.details()


def test_every_documented_signature_still_opens(extractor):
    """The formats taken, in the byte orders TIFF allows, are still embedded."""
    image = Image.new("RGB", (64, 48), (30, 160, 60))
    images = []
    for fmt, params in (("JPEG", {}), ("PNG", {}), ("WEBP", {}), ("BMP", {}), ("GIF", {}),
                        ("TIFF", {}), ("TIFF", {"big_tiff": True})):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **params)
        images.append(buffer.getvalue())
    big_endian = io.BytesIO()
    Image.fromarray(np.full((48, 64), 300, ">u2")).save(big_endian, format="TIFF")  # I;16B: a big-endian (MM) TIFF
    images.append(big_endian.getvalue())
    assert embed(extractor.stub, images).layers[0].vectors.shape == [len(images), 1280]
