"""Turning a client's configurations (model, layers, pooling, metric) into the collections that
hold them, with each one's vector dimension, using the extractor's catalogue; and the rule that
a collection only ever holds, or is compared with, vectors of the weights that made it."""

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable

import numpy as np

from convsearch.embedding import Configuration, minkowski_p_of
from convsearch.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, shown
from convsearch.extractor.v1 import extractor_pb2
from convsearch.naming import check_model_name, collection_name
from convsearch.weights import describe
from convsearch_gateway.backends import Backend

log = logging.getLogger("convsearch.gateway.configurations")
CATALOG_TTL_S = 60.0
"""How long the extractor's catalogue is used before it is asked for again."""
STALE_RETRY_S = 2.0
"""While the extractor cannot answer, how often the calls that can do without it ask it again."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One collection to fill: a layer of a model under a pooling and a metric. `weights` is the
    fingerprint of the extractor's weights in its catalogue: a new collection is bound to it."""

    model: str
    layer: str
    pooling: str
    metric: str
    minkowski_p: float
    dimension: int
    parameter_count: int = 0
    weights: str = ""

    @property
    def collection(self) -> str:
        return collection_name(self.model, self.layer, self.pooling, self.metric, self.minkowski_p)


class ModelCatalog:
    """The extractor's models, fetched once per `ttl_s` at most.

    While the extractor cannot answer (UNAVAILABLE), configurations still resolve with the last
    catalogue fetched (logged once per outage): a search by a stored item, a projection or an
    evaluation of existing collections needs no embedding. What must embed then fails on its
    own call to the extractor, with the same clear UNAVAILABLE."""

    def __init__(self, extractor: Backend, ttl_s: float = CATALOG_TTL_S):
        self.extractor = extractor
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._fetched_at = 0.0
        self._reply: extractor_pb2.ListModelsResponse | None = None
        self._stale = False  # serving the last catalogue while the extractor cannot answer
        self._retry_at = 0.0  # meanwhile, when to ask it again

    def models(self, remaining: float | None = None, stale_ok: bool = False) -> extractor_pb2.ListModelsResponse:
        """The catalogue, asked for again once older than ttl_s; with `stale_ok`, the last one
        fetched rather than UNAVAILABLE while the extractor cannot answer."""
        with self._lock:
            now = time.monotonic()
            expired = self._reply is None or now - self._fetched_at >= self.ttl_s
            if expired and (not stale_ok or self._reply is None or now >= self._retry_at):
                try:
                    self._fetch(remaining)
                except Unavailable as exc:
                    if not stale_ok or self._reply is None:
                        raise
                    self._retry_at = now + STALE_RETRY_S  # not every call pays for a failing one
                    self._note_stale(exc)
            return self._reply

    def _fetch(self, remaining: float | None) -> None:
        request = extractor_pb2.ListModelsRequest(include_all_layers=True)
        self._reply = self.extractor.call("ListModels", request, remaining)
        self._fetched_at = time.monotonic()
        if self._stale:
            log.info("the extractor answers ListModels again: configurations resolve with its current catalogue")
            self._stale = False

    def _note_stale(self, exc: Unavailable) -> None:
        if not self._stale:
            log.warning("the extractor cannot answer ListModels (%s); configurations resolve with its catalogue of "
                        "%.0f s ago until it can", exc, time.monotonic() - self._fetched_at)
            self._stale = True

    def targets(self, configurations: Iterable[Configuration], remaining: float | None = None) -> list[Target]:
        """The collections the configurations name, in order, without repeats (from the last
        catalogue fetched while the extractor cannot answer)."""
        reply = self.models(remaining, stale_ok=True)
        models = {model.name: model for model in reply.models}
        targets: list[Target] = []
        for configuration in configurations:
            check_model_name(configuration.model)
            name = configuration.model or reply.default_model
            model = models.get(name)
            if model is None:
                raise NotFound(f"unknown model {name!r}; known models: {', '.join(models)}", reason="MODEL_NOT_FOUND",
                               resource_type="model", resource_name=name, metadata={"model": name})
            layers = {layer.name: layer for layer in model.layers}
            names = configuration.layers or tuple(layer.name for layer in model.layers if layer.featured)
            for layer_name in names:
                layer = layers.get(layer_name)
                if layer is None or not layer.output_shape:
                    featured = ", ".join(layer.name for layer in model.layers if layer.featured)
                    raise InvalidArgument(f"model {name} has no usable layer {shown(layer_name)}; its featured layers "
                                          f"are {featured}", reason="LAYER_UNKNOWN", field="configuration.layers",
                                          metadata={"model": name, "layer": layer_name})
                shape = list(layer.output_shape)
                flat = configuration.pooling == "flatten" or len(shape) == 1
                target = Target(name, layer_name, configuration.pooling, configuration.metric,
                                minkowski_p_of(configuration.metric, configuration.minkowski_p),
                                int(np.prod(shape)) if flat else shape[0],
                                layer.parameter_count, model.weights)
                if target not in targets:
                    targets.append(target)
        return targets


def check_weights(dataset: str, collection: str, collection_weights: str, extractor_weights: str) -> None:
    """FAILED_PRECONDITION unless vectors the extractor made with `extractor_weights` may join, or
    be compared with, a collection bound to `collection_weights`."""
    if extractor_weights != collection_weights:
        raise FailedPrecondition(
            f"collection {collection} of {dataset!r} holds vectors of the weights {describe(collection_weights)}, "
            f"but the extractor now runs the weights {describe(extractor_weights)}; vectors of different weights "
            "cannot be mixed or compared. To replace its vectors, delete the collection (DeleteCollection, or "
            f"convsearch delete-collection --dataset {dataset} {collection}) and index again; or use an extractor "
            "with the collection's weights")
