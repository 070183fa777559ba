"""The primary's change log: every write the index applied, in order, each at a position; what
followers tail (see replication.py). A vector upsert is listed once it is durable in its
collection's log, before the graph has taken it, so followers apply it meanwhile.

Positions are global and grow by one per change. Each process starts at `time.time_ns()`, so
positions keep growing across restarts without writing anything per change: this assumes the
clock does not step back between two runs by more than the changes of the first (one per
nanosecond would be needed to overtake it). Each process also has a random epoch: a follower
that followed another epoch copies everything again rather than trusting positions across it.

Except across a clean stop: the stop seals the log (every write finished, later ones refused,
followers sent all) and the data dir keeps where it ended (the engine's LOG_END file, read and
removed by the next start, whatever its role). The next process then starts right after that
position (continue_after), and a follower of the old epoch at exactly that position resumes
instead of copying everything. A crash leaves no such record, so it still means whole copies.

The log lives in memory, bounded in bytes: the oldest changes are dropped first, and a follower
whose position was dropped copies everything again. While a follower copies everything, the
changes after the copy's position are pinned (up to PINNED_HEADROOM times the bound), so that
writes made during a long copy do not make it copy everything again at its end.
"""

import contextlib
import dataclasses
import json
import logging
import pathlib
import threading
import time
import uuid

import numpy as np

from convsearch_index import durable
from convsearch_index.records import DatasetRecord, ItemRecord, ItemSnapshot

log = logging.getLogger("convsearch.index")
LOG_END = "log-end.json"  # DATA_DIR/log-end.json: where a cleanly stopped primary's change log ended
PINNED_HEADROOM = 4  # a pinned log may hold this many times its bound
# Approximate bytes of a change besides its payload (ids, vectors, items): what the bound counts.
_OVERHEAD = 200
_ITEM_BYTES = 120


class Compacted(Exception):
    """The changes after a position were dropped from the log."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One applied write. `kind` names the engine method (create_dataset, delete_dataset,
    put_items, delete_items, create_collection, delete_collection, upsert_vectors, put_attachment,
    or copy_dataset: the dataset was replaced whole, e.g. restored from a snapshot) and `fields`
    its arguments as applied (items without images; only the vectors stored)."""

    position: int
    kind: str
    dataset: str
    fields: dict
    size: int


@dataclasses.dataclass(frozen=True)
class DatasetCopy:
    """A consistent copy of a dataset (Index.copy_dataset): it holds every write to the dataset
    up to `position` and none after."""

    record: DatasetRecord
    position: int
    items: ItemSnapshot  # read after the copy is made; close it
    attachments: list[tuple[str, str, int, bytes]]  # (collection, key, version, data)
    collections: list[tuple[dict, pathlib.Path, list[str]]]  # (spec, folder, file paths relative to it)
    damaged: list[tuple[dict, str]]  # (spec, what is wrong) of the collections damaged here: no files


def _size(fields: dict) -> int:
    size = _OVERHEAD
    for value in fields.values():
        if isinstance(value, np.ndarray):
            size += value.nbytes
        elif isinstance(value, bytes | str):
            size += len(value)
        elif isinstance(value, list):
            for element in value:
                if isinstance(element, ItemRecord):
                    size += _ITEM_BYTES + len(element.id) + len(element.label) + sum(
                        len(k) + len(v) for k, v in element.metadata.items())
                else:
                    size += 8 + len(element)
    return size


@dataclasses.dataclass
class Pin:
    """A position of a ChangeLog whose later changes it keeps (see ChangeLog.pinned)."""

    position: int


