"""Writes that survive a crash or a power cut: a file's bytes are fsync'd before it is renamed
into place, and the folder holding a rename is fsync'd after it, so the new name is on disk too.
Each function does nothing durable (only the write or rename) when `fsync` is false."""

import errno
import os
import pathlib
import sqlite3

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_room(exc: BaseException) -> bool:
    """True for the error of a write that found no room: a full disk, a quota, a file-size limit
    (an OSError), or SQLite's "database or disk is full"."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in _NO_ROOM


def fsync_path(path: pathlib.Path) -> None:
    """fsync of a file's bytes or a folder's entries."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: pathlib.Path) -> None:
    """fsync of everything under `folder` (each file before the folder holding it), then of it."""
    for path in sorted(folder.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def replace(source: pathlib.Path, target: pathlib.Path, fsync: bool = True) -> None:
    """os.replace, then fsync of the folders whose entries changed."""
    os.replace(source, target)
    if fsync:
        fsync_path(target.parent)
        if source.parent != target.parent:
            fsync_path(source.parent)


def write_file(path: pathlib.Path, data: bytes | str, fsync: bool = True) -> None:
    """Writes `path` whole or not at all: to a temporary file beside it, fsync'd, then renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    replace(temporary, path, fsync)
