"""GatewayService over gRPC: converts messages and leaves the work to the orchestration modules."""

from convsearch.embedding import Configuration, minkowski_p_of
from convsearch.enums import METRIC_ENUMS, POOLING_ENUMS, metric_name, pooling_name
from convsearch.errors import InvalidArgument, NotFound, item_not_found, shown
from convsearch.extractor.v1 import extractor_pb2
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.grpc_errors import map_errors
from convsearch.image_limits import DEFAULT_MAX_PIXELS
from convsearch.index.v1 import index_pb2
from convsearch.naming import check_model_name
from convsearch.weights import is_baseline, is_pretrained
from convsearch_gateway import images
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import CATALOG_TTL_S, ModelCatalog
from convsearch_gateway.evaluation import EXACT_UP_TO, compare, evaluate
from convsearch_gateway.indexing import index_items
from convsearch_gateway.ingesting import ingest
from convsearch_gateway.projection import project
from convsearch_gateway.public import convert, converted
from convsearch_gateway.searching import check_k, search, search_target

_METHODS = {pb.PROJECTION_METHOD_UNSPECIFIED: "pca", pb.PROJECTION_METHOD_PCA: "pca",
            pb.PROJECTION_METHOD_UMAP: "umap"}
MAX_BATCH_SIZE = 256  # images per extractor call: the extractor's default --max-images
_STATUS = {"stored": pb.INGEST_STATUS_STORED, "replaced": pb.INGEST_STATUS_REPLACED,
           "failed": pb.INGEST_STATUS_FAILED}


def model_name(name: str, field: str) -> str:
    """The name; INVALID_ARGUMENT MODEL_NAME_INVALID, with the request's field, for one that
    could address a path (with / or ..) or has other characters."""
    try:
        check_model_name(name)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc), reason="MODEL_NAME_INVALID", field=field, metadata={"model": name}) from None
    return name


def configuration(message: pb.Configuration) -> Configuration:
    """The core's configuration; INVALID_ARGUMENT for a model name with / or .., or a minkowski
    metric without a usable p (0, i.e. unset, is an error, not a silent 2)."""
    metric = metric_name(message.metric)
    return Configuration(model_name(message.model, "configuration.model"), tuple(message.layers),
                         pooling_name(message.pooling), metric, minkowski_p_of(metric, message.minkowski_p))


def _score(score) -> pb.ConfigurationScore:
    return pb.ConfigurationScore(
        collection=score.collection, model=score.model, layer=score.layer, pooling=POOLING_ENUMS[score.pooling],
        metric=METRIC_ENUMS[score.metric], mean_score=score.mean_score, precision_at_k=score.precision_at_k,
        map_at_k=score.map_at_k, k=score.k, per_label_score=score.per_label_score, queries=score.queries,
        unlabeled=score.unlabeled, dimension=score.dimension, parameter_count=score.parameter_count,
        cached=score.cached, small_dataset=score.small_dataset, single_item_classes=score.single_item_classes,
        pretrained=is_pretrained(score.weights), weights=score.weights, baseline=is_baseline(score.weights))


