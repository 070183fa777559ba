"""ExtractorService over gRPC: converts messages and leaves the work to the Extractor core."""

import queue
import threading

import grpc

from convsearch.enums import POOLING_ENUMS, pooling_name
from convsearch.errors import InvalidArgument, shown
from convsearch.extractor.v1 import extractor_pb2, extractor_pb2_grpc
from convsearch.grpc_errors import map_errors
from convsearch.tensors import to_tensor
from convsearch_extractor import imaging
from convsearch_extractor.engine import Extractor
from convsearch_extractor.inspection import inspect
from convsearch_extractor.runtime import EmbedSpec, LoadedModel

# Stream messages in flight at once: bounds memory while decode and forward overlap.
_STREAM_WINDOW = 4
_END = object()


class ExtractorServicer(extractor_pb2_grpc.ExtractorServiceServicer):
    """Thin gRPC edge of the extractor."""

    def __init__(self, extractor: Extractor):
        self.extractor = extractor

    def _resolve(self, config: extractor_pb2.EmbedConfig):
        return self.extractor.resolve(config.model, config.layers, pooling_name(config.pooling),
                                      config.normalize)

    @map_errors
    def ListModels(self, request, context):
        pool = self.extractor.pool
        models = []
        for name, spec in pool.catalog.items():
            graph = pool.graph(name)
            available, pretrained, reason = pool.status(name)
            models.append(extractor_pb2.ModelInfo(
                name=name, input_size=spec.preprocess.crop_size,
                parameter_count=graph.parameter_count, pretrained=pretrained,
                available=available, unavailable_reason=reason, weights=pool.weights(name),
                weights_path=str(spec.weights_path or ""), source=spec.source,
                layers=[extractor_pb2.LayerInfo(
                    name=layer.name, op=layer.op, output_shape=layer.output_shape,
                    parameter_count=layer.parameter_count, featured=layer.featured,
                    featured_index=layer.featured_index)
                    for layer in graph.ordered(request.include_all_layers)]))
        default = self.extractor.default_model
        models.sort(key=lambda m: m.name != default)
        return extractor_pb2.ListModelsResponse(models=models, default_model=default)

    @map_errors
    def Embed(self, request, context):
        spec, dims = self._resolve(request.config)
        vectors = self.extractor.embed(spec, dims, list(request.images), context.is_active)
        loaded = self.extractor.pool.acquire(spec.model)
        return extractor_pb2.EmbedResponse(
            model=spec.model, pooling=POOLING_ENUMS[spec.pooling], normalized=spec.normalize,
            pretrained=loaded.pretrained, weights=loaded.weights,
            layers=[extractor_pb2.LayerVectors(layer=layer, vectors=to_tensor(vectors[layer]))
                    for layer in spec.layers])

    @map_errors
    def InspectLayer(self, request, context):
        extractor = self.extractor
        result = inspect(extractor.pool, request.model or extractor.default_model, request.layer, request.image,
                         request.top_channels, extractor.limits.max_pixels, context.is_active)
        return extractor_pb2.InspectLayerResponse(
            model=result.model, layer=result.layer, output_shape=result.output_shape,
            parameter_count=result.parameter_count, pretrained=result.pretrained, width=result.width,
            height=result.height, channels=[extractor_pb2.ChannelActivation(
                channel=channel, mean_activation=mean, overlay_png=png) for channel, mean, png in result.channels])

    @map_errors
    def BulkEmbed(self, request_iterator, context):
        jobs: queue.Queue = queue.Queue(maxsize=_STREAM_WINDOW)
        reader = threading.Thread(target=self._read_stream, args=(request_iterator, jobs, context),
                                  name="bulk-reader", daemon=True)
        reader.start()
        while (job := _take(jobs, context)) is not _END:
            if job is None:
                return  # the client went away
            if isinstance(job, Exception):
                raise job
            spec, ids, first_index, future = job
            loaded = self.extractor.pool.acquire(spec.model)
            for offset, result in enumerate(future.result()):
                yield self._bulk_answer(spec, loaded, ids[offset], first_index + offset, result)

    def _read_stream(self, request_iterator, jobs: queue.Queue, context) -> None:
        """Reads the client's messages and starts their work; runs ahead of the answers."""
        spec: EmbedSpec | None = None
        config = None
        count = 0
        try:
            for message in request_iterator:
                if message.HasField("config"):
                    if config is None:
                        config = message.config
                        spec, dims = self._resolve(config)
                        self.extractor.check_answer(dims, 1, "an image's answer", "ask for fewer layers, another "
                                                    "pooling than flatten, or raise --max-message-mb")
                    elif message.config != config and self._resolve(message.config)[0] != spec:
                        raise InvalidArgument(  # the same settings spelled otherwise (defaults named) are no change
                            f"stream message holding image {count} changes the config; "
                            "open a new stream for another config")
                if spec is None:
                    raise InvalidArgument("the first message of a BulkEmbed stream must carry a config")
                if not message.images:
                    continue
                ids = [image.id for image in message.images]
                future = self.extractor.embed_each(spec, [image.data for image in message.images], count,
                                                   context.is_active)
                if not _give(jobs, (spec, ids, count, future), context):
                    return
                count += len(ids)
            _give(jobs, _END, context)
        except Exception as exc:  # noqa: BLE001 - handed to the answering thread
            _give(jobs, exc, context)


    @staticmethod
    def _bulk_answer(spec: EmbedSpec, loaded: LoadedModel, image_id: str, index: int, result
                     ) -> extractor_pb2.BulkEmbedResponse:
        answer = extractor_pb2.BulkEmbedResponse(id=image_id, index=index, model=spec.model,
                                                 pretrained=loaded.pretrained, weights=loaded.weights)
        if isinstance(result, imaging.ImageError):
            answer.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            answer.error.message = f"image {index} ({shown(image_id)}) {result}"
        else:
            answer.vectors.layers.extend(
                extractor_pb2.LayerVector(layer=layer, vector=to_tensor(result[layer]))
                for layer in spec.layers)
        return answer


def _give(jobs: queue.Queue, item, context) -> bool:
    """Puts `item`, waiting for room while the RPC is alive; False once it is not."""
    while context.is_active():
        try:
            jobs.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False


def _take(jobs: queue.Queue, context):
    """The next job, or None once the RPC is no longer alive."""
    while context.is_active():
        try:
            return jobs.get(timeout=0.5)
        except queue.Empty:
            continue
    return None
