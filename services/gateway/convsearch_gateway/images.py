"""Light image handling in the gateway (no torch): a quick validity check and thumbnails."""

import io

from PIL import Image, UnidentifiedImageError

from convsearch.errors import InvalidArgument

Image.MAX_IMAGE_PIXELS = None  # the extractor enforces the pixel limit when it decodes


def check_image(data: bytes) -> None:
    """INVALID_ARGUMENT unless `data` looks like an image file Pillow can read."""
    if not data:
        raise InvalidArgument("has no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(f"is not a readable image ({type(exc).__name__}: {exc})") from None


def thumbnail(data: bytes, size: int) -> tuple[bytes, str, int, int]:
    """(bytes, mime type, width, height) of the image, fitted into size x size when size > 0."""
    with Image.open(io.BytesIO(data)) as image:
        if size <= 0:
            mime = Image.MIME.get(image.format or "", "application/octet-stream")
            return data, mime, image.width, image.height
        image.thumbnail((size, size))
        keep_alpha = image.mode in ("RGBA", "LA", "P") or image.format == "PNG"
        out = io.BytesIO()
        if keep_alpha:
            image.save(out, format="PNG")
        else:
            image.convert("RGB").save(out, format="JPEG", quality=85)
        return out.getvalue(), "image/png" if keep_alpha else "image/jpeg", image.width, image.height
