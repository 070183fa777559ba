"""The JSON API the page calls: each route is one or two calls of the Python client; failures
become HTTP answers in convsearch_web.errors."""

import re
import typing
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.errors import InvalidArgument
from convsearch_web import views
from convsearch_web.errors import WebError
from convsearch_web.jobs import evaluation_events, index_events

Pooling = typing.Literal["avg", "max", "flatten"]
Metric = typing.Literal["cosine", "euclidean", "sqeuclidean", "ip", "manhattan", "chebyshev", "minkowski"]
MAX_LISTED = 50_000  # items a grid pages through (the gateway's largest projection)
THUMBNAIL_MAX = 1024
SEED_MAX = 2**31 - 1  # the gateway's seed is an int32

router = APIRouter(prefix="/api")


def client(request: Request) -> Client:
    return request.app.state.client


def configuration(model: str = "", layer: str = "", pooling: Pooling = "avg", metric: Metric = "cosine",
                  p: float = 0.0) -> Configuration:
    """A configuration of one layer (none: the model's last featured layer) from query parameters;
    p is minkowski's, unset (refused with minkowski) unless given."""
    return Configuration(model, (layer,) if layer else (), pooling, metric, p)


Gateway = Annotated[Client, Depends(client)]
Chosen = Annotated[Configuration, Depends(configuration)]
Upload = Annotated[UploadFile, File(description="an image file")]


class SearchBody(BaseModel):
    """A search by a stored item."""

    item_id: str = Field(min_length=1)
    model: str = ""
    layer: str = ""
    pooling: Pooling = "avg"
    metric: Metric = "cosine"
    p: float = 0.0
    k: int = Field(15, ge=1, le=100)


async def upload(request: Request, file: UploadFile) -> bytes:
    """The uploaded file's bytes: 413 beyond the service's limit, 400 when empty."""
    limit = request.app.state.config.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise WebError(413, "RESOURCE_EXHAUSTED", f"the image is larger than {limit / 2**20:g} MiB; "
                                                  "upload a smaller one", "UPLOAD_TOO_LARGE")
    if not data:
        raise WebError(400, "INVALID_ARGUMENT", "the uploaded file is empty; choose an image file", "UPLOAD_EMPTY")
    return data


async def with_upload(call):
    """call() in a thread; the gateway's word for an upload that is no image (`image 0 is not a
    recognised image`: an index in a batch the page never sent) becomes `the uploaded file is not ...`."""
    try:
        return await run_in_threadpool(call)
    except InvalidArgument as exc:
        message = re.sub(r"^(image 0 (\(''\) )?|the image )(?=is not)", "the uploaded file ", str(exc))
        if message == str(exc):
            raise
        raise WebError(400, exc.code, message, exc.reason) from None


@router.get("/health")
def health(request: Request) -> dict:
    """Whether the gateway answers its health check (503 when it does not)."""
    serving = request.app.state.gateway_serving()
    if not serving:
        raise WebError(503, "UNAVAILABLE", f"the gateway at {request.app.state.config.gateway} is not serving",
                       "GATEWAY_UNAVAILABLE")
    return {"gateway": request.app.state.config.gateway, "serving": True}


@router.get("/models")
def models(gateway: Gateway) -> list[dict]:
    return [views.model(m) for m in gateway.models()]


@router.get("/datasets")
def datasets(gateway: Gateway) -> list[dict]:
    return [views.dataset(d) for d in gateway.datasets()]


@router.get("/datasets/{dataset}")
def dataset(dataset: str, gateway: Gateway) -> dict:
    return views.dataset(gateway.dataset(dataset))


@router.get("/datasets/{dataset}/items")
def items(dataset: str, config: Chosen, gateway: Gateway, offset: Annotated[int, Query(ge=0)] = 0,
          limit: Annotated[int, Query(ge=1, le=1000)] = 60, label: str = "", unlabeled: bool = False) -> dict:
    """A page of the items a configuration's collection holds, by id (optionally of one label,
    or with unlabeled those without one)."""
    points = gateway.project(dataset, config, "pca", 0, MAX_LISTED)
    everything = sorted(zip(points.ids, points.labels, strict=True))
    labels = sorted({found for _, found in everything})
    wanted = "" if unlabeled else label
    chosen = [{"id": i, "label": found} for i, found in everything if not (wanted or unlabeled) or found == wanted]
    return {"collection": points.collection, "total": len(chosen), "offset": offset, "limit": limit,
            "labels": labels, "sampled": points.sampled, "items": chosen[offset:offset + limit]}


@router.get("/datasets/{dataset}/image")
def image(dataset: str, id: Annotated[str, Query(min_length=1)], gateway: Gateway,
          size: Annotated[int, Query(ge=0, le=THUMBNAIL_MAX)] = 128) -> Response:
    """An item's image, or its thumbnail fitting size x size (0: the original)."""
    data = gateway.image(dataset, id, size)
    return Response(data, media_type=views.image_type(data), headers={"Cache-Control": "private, max-age=300"})


