"""The write-ahead log of a collection: every batch of vector upserts or deletes is one record,
fsync'd before the RPC answers. A record is [length][crc32][payload], so a torn tail left by a
crash is recognised and cut off at replay, and a batch is applied whole or not at all.
"""

import os
import pathlib
import struct
import zlib
from collections.abc import Iterator

import numpy as np

UPSERT, DELETE = 1, 2
_HEADER = struct.Struct("<II")


def encode(op: int, ids: list[str], vectors: np.ndarray | None = None) -> bytes:
    """The payload of one batch."""
    parts = [struct.pack("<BI", op, len(ids))]
    for item_id in ids:
        raw = item_id.encode()
        parts.append(struct.pack("<H", len(raw)) + raw)
    if vectors is not None:
        parts.append(np.ascontiguousarray(vectors, "<f4").tobytes())
    return b"".join(parts)


def decode(payload: bytes, dimension: int) -> tuple[int, list[str], np.ndarray | None]:
    """(op, ids, vectors or None) of one payload."""
    op, count = struct.unpack_from("<BI", payload)
    offset, ids = 5, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", payload, offset)
        ids.append(payload[offset + 2:offset + 2 + length].decode())
        offset += 2 + length
    vectors = None
    if op == UPSERT:
        vectors = np.frombuffer(payload, "<f4", count * dimension, offset).reshape(count, dimension)
    return op, ids, vectors


class WriteAheadLog:
    """Append-only, fsync'd log file."""

    def __init__(self, path: pathlib.Path, fsync: bool = True):
        self.path = path
        self.fsync = fsync
        self._file = open(path, "ab")  # noqa: SIM115 - kept open for the collection's life

    def append(self, payload: bytes) -> None:
        """Writes one record and makes it durable."""
        self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def size(self) -> int:
        return self._file.tell()

    def truncate(self) -> None:
        """Empties the log (after a checkpoint holds everything in it)."""
        self._file.truncate(0)
        self._file.seek(0)
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def replay(path: pathlib.Path) -> Iterator[bytes]:
    """Payloads of the intact records in order; cuts a torn or corrupt tail off the file."""
    if not path.exists():
        return
    data = path.read_bytes()
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        payload = data[offset + _HEADER.size:offset + _HEADER.size + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            break
        yield payload
        offset += _HEADER.size + length
    if offset != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(offset)
