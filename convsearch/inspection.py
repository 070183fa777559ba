"""What a layer responds to in one image, as the extractor computes it and clients receive it."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Inspection:
    """A layer's strongest channels for one image, strongest first: (channel, mean activation,
    PNG of its activation map laid over the image, width x height)."""

    model: str
    layer: str
    output_shape: tuple[int, ...]
    parameter_count: int
    pretrained: bool
    width: int
    height: int
    channels: tuple[tuple[int, float, bytes], ...]
