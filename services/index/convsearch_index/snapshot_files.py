"""Snapshot files as byte streams, for moving a dataset between index primaries: one is read in
chunks with its SHA-256, and one streamed from another index is kept only when its bytes match
the SHA-256 it came with (ReadSnapshot and WriteSnapshot; `convsearch rebalance` uses both).

A received snapshot is written to a temporary file in the snapshots folder and linked to its
name only when complete and verified, so a reader never sees half of one and a refused one
leaves nothing behind.
"""

import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from convsearch.errors import AlreadyExists, InvalidArgument, shown
from convsearch_index import durable

CHUNK_BYTES = 1 << 20
"""Bytes a message carries at most: far under any gRPC message limit."""


def chunks(file: BinaryIO) -> Iterator[tuple[bytes, int, str]]:
    """(data, size, sha256) for each chunk of an open file: the file's size on the first chunk
    (0 on the others), the SHA-256 of all its bytes in hex on the last ("" on the others)."""
    size = os.fstat(file.fileno()).st_size
    digest = hashlib.sha256()
    data = file.read(CHUNK_BYTES)
    while True:
        following = file.read(CHUNK_BYTES)  # read one ahead to know which chunk is the last
        digest.update(data)
        yield data, size, "" if following else digest.hexdigest()
        if not following:
            return
        data, size = following, 0


def already_exists(name: str) -> AlreadyExists:
    return AlreadyExists(f"snapshot {shown(name)} exists already on this index; delete it first or restore it",
                         reason="SNAPSHOT_ALREADY_EXISTS", resource_type="snapshot", resource_name=name,
                         metadata={"snapshot": name})


def receive(folder: pathlib.Path, name: str, parts: Iterable[tuple[bytes, str]], fsync: bool = True) -> pathlib.Path:
    """Stores the bytes of `parts` (data, sha256: "" but on the last) as folder/name.tar and
    returns its path. INVALID_ARGUMENT when the stream ends without a SHA-256, sends bytes after
    it, or its bytes do not match it; ALREADY_EXISTS when the name is taken (before or after the
    bytes arrive); in every failure nothing is left behind."""
    target = folder / f"{name}.tar"
    if target.exists():
        raise already_exists(name)  # before taking the bytes
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tar.tmp")
    try:
        digest, expected = hashlib.sha256(), ""
        with os.fdopen(descriptor, "wb") as out:
            for data, sha256 in parts:
                if expected:
                    raise InvalidArgument(f"snapshot {shown(name)}: bytes came after the message carrying the "
                                          "SHA-256; send it on the last message only", field="sha256")
                out.write(data)
                digest.update(data)
                expected = sha256.lower()
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        if not expected:
            raise InvalidArgument(f"snapshot {shown(name)}: the stream ended without a SHA-256; send the hex "
                                  "SHA-256 of all the bytes on the last message", field="sha256")
        if expected != digest.hexdigest():
            raise InvalidArgument(f"snapshot {shown(name)} was refused: its bytes have SHA-256 {digest.hexdigest()}, "
                                  f"the stream said {expected}; copy it again", reason="SNAPSHOT_CHECKSUM_MISMATCH",
                                  field="sha256", metadata={"snapshot": name})
        try:
            os.link(temporary, target)  # unlike a rename, never replaces one stored meanwhile
        except FileExistsError:
            raise already_exists(name) from None
        if fsync:
            durable.fsync_path(folder)
        return target
    finally:
        os.unlink(temporary)