@router.post("/datasets/{dataset}/search")
def search(dataset: str, body: SearchBody, gateway: Gateway) -> dict:
    config = configuration(body.model, body.layer, body.pooling, body.metric, body.p)
    return views.search(gateway.search(dataset, item_id=body.item_id, configuration=config, k=body.k))


@router.post("/datasets/{dataset}/search/image")
async def search_image(request: Request, dataset: str, file: Upload, model: Annotated[str, Form()] = "",
                       layer: Annotated[str, Form()] = "", pooling: Annotated[Pooling, Form()] = "avg",
                       metric: Annotated[Metric, Form()] = "cosine", p: Annotated[float, Form()] = 0.0,
                       k: Annotated[int, Form(ge=1, le=100)] = 15) -> dict:
    """A search with an uploaded image (no class, so no search score)."""
    data = await upload(request, file)
    config = configuration(model, layer, pooling, metric, p)
    found = await with_upload(lambda: client(request).search(dataset, image=data, configuration=config, k=k))
    return views.search(found)


@router.get("/datasets/{dataset}/compare")
def compare(dataset: str, gateway: Gateway, item_id: str = "") -> dict:
    """Every evaluated configuration's scores, the best layer per model, and with item_id that
    item's score under each."""
    found = gateway.compare(dataset, item_id)
    return {"ranked": [views.score(s) for s in found.ranked],
            "best": views.score(found.best) if found.best else None,
            "best_layer_per_model": {m: views.score(s) for m, s in found.best_layer_per_model.items()},
            "item_scores": dict(found.item_scores), "stale": list(found.stale)}


@router.get("/datasets/{dataset}/projection")
def projection(dataset: str, config: Chosen, gateway: Gateway, method: typing.Literal["pca", "umap"] = "umap",
               seed: Annotated[int, Query(ge=0, le=SEED_MAX)] = 0,
               max_points: Annotated[int, Query(ge=3, le=MAX_LISTED)] = 2000) -> dict:
    return views.projection(gateway.project(dataset, config, method, seed, max_points))


@router.get("/datasets/{dataset}/inspect")
def inspect_item(dataset: str, id: Annotated[str, Query(min_length=1)], layer: Annotated[str, Query(min_length=1)],
                 gateway: Gateway, model: str = "", top: Annotated[int, Query(ge=0, le=64)] = 0) -> dict:
    """A layer's strongest channels for a stored item, each map laid over the image."""
    return views.inspection(gateway.inspect(layer, dataset=dataset, item_id=id, model=model, top_channels=top))


@router.post("/inspect")
async def inspect_upload(request: Request, file: Upload, layer: Annotated[str, Form(min_length=1)],
                         model: Annotated[str, Form()] = "", top: Annotated[int, Form(ge=0, le=64)] = 0) -> dict:
    """A layer's strongest channels for an uploaded image."""
    data = await upload(request, file)
    found = await with_upload(lambda: client(request).inspect(layer, image=data, model=model,
                                                                      top_channels=top))
    return views.inspection(found)


def job_client(request: Request) -> Client:
    return request.app.state.job_client()


@router.get("/datasets/{dataset}/index/events")
def index_job(request: Request, dataset: str, gateway: Gateway, model: str = "", layers: str = "",
              pooling: Pooling = "avg", metric: Metric = "cosine", p: float = 0.0):
    """Indexes a configuration (layers comma-separated; none: the model's featured ones),
    progress as server-sent events; closing the stream cancels it."""
    gateway.dataset(dataset)  # an unknown dataset is a 404 before the stream starts
    chosen = tuple(name for name in layers.split(",") if name)
    return index_events(job_client(request), dataset, Configuration(model, chosen, pooling, metric, p))


@router.get("/datasets/{dataset}/evaluate/events")
def evaluate_job(request: Request, dataset: str, gateway: Gateway, models: str = "", metrics: str = "cosine",
                 pooling: Pooling = "avg", p: float = 0.0, k: Annotated[int, Query(ge=1, le=100)] = 15):
    """Scores models (comma-separated; none: every available one) x metrics at their featured
    layers under one pooling, progress as server-sent events, the last one with the results;
    closing the stream cancels it."""
    gateway.dataset(dataset)
    chosen_models = [name for name in models.split(",") if name] or [m.name for m in gateway.models() if m.available]
    chosen_metrics = [name for name in metrics.split(",") if name]
    if not chosen_metrics:  # no configuration at all: the gateway would score every available model
        raise WebError(422, "INVALID_ARGUMENT", f"metrics: give one or more of {', '.join(typing.get_args(Metric))} "
                                                "(comma-separated)", "METRICS_EMPTY")
    unknown = [name for name in chosen_metrics if name not in typing.get_args(Metric)]
    if unknown:
        raise WebError(422, "INVALID_ARGUMENT", f"unknown metric {unknown[0]!r}; use one of "
                                                f"{', '.join(typing.get_args(Metric))}", "METRIC_UNKNOWN")
    configurations = [Configuration(model, (), pooling, metric, p) for model in chosen_models
                      for metric in chosen_metrics]  # no layers: the model's featured ones
    return evaluation_events(job_client(request), dataset, configurations, k)
