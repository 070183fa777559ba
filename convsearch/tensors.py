"""Vectors on the wire: numpy float32 arrays <-> raw little-endian bytes plus a shape."""

import math

import numpy as np

from convsearch.common.v1 import common_pb2
from convsearch.errors import InvalidArgument, shown

_LE_FLOAT32 = np.dtype("<f4")
MAX_DIMENSIONS = 32  # numpy's own limit is 64; no tensor here has more than a few


def to_tensor(array: np.ndarray) -> common_pb2.FloatTensor:
    """Packs an array of any shape as little-endian float32."""
    array = np.ascontiguousarray(array, dtype=_LE_FLOAT32)
    return common_pb2.FloatTensor(data=array.tobytes(), shape=array.shape)


def from_tensor(tensor: common_pb2.FloatTensor, what: str = "tensor") -> np.ndarray:
    """Unpacks a FloatTensor; a size that disagrees with its shape is INVALID_ARGUMENT."""
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidArgument(f"{what}: shape has {len(shape)} dimensions; at most {MAX_DIMENSIONS} are accepted")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {shown(list(shape))}")
    expected = 4 * math.prod(shape)  # Python ints: a product that would overflow int64 is just large
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(tensor.data)} bytes do not hold a float32 tensor of shape "
            f"{shown(list(shape))} ({shown(expected)} bytes expected)"
        )
    try:  # an empty tensor may still name dimensions numpy cannot index, e.g. [0, 2**62, 2**62]
        return np.frombuffer(tensor.data, dtype=_LE_FLOAT32).reshape(shape).astype(np.float32)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: shape {shown(list(shape))} cannot be used ({exc})") from None