def _model(model: extractor_pb2.ModelInfo, all_layers: bool) -> pb.ModelInfo:
    public = convert(model, pb.ModelInfo())
    if not all_layers:
        featured = [layer for layer in public.layers if layer.featured]
        del public.layers[:]
        public.layers.extend(featured)
    return public


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Thin gRPC edge of the gateway."""

    def __init__(self, backends: Backends, batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 catalog_ttl_s: float = CATALOG_TTL_S, evaluate_exact_up_to: int = EXACT_UP_TO):
        self.backends = backends
        self.evaluate_exact_up_to = evaluate_exact_up_to
        self.catalog = ModelCatalog(backends.extractor, catalog_ttl_s)
        self.batch_size = batch_size
        self.max_pixels = max_pixels  # checked on each image's header before any decode

    @map_errors
    def ListModels(self, request, context):
        reply = self.catalog.models(context.time_remaining())
        return pb.ListModelsResponse(models=[_model(m, request.include_all_layers) for m in reply.models],
                                     default_model=reply.default_model)

    @map_errors
    def CreateDataset(self, request, context):
        reply = self.backends.index.call("CreateDataset", index_pb2.CreateDatasetRequest(
            name=request.name, description=request.description), context.time_remaining())
        return pb.CreateDatasetResponse(dataset=convert(reply.dataset, pb.Dataset()))

    @map_errors
    def GetDataset(self, request, context):
        remaining = context.time_remaining()
        dataset = self.backends.reads.call("GetDataset", index_pb2.GetDatasetRequest(name=request.name), remaining)
        collections = self.backends.reads.call("ListCollections", index_pb2.ListCollectionsRequest(
            dataset=request.name), remaining)
        return pb.GetDatasetResponse(dataset=convert(dataset.dataset, pb.Dataset()),
                                     collections=converted(collections.collections, pb.Collection))

    @map_errors
    def ListDatasets(self, request, context):
        reply = self.backends.reads.call("ListDatasets", index_pb2.ListDatasetsRequest(), context.time_remaining())
        return pb.ListDatasetsResponse(datasets=converted(reply.datasets, pb.Dataset))

    @map_errors
    def DeleteDataset(self, request, context):
        self.backends.index.call("DeleteDataset", index_pb2.DeleteDatasetRequest(name=request.name),
                                 context.time_remaining())
        return pb.DeleteDatasetResponse()

    @map_errors
    def DeleteItems(self, request, context):
        reply = self.backends.index.call("DeleteItems", index_pb2.DeleteItemsRequest(
            dataset=request.dataset, ids=request.ids), context.time_remaining())
        return pb.DeleteItemsResponse(deleted=reply.deleted, not_found=reply.not_found)

    @map_errors
    def DeleteCollection(self, request, context):
        self.backends.index.call("DeleteCollection", index_pb2.DeleteCollectionRequest(
            dataset=request.dataset, collection=request.collection), context.time_remaining())
        return pb.DeleteCollectionResponse()

    @map_errors
    def Ingest(self, request_iterator, context):
        messages = ((m.dataset, [configuration(c) for c in m.configurations], converted(m.items, index_pb2.Item))
                    for m in request_iterator)
        for result in ingest(self.backends, messages, self.catalog.targets, self.batch_size, self.max_pixels):
            yield pb.IngestResponse(id=result.id, status=_STATUS[result.status], error=result.error,
                                    indexed=result.indexed)

    @map_errors
    def IndexDataset(self, request, context):
        batch_size = request.batch_size or self.batch_size
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise InvalidArgument(f"batch_size {batch_size} is out of range; use 1 to {MAX_BATCH_SIZE} (0: the "
                                  f"gateway's, {self.batch_size})", reason="BATCH_SIZE_OUT_OF_RANGE",
                                  field="batch_size")
        targets = self.catalog.targets([configuration(c) for c in request.configurations] or [Configuration()],
                                       context.time_remaining())
        for progress in index_items(self.backends, request.dataset, targets, batch_size,
                                    rebuild_damaged=request.rebuild_damaged):
            yield pb.IndexDatasetResponse(
                total=progress.total, done=progress.done, failed=progress.failed,
                images_per_second=progress.images_per_second, collections=progress.collections,
                finished=progress.finished, errors=list(progress.errors))

    @map_errors
    def Search(self, request, context):
        which = request.WhichOneof("query")
        result = search(self.backends, self.catalog, request.dataset, configuration(request.configuration),
                        request.k or 15,
                        image=images.check_request_image(request.image, self.max_pixels) if which == "image" else None,
                        item_id=request.item_id if which == "item_id" else None,
                        include_labels=list(request.include_labels), exclude_labels=list(request.exclude_labels),
                        exact=request.exact, remaining=context.time_remaining())
        return pb.SearchResponse(
            hits=[pb.SearchHit(id=i, label=label, distance=d, metadata=meta) for i, label, d, meta in result.hits],
            collection=result.collection, query_label=result.query_label, search_score=result.search_score,
            same_label_count=result.same_label_count, scored_results=result.scored_results, exact=result.exact,
            pretrained=is_pretrained(result.weights), weights=result.weights)

    @map_errors
    def GetImage(self, request, context):
        if request.thumbnail_size < 0:
            raise InvalidArgument(f"thumbnail_size {request.thumbnail_size} is negative; use 0 for the original image "
                                  "or a positive size in pixels", reason="THUMBNAIL_SIZE_OUT_OF_RANGE",
                                  field="thumbnail_size", metadata={"thumbnail_size": str(request.thumbnail_size)})
        reply = self.backends.index.call("GetItems", index_pb2.GetItemsRequest(
            dataset=request.dataset, ids=[request.item_id], include_images=True), context.time_remaining())
        if not reply.items:
            raise NotFound(f"dataset {shown(request.dataset)} has no item {shown(request.item_id)}",
                               **item_not_found(request.dataset, request.item_id))
        data, mime, width, height = images.thumbnail(reply.items[0].image, request.thumbnail_size, self.max_pixels)
        return pb.GetImageResponse(image=data, mime_type=mime, width=width, height=height)

    @map_errors
    def Evaluate(self, request, context):
        remaining = context.time_remaining()
        check_k(request.k or 15)
        targets = self.catalog.targets(self._evaluated(request, remaining), remaining)
        for progress in evaluate(self.backends, request.dataset, targets, request.k or 15, request.recompute,
                                 self.batch_size, self.evaluate_exact_up_to):
            yield pb.EvaluateResponse(phase=progress.phase, done=progress.done, total=progress.total,
                                      finished=progress.finished, results=[_score(s) for s in progress.results])

    def _evaluated(self, request: pb.EvaluateRequest, remaining) -> list[Configuration]:
        """Evaluate's configurations: explicit, or models x metrics, or every available model x
        metrics; INVALID_ARGUMENT for models or metrics beside configurations (they would be ignored)."""
        if request.configurations:
            if request.models or request.metrics:
                field = "models" if request.models else "metrics"
                raise InvalidArgument(f"{field} cannot go with configurations: give configurations, or models and "
                                      "metrics (each model at its featured layers), not both",
                                      reason="CONFIGURATIONS_AND_MODELS", field=field)
            return [configuration(c) for c in request.configurations]
        metrics = [metric_name(m, "metrics") for m in request.metrics] or ["cosine"]
        if "minkowski" in metrics:  # models x metrics carry no p, and none is assumed
            raise InvalidArgument("metrics: minkowski needs its p; give configurations with minkowski_p "
                                  "(1 to 100) instead of models x metrics", reason="MINKOWSKI_P_REQUIRED",
                                  field="metrics")
        models = ([model_name(m, "models") for m in request.models]
                  or [m.name for m in self.catalog.models(remaining, stale_ok=True).models if m.available])
        return [Configuration(model, metric=metric) for model in models for metric in metrics]

    @map_errors
    def Compare(self, request, context):
        ranked, stale = compare(self.backends, request.dataset)
        reply = pb.CompareResponse(ranked=[_score(s) for s in ranked], stale=stale)
        if ranked:
            reply.best.CopyFrom(_score(ranked[0]))
        for score in ranked:
            if score.model not in reply.best_layer_per_model:
                reply.best_layer_per_model[score.model].CopyFrom(_score(score))
        if request.item_id:
            scored = [s for s in ranked if request.item_id in s.per_query]
            if not scored:
                self._check_scored(request.dataset, request.item_id, bool(ranked), context.time_remaining())
            reply.item_scores.extend(pb.QueryScore(collection=s.collection, model=s.model, layer=s.layer,
                                                   score=s.per_query[request.item_id]) for s in scored)
        return reply

    def _check_scored(self, dataset: str, item_id: str, evaluated: bool, remaining) -> None:
        """Why an item has no score: ITEM_NOT_FOUND when the dataset lacks it (evaluated or not), or
        with current evaluations ITEM_NOT_SCORED for a stored one (an item added or relabeled since
        makes them stale, so it is unlabeled, or its image could not be embedded)."""
        items = self.backends.index.call("GetItems", index_pb2.GetItemsRequest(dataset=dataset, ids=[item_id]),
                                         remaining).items
        if not items:
            raise NotFound(f"dataset {shown(dataset)} has no item {shown(item_id)}",
                           **item_not_found(dataset, item_id))
        if not evaluated:
            return
        why = ("it has no label, and only labeled items are queries" if not items[0].label
               else "it has no vector in the evaluated collections (its image could not be embedded)")
        raise NotFound(f"item {shown(item_id)} of {shown(dataset)} has no score: {why}", reason="ITEM_NOT_SCORED",
                       resource_type="item", resource_name=item_id, metadata={"dataset": dataset, "item": item_id})

    @map_errors
    def Project(self, request, context):
        if request.method not in _METHODS:
            raise InvalidArgument(f"unknown projection method {request.method}; use PROJECTION_METHOD_PCA or "
                                  "PROJECTION_METHOD_UMAP", reason="PROJECTION_METHOD_UNKNOWN", field="method",
                                  metadata={"method": str(request.method)})
        target = search_target(self.catalog, configuration(request.configuration), context.time_remaining())
        result = project(self.backends, request.dataset, target, _METHODS[request.method], request.seed,
                         request.max_points or 5000)
        return pb.ProjectResponse(ids=result.ids, labels=result.labels, x=result.x, y=result.y,
                                  sampled=result.sampled, total=result.total, cached=result.cached,
                                  collection=result.collection)

    @map_errors
    def InspectLayer(self, request, context):
        remaining = context.time_remaining()
        if request.WhichOneof("image_source") == "item_id":
            reply = self.backends.index.call("GetItems", index_pb2.GetItemsRequest(
                dataset=request.dataset, ids=[request.item_id], include_images=True), remaining)
            if not reply.items:
                raise NotFound(f"dataset {shown(request.dataset)} has no item {shown(request.item_id)}",
                               **item_not_found(request.dataset, request.item_id))
            image = reply.items[0].image
        else:
            image = images.check_request_image(request.image, self.max_pixels)
        inspection = self.backends.extractor.call("InspectLayer", extractor_pb2.InspectLayerRequest(
            model=request.model, layer=request.layer, image=image, top_channels=request.top_channels), remaining)
        return convert(inspection, pb.InspectLayerResponse())

    # ---- snapshots (admin only, where the gateway checks API keys) ----------------------

    @map_errors
    def SnapshotDataset(self, request, context):
        reply = self.backends.index.call("SnapshotDataset", index_pb2.SnapshotDatasetRequest(
            dataset=request.dataset), context.time_remaining())
        return pb.SnapshotDatasetResponse(deleted=reply.deleted, snapshot=pb.Snapshot(
            name=reply.snapshot, dataset=request.dataset, create_time=reply.create_time, size_bytes=reply.size_bytes))

    @map_errors
    def RestoreDataset(self, request, context):
        reply = self.backends.index.call("RestoreDataset", index_pb2.RestoreDatasetRequest(
            snapshot=request.snapshot, dataset=request.dataset), context.time_remaining())
        return pb.RestoreDatasetResponse(dataset=convert(reply.dataset, pb.Dataset()))

    @map_errors
    def ListSnapshots(self, request, context):
        reply = self.backends.index.call("ListSnapshots", index_pb2.ListSnapshotsRequest(
            dataset=request.dataset), context.time_remaining())
        return pb.ListSnapshotsResponse(snapshots=converted(reply.snapshots, pb.Snapshot))

    @map_errors
    def DeleteSnapshot(self, request, context):
        self.backends.index.call("DeleteSnapshot", index_pb2.DeleteSnapshotRequest(snapshot=request.snapshot),
                                 context.time_remaining())
        return pb.DeleteSnapshotResponse()
