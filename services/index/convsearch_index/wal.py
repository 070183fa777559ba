"""The write-ahead log of a collection: every batch of vector upserts or deletes is one record,
fsync'd before the RPC answers, so a batch is applied whole or not at all.

The file starts with MAGIC and its start: the collection's version when the log was begun (the
version of the checkpoint it follows) and a crc32 of both. A record is [length][crc32 of
payload][crc32 of those 8 bytes][payload]. The start tells a log that follows the checkpoint from
one the checkpoint already holds: a crash after a checkpoint but before the log was emptied leaves
such a log, and replaying it would count its batches in the version twice.

Replay tells the two ways a log can end badly apart:

- a torn tail: the last record is incomplete (the file ends inside it, or only zeros follow the
  last good record). That write was never acknowledged; it is cut off.
- corruption: a complete record (or a header) whose checksum fails, wherever it is. Nothing is
  cut: replay raises CorruptLog and the file stays as it is, for the collection to be refused.

A write that fails part-way (a full disk) is taken back: the file is cut back to where it was,
so the records written after it are not read, at replay, as the rest of a torn tail. Where even
that fails, the log takes no more records until a checkpoint empties it.

Logs in the older formats are still read: before the start (MAGIC_2, then records) and before
MAGIC existed ([length][crc32][payload] records, no file header). The collection checkpoints
right after reading one, which starts a log in this format.
"""

import os
import pathlib
import struct
import zlib
from collections.abc import Iterator

import numpy as np

UPSERT, DELETE = 1, 2
MAGIC = b"CSWAL3\n\x00"
MAGIC_2 = b"CSWAL2\n\x00"  # the format before the start
_START = struct.Struct("<QI")  # the version the log follows, crc32 of MAGIC and that version
PROLOGUE = len(MAGIC) + _START.size  # the size of an empty log
_HEADER = struct.Struct("<III")
_LEGACY_HEADER = struct.Struct("<II")


class CorruptLog(Exception):
    """A complete record of the log fails its checksum."""


class LogUnwritable(Exception):
    """A failed write could not be taken back: the log takes no record until it is emptied."""


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
    """(op, ids, vectors or None) of one payload; CorruptLog for an operation it does not know."""
    op, count = struct.unpack_from("<BI", payload)
    if op not in (UPSERT, DELETE):
        raise CorruptLog(f"a record holds unknown operation {op}")
    offset, ids = 5, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", payload, offset)
        ids.append(payload[offset + 2:offset + 2 + length].decode())
        offset += 2 + length
    vectors = None
    if op == UPSERT:
        vectors = np.frombuffer(payload, "<f4", count * dimension, offset).reshape(count, dimension)
    return op, ids, vectors


def record(payload: bytes) -> bytes:
    """One record as the log holds it."""
    head = struct.pack("<II", len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


class WriteAheadLog:
    """Append-only, fsync'd log file, begun (when empty) at the collection's `version`."""

    def __init__(self, path: pathlib.Path, fsync: bool = True, version: int = 0):
        self.path = path
        self.fsync = fsync
        # Unbuffered: a failed write leaves nothing behind in a buffer to be written later.
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open for the collection's life
        self._unwritable: OSError | None = None  # why a failed write could not be taken back
        if self._file.tell() == 0:
            self._start(version)

    def _start(self, version: int) -> None:
        self._write(prologue(version))
        if self.fsync:
            os.fsync(self._file.fileno())

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]

    def append(self, payload: bytes) -> None:
        """Writes one record and makes it durable. A failed write or fsync is taken back before
        its error is raised; LogUnwritable once one could not be."""
        if self._unwritable is not None:
            raise LogUnwritable(f"a failed write could not be taken back ({self._unwritable})")
        start = self._file.tell()
        try:
            self._write(record(payload))
            if self.fsync:
                os.fsync(self._file.fileno())
        except BaseException:
            self._take_back(start)
            raise

    def _take_back(self, size: int) -> None:
        try:
            self._file.truncate(size)
            self._file.seek(size)
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            self._unwritable = exc

    def has_records(self) -> bool:
        """True while the log holds records, or needs emptying (a write could not be taken back)."""
        return self._unwritable is not None or self._file.tell() > PROLOGUE

    def truncate(self, version: int) -> None:
        """Empties the log, after a checkpoint of `version` holds everything in it."""
        self._file.truncate(0)
        self._file.seek(0)
        self._start(version)
        self._unwritable = None

    def close(self) -> None:
        self._file.close()


def prologue(version: int) -> bytes:
    """MAGIC and the start of a log begun at `version`: an empty log."""
    start = struct.pack("<Q", version)
    return MAGIC + start + struct.pack("<I", zlib.crc32(MAGIC + start))


def _head(path: pathlib.Path) -> bytes:
    if not path.exists():
        return b""
    with open(path, "rb") as handle:
        return handle.read(PROLOGUE)


def _torn_start(head: bytes) -> bool:
    """True for a file that ends inside MAGIC or the start: a log being begun, with no records."""
    return len(head) < PROLOGUE and head[:len(MAGIC)] == MAGIC[:len(head)]


def is_legacy(path: pathlib.Path) -> bool:
    """True for a non-empty log in an older format."""
    head = _head(path)
    return bool(head) and not head.startswith(MAGIC) and not _torn_start(head)


def start_version(path: pathlib.Path) -> int | None:
    """The version of the checkpoint the log follows; None for no log, a log in an older format,
    or one whose beginning never made it to disk. CorruptLog when its start fails its checksum."""
    head = _head(path)
    if len(head) < PROLOGUE or not head.startswith(MAGIC):
        return None
    version, crc = _START.unpack_from(head, len(MAGIC))
    if zlib.crc32(head[:len(MAGIC) + 8]) != crc:
        raise CorruptLog(f"{path.name}: its start fails its checksum")
    return version


def replay(path: pathlib.Path) -> Iterator[bytes]:
    """Payloads of the records in order; cuts a torn tail (or torn start) off the file; raises
    CorruptLog."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and _torn_start(data[:PROLOGUE]):
        _cut(path, 0)
        return
    legacy = bool(data) and not data.startswith((MAGIC, MAGIC_2))
    header = _LEGACY_HEADER if legacy else _HEADER
    offset = 0 if legacy or not data else len(MAGIC_2) if data.startswith(MAGIC_2) else PROLOGUE
    while offset < len(data):
        if offset + header.size > len(data):
            break  # torn tail: an incomplete header
        if not any(data[offset:offset + header.size]) and not any(data[offset:]):
            break  # torn tail: space the crash left unwritten
        fields = header.unpack_from(data, offset)
        length, crc = fields[0], fields[1]
        if not legacy and zlib.crc32(data[offset:offset + 8]) != fields[2]:
            raise CorruptLog(f"{path.name}: the header of the record at byte {offset} fails its checksum")
        end = offset + header.size + length
        if end > len(data):
            break  # torn tail: the last record is incomplete
        payload = data[offset + header.size:end]
        if zlib.crc32(payload) != crc:
            raise CorruptLog(f"{path.name}: the record at byte {offset} ({length} bytes) fails its checksum")
        yield payload
        offset = end
    if offset < len(data):
        _cut(path, offset)


def _cut(path: pathlib.Path, size: int) -> None:
    """Cuts the file back to `size` bytes, durably."""
    with open(path, "r+b") as handle:
        handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())
