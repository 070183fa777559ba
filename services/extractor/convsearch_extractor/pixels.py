"""The `pixels` model: the image itself as its vector, at 8x8, 16x16, 32x32 and 64x64.

A baseline every comparison needs (raw pixels can beat a CNN's layers on simple data), and the
identity model of the service: its forward pass costs almost nothing, so its throughput is the
service's own (decode, batching, gRPC).

It goes through the same path as every model: the decoder resizes the centre square of the
upright RGB image (the shorter side, all of it) to 64x64 with PIL's antialiased bilinear filter;
the forward pass scales the uint8 pixels to [0, 1] (mean 0, std 1: no ImageNet normalisation)
and halves the image by averaging 2x2 blocks (a box filter, exact antialiasing for a factor of
2) down to 32, 16 and 8. Layer `SxS` is that image flattened in (channel, row, column) order,
3*S*S values: all of R, then G, then B. The vectors are 1-D, so every pooling (avg, max,
flatten) gives the same flattened vector.
"""

import torch
from torch import nn

from convsearch_extractor.imaging import Preprocess

NAME = "pixels"
SIZES = (8, 16, 32, 64)
LAYERS = tuple(f"{size}x{size}" for size in SIZES)
PREPROCESS = Preprocess(resize_size=SIZES[-1], crop_size=SIZES[-1], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class Halve(nn.Module):
    """The mean of each 2x2 block: (N, C, H, W) -> (N, C, H/2, W/2), as AvgPool2d(2), but as
    two strided additions, which run several times faster on CPU."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        columns = image[..., 0::2] + image[..., 1::2]
        return (columns[..., 0::2, :] + columns[..., 1::2, :]) * 0.25


class Pixels(nn.Module):
    """(N, 3, 64, 64) images in [0, 1] -> one (N, 3*S*S) output per size S, smallest first.

    Each output is the graph node of a Flatten module named `SxS`, so the layers go through
    torchvision's feature extraction like any CNN's. No parameters.
    """

    def __init__(self):
        super().__init__()
        self.halve = Halve()
        for layer in LAYERS:
            self.add_module(layer, nn.Flatten())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = []
        for size in reversed(SIZES):
            if size != SIZES[-1]:
                image = self.halve(image)
            outputs.append(getattr(self, f"{size}x{size}")(image))
        return tuple(reversed(outputs))


def build(pretrained: bool) -> nn.Module:
    """The model; it has no weights, so `pretrained` changes nothing."""
    del pretrained
    return Pixels().eval()
