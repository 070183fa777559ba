"""A read-only follower (`convsearch-index --follow PRIMARY`): keeps this index a copy of a
primary's datasets, items (without images), collections and attachments by reading the
primary's Replicate stream (see replication.py), and serves the read RPCs.

Each change is applied through the engine's own write paths, so it is as durable here as at the
primary; then the position reached is written to DATA_DIR/follower.json (atomically, after the
writes it stands for, without an fsync of its own: after a power cut it may be older than the
writes, never newer). A restart resumes from there: the primary sends what came after, or, when
that is no longer in its change log (or the primary restarted: another epoch; or the file is
unreadable), whole copies. Changes are idempotent, so applying again what a crash left
unrecorded changes nothing (a change finding its item, collection or dataset already there or
gone is such a repeat). Any other failure to apply a change is never skipped: the follower
reconnects and tries it again, and when a collection here is damaged, or the same change fails
APPLY_ATTEMPTS times, it copies everything again, as it does when it starts with a damaged
collection. A collection whose copy arrives damaged (its files at the primary fail their checks)
is kept as damaged and answers DATA_LOSS (the gateway then reads from the primary); changes to it
are skipped, never copied again and again.

A dataset copy goes in fast without giving up a check: its items go straight into SQLite (the
dataset is new, so there is nothing to replace) on a thread of their own while the files
arrive; each file is hashed as it is written and flushed to disk on the way, then fsync'd, and
its checkpoint is verified against its manifest with those digests before hnswlib loads it; the
items are committed before the position is recorded.

While the primary is away the follower keeps serving what it has and reconnects with backoff;
a stream that resumes (same epoch, position still in the log) keeps it serving throughout. A
whole copy, the first or a later one (the primary restarted, or this follower fell behind its
log), replaces every dataset, so from its start until it is done the follower answers no reads:
its health is NOT_SERVING and reads answer UNAVAILABLE (FOLLOWER_SYNCING), so callers read from
the primary; it serves again once the copy is complete.
Writes and image reads answer FAILED_PRECONDITION naming the primary; a read asking for a
`min_version` this follower has not applied waits up to --max-lag-wait, then answers UNAVAILABLE
(FOLLOWER_BEHIND) so the caller retries on the primary.
"""

import contextlib
import functools
import hashlib
import json
import logging
import os
import pathlib
import queue
import shutil
import socket
import threading
import time
from collections.abc import Callable

import grpc
import prometheus_client as prom

from convsearch.channels import create_channel
from convsearch.errors import (
    AlreadyExists,
    ConvsearchError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    shown,
)
from convsearch.grpc_errors import abort
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.observability import behavior_of, with_behavior
from convsearch.tensors import from_tensor
from convsearch_index import durable
from convsearch_index.engine import CollectionKey, Index
from convsearch_index.records import ItemRecord
from convsearch_index.replication import PROTOCOL, spec_dict, spec_name

log = logging.getLogger("convsearch.index.follower")
STATE_FILE = "follower.json"
BACKOFF_S = (0.1, 5.0)  # first and longest wait between attempts to reach the primary
APPLY_ATTEMPTS = 3  # a change failing this many times in a row makes the follower copy everything again
# RPCs a follower refuses: writes, and what holds or moves images and snapshots (they stay on the primary).
REFUSED = frozenset({"CreateDataset", "DeleteDataset", "PutItems", "PutItemsStream", "DeleteItems",
                     "CreateCollection", "DeleteCollection", "UpsertVectors", "PutAttachment", "SnapshotDataset",
                     "RestoreDataset", "ListSnapshots", "DeleteSnapshot", "ReadSnapshot", "WriteSnapshot",
                     "FenceDataset", "Replicate"})
IMAGE_READS = frozenset({"GetItems", "ScanItems"})  # refused with include_images


