"""The Python client of ConvNet Search: talks to the gateway; takes and returns plain Python
and numpy types, never protos; failures raise `convsearch.errors` exceptions.

    from convsearch.client import Client
    client = Client("127.0.0.1:50051")
    client.create_dataset("shoes")
    client.ingest("shoes", [("a1", "boot", open("a1.jpg", "rb").read())])
    for progress in client.index("shoes", [Configuration("efficientnet_lite0")]):
        print(progress.done, "/", progress.total)
    result = client.search("shoes", item_id="a1")
"""

import dataclasses
import datetime
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence

import grpc

from convsearch.api_keys import ENV_API_KEY, with_api_key
from convsearch.channels import LOOPBACK, MIN_VERSION_KEY, VERSION_KEY, create_channel
from convsearch.embedding import MAX_K, Configuration
from convsearch.enums import metric_enum, pooling_enum
from convsearch.errors import ConvsearchError, InvalidArgument, Unavailable, shown
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.grpc_errors import error_from_call, status_of_call
from convsearch.inspection import Inspection
from convsearch.tls import client_credentials

DEFAULT = Configuration()  # the default model at its featured layers, average pooling, cosine
INT32_MAX = 2**31 - 1
PROJECTION_METHODS = {"pca": pb.PROJECTION_METHOD_PCA, "umap": pb.PROJECTION_METHOD_UMAP}
_STATUS_NAMES = {pb.INGEST_STATUS_STORED: "stored", pb.INGEST_STATUS_REPLACED: "replaced",
                 pb.INGEST_STATUS_FAILED: "failed"}


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    op: str
    output_shape: tuple[int, ...]
    parameter_count: int
    featured: bool


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    input_size: int
    parameter_count: int
    pretrained: bool
    available: bool
    unavailable_reason: str
    layers: tuple[Layer, ...]
    weights: str  # fingerprint of the weights it runs with: "sha256:...", "random", or "" when unavailable


@dataclasses.dataclass(frozen=True)
class Collection:
    name: str
    count: int
    dimension: int
    metric: str
    weights: str  # fingerprint of the weights that made its vectors; "" when unknown
    damage: str = ""  # empty when healthy; else what is wrong with its files and the way back


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    item_count: int
    collection_count: int
    created: datetime.datetime  # UTC
    collections: tuple[Collection, ...] = ()


@dataclasses.dataclass(frozen=True)
class IngestResult:
    id: str
    status: str  # stored, replaced or failed
    error: str
    indexed: bool


@dataclasses.dataclass(frozen=True)
class IndexProgress:
    total: int
    done: int
    failed: int
    images_per_second: float
    collections: tuple[str, ...]
    finished: bool
    errors: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Hit:
    id: str
    label: str
    distance: float
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    hits: tuple[Hit, ...]
    collection: str
    query_label: str
    search_score: float | None  # percent, for a stored labeled query item; None otherwise
    same_label_count: int | None  # for a stored labeled query item; None otherwise
    scored_results: int
    exact: bool
    pretrained: bool  # False: random or unknown weights made the collection, the results say nothing
    weights: str


@dataclasses.dataclass(frozen=True)
class Score:
    """How well one configuration captures a labeled dataset's classes (edge cases: see
    ConfigurationScore in gateway.proto)."""

    collection: str
    model: str
    layer: str
    metric: str
    mean_score: float
    precision_at_k: float
    map_at_k: float
    k: int
    per_label_score: dict[str, float]
    queries: int
    unlabeled: int
    dimension: int
    parameter_count: int
    cached: bool
    small_dataset: bool  # fewer than 16 items: the search score is renormalised, P@k and mAP@k are not
    single_item_classes: int  # labels with one item, whose query can only score 0
    pretrained: bool  # False: random or unknown weights made the vectors, the scores say nothing
    weights: str
    baseline: bool = False  # the `pixels` baseline (a model without weights), to read the others against


@dataclasses.dataclass(frozen=True)
class EvaluationProgress:
    phase: str  # indexing, evaluating
    done: int
    total: int
    finished: bool
    results: tuple[Score, ...]


