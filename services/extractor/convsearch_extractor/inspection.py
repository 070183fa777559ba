"""Looking inside a layer: the channels that respond most to an image, each as its activation
map upsampled and laid over the image (the live counterpart of a model explorer)."""

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from convsearch.errors import Cancelled, InvalidArgument, shown
from convsearch.inspection import Inspection
from convsearch_extractor.imaging import ImageError, crop_box, open_upright
from convsearch_extractor.runtime import ModelPool

DEFAULT_TOP = 8  # channels an inspection shows when not told how many
MAX_TOP = 64  # the most channels one inspection shows
OVERLAY_SIDE = 1024  # the longest side of an overlay: the image is scaled down to it


def _heat(values: np.ndarray) -> np.ndarray:
    """0..1 values -> RGB: dark blue through red to yellow."""
    red = np.clip(2.0 * values, 0, 1)
    green = np.clip(2.0 * values - 1.0, 0, 1)
    blue = np.clip(1.0 - 2.0 * values, 0, 1) * 0.6
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay(image: Image.Image, activation: np.ndarray, box: tuple[float, float, float, float]) -> bytes:
    """PNG of `image` with `activation` (h, w) stretched over `box`; outside it the image is dimmed."""
    low, high = float(activation.min()), float(activation.max())
    scaled = (activation - low) / (high - low) if high > low else np.zeros_like(activation)
    left, top, right, bottom = (round(v) for v in box)
    heat_map = Image.fromarray((scaled * 255).astype(np.uint8)).resize(
        (max(1, right - left), max(1, bottom - top)), Image.Resampling.BILINEAR)
    heat = Image.fromarray(_heat(np.asarray(heat_map, np.float32) / 255.0))
    base = np.asarray(image, np.float32) * 0.35
    canvas = Image.fromarray(base.astype(np.uint8))
    region = image.crop((left, top, right, bottom))
    canvas.paste(Image.blend(region, heat, 0.55), (left, top))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def inspect(pool: ModelPool, model: str, layer: str, data: bytes, top: int, max_pixels: int,
            alive: Callable[[], bool] = lambda: True) -> Inspection:
    """The `top` channels of `layer` with the largest mean activation for the image `data`; 0:
    DEFAULT_TOP, or every channel of a layer with fewer. Each overlay is the image scaled down to
    OVERLAY_SIDE at most; once the client is gone (`alive` false), no further one is drawn."""
    spec = pool.spec(model)
    layer_info = pool.graph(model).layers.get(layer)
    if layer_info is None or len(layer_info.output_shape) != 3:
        graph = pool.graph(model)
        # Featured layers with feature maps; a model whose featured layers are vectors (pixels)
        # names its other nodes that have them.
        maps = [name for name in graph.featured if len(graph.layers[name].output_shape) == 3] or [
            candidate.name for candidate in graph.layers.values() if len(candidate.output_shape) == 3]
        what = "is no layer" if layer_info is None else "has no (C, H, W) feature map to inspect"
        raise InvalidArgument(f"layer {shown(layer)} of {model} {what}; try one of {', '.join(maps)}",
                              reason="LAYER_UNKNOWN" if layer_info is None else "LAYER_NOT_A_FEATURE_MAP",
                              field="layer", metadata={"model": model, "layer": layer})
    top = top or min(DEFAULT_TOP, layer_info.output_shape[0])
    most = min(MAX_TOP, layer_info.output_shape[0])
    if not 1 <= top <= most:
        raise InvalidArgument(f"top_channels {top} is out of range; use 1 to {most} (the layer has "
                              f"{layer_info.output_shape[0]} channels)", reason="TOP_CHANNELS_OUT_OF_RANGE",
                              field="top_channels", metadata={"top_channels": str(top), "max": str(most)})
    try:
        image = open_upright(data, max_pixels, OVERLAY_SIDE)  # a JPEG at a reduced scale still over it
    except ImageError as exc:
        raise InvalidArgument(f"the image {exc}") from None
    box = crop_box(*image.size, spec.preprocess)
    resample = Image.Resampling.BICUBIC if spec.preprocess.bicubic else Image.Resampling.BILINEAR
    size = spec.preprocess.crop_size
    pixels = np.array(image.resize((size, size), resample, box=box), np.uint8)[None]  # writable, as torch wants
    loaded = pool.acquire(model)
    maps = loaded.feature_maps(pixels, layer)
    means = maps.mean(axis=(1, 2))
    strongest = np.argsort(-means, kind="stable")[:top]
    image.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE))
    box = crop_box(*image.size, spec.preprocess)
    channels = []
    for channel in strongest:
        if not alive():
            raise Cancelled("the client cancelled the call or its deadline passed; no further overlay was drawn")
        channels.append((int(channel), float(means[channel]), overlay(image, maps[channel], box)))
    return Inspection(model, layer, layer_info.output_shape, layer_info.parameter_count, loaded.pretrained,
                      image.width, image.height, tuple(channels))
