"""Proto enums <-> the plain names the proto-free core uses."""

from convsearch.common.v1 import common_pb2
from convsearch.errors import InvalidArgument, shown

POOLING_NAMES = {
    common_pb2.POOLING_UNSPECIFIED: "avg",
    common_pb2.POOLING_AVG: "avg",
    common_pb2.POOLING_MAX: "max",
    common_pb2.POOLING_FLATTEN: "flatten",
}
POOLING_ENUMS = {"avg": common_pb2.POOLING_AVG, "max": common_pb2.POOLING_MAX,
                 "flatten": common_pb2.POOLING_FLATTEN}
METRIC_NAMES = {
    common_pb2.METRIC_UNSPECIFIED: "cosine",
    common_pb2.METRIC_COSINE: "cosine",
    common_pb2.METRIC_EUCLIDEAN: "euclidean",
    common_pb2.METRIC_SQUARED_EUCLIDEAN: "sqeuclidean",
    common_pb2.METRIC_INNER_PRODUCT: "ip",
    common_pb2.METRIC_MANHATTAN: "manhattan",
    common_pb2.METRIC_CHEBYSHEV: "chebyshev",
    common_pb2.METRIC_MINKOWSKI: "minkowski",
}
METRIC_ENUMS = {name: value for value, name in METRIC_NAMES.items() if value != common_pb2.METRIC_UNSPECIFIED}


def pooling_name(value: int, field: str = "configuration.pooling") -> str:
    """The core's name of a Pooling value; INVALID_ARGUMENT for a value this version does not know."""
    if value not in POOLING_NAMES:
        raise InvalidArgument(f"unknown pooling value {value}; use POOLING_AVG, POOLING_MAX or POOLING_FLATTEN",
                              reason="POOLING_UNKNOWN", field=field, metadata={"pooling": str(value)})
    return POOLING_NAMES[value]


def metric_name(value: int, field: str = "configuration.metric") -> str:
    """The core's name of a Metric value; INVALID_ARGUMENT for a value this version does not know."""
    if value not in METRIC_NAMES:
        raise InvalidArgument(f"unknown metric value {value}; use one of "
                              f"{', '.join(common_pb2.Metric.Name(v) for v in METRIC_ENUMS.values())}",
                              reason="METRIC_UNKNOWN", field=field, metadata={"metric": str(value)})
    return METRIC_NAMES[value]


def pooling_enum(name: str) -> int:
    """The Pooling value of a pooling's name; INVALID_ARGUMENT for a name this version does not know."""
    if name not in POOLING_ENUMS:
        raise InvalidArgument(f"unknown pooling {shown(name)}; use one of {', '.join(POOLING_ENUMS)}",
                              reason="POOLING_UNKNOWN", metadata={"pooling": name})
    return POOLING_ENUMS[name]


def metric_enum(name: str) -> int:
    """The Metric value of a metric's name; INVALID_ARGUMENT for a name this version does not know."""
    if name not in METRIC_ENUMS:
        raise InvalidArgument(f"unknown metric {shown(name)}; use one of {', '.join(METRIC_ENUMS)}",
                              reason="METRIC_UNKNOWN", metadata={"metric": name})
    return METRIC_ENUMS[name]