class _Background:
    """Work of a dataset copy done on a thread of its own, in order, while the stream goes on:
    storing item pages (SQLite) and flushing the files received so far to disk. At most a few
    jobs wait; beyond that the stream waits. The first failure is raised to the follower's
    thread (by `put` or `finish`), which then gives the copy up (the jobs after it still run:
    each closes what it holds)."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="follower-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - raised in the follower's thread
                self._error = self._error or exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def finish(self) -> None:
        """Waits until every job is done; raises what failed."""
        self.close()
        self._raise()

    def close(self) -> None:
        """Waits for the jobs given (a failure is not raised)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def _flush(descriptor: int) -> None:
    try:
        os.fdatasync(descriptor)
    finally:
        os.close(descriptor)


class _IncomingFile:
    """A file of a collection being copied, written as its chunks arrive and hashed on the way
    (SHA-256), so verifying it against its checkpoint's manifest needs no second read. With
    `background`, what is written is flushed to disk every FLUSH_BYTES meanwhile, so the
    copy's final fsync finds little left to write."""

    FLUSH_BYTES = 32 << 20

    def __init__(self, path: pathlib.Path, size: int, background: _Background | None):
        self.path, self.size, self.received = path, size, 0
        self.sha256 = hashlib.sha256()
        self._background, self._unflushed = background, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close()

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.size:
            raise ValueError(f"the primary sent more than the {self.size} bytes it announced for {self.path.name}")
        self._handle.write(data)
        self.sha256.update(data)
        self.received += len(data)
        self._unflushed += len(data)
        if self._background is not None and (self._unflushed >= self.FLUSH_BYTES or self.received == self.size):
            self._unflushed = 0
            self._handle.flush()
            descriptor = os.dup(self._handle.fileno())  # the job's own: this one may be closed first
            try:
                self._background.put(functools.partial(_flush, descriptor))
            except BaseException:
                os.close(descriptor)
                raise

    def close(self) -> None:
        self._handle.close()


class _Copy:
    """A dataset copy being received: its items (stored as they come, in the background) and
    each collection's files (written and hashed as they come)."""

    def __init__(self, message: pb.DatasetCopy, incoming: pathlib.Path, index: Index):
        self.dataset = message.dataset.name
        self.position = message.position
        self.items = message.dataset.item_count
        self.attachments: list[pb.PutAttachmentRequest] = []  # as they come
        self.started = time.monotonic()
        self.collections: dict[str, tuple[dict, pathlib.Path]] = {}
        self.files: dict[tuple[str, str], _IncomingFile] = {}  # (collection, path) -> its file
        self.damage_at_primary: dict[str, str] = {}  # collection -> what is wrong with it at the primary
        self._index = index
        self._background = _Background()
        try:
            for number, collection in enumerate(message.collections):
                spec = spec_dict(collection.spec)
                folder = incoming / f"{self.dataset}-{number}"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                name = spec_name(spec)
                if collection.damage:  # no files: a pointer to no checkpoint, so it opens as damaged here too
                    (folder / "CURRENT").write_text(f"damaged at the primary: {collection.damage}")
                    self.damage_at_primary[name] = collection.damage
                for copied in collection.files:  # every file, the empty ones too
                    path = (folder / copied.path).resolve()
                    if not path.is_relative_to(folder.resolve()):
                        raise ValueError(f"the primary sent a file path outside the collection: {copied.path!r}")
                    self.files[name, copied.path] = _IncomingFile(path, copied.size_bytes,
                                                                  self._background if index.fsync else None)
                self.collections[name] = (spec, folder)
        except BaseException:
            self.close()
            raise

    def put_items(self, items) -> None:
        self._background.put(functools.partial(self._index.put_copied_items, self.dataset,
                                               [_copied_row(item) for item in items]))

    def write(self, chunk: pb.FileChunk) -> None:
        incoming = self.files.get((chunk.collection, chunk.path))
        if incoming is None:
            raise ValueError(f"the primary sent a chunk of {chunk.collection}/{chunk.path}, which its copy of "
                             f"dataset {self.dataset} did not announce")
        incoming.write(chunk.data)

    def finish(self) -> dict[str, dict[str, str]]:
        """Waits until the items are stored and checks every file came whole; the SHA-256 of each
        collection's files (collection -> path -> hex digest)."""
        self._background.finish()
        self.close()
        digests: dict[str, dict[str, str]] = {name: {} for name in self.collections}
        for (name, path), incoming in self.files.items():
            if incoming.received != incoming.size:
                raise ValueError(f"the copy of dataset {self.dataset} ended with {incoming.received} of the "
                                 f"{incoming.size} bytes of {name}/{path}")
            digests[name][path] = incoming.sha256.hexdigest()
        return digests

    def close(self) -> None:
        """Waits for the work in the background and closes the files."""
        self._background.close()
        for incoming in self.files.values():
            incoming.close()


