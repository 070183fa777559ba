"""GatewayService over gRPC: converts messages and leaves the work to the orchestration modules."""

from convsearch.embedding import Configuration
from convsearch.enums import metric_name, pooling_name
from convsearch.errors import NotFound
from convsearch.extractor.v1 import extractor_pb2
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.grpc_errors import map_errors
from convsearch.index.v1 import index_pb2
from convsearch_gateway import images
from convsearch_gateway.backends import Backends
from convsearch_gateway.configurations import ModelCatalog
from convsearch_gateway.indexing import index_items
from convsearch_gateway.ingesting import ingest
from convsearch_gateway.searching import search

_STATUS = {"stored": pb.INGEST_STATUS_STORED, "replaced": pb.INGEST_STATUS_REPLACED,
           "failed": pb.INGEST_STATUS_FAILED}


def configuration(message: pb.Configuration) -> Configuration:
    return Configuration(message.model, tuple(message.layers), pooling_name(message.pooling),
                         metric_name(message.metric), message.minkowski_p or 2.0)


def _featured_only(model: extractor_pb2.ModelInfo) -> extractor_pb2.ModelInfo:
    trimmed = extractor_pb2.ModelInfo()
    trimmed.CopyFrom(model)
    del trimmed.layers[:]
    trimmed.layers.extend(layer for layer in model.layers if layer.featured)
    return trimmed


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Thin gRPC edge of the gateway."""

    def __init__(self, backends: Backends, batch_size: int):
        self.backends = backends
        self.catalog = ModelCatalog(backends.extractor)
        self.batch_size = batch_size

    @map_errors
    def ListModels(self, request, context):
        reply = self.catalog.models(context.time_remaining())
        models = list(reply.models)
        if not request.include_all_layers:
            models = [_featured_only(model) for model in models]
        return pb.ListModelsResponse(models=models, default_model=reply.default_model)

    @map_errors
    def CreateDataset(self, request, context):
        reply = self.backends.index.call("CreateDataset", index_pb2.CreateDatasetRequest(
            name=request.name, description=request.description), context.time_remaining())
        return pb.CreateDatasetResponse(dataset=reply.dataset)

    @map_errors
    def GetDataset(self, request, context):
        remaining = context.time_remaining()
        dataset = self.backends.index.call("GetDataset", index_pb2.GetDatasetRequest(name=request.name), remaining)
        collections = self.backends.index.call("ListCollections", index_pb2.ListCollectionsRequest(
            dataset=request.name), remaining)
        return pb.GetDatasetResponse(dataset=dataset.dataset, collections=collections.collections)

    @map_errors
    def ListDatasets(self, request, context):
        reply = self.backends.index.call("ListDatasets", index_pb2.ListDatasetsRequest(), context.time_remaining())
        return pb.ListDatasetsResponse(datasets=reply.datasets)

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
    def Ingest(self, request_iterator, context):
        messages = ((m.dataset, [configuration(c) for c in m.configurations], list(m.items))
                    for m in request_iterator)
        for result in ingest(self.backends, messages, self.catalog.targets, self.batch_size):
            yield pb.IngestResponse(id=result.id, status=_STATUS[result.status], error=result.error,
                                    indexed=result.indexed)

    @map_errors
    def IndexDataset(self, request, context):
        targets = self.catalog.targets([configuration(c) for c in request.configurations] or [Configuration()],
                                       context.time_remaining())
        for progress in index_items(self.backends, request.dataset, targets, request.batch_size or self.batch_size):
            yield pb.IndexDatasetResponse(
                total=progress.total, done=progress.done, failed=progress.failed,
                images_per_second=progress.images_per_second, collections=progress.collections,
                finished=progress.finished, errors=list(progress.errors))

    @map_errors
    def Search(self, request, context):
        which = request.WhichOneof("query")
        result = search(self.backends, self.catalog, request.dataset, configuration(request.configuration),
                        request.k or 15, image=request.image if which == "image" else None,
                        item_id=request.item_id if which == "item_id" else None,
                        include_labels=list(request.include_labels), exclude_labels=list(request.exclude_labels),
                        exact=request.exact, remaining=context.time_remaining())
        return pb.SearchResponse(
            hits=[pb.SearchHit(id=i, label=label, distance=d, metadata=meta) for i, label, d, meta in result.hits],
            collection=result.collection, query_label=result.query_label, search_score=result.search_score,
            same_label_count=result.same_label_count, scored_results=result.scored_results, exact=result.exact)

    @map_errors
    def GetImage(self, request, context):
        reply = self.backends.index.call("GetItems", index_pb2.GetItemsRequest(
            dataset=request.dataset, ids=[request.item_id], include_images=True), context.time_remaining())
        if not reply.items:
            raise NotFound(f"dataset {request.dataset!r} has no item {request.item_id!r}")
        data, mime, width, height = images.thumbnail(reply.items[0].image, request.thumbnail_size)
        return pb.GetImageResponse(image=data, mime_type=mime, width=width, height=height)
