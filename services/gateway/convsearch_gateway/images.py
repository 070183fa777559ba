"""Light image handling in the gateway (no torch): the pixel limit on the header before any
decode, a cheap full check of decodability at ingest, and thumbnails decoded in draft mode."""

import io

from PIL import Image

from convsearch.errors import InvalidArgument
from convsearch.image_limits import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    describe,
    load_checked,
    open_checked,
    verify_image,
)


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """INVALID_ARGUMENT unless `data` is an image within the pixel limit that decodes completely.

    The declared size is checked on the header first, so a decompression bomb is never decoded;
    a JPEG is then decoded at a reduced scale (draft mode), so a truncated file costs little to find.
    """
    if not data:
        raise InvalidArgument("has no image bytes")
    verify_image(data, max_pixels)


def check_request_image(data: bytes, max_pixels: int, field: str = "image") -> bytes:
    """The image a request sends (a query), its declared size checked on its header, nothing
    decoded; INVALID_ARGUMENT naming `field` for an empty, unrecognised or oversized one."""
    try:
        open_checked(data, max_pixels).close()
    except ImageError as exc:
        raise InvalidArgument(f"the {field} {exc}", field=field) from None
    return data


def thumbnail(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str, int, int]:
    """(bytes, mime type, width, height) of the image, fitted into size x size when size > 0.

    The pixel limit is checked on the header before anything is decoded, and a JPEG is decoded
    at the smallest scale still at least `size` wide (draft mode). Raises ImageError
    (INVALID_ARGUMENT) for a stored image that cannot be decoded.
    """
    with open_checked(data, max_pixels) as image:
        if size <= 0:
            mime = Image.MIME.get(image.format or "", "application/octet-stream")
            return data, mime, image.width, image.height
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        load_checked(image)
        try:
            image.thumbnail((size, size))
        except (OSError, ValueError) as exc:
            raise ImageError(f"is truncated or corrupt ({describe(exc)})") from None
        keep_alpha = image.mode in ("RGBA", "LA", "P") or image.format == "PNG"
        out = io.BytesIO()
        if keep_alpha:
            image.save(out, format="PNG")
        else:
            image.convert("RGB").save(out, format="JPEG", quality=85)
        return out.getvalue(), "image/png" if keep_alpha else "image/jpeg", image.width, image.height
