"""Loaded models on one device: loading within a memory budget (least recently used goes
first), feature extractors cached per layer set, and the forward pass that turns uint8 pixels
into pooled vectors for several layers at once.
"""

import collections
import contextlib
import dataclasses
import logging
import threading
import warnings

import numpy as np
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from convsearch.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown
from convsearch.naming import check_model_name
from convsearch.rwlock import RWLock
from convsearch.weights import NONE, RANDOM, UNKNOWN, fingerprint
from convsearch_extractor.catalog import ModelSpec
from convsearch_extractor.graph import ModelGraph, describe, tracer_kwargs

log = logging.getLogger("convsearch.extractor.runtime")
POOLINGS = ("avg", "max", "flatten")
_EXTRACTORS_PER_MODEL = 16
_SHAPES_COMPILED = 32  # batch shapes torch.compile may compile a feature extractor for (padded: a few)


# torch.fx patches nn.Module.__call__ process-wide while it traces, so no forward pass may run
# during a trace; forward passes (the model workers') run together: `read()` to run, `write()` to trace.
FX_LOCK = RWLock()


@dataclasses.dataclass(frozen=True)
class EmbedSpec:
    """What to compute: the batching key of the dynamic batcher."""

    model: str
    layers: tuple[str, ...]
    pooling: str = "avg"
    normalize: bool = False


