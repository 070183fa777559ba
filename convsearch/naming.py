"""Names shared by the services: a collection is named after what fills it."""


def collection_name(model: str, layer: str, pooling: str, metric: str, minkowski_p: float = 2.0) -> str:
    """`model/layer/pooling/metric`, e.g. `efficientnet_lite0/_conv_head/avg/cosine` (minkowski
    carries its p: `minkowski3`)."""
    metric_part = f"minkowski{minkowski_p:g}" if metric == "minkowski" else metric
    return f"{model}/{layer}/{pooling}/{metric_part}"
