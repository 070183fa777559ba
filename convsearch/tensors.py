"""Vectors on the wire: numpy float32 arrays <-> raw little-endian bytes plus a shape."""

import numpy as np

from convsearch.common.v1 import common_pb2
from convsearch.errors import InvalidArgument

_LE_FLOAT32 = np.dtype("<f4")


def to_tensor(array: np.ndarray) -> common_pb2.FloatTensor:
    """Packs an array of any shape as little-endian float32."""
    array = np.ascontiguousarray(array, dtype=_LE_FLOAT32)
    return common_pb2.FloatTensor(data=array.tobytes(), shape=array.shape)


def from_tensor(tensor: common_pb2.FloatTensor, what: str = "tensor") -> np.ndarray:
    """Unpacks a FloatTensor; a size that disagrees with its shape is INVALID_ARGUMENT."""
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {list(shape)}")
    expected = 4 * int(np.prod(shape, dtype=np.int64))
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(tensor.data)} bytes do not hold a float32 tensor of shape "
            f"{list(shape)} ({expected} bytes expected)"
        )
    return np.frombuffer(tensor.data, dtype=_LE_FLOAT32).reshape(shape).astype(np.float32)
