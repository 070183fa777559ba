"""The client's results as the page's JSON: plain dicts, collections split into their parts."""

import base64
import dataclasses
import re

from convsearch.client import Collection, Dataset, Model, Projection, SearchResult
from convsearch.inspection import Inspection

IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
               (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def image_type(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their signature."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in IMAGE_TYPES if data.startswith(magic)), "application/octet-stream")


def collection_parts(name: str) -> dict:
    """model/layer/pooling/metric of a collection's name (a layer may hold slashes), and p
    (minkowski's, e.g. `minkowski3` is metric minkowski, p 3; 0 for the other metrics)."""
    model, *layer, pooling, metric = name.split("/")
    p = 0.0
    minkowski = re.fullmatch(r"minkowski(.+)", metric)
    if minkowski:
        metric, p = "minkowski", float(minkowski.group(1))
    return {"model": model, "layer": "/".join(layer), "pooling": pooling, "metric": metric, "p": p}


def collection(found: Collection) -> dict:
    return {"name": found.name, **collection_parts(found.name), "count": found.count, "dimension": found.dimension,
            "weights": found.weights, "damage": found.damage}


def dataset(found: Dataset) -> dict:
    return {"name": found.name, "description": found.description, "item_count": found.item_count,
            "collection_count": found.collection_count, "created": found.created.isoformat(),
            "collections": [collection(c) for c in found.collections]}


def model(found: Model) -> dict:
    return {"name": found.name, "input_size": found.input_size, "parameter_count": found.parameter_count,
            "pretrained": found.pretrained, "available": found.available,
            "unavailable_reason": found.unavailable_reason, "weights": found.weights,
            "layers": [{"name": la.name, "op": la.op, "output_shape": list(la.output_shape),
                        "parameter_count": la.parameter_count} for la in found.layers if la.featured]}


def search(result: SearchResult) -> dict:
    """Hits with a same-class mark when the query has a label; the score when the gateway gave one."""
    hits = [{"id": h.id, "label": h.label, "distance": h.distance,
             "same": (h.label == result.query_label) if result.query_label else None} for h in result.hits]
    return {"collection": result.collection, **collection_parts(result.collection), "query_label": result.query_label,
            "search_score": result.search_score, "same_label_count": result.same_label_count,
            "scored_results": result.scored_results, "exact": result.exact, "pretrained": result.pretrained,
            "weights": result.weights, "hits": hits}


def score(found) -> dict:
    return {**dataclasses.asdict(found), **collection_parts(found.collection)}


def projection(points: Projection) -> dict:
    return {"collection": points.collection, "total": points.total, "sampled": points.sampled,
            "points": [{"id": i, "label": label, "x": x, "y": y}
                       for i, label, x, y in zip(points.ids, points.labels, points.x, points.y, strict=True)]}


def inspection(found: Inspection) -> dict:
    return {"model": found.model, "layer": found.layer, "output_shape": list(found.output_shape),
            "parameter_count": found.parameter_count, "pretrained": found.pretrained, "width": found.width,
            "height": found.height,
            "channels": [{"channel": channel, "mean_activation": mean,
                          "png": "data:image/png;base64," + base64.b64encode(png).decode("ascii")}
                         for channel, mean, png in found.channels]}