class _Diverged(Exception):
    """A change this follower could not apply, at `position`; `damaged`: a collection here is."""

    def __init__(self, message: str, position: int, damaged: bool):
        super().__init__(message)
        self.position, self.damaged = position, damaged


class Follower:
    """Follows `primary` into `index` on a thread of its own (start, stop); `admit` gates reads."""

    def __init__(self, index: Index, primary: str, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str = "", max_message_mb: int = 64, max_lag_wait_s: float = 2.0,
                 registry: prom.CollectorRegistry | None = None, on_ready: Callable[[], None] = lambda: None,
                 on_syncing: Callable[[], None] = lambda: None):
        self.index = index
        self.primary = primary
        self.max_lag_wait_s = max_lag_wait_s
        self._channel_args = (primary, max_message_mb, credentials, server_name)
        self._on_ready = on_ready  # it holds a whole copy: SERVING
        self._on_syncing = on_syncing  # a whole copy starts again: NOT_SERVING until on_ready
        self._state_path = index.data_dir / STATE_FILE
        self._incoming = index.data_dir / "replication" / "incoming"  # emptied at each start (server.py)
        state = read_state(self._state_path)
        self.epoch: str = state.get("epoch", "")
        self.position: int = state.get("position", 0)
        self.ready = bool(self.epoch)  # holds a consistent copy (maybe old) to serve
        # A dataset whose copy in the stream is under way, or was cut short: not read here until
        # a later position is recorded (its copy sent again, or its deletion).
        self._copying: str = state.get("copying", "")
        damaged = [f"{info.dataset}/{info.key.name}" for info in index.all_collections() if info.damage]
        if damaged:
            log.error("collections damaged here (%s): copying everything from the primary again", ", ".join(damaged))
        self._copy_again = bool(damaged)  # the next stream asks for whole copies, whatever its position
        self._failed_at, self._failures = 0, 0  # the change that failed last, and how often in a row
        self._damaged_copies: set[tuple[str, str]] = set()  # (dataset, collection) that arrived damaged
        self._stream_epoch = ""
        self._skip: dict[str, int] = {}  # dataset -> position its copy holds every change up to
        self._copied: set[str] = set()  # datasets copied since the last full-sync start
        self._copied_items = 0  # their items
        self._sync_started, self._restarted_sync = 0.0, False  # when the whole copy under way was asked for
        self._copy: _Copy | None = None
        self._applied = threading.Condition()
        self._stopping = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name="follower", daemon=True)
        registry = registry or prom.CollectorRegistry()
        self._behind = prom.Gauge("convsearch_index_follower_behind_changes",
                                  "Changes the primary has applied that this follower has not (at the last message)",
                                  registry=registry)
        self._version = prom.Gauge("convsearch_index_follower_applied_version",
                                   "The primary's change log position this follower has applied", registry=registry)
        self._full_syncs = prom.Counter("convsearch_index_follower_full_syncs",
                                        "Whole copies of the primary started (fresh, behind its log, or it restarted)",
                                        registry=registry)
        self._full_sync_seconds = prom.Gauge(
            "convsearch_index_follower_full_sync_seconds",
            "Seconds the latest whole copy of the primary took: from asking for it (opening the stream, or the "
            "primary starting it again) to applying all of it", registry=registry)
        self._connected = prom.Gauge("convsearch_index_follower_connected",
                                     "1 while the stream from the primary is open", registry=registry)
        self._diverged = prom.Counter("convsearch_index_follower_diverged",
                                      "Changes this follower could not apply, whose failure made it copy everything "
                                      "again", registry=registry)
        self._damaged_copy = prom.Counter("convsearch_index_follower_damaged_copies",
                                          "Collections whose copy from the primary failed its checks (rebuild them "
                                          "at the primary)", registry=registry)
        self._version.set(self.position)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(10)

    def _run(self) -> None:
        delay = BACKOFF_S[0]
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._follow()
            except _Diverged as exc:
                self._failures = self._failures + 1 if exc.position == self._failed_at else 1
                self._failed_at = exc.position
                if exc.damaged or self._failures >= APPLY_ATTEMPTS:
                    log.error("%s; copying everything from the primary again", exc)
                    self._diverged.inc()
                    self._copy_again = True
                else:
                    log.warning("%s; trying it again (attempt %d of %d before copying everything)", exc,
                                self._failures + 1, APPLY_ATTEMPTS)
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    return
                log.warning("lost the primary %s (%s: %s); serving what is applied (version %d), reconnecting in "
                            "%.1fs", self.primary, exc.code().name, exc.details(), self.position, delay)
            except Exception:  # noqa: BLE001 - logged; the next attempt starts from the recorded position
                log.exception("following %s failed; reconnecting in %.1fs", self.primary, delay)
            finally:
                self._connected.set(0)
                if self._copy is not None:
                    self._copy.close()  # its dataset is copied again from the start
                self._copy = None
            if time.monotonic() - started > 2 * BACKOFF_S[1]:
                delay = BACKOFF_S[0]  # it had worked for a while: retry soon
            self._stopping.wait(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    def _follow(self) -> None:
        primary, max_message_mb, credentials, server_name = self._channel_args
        self._sync_started, self._restarted_sync = time.monotonic(), False  # a whole copy is timed from here
        with create_channel(primary, max_message_mb, credentials, server_name) as channel:
            self._call = index_pb2_grpc.IndexServiceStub(channel).Replicate(pb.ReplicateRequest(
                epoch="" if self._copy_again else self.epoch, position=self.position,
                follower=socket.gethostname(), protocol=PROTOCOL))
            if self._stopping.is_set():
                self._call.cancel()
            for message in self._call:
                self._connected.set(1)
                self._handle(message)

    # ---- the stream --------------------------------------------------------------------

    def _handle(self, message: pb.ReplicateResponse) -> None:
        event = message.WhichOneof("event")
        if event == "start":
            self._start(message.start)
        elif event == "dataset_copy":
            self._begin_copy(message.dataset_copy)
        elif event == "items":
            self._copy.put_items(message.items.items)
        elif event == "file_chunk":
            self._copy.write(message.file_chunk)
        elif event == "attachment":
            self._copy.attachments.append(message.attachment)
        elif event == "dataset_copy_end":
            self._end_copy()
        elif event == "sync_done":
            self._sync_done(message.sync_done.position)
        elif event == "changes":
            self._apply(message.changes)

    def _start(self, start: pb.ReplicationStart) -> None:
        if start.protocol != PROTOCOL:
            raise FailedPrecondition(f"the primary {self.primary} speaks replication protocol {start.protocol}, this "
                                     f"follower {PROTOCOL}: run the same release on both")
        self._stream_epoch = start.epoch
        if not start.full_sync:
            log.info("following %s: resumed after version %d (epoch %s)", self.primary, self.position, start.epoch)
            if start.epoch != self.epoch:  # the primary restarted cleanly, its log continued
                self._advance(start.epoch, self.position)
            return
        log.info("following %s: copying everything (epoch %s, from version %d)", self.primary, start.epoch,
                 start.position)
        # The copies replace every dataset: no read is answered until they are complete (not
        # ready; no min_version passes), and a reconnect or restart must copy everything again.
        with self._applied:
            was_ready, self.ready = self.ready, False
            self.epoch, self.position = "", 0
        self._version.set(0)
        if was_ready:
            self._on_syncing()
        self._state_path.unlink(missing_ok=True)
        if self.index.fsync:
            durable.fsync_path(self._state_path.parent)  # never back after a power cut, over half-replaced data
        self._copy_again = False
        self._damaged_copies = set()
        self._full_syncs.inc()
        if self._restarted_sync:  # the primary copies again mid-stream: timed from here
            self._sync_started = time.monotonic()
        self._restarted_sync = True
        self._skip, self._copied, self._copied_items = {}, set(), 0

    def _begin_copy(self, message: pb.DatasetCopy) -> None:
        if self._copy is not None:
            self._copy.close()
            raise ValueError(f"the primary began a copy of {message.dataset.name} before ending that of "
                             f"{self._copy.dataset}")
        self._incoming.mkdir(parents=True, exist_ok=True)
        dataset = message.dataset
        if self.ready:  # in the stream (restored at the primary): --promote refuses a data dir it was cut short in
            self._record_state(self.epoch, self.position, copying=dataset.name)
        with contextlib.suppress(NotFound):
            self.index.delete_dataset(dataset.name)
        self.index.create_dataset(dataset.name, dataset.description, dataset.create_time.ToNanoseconds() / 1e9)
        self._copy = _Copy(message, self._incoming, self.index)

    def _end_copy(self) -> None:
        copy = self._copy
        digests = copy.finish()  # the items are durable, every file came whole
        self._copy = None
        for name, (spec, folder) in copy.collections.items():
            if self.index.fsync:
                durable.fsync_tree(folder)
            # Verified against the checkpoint's manifest with the digests taken as the bytes came.
            installed = self.index.install_collection(copy.dataset, spec, folder, sha256=digests[name])
            if name in copy.damage_at_primary:
                log.error("collection %s of %s is damaged at the primary %s (%s): so it is here, answering "
                          "DATA_LOSS, until it is rebuilt there", name, copy.dataset, self.primary,
                          copy.damage_at_primary[name])
                self._damaged_copies.add((copy.dataset, name))
            elif installed.damage:
                log.error("the copy of %s from the primary %s fails its checks: %s. It answers DATA_LOSS here "
                          "(reads go to the primary) and takes none of the primary's changes until it is "
                          "rebuilt there", name, self.primary, installed.damage)
                self._damaged_copies.add((copy.dataset, name))
                self._damaged_copy.inc()
        for attachment in copy.attachments:
            if (copy.dataset, attachment.collection) in self._damaged_copies:
                continue
            self.index.put_attachment(copy.dataset, attachment.collection, attachment.key, attachment.version,
                                      attachment.data)
        self._skip[copy.dataset] = copy.position
        self._copied.add(copy.dataset)
        self._copied_items += copy.items
        log.info("copied dataset %s (%d items, %d collections) at version %d in %.2fs", copy.dataset, copy.items,
                 len(copy.collections), copy.position, time.monotonic() - copy.started)

    def _sync_done(self, position: int) -> None:
        for dataset in set(self.index.records.dataset_names()) - self._copied:
            self.index.delete_dataset(dataset)  # gone at the primary
        self._advance(self._stream_epoch, position)
        seconds = time.monotonic() - self._sync_started
        self._full_sync_seconds.set(seconds)
        log.info("following %s: caught up with a whole copy at version %d (%d datasets, %d items) in %.2fs from "
                 "asking for it", self.primary, position, len(self._copied), self._copied_items, seconds)
        if not self.ready:
            self.ready = True
            self._on_ready()

    def _apply(self, batch: pb.ChangeBatch) -> None:
        applied = None
        for change in batch.changes:
            if change.position <= self.position:
                continue  # sent again after a reconnect
            dataset = self._dataset_of(change)
            if change.position > self._skip.get(dataset, 0):
                try:
                    self._apply_change(change)
                except DataLoss as exc:
                    write = change.WhichOneof("write")
                    if (dataset, getattr(getattr(change, write), "collection", "")) not in self._damaged_copies:
                        raise _Diverged(f"change {change.position} ({write}) of dataset {dataset} could not be "
                                        f"applied: {exc}", change.position, damaged=True) from exc
                    log.warning("change %d (%s) of dataset %s skipped: its collection arrived damaged from the "
                                "primary", change.position, write, dataset)
                except Exception as exc:  # noqa: BLE001 - raised as what it means for this follower
                    raise _Diverged(f"change {change.position} ({change.WhichOneof('write')}) of dataset "
                                    f"{dataset} could not be applied: {type(exc).__name__}: {exc}", change.position,
                                    damaged=False) from exc
            applied = change.position
            self._reach(self._stream_epoch, applied)  # readable now, not after the rest of the batch
        if applied is not None:
            self._advance(self._stream_epoch, applied)
        self._behind.set(max(0, batch.primary_position - self.position))

    @staticmethod
    def _dataset_of(change: pb.Change) -> str:
        write = change.WhichOneof("write")
        if write is None:
            return ""
        message = getattr(change, write)
        return message.name if write in ("create_dataset", "delete_dataset") else message.dataset

    def _apply_change(self, change: pb.Change) -> None:
        write = change.WhichOneof("write")
        if write is None:
            return  # a dataset copied whole, sent before it
        m = getattr(change, write)
        index = self.index
        try:
            if write == "create_dataset":
                index.create_dataset(m.name, m.description, m.create_time.ToNanoseconds() / 1e9)
            elif write == "delete_dataset":
                index.delete_dataset(m.name)
            elif write == "put_items":
                index.put_items(m.dataset, [_item(item) for item in m.items], keep_digests=True)
            elif write == "delete_items":
                index.delete_items(m.dataset, list(m.ids))
            elif write == "create_collection":
                spec = spec_dict(m.spec)
                index.create_collection(m.dataset, CollectionKey(*(spec[k] for k in (
                    "model", "layer", "pooling", "metric", "minkowski_p"))), spec["dimension"], spec["m"],
                    spec["ef_construction"], spec["ef"], spec["weights"], spec["id"])
            elif write == "delete_collection":
                index.delete_collection(m.dataset, m.collection)
            elif write == "upsert_vectors":
                # With the digests of the images the vectors were made from: a replay after a crash
                # leaves out those of an image replaced since.
                index.upsert_vectors(m.dataset, m.collection, list(m.ids), from_tensor(m.vectors, "vectors"),
                                     list(m.image_digests))
            elif write == "put_attachment":
                index.put_attachment(m.dataset, m.collection, m.key, m.version, m.data)
        except (NotFound, AlreadyExists, InvalidArgument) as exc:
            # Applying again what this follower already holds (after a crash, or a copy newer
            # than the change) may find it done or gone; the changes after it set it right.
            log.debug("change %d (%s) skipped: %s", change.position, write, exc)

    def _advance(self, epoch: str, position: int) -> None:
        """Records the position reached, after the writes it stands for are durable."""
        self._record_state(epoch, position)
        self._reach(epoch, position)

    def _record_state(self, epoch: str, position: int, copying: str = "") -> None:
        """Writes the state file: the position, and the dataset whose copy is under way, if any."""
        state = {"epoch": epoch, "position": position, "primary": self.primary}
        durable.write_file(self._state_path, json.dumps({**state, "copying": copying} if copying else state),
                           fsync=False)
        self._copying = copying

    def _reach(self, epoch: str, position: int) -> None:
        """Lets reads waiting for `position` go on (its writes are applied and durable); the
        position file may be older than this, never newer (a restart applies changes again)."""
        with self._applied:
            self.epoch, self.position = epoch, position
            self._applied.notify_all()
        self._version.set(position)

    # ---- reads -------------------------------------------------------------------------

    def read_only(self, method: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"this index follows {self.primary} and is read-only; send writes (and image and snapshot reads) "
            f"there ({method} refused)", reason="READ_ONLY_FOLLOWER", metadata={"primary": self.primary})

    def admit(self, method: str, request, remaining_s: float | None = None) -> None:
        """Raises unless this follower may answer the read: images are at the primary; a
        `min_version` not applied within max_lag_wait_s (or half the call's `remaining_s`, so the
        caller has time left for the primary) is UNAVAILABLE (read from the primary)."""
        if method in IMAGE_READS and request.include_images:
            raise self.read_only(method)
        if not self.ready:
            raise Unavailable(f"this index is copying its primary {self.primary} whole; retry, or read from the "
                              "primary", reason="FOLLOWER_SYNCING", retry_after_s=1.0,
                              metadata={"primary": self.primary})
        copying = self._copying
        if copying and copying in (getattr(request, "dataset", None), getattr(request, "name", None)):
            raise Unavailable(f"dataset {shown(copying)} is being copied from the primary {self.primary} (it was "
                              "restored there), and is not whole here yet; read it from the primary",
                              reason="FOLLOWER_SYNCING", retry_after_s=1.0,
                              metadata={"primary": self.primary, "dataset": copying})
        wanted = getattr(request, "min_version", 0)
        if wanted <= self.position:
            return
        wait_s = self.max_lag_wait_s if remaining_s is None else min(self.max_lag_wait_s, remaining_s / 2)
        with self._applied:
            if self._applied.wait_for(lambda: self.position >= wanted, wait_s):
                return
            applied = self.position
        raise Unavailable(f"this follower has applied version {applied}, older than min_version {wanted}, after "
                          f"waiting {wait_s:.3g}s; read from the primary {self.primary}",
                          reason="FOLLOWER_BEHIND", retry_after_s=0.1,
                          metadata={"primary": self.primary, "applied_version": str(applied),
                                    "min_version": str(wanted)})


def read_state(path: pathlib.Path) -> dict:
    """The recorded position ({} when there is none, or none readable: everything is copied again)."""
    try:
        state = json.loads(path.read_text())
        int(state["position"]), str(state["epoch"])
        return state
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s): copying everything from the primary again", path, exc)
        return {}