@dataclasses.dataclass(frozen=True)
class Comparison:
    ranked: tuple[Score, ...]
    best: Score | None
    best_layer_per_model: dict[str, Score]
    item_scores: tuple[tuple[str, float], ...]  # (collection, score) for a compared item
    stale: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Projection:
    ids: tuple[str, ...]
    labels: tuple[str, ...]
    x: tuple[float, ...]
    y: tuple[float, ...]
    sampled: bool
    total: int
    collection: str


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A snapshot the index keeps of a dataset: its name is what restore and delete take."""

    name: str
    dataset: str
    created: datetime.datetime  # UTC
    size_bytes: int


def _time(stamp) -> datetime.datetime:
    return stamp.ToDatetime(tzinfo=datetime.UTC)


def _optional(message, field: str):
    return getattr(message, field) if message.HasField(field) else None


def _snapshot(message) -> Snapshot:
    return Snapshot(message.name, message.dataset, _time(message.create_time), message.size_bytes)


def _score(message) -> Score:
    return Score(message.collection, message.model, message.layer, message.collection.rsplit("/", 1)[-1],
                 message.mean_score, message.precision_at_k, message.map_at_k, message.k,
                 dict(message.per_label_score), message.queries, message.unlabeled, message.dimension,
                 message.parameter_count, message.cached, message.small_dataset, message.single_item_classes,
                 message.pretrained, message.weights, message.baseline)


def _configuration(configuration: Configuration) -> pb.Configuration:
    return pb.Configuration(model=configuration.model, layers=configuration.layers,
                            pooling=pooling_enum(configuration.pooling), metric=metric_enum(configuration.metric),
                            minkowski_p=configuration.minkowski_p)


def _k(k: int) -> int:
    """k as the gateway takes it (0 means 15), refused here as the gateway would refuse it, even
    where it does not fit the message."""
    if not 0 <= k <= MAX_K:
        raise InvalidArgument(f"k = {shown(k)} is out of range; use 1 to {MAX_K} (0 means 15)",
                              reason="K_OUT_OF_RANGE", field="k", metadata={"k": str(k), "max_k": str(MAX_K)})
    return k


def _dataset(message, collections=()) -> Dataset:
    return Dataset(message.name, message.description, message.item_count, message.collection_count,
                   _time(message.create_time),
                   tuple(Collection(c.name, c.count, c.spec.dimension, c.name.rsplit("/", 1)[-1], c.spec.weights,
                                    c.damage) for c in collections))


class PlaintextKeyWarning(UserWarning):
    """An API key is about to be sent without TLS to another machine."""


def _on_this_machine(address: str) -> bool:
    """Whether every host of `address` (host:port, comma-separated, or dns:///host:port) is a loopback name."""
    hosts = [part.strip().removeprefix("dns:///").rpartition(":")[0] for part in address.split(",")]
    return all(host.strip("[]") in LOOPBACK for host in hosts)


class Client:
    """A connection to the gateway at `address` (host:port).

    Its calls form a session: each reply's `convsearch-version` (trailing metadata, on failed
    calls too) raises `session_version`, which goes with every later call as
    `convsearch-min-version`, so this client reads its own writes through any gateway replica
    serving from index followers. Give another client `session_version` to continue the session
    there (another process, another gateway address)."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float = 120.0, *, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, api_key: str | None = None,
                 session_version: int = 0):
        self.address = address
        self.timeout_s = timeout_s
        if session_version < 0:
            raise ValueError(f"session_version is a version a reply gave (0 or more), not {session_version}")
        self.session_version = session_version
        # TLS when a CA or client certificate is given (None: CONVSEARCH_TLS_CA/_CERT/_KEY); plaintext otherwise.
        credentials = client_credentials(tls_ca, tls_cert, tls_key)
        self._channel = create_channel(address, credentials=credentials)
        # Sent as `authorization: Bearer <key>` on every call (None: CONVSEARCH_API_KEY; empty: none).
        api_key = os.environ.get(ENV_API_KEY, "") if api_key is None else api_key
        if api_key and credentials is None and not _on_this_machine(address):
            warnings.warn(f"the API key goes to {address} in plaintext, readable by anyone on the way: give "
                          "the gateway a certificate and the client its CA (tls_ca, --tls-ca, CONVSEARCH_TLS_CA)",
                          PlaintextKeyWarning, stacklevel=2)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(with_api_key(self._channel, api_key))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _error(self, exc: grpc.RpcError) -> ConvsearchError:
        """The domain error, with the google.rpc.Status details the gateway sent: `reason`,
        `metadata`, `field_violations`, `resource`, `retry_after_s` (see convsearch.errors); an
        UNAVAILABLE without them is gRPC's own: the gateway could not be reached."""
        status = status_of_call(exc)
        if exc.code() == grpc.StatusCode.UNAVAILABLE and not (status is not None and status.details):
            return Unavailable(f"the gateway at {self.address} is unavailable ({exc.details()}); is it running?",
                               reason="GATEWAY_UNAVAILABLE", metadata={"address": self.address})
        return error_from_call(exc)

    def _session(self) -> tuple[tuple[str, str], ...]:
        return ((MIN_VERSION_KEY, str(self.session_version)),) if self.session_version else ()

    def _reached(self, call) -> None:
        """Raises session_version to the call's `convsearch-version` (a failed call's too)."""
        trailing = call.trailing_metadata() if isinstance(call, grpc.Call) else None
        for key, value in trailing or ():
            if key == VERSION_KEY and value.isdigit():
                self.session_version = max(self.session_version, int(value))

    def _call(self, method: str, request):
        try:
            reply, call = getattr(self._stub, method).with_call(request, timeout=self.timeout_s,
                                                                metadata=self._session())
        except grpc.RpcError as exc:
            self._reached(exc)
            raise self._error(exc) from None
        self._reached(call)
        return reply

    def _stream(self, method: str, request_or_requests):
        responses = getattr(self._stub, method)(request_or_requests, timeout=None, metadata=self._session())
        try:
            yield from responses
        except grpc.RpcError as exc:
            self._reached(exc)
            raise self._error(exc) from None
        self._reached(responses)

    def models(self, all_layers: bool = False) -> list[Model]:
        """Every model with its layers (featured only unless all_layers)."""
        reply = self._call("ListModels", pb.ListModelsRequest(include_all_layers=all_layers))
        return [Model(m.name, m.input_size, m.parameter_count, m.pretrained, m.available, m.unavailable_reason,
                      tuple(Layer(la.name, la.op, tuple(la.output_shape), la.parameter_count, la.featured)
                            for la in m.layers), m.weights) for m in reply.models]

    def create_dataset(self, name: str, description: str = "") -> Dataset:
        reply = self._call("CreateDataset", pb.CreateDatasetRequest(name=name, description=description))
        return _dataset(reply.dataset)

    def datasets(self) -> list[Dataset]:
        return [_dataset(d) for d in self._call("ListDatasets", pb.ListDatasetsRequest()).datasets]

    def dataset(self, name: str) -> Dataset:
        reply = self._call("GetDataset", pb.GetDatasetRequest(name=name))
        return _dataset(reply.dataset, reply.collections)

    def delete_dataset(self, name: str) -> None:
        self._call("DeleteDataset", pb.DeleteDatasetRequest(name=name))

    def delete_items(self, dataset: str, ids: Sequence[str]) -> int:
        return self._call("DeleteItems", pb.DeleteItemsRequest(dataset=dataset, ids=list(ids))).deleted

    def delete_collection(self, dataset: str, collection: str) -> None:
        """Deletes one collection (its vectors and stored results; the items stay), e.g. to index
        it again with other weights."""
        self._call("DeleteCollection", pb.DeleteCollectionRequest(dataset=dataset, collection=collection))

    def ingest(self, dataset: str, items: Iterable[tuple], configurations: Sequence[Configuration] = (),
               batch: int = 32) -> Iterator[IngestResult]:
        """Stores items given as (id, label, image bytes) or (id, label, image bytes, metadata);
        yields a result per item, in order. With configurations, embeds them at once.

        Should iterating `items` raise, the items before are still sent (their results are
        yielded) and the exception then propagates unchanged."""
        raised = []  # what iterating `items` raised: it ends the stream, and is raised at its end

        def requests():
            first = True
            chunk = []
            try:
                for item in items:
                    chunk.append(pb.Item(id=item[0], label=item[1] or "", image=item[2],
                                         metadata=item[3] if len(item) > 3 else {}))
                    if len(chunk) == batch:
                        yield self._ingest_message(dataset, configurations, chunk, first)
                        first, chunk = False, []
            except Exception as exc:  # raised again in the caller's thread, not lost in gRPC's
                raised.append(exc)
            if chunk or first:
                yield self._ingest_message(dataset, configurations, chunk, first)

        try:
            for reply in self._stream("Ingest", requests()):
                yield IngestResult(reply.id, _STATUS_NAMES.get(reply.status, "failed"), reply.error, reply.indexed)
        except ConvsearchError:
            if not raised:
                raise
        if raised:
            raise raised[0]

    @staticmethod
    def _ingest_message(dataset, configurations, chunk, first) -> pb.IngestRequest:
        return pb.IngestRequest(dataset=dataset if first else "", items=chunk,
                                configurations=[_configuration(c) for c in configurations] if first else [])

    def index(self, dataset: str, configurations: Sequence[Configuration] = (DEFAULT,),
              batch_size: int = 0, rebuild_damaged: bool = False) -> Iterator[IndexProgress]:
        """Embeds and indexes what the configurations' collections lack; yields progress. With
        `rebuild_damaged`, a damaged collection (DataLoss) is deleted and filled again from the items."""
        request = pb.IndexDatasetRequest(dataset=dataset, configurations=[_configuration(c) for c in configurations],
                                         batch_size=batch_size, rebuild_damaged=rebuild_damaged)
        for reply in self._stream("IndexDataset", request):
            yield IndexProgress(reply.total, reply.done, reply.failed, reply.images_per_second,
                                tuple(reply.collections), reply.finished, tuple(reply.errors))

    def search(self, dataset: str, image: bytes | None = None, item_id: str | None = None,
               configuration: Configuration = DEFAULT, k: int = 15, include_labels: Sequence[str] = (),
               exclude_labels: Sequence[str] = (), exact: bool = False) -> SearchResult:
        """The k nearest items to an image or a stored item (give one), under a configuration of
        one layer (no layer: the model's last featured layer). k: 1 to 1000; 0 means 15."""
        if image is not None and item_id is not None:
            raise InvalidArgument("give image or item_id, not both", reason="QUERY_AMBIGUOUS", field="query",
                                  metadata={"item": item_id})
        request = pb.SearchRequest(dataset=dataset, configuration=_configuration(configuration), k=_k(k),
                                   include_labels=include_labels, exclude_labels=exclude_labels, exact=exact)
        if item_id is not None:
            request.item_id = item_id
        elif image is not None:
            request.image = image
        reply = self._call("Search", request)
        return SearchResult(
            tuple(Hit(h.id, h.label, h.distance, dict(h.metadata)) for h in reply.hits), reply.collection,
            reply.query_label, _optional(reply, "search_score"), _optional(reply, "same_label_count"),
            reply.scored_results, reply.exact, reply.pretrained, reply.weights)

    def image(self, dataset: str, item_id: str, thumbnail_size: int = 0) -> bytes:
        """An item's image bytes (thumbnail_size 0), or a thumbnail fitting thumbnail_size x thumbnail_size."""
        if not 0 <= thumbnail_size <= INT32_MAX:
            raise InvalidArgument(f"thumbnail_size = {shown(thumbnail_size)} is out of range; use 0 for the original "
                                  "image or a positive size in pixels", reason="THUMBNAIL_SIZE_OUT_OF_RANGE",
                                  field="thumbnail_size", metadata={"thumbnail_size": str(thumbnail_size)})
        return self._call("GetImage", pb.GetImageRequest(dataset=dataset, item_id=item_id,
                                                         thumbnail_size=thumbnail_size)).image

    def evaluate(self, dataset: str, configurations: Sequence[Configuration] = (), models: Sequence[str] = (),
                 metrics: Sequence[str] = (), k: int = 15, recompute: bool = False) -> Iterator[EvaluationProgress]:
        """Scores configurations (explicit; or models x metrics at featured layers; or every
        available model); yields progress, the last with the results, best first."""
        request = pb.EvaluateRequest(dataset=dataset, configurations=[_configuration(c) for c in configurations],
                                     models=models, metrics=[metric_enum(m) for m in metrics], k=_k(k),
                                     recompute=recompute)
        for reply in self._stream("Evaluate", request):
            yield EvaluationProgress(reply.phase, reply.done, reply.total, reply.finished,
                                     tuple(_score(s) for s in reply.results))

    def compare(self, dataset: str, item_id: str = "") -> Comparison:
        """The dataset's evaluated configurations ranked, the best, the best layer per model,
        and with item_id that item's score under each."""
        reply = self._call("Compare", pb.CompareRequest(dataset=dataset, item_id=item_id))
        return Comparison(tuple(_score(s) for s in reply.ranked), _score(reply.best) if reply.ranked else None,
                          {model: _score(s) for model, s in reply.best_layer_per_model.items()},
                          tuple((q.collection, q.score) for q in reply.item_scores), tuple(reply.stale))

    def project(self, dataset: str, configuration: Configuration = DEFAULT, method: str = "pca", seed: int = 0,
                max_points: int = 5000) -> Projection:
        """2-D coordinates (pca or umap) of a collection's vectors with their ids and labels."""
        if method not in PROJECTION_METHODS:
            raise InvalidArgument(f"unknown projection method {shown(method)}; use pca or umap",
                                  reason="PROJECTION_METHOD_UNKNOWN", field="method", metadata={"method": str(method)})
        reply = self._call("Project", pb.ProjectRequest(dataset=dataset, configuration=_configuration(configuration),
                                                        method=PROJECTION_METHODS[method], seed=seed,
                                                        max_points=max_points))
        return Projection(tuple(reply.ids), tuple(reply.labels), tuple(reply.x), tuple(reply.y), reply.sampled,
                          reply.total, reply.collection)

    def inspect(self, layer: str, image: bytes | None = None, dataset: str = "", item_id: str = "",
                model: str = "", top_channels: int = 0) -> Inspection:
        """A layer's strongest channels for an image (bytes, or a stored item) as overlay PNGs;
        top_channels 0: 8, or every channel of a layer with fewer."""
        request = pb.InspectLayerRequest(dataset=dataset, model=model, layer=layer, top_channels=top_channels)
        if item_id:
            request.item_id = item_id
        else:
            request.image = image or b""
        found = self._call("InspectLayer", request)
        return Inspection(found.model, found.layer, tuple(found.output_shape), found.parameter_count,
                          found.pretrained, found.width, found.height,
                          tuple((c.channel, c.mean_activation, c.overlay_png) for c in found.channels))

    def snapshot(self, dataset: str) -> tuple[Snapshot, list[str]]:
        """Writes a snapshot of a dataset on the index server: (the snapshot, the older ones the
        index's retention limit deleted). Admin only where the gateway checks API keys."""
        reply = self._call("SnapshotDataset", pb.SnapshotDatasetRequest(dataset=dataset))
        return _snapshot(reply.snapshot), list(reply.deleted)

    def snapshots(self, dataset: str = "") -> list[Snapshot]:
        """The snapshots kept (of one dataset, or all), oldest first."""
        return [_snapshot(s) for s in self._call("ListSnapshots", pb.ListSnapshotsRequest(dataset=dataset)).snapshots]

    def restore(self, snapshot: str, dataset: str) -> Dataset:
        """Restores a snapshot as a new dataset."""
        return _dataset(self._call("RestoreDataset", pb.RestoreDatasetRequest(snapshot=snapshot,
                                                                               dataset=dataset)).dataset)

    def delete_snapshot(self, snapshot: str) -> None:
        self._call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot=snapshot))
