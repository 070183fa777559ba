"""The index's proto-free core: datasets, items and collections, their validation, their
durability (a lock file, SQLite, per-collection logs and checkpoints) and snapshots.

A collection whose files fail their checks at start is kept as damaged: it answers DATA_LOSS
(with the way back), while every other collection and dataset keeps serving. Vectors are
derived data, so the way back is to rebuild it from the dataset's items (IndexDataset with
rebuild_damaged, which deletes it first: its files move to DATA_DIR/damaged/) or to restore the
dataset from a snapshot. Item deletions and image replacements it misses meanwhile are noted,
and their vectors deleted should a later start open it healthy (the damage passed).
"""

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import sqlite3
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import numpy as np

from convsearch.errors import (
    Aborted,
    AlreadyExists,
    ConvsearchError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    shown,
)
from convsearch.item_limits import MAX_ID, item_problem
from convsearch.naming import DATASET_NAME, DATASET_NAME_RULE, collection_name
from convsearch.rwlock import RWLock
from convsearch_index import durable
from convsearch_index.changes import ChangeLog, DatasetCopy, keep_log_end, take_log_end
from convsearch_index.collection import Timings, VectorCollection, VectorSpec, install_checkpoint
from convsearch_index.distances import check_metric
from convsearch_index.records import DatasetRecord, ItemRecord, Records, image_digest
from convsearch_index.snapshot_files import receive

log = logging.getLogger("convsearch.index")
SNAPSHOT_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # what a snapshot name may be at all
SNAPSHOT_NAME = re.compile(r"(?P<dataset>[a-z0-9][a-z0-9_-]{0,63})-\d{8}T\d{6}-[0-9a-f]{6}")
COPY_CHECKPOINT_BYTES = 16 << 20  # a collection's log beyond this is checkpointed before a copy
MAX_FENCE_S = 24 * 3600.0  # longest a dataset's writes may be held (FenceDataset)
RESTORING = "restoring"  # DATA_DIR/restoring/<dataset>: a restore under way (its snapshot's name inside)
WORK_PREFIX = "index-work-"  # DATA_DIR/index-work-*: a snapshot's or restore's work folder, swept at start
COLLECTION_FOLDER = re.compile(r"[0-9a-f]{32}")  # DATA_DIR/collections/<uuid4 hex>


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on requests; each breach is a clear INVALID_ARGUMENT."""

    max_k: int = 1000
    max_queries: int = 4096
    exact_below: int = 2000


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot kept under data_dir/snapshots."""

    name: str
    dataset: str
    created_at: float
    size_bytes: int
    mtime_ns: int = 0


@dataclasses.dataclass(frozen=True)
class CollectionKey:
    """What a collection holds: the vectors of one model, layer, pooling and metric."""

    model: str
    layer: str
    pooling: str = "avg"
    metric: str = "cosine"
    minkowski_p: float = 2.0

    @property
    def name(self) -> str:
        return collection_name(self.model, self.layer, self.pooling, self.metric, self.minkowski_p)


@dataclasses.dataclass
class CollectionInfo:
    """A collection as the core keeps it."""

    dataset: str
    key: CollectionKey
    spec: VectorSpec
    directory: pathlib.Path
    vectors: VectorCollection | None  # None when damaged
    weights: str = ""  # fingerprint of the weights that made the vectors; "" when unknown
    id: str = ""  # its identity, kept by its copies; "" for one made before ids
    damage: str = ""  # what is wrong with its files, and the way back; "" when healthy

    def spec_dict(self) -> dict:
        """Its key and parameters as snapshots and followers' copies record them."""
        return {**dataclasses.asdict(self.key), "dimension": self.spec.dimension, "m": self.spec.m,
                "ef_construction": self.spec.ef_construction, "ef": self.spec.ef, "weights": self.weights,
                "id": self.id}

    def healthy(self) -> VectorCollection:
        """The vectors; DATA_LOSS when the collection is damaged."""
        if self.vectors is None:
            raise DataLoss(self.damage, reason="COLLECTION_DAMAGED", resource_type="collection",
                           resource_name=self.key.name, metadata={"collection": self.key.name})
        return self.vectors


def _without(ids: list[str], distances: np.ndarray, dropped: set[str], k: int) -> tuple[list[str], np.ndarray]:
    keep = [position for position, i in enumerate(ids) if i not in dropped][:k]
    return [ids[p] for p in keep], distances[keep]


def _restore_error(snapshot: str, exc: Exception) -> Exception:
    """What a failed restore answers: DATA_LOSS for a snapshot that cannot be read or fails its
    checks, RESOURCE_EXHAUSTED for a full disk, the error itself for anything else."""
    if isinstance(exc, ConvsearchError):
        return exc
    if durable.no_room(exc):
        return ResourceExhausted(f"no room on the index's disk to restore snapshot {shown(snapshot)} ({exc}); "
                                 "nothing was restored: free space and restore again", reason="DISK_FULL")
    damaged = (tarfile.TarError, KeyError, TypeError, ValueError, FileNotFoundError, IsADirectoryError,
               NotADirectoryError, sqlite3.DatabaseError)
    if isinstance(exc, damaged) and not isinstance(exc, sqlite3.OperationalError):
        return DataLoss(f"snapshot {shown(snapshot)} cannot be restored: {type(exc).__name__}: {exc}. Nothing was "
                        "restored; restore another snapshot of the dataset", reason="SNAPSHOT_DAMAGED",
                        resource_type="snapshot", resource_name=snapshot)
    return exc


def _file_sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _no_dataset(name: str) -> NotFound:
    return NotFound(f"dataset {shown(name)} does not exist; create it first (ListDatasets names the datasets)",
                    reason="DATASET_NOT_FOUND", resource_type="dataset", resource_name=name, metadata={"dataset": name})


def _dataset_exists(name: str) -> AlreadyExists:
    return AlreadyExists(f"dataset {shown(name)} exists already; pick another name or delete it first",
                         reason="DATASET_ALREADY_EXISTS", resource_type="dataset", resource_name=name,
                         metadata={"dataset": name})


