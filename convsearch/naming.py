"""Names shared by the services: a collection is named after what fills it; model names are
checked before anything uses them (they name weight files and folders)."""

import re

from convsearch.errors import InvalidArgument, shown

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
DATASET_NAME_RULE = "1-64 of a-z, 0-9, _ and -, starting with a letter or digit"


def check_model_name(name: str) -> None:
    """INVALID_ARGUMENT for a model name that could address a path: with `/`, `\\` or `..`, or
    other than 1-128 of letters, digits, `_`, `.`, `+` and `-`. An empty name (the default
    model) passes."""
    if name and ("/" in name or "\\" in name or ".." in name or not MODEL_NAME.fullmatch(name)):
        raise InvalidArgument(f"invalid model name {shown(name)}: use 1-128 of letters, digits, _, ., + and -, "
                              "without / or ..; ListModels names the models")


def collection_name(model: str, layer: str, pooling: str, metric: str, minkowski_p: float = 2.0) -> str:
    """`model/layer/pooling/metric`, e.g. `efficientnet_lite0/_conv_head/avg/cosine` (minkowski
    carries its p: `minkowski3`)."""
    metric_part = f"minkowski{minkowski_p:g}" if metric == "minkowski" else metric
    return f"{model}/{layer}/{pooling}/{metric_part}"