class ChangeLog:
    """The changes applied by this process, the newest up to `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.epoch = uuid.uuid4().hex
        self.start = time.time_ns()  # see the module docstring
        self._next = self.start
        self._ring: list[Change] = []
        self._head = 0  # index in _ring of the oldest change kept
        self._bytes = 0
        self._by_dataset: dict[str, int] = {}
        self._pins: list[Pin] = []  # positions whose later changes are kept (see pinned)
        self._changed = threading.Condition()
        self.previous: tuple[str, int] | None = None  # (epoch, last position) this log continues
        self.sealed = False  # no change comes any more (seal)

    def continue_after(self, epoch: str, last: int) -> None:
        """Makes this log, before its first change, continue the log of `epoch` that ended at
        position `last` at a clean stop: its changes follow that position (see continues)."""
        with self._changed:
            if self._next != self.start:
                raise RuntimeError("a change log continues another only before its first change")
            self.previous = (epoch, last)
            self.start = self._next = last + 1

    def continues(self, epoch: str, position: int) -> bool:
        """True when a follower at `position` of `epoch` can take the changes after it from this
        log: the same epoch with that position still held, or the end of the log it continues."""
        if epoch == self.epoch:
            return self.holds(position)
        return (epoch, position) == self.previous and self.holds(position)

    def seal(self) -> None:
        """Marks the log complete (the engine refuses every later write); wakes the readers
        waiting in `after`, so the followers' streams end once they have sent everything."""
        with self._changed:
            self.sealed = True
            self._changed.notify_all()

    @property
    def last(self) -> int:
        """The position of the latest change (start - 1 before the first)."""
        return self._next - 1

    def record(self, kind: str, dataset: str, **fields) -> int:
        """Appends a change; its position. The caller holds the dataset's order lock, so a
        dataset's changes are listed in the order they were applied."""
        size = _size(fields)
        with self._changed:
            position = self._next
            self._next += 1
            self._ring.append(Change(position, kind, dataset, fields, size))
            self._by_dataset[dataset] = position
            self._bytes += size
            while self._bytes > self.max_bytes and self._head < len(self._ring) - 1:
                if self._pins and self._ring[self._head].position > min(pin.position for pin in self._pins) \
                        and self._bytes <= PINNED_HEADROOM * self.max_bytes:
                    break  # a copy in progress needs it
                self._bytes -= self._ring[self._head].size
                self._ring[self._head] = None  # type: ignore[call-overload] - freed now, cut off below
                self._head += 1
            if self._head > 1024 and self._head * 2 > len(self._ring):
                del self._ring[:self._head]
                self._head = 0
            self._changed.notify_all()
        return position

    @contextlib.contextmanager
    def pinned(self, position: int):
        """Keeps the changes after `position` (within PINNED_HEADROOM times the bound) while
        the caller, a whole copy taken at `position` and then its reader, runs: it gives a Pin,
        to move forward (move_pin) as the changes are read."""
        pin = Pin(position)
        with self._changed:
            self._pins.append(pin)
        try:
            yield pin
        finally:
            with self._changed:
                self._pins.remove(pin)

    def move_pin(self, pin: Pin, position: int) -> None:
        """Keeps only the changes after `position` for `pin` from now on."""
        with self._changed:
            pin.position = position

    def version(self, dataset: str) -> int:
        """The position of the dataset's latest change in this process; before any, the
        position this process started after (older than anything it wrote)."""
        with self._changed:
            return self._by_dataset.get(dataset, self.start - 1)

    def holds(self, position: int) -> bool:
        """True when every change after `position` is still in the log."""
        with self._changed:
            first = self._ring[self._head].position if self._head < len(self._ring) else self._next
            return first - 1 <= position <= self.last

    def after(self, position: int, max_bytes: int, timeout_s: float) -> list[Change]:
        """The changes after `position` (at least one, up to about `max_bytes`), waiting up to
        `timeout_s` for one (or for the seal); [] when none came. Raises Compacted when they
        were dropped."""
        with self._changed:
            self._changed.wait_for(lambda: self.last > position or self.sealed, timeout_s)
            if self.last <= position:
                return []
            first = self._ring[self._head].position
            if position < first - 1:
                raise Compacted(f"changes after {position} were dropped (the log starts at {first})")
            index = self._head + position + 1 - first
            batch, size = [], 0
            for change in self._ring[index:index + 10_000]:
                if batch and size + change.size > max_bytes:
                    break
                batch.append(change)
                size += change.size
            return batch


def keep_log_end(data_dir: pathlib.Path, changes: ChangeLog, fsync: bool) -> None:
    """Records where a sealed change log ended, for the next start (take_log_end)."""
    if not changes.sealed:
        raise RuntimeError("only a sealed change log has an end to keep")
    durable.write_file(data_dir / LOG_END, json.dumps({"epoch": changes.epoch, "last": changes.last}), fsync)


def take_log_end(data_dir: pathlib.Path, fsync: bool) -> tuple[str, int] | None:
    """(epoch, last position) of the change log a clean stop left in the data dir, or None; the
    record is removed (durably) either way, so that a later crash never reads as a clean stop."""
    path = data_dir / LOG_END
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
        ending = (str(recorded["epoch"]), int(recorded["last"]))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s): followers copy everything again", path, exc)
        ending = None
    path.unlink()
    if fsync:
        durable.fsync_path(data_dir)
    return ending