def _restored_key(spec: dict) -> CollectionKey:
    """The key of a collection a snapshot's manifest lists, once its spec is one CreateCollection
    would take (ValueError, for a damaged snapshot, when it is not)."""
    key = CollectionKey(**{k: spec[k] for k in ("model", "layer", "pooling", "metric", "minkowski_p")})
    try:
        check_collection(key, spec["dimension"], spec["m"], spec["ef_construction"], spec["ef"])
        if not isinstance(spec.get("weights", ""), str) or not isinstance(spec.get("id", ""), str):
            raise InvalidArgument(f"weights {spec.get('weights')!r} or id {spec.get('id')!r} is not text")
    except InvalidArgument as exc:
        raise ValueError(f"its manifest lists a collection no index could hold: {exc}") from None
    return key


def check_name(name: str) -> None:
    if not DATASET_NAME.fullmatch(name or ""):
        raise InvalidArgument(f"invalid dataset name {shown(name)}: use {DATASET_NAME_RULE}",
                              reason="DATASET_NAME_INVALID", field="dataset",
                              metadata={"dataset": name})


def check_collection(key: CollectionKey, dimension: int, m: int, ef_construction: int, ef: int) -> None:
    """INVALID_ARGUMENT unless these make a collection: a model and a layer (text), a known pooling
    and metric, and each parameter a whole number in its range."""
    if not (key.model and key.layer and isinstance(key.model, str) and isinstance(key.layer, str)):
        raise InvalidArgument("a collection needs a model and a layer")
    if key.pooling not in ("avg", "max", "flatten"):
        raise InvalidArgument(f"unknown pooling {shown(key.pooling)}")
    check_metric(key.metric, key.minkowski_p)
    for value, what, low, high in ((dimension, "dimension", 1, 1 << 20), (m, "M", 2, 256),
                                   (ef_construction, "ef_construction", 1, 10_000), (ef, "ef", 1, 10_000)):
        if type(value) is not int or not low <= value <= high:
            raise InvalidArgument(f"{what} {value!r} is out of range; use a whole number from {low} to {high}")


def check_ids(ids: Sequence[str], what: str = "item id") -> None:
    for item_id in ids:
        if not item_id or len(item_id) > MAX_ID:
            raise InvalidArgument(f"{what} {shown(item_id)} has {len(item_id)} characters; use 1 to {MAX_ID}"
                                  if item_id else f"an {what} is empty; every item needs an id")


def _refused(exc: BaseException) -> bool:
    """True for what a write raises from its checks, before it changes anything; anything else may
    come from a write that failed part-way (e.g. its vectors deleted, its items not), changing
    what the change log does not list."""
    return isinstance(exc, (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Aborted)) or \
        getattr(exc, "reason", "") in ("DATASET_MOVING", "COLLECTION_DAMAGED")


def _ordered(argument: str):
    """Runs a write holding the order lock of the dataset named by `argument` (see Index.changes)."""
    def wrap(method):
        signature = inspect.signature(method)

        @functools.wraps(method)
        def ordered(self, *args, **kwargs):
            dataset = signature.bind(self, *args, **kwargs).arguments[argument]
            depth = getattr(self._writing, "depth", 0)  # a write inside one under way goes on
            with self._order_lock(dataset):
                if self._sealed and not depth:
                    raise Unavailable(f"the index is stopping (a restart or a rollout): {method.__name__} of "
                                      f"dataset {shown(dataset)} was not applied; retry in a moment",
                                      reason="INDEX_STOPPING", retry_after_s=1.0, metadata={"dataset": dataset})
                self._writing.depth = depth + 1
                try:
                    return method(self, *args, **kwargs)
                except BaseException as exc:
                    if not depth and not _refused(exc):
                        self._failed_write = f"{method.__name__} of {shown(dataset)} ({type(exc).__name__}: {exc})"
                    raise
                finally:
                    self._writing.depth = depth

        return ordered

    return wrap