def _item(message: pb.Item) -> ItemRecord:
    return ItemRecord(message.id, message.label, dict(message.metadata), b"", message.image_digest,
                      message.image_size)


def _copied_row(message: pb.Item) -> tuple[str, str, str, str, int]:
    """An item of a dataset copy as Index.put_copied_items takes it (metadata as Records stores it)."""
    metadata = message.metadata
    return (message.id, message.label, json.dumps(dict(metadata), sort_keys=True) if metadata else "{}",
            message.image_digest, message.image_size)


class FollowerGate(grpc.ServerInterceptor):
    """Puts the follower's rules in front of the IndexService (`service` is its full name):
    refused RPCs answer FAILED_PRECONDITION, reads pass `Follower.admit` first."""

    def __init__(self, follower: Follower, service: str):
        self.follower = follower
        self._prefix = f"/{service}/"
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # a method's handler never changes

    def intercept_service(self, continuation, handler_call_details):
        full_name = handler_call_details.method
        gated = self._handlers.get(full_name)
        if gated is None:
            handler = continuation(handler_call_details)
            if handler is None or not full_name.startswith(self._prefix):
                return handler
            gated = self._handlers[full_name] = self._gated(handler, full_name[len(self._prefix):])
        return gated

    def _gated(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior, follower = behavior_of(handler), self.follower

        def refused(request, context):
            abort(context, follower.read_only(method))

        def admitted(request, context):
            try:
                follower.admit(method, request, context.time_remaining())
            except ConvsearchError as exc:
                abort(context, exc)
            return behavior(request, context)

        return with_behavior(handler, refused if method in REFUSED else admitted)
