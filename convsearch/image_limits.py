"""Image limits shared by the gateway and the extractor: an image's declared size is read from its
header (Pillow's lazy open decodes no pixels) and checked against one pixel limit before anything
decodes it, so a decompression bomb is refused for the price of reading a header.

Imports Pillow only (no numpy, no torch), so the gateway can use it.
"""

import io
import re
import struct
import warnings

from PIL import Image, UnidentifiedImageError

from convsearch.errors import InvalidArgument, shown

DEFAULT_MAX_PIXELS = 40_000_000
"""Default of the extractor's and the gateway's --max-pixels: the largest image accepted, in pixels."""

FORMATS = "JPEG, PNG, WebP, BMP, GIF or TIFF"
_OPENED = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""Pillow's names of FORMATS, the only ones it is let open: it knows many more, and some decode
as they open, before the size can be checked (an icon decodes the PNG inside it, of any size:
100 KB of one took 900 MB)."""
CHECK_DRAFT_SIZE = 64
"""A JPEG is verified by decoding it at the smallest scale still this wide (1/8 of most photos)."""

# Our own limit (check_pixels, on the header, before any decode) replaces Pillow's global bomb
# check, which would refuse at a fixed 89M pixels and only warn below that.
Image.MAX_IMAGE_PIXELS = None


class ImageError(InvalidArgument):
    """One image cannot be used; the message says why, without its position."""


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF or BMP header, for files Pillow refuses to open."""
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data.startswith(b"GIF8") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data.startswith(b"BM") and len(data) >= 26:
        return struct.unpack("<ii", data[18:26])
    return None


_OBJECT_REPR = re.compile(r"<[\w.]+ (?:object|at) [^>]*>|<[\w.]+ object>")


def describe(exc: BaseException) -> str:
    """A decoder's complaint as a message may echo it: cut short, and without the repr of our
    objects that Pillow puts in some of its messages ("cannot identify image file
    <_io.BytesIO object at 0x7f...>"), which speaks of our buffer, not of the user's image."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image"
    text = _OBJECT_REPR.sub("the image", str(exc)).strip()
    return shown(text or type(exc).__name__).strip("'")


_short = describe


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """ImageError for a zero-size image or one of more than `max_pixels` pixels."""
    if width <= 0 or height <= 0:
        raise ImageError(f"has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
            "downscale it first")


def open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The image opened lazily (header read, no pixels decoded), its declared size checked.

    Raises ImageError for empty, unrecognised, corrupt-header, zero-size or oversized images.
    """
    if not data:
        raise ImageError("is empty (0 bytes); send the encoded file's bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=_OPENED)
    except UnidentifiedImageError:
        declared = _declared_size(data)
        if declared:  # a known header Pillow cannot read on from: its size first, then the damage
            check_pixels(*declared, max_pixels)
            raise ImageError(f"is truncated or corrupt (a {declared[0]}x{declared[1]} header without readable "
                             "image data); send the complete file") from None
        raise ImageError(f"is not a recognised image ({len(data)} bytes); send {FORMATS}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a hostile header makes Pillow raise
        raise ImageError(f"is truncated or corrupt ({_short(exc)}); send the complete file") from None
    check_pixels(*image.size, max_pixels)
    return image


def load_checked(image: Image.Image) -> Image.Image:
    """Decodes the pixels of an image from open_checked; ImageError if they are truncated or corrupt."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Exception as exc:  # noqa: BLE001 - whatever corrupt pixel data makes a decoder raise
        raise ImageError(f"is truncated or corrupt ({_short(exc)}); send the complete file") from None
    return image


def verify_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image that is within the pixel limit and decodes completely.

    The size is checked on the header first; then the pixels are decoded, a JPEG at a reduced
    scale (draft mode: down to 1/8 a side, a fraction of the work), so a truncated or corrupt file is caught here
    rather than when it is used. Raises ImageError.
    """
    with open_checked(data, max_pixels) as image:
        size = image.size
        if image.format == "JPEG":
            image.draft("RGB", (CHECK_DRAFT_SIZE, CHECK_DRAFT_SIZE))
        load_checked(image)
    return size