class Index:
    """Everything the index service keeps, under one data directory.

    With a change log (`changes`, a primary's), every write is recorded there as it is applied;
    each dataset's writes then take turns (its order lock), so the log lists them in the order
    they were applied, which is the order followers apply them in. A clean stop seals it (seal),
    and close keeps where it ended for the next start, which continues it (see changes.py).
    """

    def __init__(self, data_dir: pathlib.Path, limits: Limits = Limits(), fsync: bool = True,
                 timings: Timings | None = None, snapshot_retention: int = 0, changes: ChangeLog | None = None):
        self.data_dir = data_dir
        self.snapshot_retention = snapshot_retention  # snapshots kept per dataset; 0 keeps all
        self.changes = changes
        self._order_locks: dict[str, threading.RLock] = {}
        self._fences: dict[str, float] = {}  # dataset -> time.monotonic() its fence ends at (FenceDataset)
        self._snapshot_lock = threading.Lock()  # deleting snapshot files vs. reading them
        self.limits = limits
        self.fsync = fsync
        self.timings = timings or Timings()  # of every collection's log appends and checkpoints
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "collections").mkdir(exist_ok=True)
        (data_dir / "snapshots").mkdir(exist_ok=True)
        self._lock_file = open(data_dir / "LOCK", "w")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise FailedPrecondition(f"data dir {data_dir} is in use by another index process "
                                     "(its LOCK file is held); stop that one or use another --data-dir") from None
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        ending = take_log_end(data_dir, fsync)  # taken whatever the role: a follower's data dir may become a primary
        if ending is not None and changes is not None:
            changes.continue_after(*ending)
            log.info("the change log continues epoch %s after position %d (a clean stop): followers there resume",
                     *ending)
        self._sealed = False  # writes are refused (seal)
        self._failed_write = ""  # the latest write that failed part-way, if any: its log end is not kept (close)
        self._writing = threading.local()  # depth: the writes under way in this thread (see _ordered)
        self.records = Records(data_dir / "records.sqlite")
        # Mutations take the read side; a snapshot takes the write side for a consistent copy.
        self._guard = RWLock()
        self._meta = threading.Lock()
        self._collections: dict[tuple[str, str], CollectionInfo] = {}
        self._labels: dict[str, dict[str, str]] = {name: self.records.labels(name)
                                                   for name in self.records.dataset_names()}
        # Replacing an item's image takes its dataset's write side; storing vectors the read side.
        self._dataset_locks: dict[str, RWLock] = {}
        for dataset, name, spec, stored in self.records.collections():
            relative = pathlib.Path(stored)
            if relative.is_absolute():  # written before paths were relative to the data dir
                relative = pathlib.Path("collections") / relative.name
                self.records.move_collection(dataset, name, str(relative))
            self._open_collection(dataset, spec, relative)
        for marker in sorted((data_dir / RESTORING).glob("*")):  # restores a crash cut short
            if marker.name in self._labels:
                log.warning("dataset %s was being restored from snapshot %s when the index stopped: deleting "
                            "what of it was restored; restore it again", marker.name, marker.read_text())
                self.delete_dataset(marker.name, logged=False)
            marker.unlink()
        self._sweep_leftovers()
        damaged = [info for info in self._collections.values() if info.damage]
        for info in damaged:
            log.error("%s", info.damage)
        log.info("opened %s: %d datasets, %d collections (%d damaged)", data_dir, len(self._labels),
                 len(self._collections), len(damaged))

    def _sweep_leftovers(self) -> None:
        """Removes what an index killed mid-way (kill -9, a power cut) left, and nothing else:
        the work folders of snapshots and restores (WORK_PREFIX), unfinished snapshot files
        (*.tar.tmp) and collection folders that no collection names (a crash in DeleteCollection,
        DeleteDataset, CreateCollection or a restore). Run at start, before anything is under way."""
        named = {self.data_dir / stored for *_, stored in self.records.collections()}
        leftovers = [
            *((path, "a snapshot's or restore's work folder") for path in self.data_dir.glob(f"{WORK_PREFIX}*")
              if path.is_dir()),
            *((path, "an unfinished snapshot") for path in (self.data_dir / "snapshots").glob("*.tar.tmp")
              if path.is_file()),
            *((path, "a folder no collection names") for path in (self.data_dir / "collections").iterdir()
              if path.is_dir() and COLLECTION_FOLDER.fullmatch(path.name) and path not in named)]
        for path, what in leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            log.warning("removed %s, %s left by an index stopped mid-way", path, what)

    def _open_collection(self, dataset: str, spec: dict, relative: pathlib.Path,
                         sha256: dict[str, str] | None = None) -> CollectionInfo:
        key = CollectionKey(spec["model"], spec["layer"], spec["pooling"], spec["metric"], spec["minkowski_p"])
        vector_spec = VectorSpec(spec["dimension"], spec["metric"], spec["minkowski_p"], spec["m"],
                                 spec["ef_construction"], spec["ef"])
        directory = self.data_dir / relative
        info = CollectionInfo(dataset, key, vector_spec, directory, None, spec.get("weights", ""), spec.get("id", ""))
        try:
            info.vectors = VectorCollection(directory, vector_spec, self.fsync, f"{dataset}:{key.name}",
                                            self.timings, sha256)
            self._delete_stale(info)
        except DataLoss as exc:
            info.damage = (
                f"collection {shown(key.name)} of dataset {shown(dataset)} is damaged: {exc}. Its files are kept "
                f"as they are ({relative}). Rebuild it from the dataset's items (IndexDataset with rebuild_damaged, "
                "e.g. `convsearch index --rebuild-damaged`), or restore the dataset from a snapshot")
        self._collections[dataset, key.name] = info
        return info

    def _delete_stale(self, info: CollectionInfo) -> None:
        """Deletes the vectors a collection holds of items deleted, or whose image was replaced,
        while it was damaged (see _delete_vectors), before it serves."""
        stale = self.records.stale_vectors(info.dataset, info.key.name)
        if stale:
            deleted = info.vectors.delete(stale)
            self.records.forget_stale_vectors(info.dataset, info.key.name)
            log.warning("collection %s of %s opened healthy after it was damaged: deleted %d vectors of items "
                        "deleted or given a new image meanwhile", info.key.name, info.dataset, deleted)

    def _dataset_lock(self, dataset: str) -> RWLock:
        with self._meta:
            return self._dataset_locks.setdefault(dataset, RWLock())

    def _order_lock(self, dataset: str):
        if self.changes is None:
            return contextlib.nullcontext()
        with self._meta:
            return self._order_locks.setdefault(dataset, threading.RLock())

    def _record(self, kind: str, dataset: str, **fields) -> None:
        if self.changes is not None:
            self.changes.record(kind, dataset, **fields)

    def version(self, dataset: str) -> int:
        """The dataset's version: the change log position of its latest write (0 without a log)."""
        return self.changes.version(dataset) if self.changes is not None else 0

    @_ordered("dataset")
    def fence(self, dataset: str, ttl_s: float) -> None:
        """Holds the dataset's writes for ttl_s seconds (0: lifts the fence). Taken in the
        dataset's order, so no write is under way once it returns."""
        self._require_dataset(dataset)
        if not 0 <= ttl_s <= MAX_FENCE_S:
            raise InvalidArgument(f"a fence holds for 0 (lifted) to {MAX_FENCE_S:g} seconds, not {ttl_s}",
                                  field="ttl_s")
        with self._meta:
            if ttl_s:
                self._fences[dataset] = time.monotonic() + ttl_s
            else:
                self._fences.pop(dataset, None)

    def _check_fence(self, dataset: str) -> None:
        left = self._fences.get(dataset, 0.0) - time.monotonic()
        if left > 0:
            raise Unavailable(f"dataset {shown(dataset)} is being moved to another index primary (convsearch "
                              f"rebalance): its writes are held, for at most {left:.0f}s more; retry then",
                              reason="DATASET_MOVING", retry_after_s=1.0, resource_type="dataset",
                              resource_name=dataset)

    # ---- datasets ----------------------------------------------------------------------

    def _require_dataset(self, name: str) -> None:
        """NOT_FOUND unless the dataset exists. A read checks again after it read: a delete takes
        the name out before it deletes anything, so a read that still finds it read it whole."""
        check_name(name)
        if name not in self._labels:
            raise _no_dataset(name)

    def _labels_of(self, dataset: str) -> dict[str, str]:
        """The dataset's labels by item id; NOT_FOUND once it is deleted."""
        labels = self._labels.get(dataset)
        if labels is None:
            raise _no_dataset(dataset)
        return labels

    @_ordered("name")
    def create_dataset(self, name: str, description: str = "", created_at: float | None = None,
                       logged: bool = True) -> DatasetRecord:
        """A new, empty dataset; `logged` false keeps it from the followers (a restore: they are
        given the dataset whole, as a copy, once it is). A restore marker of its name, which a
        failed restore left, is removed first: else the next start would delete this dataset."""
        check_name(name)
        created_at = time.time() if created_at is None else created_at
        with self._guard.read(), self._meta:
            if name in self._labels:
                raise _dataset_exists(name)
            marker = self.data_dir / RESTORING / name
            if logged and marker.exists():
                marker.unlink()
                if self.fsync:
                    durable.fsync_path(marker.parent)
            self.records.create_dataset(name, description, created_at)
            self._labels[name] = {}
            if logged:
                self._record("create_dataset", name, description=description, created_at=created_at)
        return self.dataset(name)

    def dataset(self, name: str) -> DatasetRecord:
        self._require_dataset(name)
        record = self.records.dataset(name)
        if record is None:  # deleted meanwhile
            raise _no_dataset(name)
        return record

    def datasets(self) -> list[DatasetRecord]:
        """Every dataset (one deleted while they are read is left out)."""
        return [record for name in self.records.dataset_names() if (record := self.records.dataset(name))]

    @_ordered("name")
    def delete_dataset(self, name: str, logged: bool = True) -> None:
        """Deletes a dataset and its collections; `logged` false for one the followers were never
        given (a restore that failed)."""
        self._require_dataset(name)
        with self._guard.read(), self._meta:
            labels = self._labels.pop(name)  # first: see _require_dataset
            try:
                for key in [k for k in self._collections if k[0] == name]:
                    self._drop_collection(*key)
                self.records.delete_dataset(name)
            except BaseException:
                self._labels[name] = labels
                raise
            self._fences.pop(name, None)
            if logged:
                self._record("delete_dataset", name)

    # ---- items -------------------------------------------------------------------------

    @_ordered("dataset")
    def put_items(self, dataset: str, items: Sequence[ItemRecord], keep_digests: bool = False) -> tuple[int, int]:
        """Upserts items: (inserted, replaced). A replaced item whose image changed loses its
        vectors, so the next indexing run embeds it again: they are deleted (durably) before the
        new image is committed, so a crash in between leaves the old image without vectors,
        never the new image with the old vectors. With `keep_digests` (a follower's copies,
        without images) each item's digest and image_size are kept as given."""
        self._require_dataset(dataset)
        self._check_fence(dataset)
        if not items:
            raise InvalidArgument("no items given; send at least one")
        ids = [item.id for item in items]
        check_ids(ids)
        if len(set(ids)) != len(ids):
            raise InvalidArgument("an item id appears twice in the batch; send each item once")
        for item in items:
            if problem := item_problem(item.id, item.label, item.metadata):
                raise InvalidArgument(problem)
        if not keep_digests:
            for item in items:
                item.digest = image_digest(item.image)
        with self._guard.read(), self._dataset_lock(dataset).write():
            existing = self.records.digests(dataset, ids)
            changed = [item.id for item in items if item.id in existing and existing[item.id] != item.digest]
            damaged = self._delete_vectors(dataset, changed) if changed else []
            self.records.put_items(dataset, items, stale=[(name, item_id) for name in damaged for item_id in changed])
            self._labels[dataset].update((item.id, item.label) for item in items)
            if self.changes is not None:  # a follower logs nothing: skip copying the items
                self._record("put_items", dataset, items=[
                    dataclasses.replace(item, image=b"", image_size=item.image_size or len(item.image))
                    for item in items])
        return len(items) - len(existing), len(existing)

    def put_copied_items(self, dataset: str, rows: Sequence[tuple[str, str, str, str, int]]) -> None:
        """Stores a page of the items of a dataset being copied whole from a primary (a
        follower's copy; see Records.item_rows for the rows), durably, in one transaction. The
        dataset was created empty for the copy, so no item is replaced and no vector goes stale:
        put_items' digest checks are skipped."""
        self._require_dataset(dataset)
        with self._guard.read(), self._dataset_lock(dataset).write():
            self.records.put_copied_items(dataset, rows)
            self._labels[dataset].update((row[0], row[1]) for row in rows)

    def get_items(self, dataset: str, ids: Sequence[str], include_images: bool) -> tuple[list[ItemRecord], list[str]]:
        self._require_dataset(dataset)
        found = self.records.get_items(dataset, ids, include_images)
        self._require_dataset(dataset)  # again: deleted meanwhile, its items read as missing
        return [found[i] for i in ids if i in found], [i for i in ids if i not in found]

    def scan_items(self, dataset: str, after: str, limit: int, include_images: bool, label: str = ""):
        self._require_dataset(dataset)
        if not 1 <= limit <= 1000:
            raise InvalidArgument(f"page size {limit} is out of range; use 1 to 1000")
        items = self.records.scan_items(dataset, after, limit, include_images, label)
        self._require_dataset(dataset)  # again: deleted meanwhile, its page reads as empty
        return items

    @_ordered("dataset")
    def delete_items(self, dataset: str, ids: Sequence[str]) -> tuple[int, int]:
        """Deletes items from the dataset and every collection: (deleted, not found)."""
        self._require_dataset(dataset)
        check_ids(ids)
        self._check_fence(dataset)
        with self._guard.read():
            deleted = self.records.delete_items(dataset, ids, stale_in=self._delete_vectors(dataset, ids))
            for item_id in deleted:
                self._labels[dataset].pop(item_id, None)
            if deleted:
                self._record("delete_items", dataset, ids=deleted)
        return len(deleted), len(set(ids)) - len(deleted)

    def _delete_vectors(self, dataset: str, ids: Sequence[str]) -> list[str]:
        """Deletes these items' vectors (durably) from each healthy collection of the dataset;
        returns the names of its damaged ones, which no write reaches: the caller notes there
        that their vectors of these items are stale, deleted if they open healthy again (the
        damage passed: an I/O error) before they are rebuilt (see _delete_stale)."""
        damaged = []
        for info in self._dataset_collections(dataset):
            if info.vectors is None:
                damaged.append(info.key.name)
            else:
                info.vectors.delete(ids)
        return damaged

    def labels(self, dataset: str) -> dict[str, str]:
        check_name(dataset)
        return self._labels_of(dataset)

    # ---- collections -------------------------------------------------------------------

    def _dataset_collections(self, dataset: str) -> list[CollectionInfo]:
        with self._meta:
            return [info for (d, _), info in self._collections.items() if d == dataset]

    @_ordered("dataset")
    def create_collection(self, dataset: str, key: CollectionKey, dimension: int, m: int = 16,
                          ef_construction: int = 200, ef: int = 64, weights: str = "",
                          collection_id: str = "") -> CollectionInfo:
        """A new, empty collection; `collection_id` is a copy's (a follower's), else a new one is made."""
        self._require_dataset(dataset)
        self._check_fence(dataset)
        check_collection(key, dimension, m, ef_construction, ef)
        spec = {**dataclasses.asdict(key), "dimension": dimension, "m": m, "ef_construction": ef_construction,
                "ef": ef, "weights": weights, "id": collection_id or uuid.uuid4().hex}
        with self._guard.read(), self._meta:
            if (dataset, key.name) in self._collections:
                raise AlreadyExists(f"collection {shown(key.name)} of dataset {shown(dataset)} exists already",
                                    reason="COLLECTION_ALREADY_EXISTS", resource_type="collection",
                                    resource_name=key.name, metadata={"dataset": dataset, "collection": key.name})
            info = self._new_collection(dataset, spec, pathlib.Path("collections") / uuid.uuid4().hex)
            self._record("create_collection", dataset, spec=spec)
            return info

    def _new_collection(self, dataset: str, spec: dict, relative: pathlib.Path) -> CollectionInfo:
        """Opens a new, empty collection, then names it in SQLite; when either fails (a full disk)
        neither is left (a crash between them leaves a folder that no collection names)."""
        info = None
        try:
            info = self._open_collection(dataset, spec, relative)  # a new folder: never damaged
            self.records.create_collection(dataset, info.key.name, spec, str(relative))
        except BaseException as exc:
            if info is not None:
                del self._collections[dataset, info.key.name]
                info.vectors.close(checkpoint=False)
            shutil.rmtree(self.data_dir / relative, ignore_errors=True)
            if durable.no_room(exc):
                raise ResourceExhausted(f"no room on the index's disk to create a collection of dataset "
                                        f"{shown(dataset)} ({exc}); nothing was created: free space and create it "
                                        "again", reason="DISK_FULL") from exc
            raise
        return info

    def collection(self, dataset: str, name: str) -> CollectionInfo:
        self._require_dataset(dataset)
        with self._meta:
            info = self._collections.get((dataset, name))
        if info is None:
            known = ", ".join(i.key.name for i in self._dataset_collections(dataset)) or "none"
            raise NotFound(f"dataset {shown(dataset)} has no collection {shown(name)} (it has: {known})",
                           reason="COLLECTION_NOT_FOUND", resource_type="collection", resource_name=name,
                           metadata={"dataset": dataset, "collection": name})
        return info

    def collections(self, dataset: str) -> list[CollectionInfo]:
        self._require_dataset(dataset)
        found = self._dataset_collections(dataset)
        self._require_dataset(dataset)  # again: deleted meanwhile, it reads as having none
        return sorted(found, key=lambda info: info.key.name)

    def all_collections(self) -> list[CollectionInfo]:
        """Every collection of every dataset, damaged ones too."""
        with self._meta:
            return list(self._collections.values())

    def _drop_collection(self, dataset: str, name: str) -> None:
        info = self._collections.pop((dataset, name))
        self.records.delete_collection(dataset, name)
        if info.vectors is not None:
            info.vectors.close(checkpoint=False)
            shutil.rmtree(info.directory, ignore_errors=True)
        elif info.directory.exists():
            kept = self.data_dir / "damaged" / f"{dataset}-{info.directory.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            kept.parent.mkdir(exist_ok=True)
            os.replace(info.directory, kept)
            log.warning("damaged collection %s of %s deleted; its files are kept in %s", name, dataset, kept)

    @_ordered("dataset")
    def delete_collection(self, dataset: str, name: str, only_if_empty: bool = False) -> None:
        """Deletes a collection (damaged or not); with `only_if_empty`, only one holding no vectors."""
        info = self.collection(dataset, name)
        self._check_fence(dataset)
        held = len(info.healthy()) if only_if_empty else 0
        if held:
            raise FailedPrecondition(f"collection {shown(name)} of dataset {shown(dataset)} holds {held} vectors, so "
                                     "it was not deleted (only_if_empty); delete it without only_if_empty to drop "
                                     "them", reason="COLLECTION_NOT_EMPTY", resource_type="collection",
                                     resource_name=name, metadata={"dataset": dataset, "collection": name})
        with self._guard.read(), self._meta:
            self._drop_collection(dataset, name)
            self._record("delete_collection", dataset, name=name)

    # ---- vectors -----------------------------------------------------------------------

    @_ordered("dataset")
    def upsert_vectors(self, dataset: str, name: str, ids: Sequence[str], vectors: np.ndarray,
                       digests: Sequence[str] = ()) -> tuple[int, int, list[str]]:
        """(inserted, replaced, stale ids). With `digests` (the image digest each vector was made
        from), vectors of items whose image has changed since are not stored: those are stale."""
        collection = self.collection(dataset, name).healthy()
        self._check_fence(dataset)
        labels = self._labels_of(dataset)
        unknown = [item_id for item_id in ids if item_id not in labels]
        if unknown:
            raise NotFound(f"item {shown(unknown[0])} is not in dataset {shown(dataset)} ({len(unknown)} unknown ids); "
                           "put the items first", reason="ITEM_NOT_FOUND", resource_type="item",
                           resource_name=unknown[0], metadata={"dataset": dataset, "item": unknown[0]})
        if digests and len(digests) != len(ids):
            raise InvalidArgument(f"{len(digests)} image digests for {len(ids)} ids; send one per id, or none")
        vectors = np.asarray(vectors, np.float32)
        collection.check_rows(ids, vectors)  # all of them, before the stale ones are left out
        with self._guard.read(), self._dataset_lock(dataset).read():
            stale: list[str] = []
            # The digests go to the followers with the vectors: one replaying this change after a
            # crash, its item's image replaced since (its vector then dropped), leaves it out.
            current = self.records.digests(dataset, ids) if digests or self.changes is not None else {}
            if digests:
                fresh = [n for n, item_id in enumerate(ids) if current.get(item_id) == digests[n]]
                stale = [item_id for n, item_id in enumerate(ids) if current.get(item_id) != digests[n]]
                ids, vectors = [ids[n] for n in fresh], vectors[fresh]
                if not ids:
                    return 0, 0, stale
            # Logged for followers as soon as it is durable, so they apply it while the graph here
            # does (in dataset order: the order lock is held), not only after.
            counts = collection.upsert(ids, vectors, logged=lambda: self._record(
                "upsert_vectors", dataset, collection=name, ids=list(ids), vectors=vectors,
                digests=[current.get(item_id, "") for item_id in ids]))
            return (*counts, stale)

    def search(self, dataset: str, name: str, queries: np.ndarray | list[str], k: int, ef: int = 0,
               include_labels: Sequence[str] = (), exclude_labels: Sequence[str] = (),
               exclude_ids: Sequence[str] = (), exact: bool = False):
        """([(ids, labels, distances)] per query, nearest first; exact?). `queries` are vectors, or
        ids of items whose stored vectors are the queries (each then left out of its own results)."""
        collection = self.collection(dataset, name).healthy()
        if not 1 <= k <= self.limits.max_k:
            raise InvalidArgument(f"k = {k} is out of range; use 1 to {self.limits.max_k}", reason="K_OUT_OF_RANGE",
                                  field="k", metadata={"k": str(k), "max_k": str(self.limits.max_k)})
        if not 0 <= ef <= 10_000:
            raise InvalidArgument(f"ef = {ef} is out of range; use 0 (the collection's) to 10000",
                                  reason="EF_OUT_OF_RANGE", field="ef")
        if not 1 <= len(queries) <= self.limits.max_queries:
            raise InvalidArgument(f"{len(queries)} queries; send 1 to {self.limits.max_queries}")
        query_ids: list[str] = []
        if isinstance(queries, list):
            query_ids = queries
            _, queries, missing = collection.get(query_ids)
            if missing:
                raise NotFound(f"item {shown(missing[0])} has no vector in collection {shown(name)} "
                               f"of {shown(dataset)}", reason="VECTOR_NOT_FOUND", resource_type="item",
                               resource_name=missing[0],
                               metadata={"dataset": dataset, "collection": name, "item": missing[0]})
        labels = self._labels_of(dataset)  # the collection's dataset may be deleted since
        skip = set(exclude_ids)
        keep = None
        if include_labels or exclude_labels:
            include, exclude, excluded = set(include_labels), set(exclude_labels), skip

            def keep(item_id: str) -> bool:
                label = labels.get(item_id)
                return item_id not in excluded and (not include or label in include) and label not in exclude
            skip = set()
        # Excluded ids (and each query item) are dropped after a search for that many more.
        extra = len(skip) + (1 if query_ids else 0)
        hits, was_exact = collection.search(queries, k + extra, ef, keep, exact, self.limits.exact_below)
        if extra:
            hits = [_without(ids, distances, skip | ({query_ids[q]} if query_ids else set()), k)
                    for q, (ids, distances) in enumerate(hits)]
        unlabeled = itertools.repeat("")
        return [(ids, list(map(labels.get, ids, unlabeled)), distances) for ids, distances in hits], was_exact

    # ---- durability --------------------------------------------------------------------

    def _open_collections(self) -> list[VectorCollection]:
        with self._meta:
            return [info.vectors for info in self._collections.values() if info.vectors is not None]

    def checkpoint(self) -> None:
        """Checkpoints every collection whose log holds something."""
        for collection in self._open_collections():
            collection.checkpoint()

    def compact(self) -> None:
        """Compacts the collections whose deleted slots reached their share (in memory; their
        next checkpoint writes them compacted)."""
        for collection in self._open_collections():
            collection.compact()

    def _snapshot_path(self, name: str) -> pathlib.Path:
        """The file of a kept snapshot; INVALID_ARGUMENT for a malformed name, NOT_FOUND (without
        listing the others) when there is none."""
        if not SNAPSHOT_CHARS.fullmatch(name or ""):
            raise InvalidArgument(f"invalid snapshot name {shown(name)}: snapshot names look like "
                                  "<dataset>-20260101T120000-1a2b3c (SnapshotDataset gives one, ListSnapshots "
                                  "lists them)", reason="SNAPSHOT_NAME_INVALID", field="snapshot",
                                  metadata={"snapshot": name})
        path = self.data_dir / "snapshots" / f"{name}.tar"
        if not path.is_file():
            raise NotFound(f"no snapshot {shown(name)}; ListSnapshots lists the snapshots kept",
                           reason="SNAPSHOT_NOT_FOUND", resource_type="snapshot", resource_name=name,
                           metadata={"snapshot": name})
        return path

    def snapshots(self, dataset: str = "") -> list[SnapshotInfo]:
        """The snapshots kept (of `dataset`, or all), oldest first."""
        if dataset:
            check_name(dataset)
        found = []
        for path in (self.data_dir / "snapshots").glob("*.tar"):
            match = SNAPSHOT_NAME.fullmatch(path.stem)
            if match is None or (dataset and match["dataset"] != dataset):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted meanwhile
                continue
            found.append(SnapshotInfo(path.stem, match["dataset"], stat.st_mtime, stat.st_size, stat.st_mtime_ns))
        return sorted(found, key=lambda info: (info.mtime_ns, info.name))

    def delete_snapshot(self, name: str) -> None:
        path = self._snapshot_path(name)
        with self._snapshot_lock:
            path.unlink(missing_ok=True)

    def open_snapshot(self, name: str) -> BinaryIO:
        """A kept snapshot's file, open for reading (ReadSnapshot); it stays readable to the end
        if the snapshot is deleted meanwhile."""
        with self._snapshot_lock:
            return self._snapshot_path(name).open("rb")

    def store_snapshot(self, name: str, parts: Iterable[tuple[bytes, str]]) -> SnapshotInfo:
        """Stores a snapshot streamed from another index under its name (WriteSnapshot): `parts`
        are (data, sha256) with the SHA-256 of all the bytes on the last; kept only if it matches
        (see snapshot_files.receive)."""
        match = SNAPSHOT_NAME.fullmatch(name or "")
        if match is None:  # also keeps paths out: no / or . in a name
            raise InvalidArgument(f"invalid snapshot name {shown(name)}: snapshot names look like "
                                  "<dataset>-20260101T120000-1a2b3c (as SnapshotDataset gave it)", field="snapshot")
        stat = receive(self.data_dir / "snapshots", name, parts, self.fsync).stat()
        return SnapshotInfo(name, match["dataset"], stat.st_mtime, stat.st_size, stat.st_mtime_ns)

    def snapshot(self, dataset: str, retention: bool = True) -> tuple[SnapshotInfo, list[str]]:
        """Writes a tar file under data_dir/snapshots holding the dataset's items and collections;
        then, with a retention limit set (and `retention`), deletes the dataset's oldest snapshots
        beyond it. Returns the new snapshot and the names of those deleted."""
        self._require_dataset(dataset)
        name = f"{dataset}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        target = self.data_dir / "snapshots" / f"{name}.tar"
        with self._guard.write():
            self._require_dataset(dataset)  # again: a delete may have come before the lock
            try:
                self._write_snapshot(dataset, target)
            except Exception as exc:
                if durable.no_room(exc):
                    raise ResourceExhausted(f"no room on the index's disk to snapshot dataset {shown(dataset)} "
                                            f"({exc}); no snapshot was written: free space (DeleteSnapshot deletes "
                                            "old ones) and snapshot again", reason="DISK_FULL") from exc
                raise
        deleted = []
        with self._snapshot_lock:
            kept = self.snapshots(dataset)
            if retention and self.snapshot_retention > 0:
                for old in [info for info in kept if info.name != name][:max(0, len(kept) - self.snapshot_retention)]:
                    (self.data_dir / "snapshots" / f"{old.name}.tar").unlink(missing_ok=True)
                    deleted.append(old.name)
        if deleted:
            log.info("snapshot %s of %s written; deleted %s (retention %d)", name, dataset, ", ".join(deleted),
                     self.snapshot_retention)
        stat = target.stat()
        return SnapshotInfo(name, dataset, stat.st_mtime, stat.st_size, stat.st_mtime_ns), deleted

    def _work_folder(self) -> tempfile.TemporaryDirectory:
        """A temporary folder in the data dir (on its file system), named so that the next start
        removes it when a crash leaves it (see _sweep_leftovers)."""
        return tempfile.TemporaryDirectory(dir=self.data_dir, prefix=WORK_PREFIX)

    def _write_snapshot(self, dataset: str, target: pathlib.Path) -> None:
        """Writes the snapshot file `target` whole (durably, with fsync) or not at all: on any
        failure its unfinished file is removed. Run with the index's writes held."""
        partial = target.with_suffix(".tar.tmp")
        try:
            with self._work_folder() as work:
                work = pathlib.Path(work)
                self.records.export_dataset(dataset, work / "records.sqlite")
                manifest = {"dataset": dataset, "records_sha256": _file_sha256(work / "records.sqlite"),
                            "collections": []}
                for index, info in enumerate(self._dataset_collections(dataset)):
                    info.healthy().export_checkpoint(work / f"collection-{index}")
                    manifest["collections"].append({"folder": f"collection-{index}", "spec": info.spec_dict()})
                (work / "manifest.json").write_text(json.dumps(manifest))
                with tarfile.open(partial, "w") as archive:
                    archive.add(work, arcname=".")
                if self.fsync:
                    durable.fsync_path(partial)
                durable.replace(partial, target, self.fsync)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    @_ordered("dataset")
    def restore(self, snapshot: str, dataset: str, fence_ttl_s: float = 0.0) -> DatasetRecord:
        """Restores a snapshot (by name, from data_dir/snapshots) as a new dataset, whole or not
        at all: a snapshot that cannot be read, or whose collections fail their checks, leaves no
        dataset behind (DATA_LOSS). With fence_ttl_s, the dataset is fenced (see `fence`) from
        its creation on."""
        check_name(dataset)
        path = self._snapshot_path(snapshot)
        if dataset in self._labels:  # before its marker, which would delete that dataset at the next start
            raise _dataset_exists(dataset)
        with self._work_folder() as work:
            work = pathlib.Path(work)
            try:
                with self._snapshot_lock, tarfile.open(path) as archive:
                    archive.extractall(work, filter="data")
                manifest = json.loads((work / "manifest.json").read_text())
                if not isinstance(manifest, dict):
                    raise ValueError("its manifest is not a JSON object")
            except Exception as exc:
                raise _restore_error(snapshot, exc) from exc
            marker = self.data_dir / RESTORING / dataset  # a crash before the end: deleted at the next start
            marker.parent.mkdir(exist_ok=True)
            durable.write_file(marker, snapshot, self.fsync)
            self.create_dataset(dataset, f"restored from {snapshot}", logged=False)
            try:
                self.fence(dataset, fence_ttl_s)
                self._restore_contents(dataset, work, manifest)
            except Exception as exc:
                try:
                    self.delete_dataset(dataset, logged=False)
                    marker.unlink()
                except Exception:  # noqa: BLE001 - logged; the restore's own error is the one to report
                    log.exception("could not remove the partly restored dataset %s", dataset)
                raise _restore_error(snapshot, exc) from exc
            marker.unlink()
            if self.fsync:
                durable.fsync_path(marker.parent)
        self._record("copy_dataset", dataset)  # followers copy it whole
        return self.dataset(dataset)

    def _restore_contents(self, dataset: str, work: pathlib.Path, manifest: dict) -> None:
        """Fills a restored dataset from an extracted snapshot; raises when any of it fails."""
        expected = manifest.get("records_sha256")  # snapshots from before it have none
        if expected is not None and _file_sha256(work / "records.sqlite") != expected:
            raise ValueError("its items (records.sqlite) fail their checksum")
        self.records.import_dataset(work / "records.sqlite", manifest["dataset"], dataset)
        self._labels[dataset] = self.records.labels(dataset)
        for entry in manifest["collections"]:
            if not re.fullmatch(r"collection-\d+", str(entry["folder"])):
                raise ValueError(f"its manifest names a folder {shown(entry['folder'])} outside the snapshot")
            key = _restored_key(entry["spec"])
            if (dataset, key.name) in self._collections:
                raise ValueError(f"its manifest lists collection {shown(key.name)} twice")
            relative = pathlib.Path("collections") / uuid.uuid4().hex
            try:  # the copy outside the index's locks: other datasets' calls go on meanwhile
                install_checkpoint(work / entry["folder"], self.data_dir / relative, self.fsync)
            except BaseException:
                shutil.rmtree(self.data_dir / relative, ignore_errors=True)
                raise
            with self._guard.read(), self._meta:
                self.records.create_collection(dataset, key.name, entry["spec"], str(relative))
                info = self._open_collection(dataset, entry["spec"], relative)
            if info.damage:
                raise ValueError(f"its collection {key.name} fails its checks")

    @_ordered("dataset")
    def put_attachment(self, dataset: str, collection: str, key: str, version: int, data: bytes,
                       collection_id: str = "") -> None:
        """Stores a result derived from a collection, replacing one with the same key; given
        `collection_id`, only while the collection is still the one of that id."""
        info = self.collection(dataset, collection)
        info.healthy()
        self._check_fence(dataset)
        if not key:
            raise InvalidArgument("an attachment needs a key")
        if collection_id and collection_id != info.id:
            raise Aborted(f"collection {shown(collection)} of dataset {shown(dataset)} was deleted and created again "
                          f"since its version was read: the result {shown(key)} was computed from the old one and is "
                          "not stored; compute it again", reason="COLLECTION_REPLACED", resource_type="collection",
                          resource_name=collection, metadata={"dataset": dataset, "collection": collection})
        self.records.put_attachment(dataset, collection, key, version, data)
        self._record("put_attachment", dataset, collection=collection, key=key, version=version, data=data)

    def attachment(self, dataset: str, collection: str, key: str) -> tuple[CollectionInfo, tuple[int, bytes] | None]:
        """A healthy collection and its result stored under `key` ((version, data), or None),
        read together: when the collection is deleted (or replaced) while the result is read,
        both are read again, so a result deleted with it never reads as one not computed yet."""
        while True:
            info = self.collection(dataset, collection)
            info.healthy()
            stored = self.records.attachment(dataset, collection, key)
            if self.collection(dataset, collection) is info:  # a delete takes it out first: _drop_collection
                return info, stored

    # ---- replication -------------------------------------------------------------------

    def copy_dataset(self, dataset: str, target: pathlib.Path) -> DatasetCopy:
        """A consistent copy of a dataset for a follower: its items (without images; a snapshot
        read afterwards, page by page), attachments and each healthy collection's files
        (hard-linked or copied into folders under `target`), with the change log position it
        holds every write up to. Writes to the dataset wait while the files are linked and the
        snapshot taken, not while it is read."""
        self._require_dataset(dataset)
        for info in self._dataset_collections(dataset):
            if info.vectors is not None and info.vectors.log_bytes() > COPY_CHECKPOINT_BYTES:
                info.vectors.checkpoint()  # else every follower re-inserts the whole log into its graph
        with self._order_lock(dataset):
            self._require_dataset(dataset)
            collections, damaged, copied = [], [], set()
            for number, info in enumerate(self.collections(dataset)):
                if info.vectors is None:
                    log.warning("collection %s of %s is damaged: a follower gets it as damaged", info.key.name, dataset)
                    damaged.append((info.spec_dict(), info.damage))
                    continue
                folder = target / f"collection-{number}"
                collections.append((info.spec_dict(), folder, info.vectors.link_files(folder)))
                copied.add(info.key.name)
            items = self.records.item_snapshot(dataset)
            attachments = [a for a in self.records.attachments(dataset) if a[0] in copied]  # a[0]: its collection
            try:
                return DatasetCopy(self.records.dataset(dataset), self.changes.last if self.changes else 0, items,
                                   attachments, collections, damaged)
            except BaseException:
                items.close()
                raise

    def install_collection(self, dataset: str, spec: dict, files: pathlib.Path,
                           sha256: dict[str, str] | None = None) -> CollectionInfo:
        """Makes `files` (a folder on the data dir's file system holding a collection's files, as
        copy_dataset gave them) a collection of the dataset, replacing one of the same name;
        opening it verifies the files (against their checkpoint's manifest: with the SHA-256 in
        `sha256`, path relative to the folder -> hex, for those the caller hashed as it wrote them)."""
        self._require_dataset(dataset)
        key = CollectionKey(**{k: spec[k] for k in ("model", "layer", "pooling", "metric", "minkowski_p")})
        with self._guard.read(), self._meta:
            if (dataset, key.name) in self._collections:
                self._drop_collection(dataset, key.name)
            relative = pathlib.Path("collections") / uuid.uuid4().hex
            durable.replace(files, self.data_dir / relative, self.fsync)
            self.records.create_collection(dataset, key.name, spec, str(relative))
            return self._open_collection(dataset, spec, relative, sha256)

    def seal(self, timeout_s: float) -> bool:
        """The first step of a clean stop: refuses every write from now on (UNAVAILABLE
        INDEX_STOPPING) and waits up to `timeout_s` for those under way. When they all finished,
        seals the change log (its followers' streams end once they have sent all of it; close
        then keeps where it ended) and returns True."""
        with self._meta:
            self._sealed = True
            locks = list(self._order_locks.values())
        deadline = time.monotonic() + timeout_s
        for lock in locks:
            if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                log.warning("writes still under way after %.0fs: followers copy everything after the restart",
                            timeout_s)
                return False
            lock.release()
        if self.changes is not None:
            self.changes.seal()
        return True

    def close(self) -> None:
        """Checkpoints everything and releases the data dir; after `seal`, keeps where the change
        log ended, unless a write failed part-way meanwhile (see _refused)."""
        with self._meta:
            infos = [info for info in self._collections.values() if info.vectors is not None]
        for info in infos:
            info.vectors.close()
        self.records.close()
        if self.changes is not None and self.changes.sealed and self._failed_write:
            log.warning("a write failed part-way in this run (%s): what it changed may be missing from the change "
                        "log, so where the log ended is not kept and followers copy everything after the restart",
                        self._failed_write)
        elif self.changes is not None and self.changes.sealed:
            keep_log_end(self.data_dir, self.changes, self.fsync)
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
