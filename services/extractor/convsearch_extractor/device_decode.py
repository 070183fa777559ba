"""Decoding JPEGs on the model's device (nvJPEG on CUDA, through torchvision.io.decode_jpeg, a
batch at a time), resized and centre-cropped there, so the pixels never pass through the host.

It gives what imaging.decode gives on the CPU: the centre square kept by
resize-shorter-side-then-crop, resized to the crop with an antialiased bilinear (or bicubic)
filter, as (N, crop, crop, 3) uint8; the two differ by a few levels (Pillow decodes a large JPEG
at a reduced scale first, draft mode). Only whole RGB and greyscale JPEGs stored upright (no EXIF
orientation but the default: nvJPEG does not apply it) within the pixel limit come here; anything
else (other formats, CMYK, a rotated photo, a header that fails the checks) is left to the CPU
decoder, which also words the error of a bad image.
"""

import io
import logging
import math
import threading

import numpy as np
import torch
import torchvision.io
from PIL import Image
from torch.nn import functional

from convsearch_extractor.imaging import ImageError, Preprocess, crop_box, open_checked, orientation

_JPEG_MODES = ("RGB", "L")
BATCH_PIXELS = 1 << 29  # the most pixels decoded at once (1.5 GiB of RGB), however many images that is
DECODE_DEVICES = ("auto", "cpu", "cuda")
log = logging.getLogger("convsearch.extractor")


def device_pixels(data: bytes, max_pixels: int) -> int:
    """The pixels of `data` when it is a JPEG this decoder takes, else 0 (its header read, no
    pixels decoded; one cut short, or with bytes after its end marker, goes to the CPU decoder)."""
    if not data.endswith(b"\xff\xd9"):
        return 0
    try:
        image = open_checked(data, max_pixels)
        upright = orientation(image) == 1
    except (ImageError, OSError, ValueError, SyntaxError):
        return 0
    taken = image.format == "JPEG" and image.mode in _JPEG_MODES and upright
    return image.width * image.height if taken else 0


class DeviceDecoder:
    """Decodes batches of JPEGs (each one `device_pixels` takes) on `device`, one at a time."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()  # one batch at a time: the decoder's state is shared

    def decode(self, images: list[bytes], preprocess: Preprocess) -> torch.Tensor:
        """(N, crop, crop, 3) uint8 on the device, complete when this returns. Raises
        RuntimeError when the decoder refuses the batch (a JPEG corrupt past its header; out of
        memory): the caller decodes it on the CPU instead."""
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
        crop = preprocess.crop_size
        with self._lock:
            decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=self.device)
            out = torch.empty((len(images), crop, crop, 3), dtype=torch.uint8, device=self.device)
            for row, image in enumerate(decoded):
                out[row] = _resized_crop(image, preprocess)
            if self.device.type == "cuda":  # done before a model worker's own stream reads it
                torch.cuda.current_stream(self.device).synchronize()
        return out

    def check(self) -> None:
        """Decodes one small JPEG on the device; raises RuntimeError when it cannot be done here."""
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, format="JPEG")
        self.decode([buffer.getvalue()], Preprocess(resize_size=16, crop_size=16))


def _resized_crop(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """(3, H, W) uint8 -> (crop, crop, 3) uint8: the region crop_box keeps, resized."""
    height, width = image.shape[1:]
    left, top, right, bottom = crop_box(width, height, preprocess)
    region = image[:, max(0, math.floor(top)):math.ceil(bottom), max(0, math.floor(left)):math.ceil(right)]
    crop = preprocess.crop_size
    resized = functional.interpolate(region[None].float(), size=(crop, crop), antialias=True, align_corners=False,
                                     mode="bicubic" if preprocess.bicubic else "bilinear")
    return resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def device_decoder(choice: str, device: torch.device) -> DeviceDecoder | None:
    """The device decoder --decode-device asks for on the model's `device`: none with `cpu`, or
    with `auto` where the model runs on the CPU or the device cannot decode (logged). With `cuda`
    a device that cannot decode raises ValueError."""
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"--decode-device {choice} needs the model on a CUDA device; it runs on {device}")
    decoder = DeviceDecoder(device)
    try:
        decoder.check()
    except (RuntimeError, ImportError) as exc:
        if choice == "cuda":
            raise ValueError(f"--decode-device cuda: torchvision cannot decode JPEGs on {device} here ({exc}); "
                             "use --decode-device auto or cpu") from None
        log.warning("JPEGs are decoded on the CPU: torchvision cannot decode them on %s here (%s)", device, exc)
        return None
    return decoder
