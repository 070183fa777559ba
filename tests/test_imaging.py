"""Decoding: every format and colour mode becomes upright RGB; unusable files are named errors."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from convsearch_extractor.imaging import ImageError, Preprocess, decode

PRE = Preprocess(resize_size=64, crop_size=56)
RED, BLUE = (220, 20, 20), (20, 20, 220)


def pattern() -> Image.Image:
    """Landscape 160x100: left half red, right half blue (survives a centre crop)."""
    pixels = np.zeros((100, 160, 3), np.uint8)
    pixels[:, :80] = RED
    pixels[:, 80:] = BLUE
    return Image.fromarray(pixels)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def assert_red_left_blue_right(pixels: np.ndarray, tolerance: int = 40):
    assert pixels.shape == (56, 56, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels[:, :20].reshape(-1, 3).mean(0) - RED).max() < tolerance
    assert np.abs(pixels[:, -20:].reshape(-1, 3).mean(0) - BLUE).max() < tolerance


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats(fmt):
    assert_red_left_blue_right(decode(encoded(pattern(), fmt), PRE, 10**8))


def test_gif_uses_first_frame():
    frames = [pattern(), pattern().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert_red_left_blue_right(decode(data, PRE, 10**8))


def test_exif_rotation_is_applied():
    stored = pattern().transpose(Image.Transpose.ROTATE_90)  # as a phone held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    assert_red_left_blue_right(decode(encoded(stored, "JPEG", exif=exif), PRE, 10**8))


def damaged_exif(orientation: int) -> bytes:
    """An EXIF block holding this orientation and, under the tag of a resolution (a rational), a
    string: Pillow reads it, but raises TypeError when it writes the block out again."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x0131] = "cam"  # Software, an ASCII tag
    raw = exif.tobytes()
    order = "little" if raw[6:8] == b"II" else "big"
    return raw.replace((0x0131).to_bytes(2, order), (0x011B).to_bytes(2, order), 1)  # now YResolution


def test_a_damaged_exif_block_still_gives_the_upright_image():
    """Pillow's exif_transpose rewrites the EXIF block and raised TypeError (struct.error for
    other damage) on one damaged tag: not an ImageError, so Embed answered INTERNAL and a
    BulkEmbed stream ended, the images after it unanswered, though the pixels were sound."""
    stored = pattern().transpose(Image.Transpose.ROTATE_90)
    assert_red_left_blue_right(decode(encoded(stored, "JPEG", exif=damaged_exif(6)), PRE, 10**8))
    assert_red_left_blue_right(decode(encoded(pattern(), "WEBP", exif=damaged_exif(1)), PRE, 10**8))


def test_cmyk_jpeg():
    assert_red_left_blue_right(decode(encoded(pattern().convert("CMYK"), "JPEG"), PRE, 10**8))


def test_grayscale_becomes_three_equal_channels():
    pixels = decode(encoded(pattern().convert("L"), "PNG"), PRE, 10**8)
    assert pixels.shape == (56, 56, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_sixteen_bit_grayscale_keeps_its_range():
    ramp = (np.linspace(0, 65535, 160)[None, :].repeat(100, 0)).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    pixels = decode(encoded(image, "PNG"), PRE, 10**8)
    assert pixels[:, 0, 0].mean() < 80 and pixels[:, -1, 0].mean() > 175


def test_transparency_is_composited_on_white():
    rgba = pattern().convert("RGBA")
    alpha = np.full((100, 160), 255, np.uint8)
    alpha[:, 80:] = 0
    rgba.putalpha(Image.fromarray(alpha))
    pixels = decode(encoded(rgba, "PNG"), PRE, 10**8)
    assert np.abs(pixels[:, :20].reshape(-1, 3).mean(0) - RED).max() < 40
    assert pixels[:, -20:].min() > 235


def _png_declaring(width: int, height: int) -> bytes:
    raw = encoded(Image.new("L", (1, 1)), "PNG")
    at = raw.index(b"IHDR")
    header = bytearray(raw[at:at + 17])
    header[4:12] = struct.pack(">II", width, height)
    return raw[:at] + bytes(header) + struct.pack(">I", zlib.crc32(bytes(header))) + raw[at + 21:]


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"this is not an image at all", "not a recognised image"),
    (encoded(pattern(), "JPEG")[:400], "truncated"),
    (encoded(pattern(), "PNG")[:200], "truncated"),
    (_png_declaring(0, 5), "zero size"),
    (_png_declaring(20000, 20000), "over the limit"),
])
def test_unusable_images_are_named(data, words):
    with pytest.raises(ImageError, match=words):
        decode(data, PRE, 40_000_000)