def pool(features: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """(N, C, *spatial) or (N, D) features -> (N, D) float32 vectors."""
    features = features.float()
    if features.dim() > 2:
        if pooling == "avg":
            features = features.mean(dim=tuple(range(2, features.dim())))
        elif pooling == "max":
            features = features.amax(dim=tuple(range(2, features.dim())))
    features = features.reshape(features.shape[0], -1)
    if normalize:
        features = torch.nn.functional.normalize(features, dim=1)
    return features


def padded_size(count: int) -> int:
    """The power of two a batch of `count` images is padded to on CUDA."""
    return 1 << max(0, count - 1).bit_length()


class LoadedModel:
    """One model on a device, with its feature extractors. Several model workers may run it at
    once: a forward pass in eval mode changes nothing in the module.

    With `pad_batches` (the default on CUDA) batches are padded to a power of two, so the GPU
    sees few distinct shapes and its kernels are chosen once per shape, at warm-up. `weights` is
    the fingerprint of the weights it was built with (see convsearch.weights). With `compile`,
    each feature extractor goes through torch.compile (compiled at its first batch of a shape).

    On CUDA each model worker (thread) runs on a CUDA stream of its own: pixels are copied from
    page-locked host memory asynchronously, and the vectors come back the same way, so one
    worker's copies and host work overlap another's kernels.

    A forward pass holds the whole output of every requested layer until it ends: with
    `max_activation_bytes` and the values each layer outputs per image (`layer_values`), a batch
    whose outputs would hold more is run in parts of as many images as fit (one at least), so
    that asking for every layer of a large model cannot take the process's memory.
    """

    def __init__(self, spec: ModelSpec, module: nn.Module, pretrained: bool, device: torch.device,
                 pad_batches: bool | None = None, weights: str = UNKNOWN, compile: bool = False,
                 layer_values: dict[str, int] | None = None, max_activation_bytes: int = 0):
        self.spec = spec
        self._layer_values = layer_values or {}
        self.max_activation_bytes = max_activation_bytes
        self.compile = compile
        self._compiled: set[tuple] = set()  # (layers, input shape) compiled already
        self._streams = threading.local()
        self.pretrained = pretrained
        self.weights = weights
        self.device = device
        self.pad_batches = device.type == "cuda" if pad_batches is None else pad_batches
        self.module = module.to(device=device, memory_format=torch.channels_last)
        self.bytes = sum(t.numel() * t.element_size()
                         for t in [*module.parameters(), *module.buffers()])
        shape = (1, 1, 1, 3)
        # (pixel / 255 - mean) / std as one multiply-add from the (N, H, W, 3) uint8 pixels: scale
        # and shift by channel, the last dimension.
        std = torch.tensor(spec.preprocess.std, dtype=torch.float64).view(shape) * 255.0
        self._scale = (1.0 / std).to(device, torch.float32)
        self._shift = (-torch.tensor(spec.preprocess.mean, dtype=torch.float64).view(shape) * 255.0 / std
                       ).to(device, torch.float32)
        self._extractors: collections.OrderedDict[tuple[str, ...], nn.Module] = collections.OrderedDict()
        self._extractors_lock = threading.Lock()

    def _cached_extractor(self, key: tuple[str, ...]) -> nn.Module | None:
        with self._extractors_lock:
            extractor = self._extractors.get(key)
            if extractor is not None:
                self._extractors.move_to_end(key)
            return extractor

    def _extractor(self, layers: tuple[str, ...]) -> nn.Module:
        key = tuple(sorted(set(layers)))
        extractor = self._cached_extractor(key)
        if extractor is not None:
            return extractor
        with FX_LOCK.write():
            extractor = self._cached_extractor(key)
            if extractor is not None:  # traced by another worker meanwhile
                return extractor
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                extractor = create_feature_extractor(
                    self.module, return_nodes=list(key),
                    tracer_kwargs=tracer_kwargs(self.spec.tracer_leaf_modules)).eval()
            if self.compile:  # padded batches have few shapes; unpadded ones get a dynamic batch size
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _SHAPES_COMPILED)
                extractor = torch.compile(extractor, dynamic=not self.pad_batches)
        with self._extractors_lock:
            self._extractors[key] = extractor
            if len(self._extractors) > _EXTRACTORS_PER_MODEL:
                self._extractors.popitem(last=False)
        return extractor

    def _forward(self, pixels: np.ndarray | torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """One forward pass of (N, H, W, 3) uint8 pixels, normalised on the device, to `layers`."""
        batch = torch.as_tensor(pixels)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # page-locked: the copy below runs asynchronously on the stream
        batch = batch.to(self.device, non_blocking=True)
        # Normalised where the pixels lie, then seen as (N, 3, H, W): channels_last already, no copy
        # (twice as fast as normalising the permuted pixels into a new layout).
        batch = torch.addcmul(self._shift, batch, self._scale).permute(0, 3, 1, 2)
        batch = batch.contiguous(memory_format=torch.channels_last)
        extractor = self._extractor(layers)
        # Compiling a new shape traces the module, as torch.fx does: no other forward pass meanwhile.
        shape = (tuple(sorted(set(layers))), tuple(batch.shape))
        compiling = self.compile and shape not in self._compiled
        with FX_LOCK.write() if compiling else FX_LOCK.read():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                outputs = extractor(batch)
        if compiling:
            self._compiled.add(shape)
        return outputs

    @torch.inference_mode()
    def feature_maps(self, pixels: np.ndarray, layer: str) -> np.ndarray:
        """The raw (C, H, W) output of `layer` for one image, float32."""
        return self._forward(pixels, (layer,))[layer][0].float().cpu().numpy()

    def images_per_pass(self, layers: tuple[str, ...]) -> int | None:
        """The most images one forward pass to `layers` may take within max_activation_bytes (a
        power of two where batches are padded; 1 at least); None when unbounded."""
        per_image = 4 * sum(self._layer_values.get(layer, 0) for layer in set(layers))  # float32
        if not self.max_activation_bytes or not per_image:
            return None
        fits = max(1, self.max_activation_bytes // per_image)
        return 1 << (fits.bit_length() - 1) if self.pad_batches else fits

    def embed(self, pixels: np.ndarray | torch.Tensor, spec: EmbedSpec) -> dict[str, np.ndarray]:
        """(N, H, W, 3) uint8 pixels (host or device) -> {layer: (N, D) float32}, all layers from
        one forward pass, or from one a part of the images where they do not fit in one (see
        images_per_pass)."""
        step = self.images_per_pass(spec.layers)
        if step is None or len(pixels) <= step:
            return self._embed(pixels, spec)
        parts = [self._embed(pixels[start:start + step], spec) for start in range(0, len(pixels), step)]
        return {layer: np.concatenate([part[layer] for part in parts]) for layer in spec.layers}

    @torch.inference_mode()
    def _embed(self, pixels: np.ndarray | torch.Tensor, spec: EmbedSpec) -> dict[str, np.ndarray]:
        count = len(pixels)
        with self._stream():
            if isinstance(pixels, torch.Tensor) and pixels.is_cuda:
                # Decoded, or joined by the batcher, on the default stream: this stream waits for it.
                stream = torch.cuda.current_stream(self.device)
                stream.wait_stream(torch.cuda.default_stream(self.device))
                pixels.record_stream(stream)
            if self.pad_batches and padded_size(count) != count:
                pixels = torch.as_tensor(pixels)
                pixels = torch.cat([pixels, pixels.new_zeros((padded_size(count) - count, *pixels.shape[1:]))])
            outputs = self._forward(pixels, spec.layers)
            return self._to_host({layer: pool(outputs[layer][:count], spec.pooling, spec.normalize)
                                  for layer in spec.layers})

    def _stream(self) -> contextlib.AbstractContextManager:
        """This thread's CUDA stream (each model worker its own); nothing on the CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def _to_host(self, vectors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The vectors as numpy arrays; from CUDA through page-locked memory, copied
        asynchronously, then waited for once."""
        if self.device.type != "cuda":
            return {layer: values.numpy() for layer, values in vectors.items()}
        host = {layer: torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                for layer, values in vectors.items()}
        for layer, values in vectors.items():
            host[layer].copy_(values, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return {layer: values.numpy().copy() for layer, values in host.items()}  # the page-locked blocks go back


class ModelPool:
    """Knows every model's graph and status, and keeps loaded models within a memory budget."""

    def __init__(self, catalog: dict[str, ModelSpec], device: torch.device, memory_budget_bytes: int,
                 allow_random_weights: bool, compile: bool = False, max_activation_bytes: int = 0):
        self.catalog = catalog
        self.max_activation_bytes = max_activation_bytes  # of one forward pass's outputs (LoadedModel)
        self.compile = compile
        self.device = device
        self.budget = memory_budget_bytes
        self.allow_random = allow_random_weights
        self._graphs: dict[str, ModelGraph] = {}
        self._fingerprints: dict[tuple[str, int, int], str] = {}
        self._loaded: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def spec(self, name: str) -> ModelSpec:
        """The spec of a known model; INVALID_ARGUMENT for a name that could address a path (`/`,
        `..`), NOT_FOUND, listing the models, otherwise."""
        check_model_name(name)
        spec = self.catalog.get(name)
        if spec is None:
            raise NotFound(f"unknown model {name!r}; known models: {', '.join(self.catalog)}", reason="MODEL_NOT_FOUND",
                           resource_type="model", resource_name=name, metadata={"model": name})
        return spec

    def graph(self, name: str) -> ModelGraph:
        """Layers of a model, traced once on the meta device."""
        with self._lock:
            graph = self._graphs.get(name)
        if graph is None:
            spec = self.spec(name)
            with FX_LOCK.write(), torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = describe(spec.build(False), spec.preprocess.crop_size, spec.tracer_leaf_modules,
                                 spec.featured_layers)
            with self._lock:
                self._graphs[name] = graph
        return graph

    def status(self, name: str) -> tuple[bool, bool, str]:
        """(available, pretrained, reason when unavailable) for a model. A model without weights
        (the `pixels` baseline) counts as pretrained: its vectors are as meaningful."""
        spec = self.spec(name)
        if spec.weightless or spec.weights_present():
            return True, True, ""
        if self.allow_random:
            return True, False, ""
        return False, False, (f"pretrained weights for {name} not found at {spec.weights_path}; "
                              f"{spec.missing_weights_hint}, or start the extractor with "
                              "--allow-random-weights for development")

    def weights(self, name: str) -> str:
        """The fingerprint of the weights Embed runs a model with now: the loaded model's, else
        those it would load; UNKNOWN when the model is unavailable."""
        with self._lock:
            loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded.weights
        available, pretrained, _ = self.status(name)
        return self._fingerprint(self.spec(name), pretrained) if available else UNKNOWN

    def _fingerprint(self, spec: ModelSpec, pretrained: bool) -> str:
        """NONE for a model without weights, RANDOM, or the weights file's fingerprint, hashed once
        per version of the file."""
        if spec.weightless:
            return NONE
        if not pretrained:
            return RANDOM
        try:
            stat = spec.weights_path.stat()
        except OSError:
            return UNKNOWN  # removed since its status was read
        key = (str(spec.weights_path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            known = self._fingerprints.get(key)
        if known is None:
            known = fingerprint(spec.weights_path)
            with self._lock:
                self._fingerprints[key] = known
        return known

    def acquire(self, name: str) -> LoadedModel:
        """The loaded model, loading it (and evicting least recently used ones) if needed."""
        loaded = self._touch(name)
        if loaded is not None:
            return loaded
        with self._load_lock:
            return self._touch(name) or self._load(name)

    def _touch(self, name: str) -> LoadedModel | None:
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None:
                self._loaded.move_to_end(name)
            return loaded

    def _load(self, name: str) -> LoadedModel:
        available, pretrained, reason = self.status(name)
        if not available:
            raise FailedPrecondition(reason)
        spec = self.spec(name)
        needed = sum(p.numel() * 4 for p in self._meta_module(spec).parameters())
        if needed > self.budget:
            raise ResourceExhausted(
                f"model {name} needs about {needed >> 20} MiB, over the memory budget of "
                f"{self.budget >> 20} MiB; raise --memory-budget-mb")
        with self._lock:
            while self._loaded and sum(m.bytes for m in self._loaded.values()) + needed > self.budget:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("evicted %s to stay within the memory budget", evicted)
        log.info("loading %s (%s weights) on %s", name, "pretrained" if pretrained else "RANDOM",
                 self.device)
        try:
            module = spec.build(pretrained)
        except (RuntimeError, OSError) as exc:
            raise FailedPrecondition(f"weights for {name} at {spec.weights_path} could not be "
                                     f"loaded ({exc}); replace the file") from None
        layer_values = {layer.name: int(np.prod(layer.output_shape)) for layer in self.graph(name).layers.values()
                        if layer.is_tensor}
        loaded = LoadedModel(spec, module, pretrained, self.device, weights=self._fingerprint(spec, pretrained),
                             compile=self.compile, layer_values=layer_values,
                             max_activation_bytes=self.max_activation_bytes)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with self._lock:
            self._loaded[name] = loaded
        return loaded

    @staticmethod
    def _meta_module(spec: ModelSpec) -> nn.Module:
        with torch.device("meta"):
            return spec.build(False)

    def check_layers(self, spec: EmbedSpec, max_flatten: int) -> dict[str, int]:
        """Validates the layers of a request and returns each one's vector dimension."""
        graph = self.graph(spec.model)
        featured = ", ".join(graph.featured)
        dims = {}
        for layer_name in spec.layers:
            layer = graph.layers.get(layer_name)
            named = {"model": spec.model, "layer": layer_name}
            if layer is None:
                raise InvalidArgument(
                    f"model {spec.model} has no layer {shown(layer_name)}; its featured layers are "
                    f"{featured} (ListModels with include_all_layers lists every node)", reason="LAYER_UNKNOWN",
                    metadata=named)
            if not layer.is_tensor:
                raise InvalidArgument(f"layer {layer_name!r} of {spec.model} ({layer.op}) does not "
                                      f"output a feature map; pick one of {featured}",
                                      reason="LAYER_NOT_A_FEATURE_MAP", metadata=named)
            size = int(np.prod(layer.output_shape))
            if spec.pooling == "flatten" and size > max_flatten:
                raise InvalidArgument(
                    f"flattening layer {layer_name!r} ({list(layer.output_shape)}) gives {size:,} "
                    f"values, over the limit of {max_flatten:,}; use avg or max pooling", reason="FLATTEN_TOO_LARGE",
                    metadata=named)
            dims[layer_name] = size if spec.pooling == "flatten" or len(layer.output_shape) == 1 \
                else layer.output_shape[0]
        return dims
