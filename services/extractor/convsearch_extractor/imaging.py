"""Decoding any common image file into the upright RGB, resized and centre-cropped pixels a
model expects. Runs in worker threads or processes, so it imports no torch.
"""

import dataclasses

import numpy as np
from PIL import Image

from convsearch.image_limits import (  # noqa: F401 - re-exported
    FORMATS,
    ImageError,
    describe,
    load_checked,
    open_checked,
)

ORIENTATION = 0x0112  # the EXIF tag
# How to turn an image stored with each EXIF orientation upright (1 and unknown values: as it is).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize_size`, centre-crop `crop_size`, normalise with mean/std."""

    resize_size: int
    crop_size: int
    bicubic: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F":  # NaN and infinities (no-data pixels) become the ends of the finite range
            finite = values[np.isfinite(values)]
            low, high = float(finite.min(initial=0)), float(finite.max(initial=1))
            values = np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low
            top = max(high - low, 1e-12)
        eight_bit = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation; 1 (as stored) where it has none, or an EXIF block Pillow
    cannot read: a damaged block makes it raise errors of many kinds (struct.error, TypeError)."""
    try:
        value = image.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - whatever a damaged EXIF block makes Pillow raise
        return 1
    return value if value in _UPRIGHT else 1


def open_upright(data: bytes, max_pixels: int, draft_size: int = 0) -> Image.Image:
    """The image as upright RGB (EXIF orientation applied, any mode converted).

    A JPEG may be decoded at a reduced scale still at least `draft_size` on each side. Raises
    ImageError for empty, unrecognised, truncated, zero-size or oversized images.
    """
    image = open_checked(data, max_pixels)  # the pixel limit, on the header, before any decode
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    load_checked(image)
    turn = _UPRIGHT.get(orientation(image))
    # Turned by its orientation alone: Pillow's exif_transpose also rewrites the EXIF block, and
    # fails on one damaged anywhere, however well the pixels decode.
    return _to_rgb(image if turn is None else image.transpose(turn))


def crop_box(width: int, height: int, preprocess: Preprocess) -> tuple[float, float, float, float]:
    """The region of a width x height image that resize-shorter-side-then-centre-crop keeps."""
    side = min(width, height) * preprocess.crop_size / preprocess.resize_size
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def decode(data: bytes, preprocess: Preprocess, max_pixels: int) -> np.ndarray:
    """Returns (crop, crop, 3) uint8 pixels of an encoded image, as the model sees it."""
    image = open_upright(data, max_pixels, preprocess.resize_size)
    resample = Image.Resampling.BICUBIC if preprocess.bicubic else Image.Resampling.BILINEAR
    crop = preprocess.crop_size
    # Resize-shorter-side-then-centre-crop as a single resize of the source region.
    image = image.resize((crop, crop), resample, box=crop_box(*image.size, preprocess))
    return np.asarray(image, dtype=np.uint8)
