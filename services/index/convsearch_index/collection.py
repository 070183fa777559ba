"""One vector collection: its vectors, an hnswlib graph (for metrics hnswlib serves), its
write-ahead log and checkpoints. All of hnswlib's rules live here:

- add_items never overlaps knn_query (reader-writer lock); searches run in parallel;
- labels are ints: each vector gets a slot, never given to another, so deleted items never come
  back; a graph node is never changed: a re-upserted id gets a new slot and its old node is
  marked deleted (hnswlib's in-place update, or reuse of a deleted node, costs ~7x an insert),
  so an id has one live node; searches skip deleted nodes, and compaction drops them;
- capacity grows (by a quarter) before it runs out;
- ef is not saved with the graph: it is kept in the checkpoint's metadata and set after load;
- knn_query raises when fewer than k results survive: k is capped and exact search answers;
- no file reaches hnswlib before its checksum is verified.

Compaction (once deleted slots are COMPACT_SHARE of all; the service checks every second, and
before each checkpoint) goes on beside reads and writes: the live vectors are copied out, a new
graph is built from them without a lock, the writes applied meanwhile are replayed into it, and
it replaces the old one under a brief lock.

The graph is the only copy of the vectors of an approximate collection (a cosine one also keeps
each vector's norm, since hnswlib stores them normalised); the exact-only metrics keep a numpy
array. Files that fail their checks raise DataLoss: the collection is refused whole, its files
are left as they are.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import threading
import time
from collections.abc import Callable, Sequence

import hnswlib
import numpy as np

from convsearch.errors import DataLoss, InvalidArgument, ResourceExhausted, Unavailable
from convsearch.rwlock import RWLock
from convsearch_index import durable, wal
from convsearch_index.distances import HNSW_SPACES, exact_knn, from_hnsw

log = logging.getLogger("convsearch.index")
_INITIAL_CAPACITY = 1024
_GROWTH = 1.25
CHECKPOINT_FORMAT = 2
# A collection is rewritten without its deleted slots once they are this share of all.
COMPACT_SHARE = 0.3
# Compaction replays the writes made while it built its graph in rounds, outside the locks, until
# one round holds at most this many batches; that last round is replayed with writes held.
_SWAP_BATCHES = 2
_REPLAY_ROUNDS = 10
_COPY_CHUNK = 256  # rows compaction copies out of a graph per hold of the read lock
_ID_MAP_BYTES = 120  # estimated bytes per slot of the Python id <-> slot maps
# Largest norm of a vector or query: squared distances and dot products stay within float32.
MAX_NORM = 1e18


@dataclasses.dataclass(frozen=True)
class VectorSpec:
    """What a collection's vectors are and how they are searched."""

    dimension: int
    metric: str = "cosine"
    minkowski_p: float = 2.0
    m: int = 16
    ef_construction: int = 200
    ef: int = 64

    @property
    def approximate(self) -> bool:
        return self.metric in HNSW_SPACES


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _norms(rows: np.ndarray) -> np.ndarray:
    """Each row's euclidean norm, summed in float64 (in float32 the squares overflow, or vanish)."""
    return np.linalg.norm(rows.astype(np.float64), axis=1)


def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    """`array` with at least `needed` rows (a quarter more than needed when it must grow)."""
    if needed <= len(array):
        return array
    grown = np.zeros((max(needed, int(len(array) * _GROWTH), _INITIAL_CAPACITY), *array.shape[1:]), array.dtype)
    grown[:len(array)] = array
    return grown


@dataclasses.dataclass(frozen=True)
class Timings:
    """Told the seconds each write-ahead log append and each checkpoint took (the service's metrics)."""

    log_append: Callable[[float], None] = lambda seconds: None
    checkpoint: Callable[[float], None] = lambda seconds: None


@dataclasses.dataclass
class _State:
    """Everything a search reads: swapped whole by compaction."""

    ids: list  # item id per slot, None where deleted
    slot: dict  # item id -> slot
    alive: np.ndarray  # per slot
    graph: hnswlib.Index | None = None  # approximate metrics: the vectors and their graph
    norms: np.ndarray | None = None  # cosine: each slot's norm (the graph keeps unit vectors)
    vectors: np.ndarray | None = None  # exact-only metrics


class VectorCollection:
    """Vectors of one (dataset, model, layer, pooling, metric), durable in `directory`.

    Raises DataLoss when the files in `directory` fail their checks. `sha256` (path relative to
    `directory` -> hex digest) spares reading files again to verify them: the SHA-256 of their
    bytes as the caller wrote them (a follower hashes a copy as it arrives); still checked
    against the checkpoint's manifest, as a file read here would be.
    """

    def __init__(self, directory: pathlib.Path, spec: VectorSpec, fsync: bool = True, name: str = "",
                 timings: Timings = Timings(), sha256: dict[str, str] | None = None):
        self.directory = directory
        self.spec = spec
        self.fsync = fsync
        self.name = name or directory.name
        self.timings = timings
        self.lock = RWLock()
        self._writer = threading.Lock()  # one writer (or checkpoint) at a time
        self._checkpointing = threading.Lock()  # one checkpoint (and compaction) at a time
        self._pending: list | None = None  # writes applied while a compaction builds its graph
        directory.mkdir(parents=True, exist_ok=True)
        self._s = self._empty_state()
        self.version = 0  # applied batches since creation; replay recounts the logged ones
        log_path = directory / "wal.log"
        try:
            migrated = self._load_checkpoint(sha256 or {})
            legacy_log = wal.is_legacy(log_path)
            held = self._log_held(wal.start_version(log_path))
            if not held:
                self._replay()
        except wal.CorruptLog as exc:
            raise DataLoss(f"the write-ahead log is corrupt ({exc})") from None
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise DataLoss(f"the checkpoint cannot be read ({type(exc).__name__}: {exc})") from None
        self._wal: wal.WriteAheadLog | None = None
        if migrated or legacy_log:
            # Replaying the old log again over this checkpoint, after a crash, changes nothing.
            self._write_checkpoint()
            log_path.unlink(missing_ok=True)
            log.info("collection %s: rewritten in checkpoint format %d", self.name, CHECKPOINT_FORMAT)
        if held:
            log_path.unlink()
        self._wal = wal.WriteAheadLog(log_path, fsync, self.version)

    def _log_held(self, start: int | None) -> bool:
        """True when the log's batches are all in the checkpoint: a crash after the checkpoint
        was written and before the log was emptied. DataLoss when the log follows a checkpoint
        newer than the one loaded (the batches between them are gone)."""
        if start is not None and start > self.version:
            raise DataLoss(f"the write-ahead log follows version {start}, but the checkpoint holds version "
                           f"{self.version}: the batches between them are missing")
        return start is not None and start < self.version

    # ---- state -------------------------------------------------------------------------

    @property
    def _space(self) -> str:
        """hnswlib's space: cosine is inner product over the unit vectors this class makes, so
        the graph holds exactly the bits it was given."""
        return "ip" if self.spec.metric == "cosine" else HNSW_SPACES[self.spec.metric]

    def _empty_state(self) -> _State:
        state = _State([], {}, np.zeros(0, bool))
        if self.spec.approximate:
            state.graph = self._new_graph(_INITIAL_CAPACITY)
            if self.spec.metric == "cosine":
                state.norms = np.zeros(0, np.float32)
        else:
            state.vectors = np.zeros((0, self.spec.dimension), np.float32)
        return state

    def _new_graph(self, capacity: int) -> hnswlib.Index:
        graph = hnswlib.Index(space=self._space, dim=self.spec.dimension)
        graph.init_index(max_elements=capacity, M=self.spec.m, ef_construction=self.spec.ef_construction,
                         allow_replace_deleted=True)
        graph.set_ef(self.spec.ef)
        return graph

    def _rows(self, slots: np.ndarray, state: _State | None = None) -> np.ndarray:
        """The vectors of these (live) slots, as upserted."""
        s = state or self._s
        slots = np.asarray(slots, np.int64)
        if s.graph is None:
            return s.vectors[slots]
        if not len(slots):
            return np.zeros((0, self.spec.dimension), np.float32)
        rows = np.asarray(s.graph.get_items(slots), np.float32).reshape(len(slots), self.spec.dimension)
        return rows * s.norms[slots, None] if s.norms is not None else rows

    def _apply(self, op: int, ids: Sequence[str], vectors: np.ndarray | None = None) -> tuple[int, int] | int:
        """Applies one logged batch: (inserted, replaced) for an upsert, deleted for a delete."""
        self.version += 1
        if self._pending is not None:
            self._pending.append((op, ids, vectors))
        return self._into(self._s, op, ids, vectors)

    def _into(self, s: _State, op: int, ids: Sequence[str], vectors: np.ndarray | None):
        if op == wal.UPSERT:
            return self._upsert_into(s, ids, vectors)
        return self._delete_from(s, ids)

    def _upsert_into(self, s: _State, ids: Sequence[str], vectors: np.ndarray) -> tuple[int, int]:
        replaced = [item_id for item_id in ids if item_id in s.slot]
        if s.graph is not None:
            self._delete_from(s, replaced)  # a new node for each: cheaper than updating one
        fresh = [item_id for item_id in ids if item_id not in s.slot]
        needed = len(s.ids) + len(fresh)
        s.alive = _grown(s.alive, needed)
        if s.vectors is not None:
            s.vectors = _grown(s.vectors, needed)
        if s.norms is not None:
            s.norms = _grown(s.norms, needed)
        for item_id in fresh:
            s.slot[item_id] = len(s.ids)
            s.ids.append(item_id)
        slots = np.array([s.slot[item_id] for item_id in ids], np.int64)
        s.alive[slots] = True
        if s.vectors is not None:
            s.vectors[slots] = vectors
            return len(ids) - len(replaced), len(replaced)
        if s.norms is not None:
            norms = _norms(vectors)
            s.norms[slots] = norms
            vectors = vectors / np.maximum(norms, 1e-30)[:, None]
        if s.graph.get_current_count() + len(ids) > s.graph.get_max_elements():
            s.graph.resize_index(max(s.graph.get_current_count() + len(ids),
                                     int(s.graph.get_max_elements() * _GROWTH)))
        s.graph.add_items(vectors, slots)
        return len(ids) - len(replaced), len(replaced)

    @staticmethod
    def _delete_from(s: _State, ids: Sequence[str]) -> int:
        deleted = 0
        for item_id in ids:
            slot = s.slot.pop(item_id, None)
            if slot is None:
                continue
            s.ids[slot] = None
            s.alive[slot] = False
            if s.graph is not None:
                s.graph.mark_deleted(slot)
            deleted += 1
        return deleted

    # ---- durability --------------------------------------------------------------------

    def _load_checkpoint(self, known_sha256: dict[str, str]) -> bool:
        """Loads the checkpoint CURRENT names, verified; True when it was in an older format."""

        def sha256(path: pathlib.Path) -> str:
            known = known_sha256.get(path.relative_to(self.directory).as_posix())
            return known if known is not None else _sha256(path)

        current = self.directory / "CURRENT"
        if not current.exists():
            return False
        text = current.read_text()
        if not text.lstrip().startswith("{"):
            self._load_format_1(self._checkpoint_dir(text.strip()))
            return True
        pointer = json.loads(text)
        checkpoint = self._checkpoint_dir(pointer["checkpoint"])
        manifest_path = checkpoint / "MANIFEST.json"
        if sha256(manifest_path) != pointer["manifest_sha256"]:
            raise DataLoss(f"{checkpoint.name}/MANIFEST.json fails its checksum")
        for file_name, entry in json.loads(manifest_path.read_text())["files"].items():
            path = checkpoint / file_name
            if not path.is_file() or path.stat().st_size != entry["size"] or sha256(path) != entry["sha256"]:
                raise DataLoss(f"{checkpoint.name}/{file_name} is missing or fails its checksum")
        meta = json.loads((checkpoint / "meta.json").read_text())
        if meta["format"] != CHECKPOINT_FORMAT or meta["dimension"] != self.spec.dimension:
            raise DataLoss(f"{checkpoint.name} holds format {meta['format']}, dimension {meta['dimension']}; "
                           f"expected format {CHECKPOINT_FORMAT}, dimension {self.spec.dimension}")
        self.version = meta["version"]
        s = self._state_from_ids(meta["ids"])
        if self.spec.approximate:
            graph = hnswlib.Index(space=self._space, dim=self.spec.dimension)
            graph.load_index(str(checkpoint / "graph.bin"), max_elements=meta["capacity"],
                             allow_replace_deleted=True)
            graph.set_ef(meta["ef"])  # hnswlib does not save ef
            labels = set(graph.get_ids_list())
            if not labels.issuperset(s.slot.values()):
                raise DataLoss(f"{checkpoint.name}/graph.bin lacks items its metadata lists")
            s.graph = graph
            if self.spec.metric == "cosine":
                s.norms = self._array(checkpoint / "norms.npy", (len(s.ids),))
        else:
            s.vectors = self._array(checkpoint / "vectors.npy", (len(s.ids), self.spec.dimension))
        self._s = s
        return False

    def _checkpoint_dir(self, name: str) -> pathlib.Path:
        checkpoint = self.directory / name
        if not name.startswith("ckpt-") or "/" in name or not checkpoint.is_dir():
            raise DataLoss(f"CURRENT names checkpoint {name[:64]!r}, which does not exist")
        return checkpoint

    @staticmethod
    def _state_from_ids(ids: list) -> _State:
        if not isinstance(ids, list) or not all(i is None or isinstance(i, str) for i in ids):
            raise DataLoss("the checkpoint's id list is malformed")
        slot = {item_id: n for n, item_id in enumerate(ids) if item_id is not None}
        return _State(ids, slot, np.array([item_id is not None for item_id in ids], bool))

    @staticmethod
    def _array(path: pathlib.Path, shape: tuple) -> np.ndarray:
        array = np.load(path, allow_pickle=False)
        if array.shape != shape or array.dtype != np.float32:
            raise DataLoss(f"{path.parent.name}/{path.name} holds {array.dtype}{list(array.shape)}; "
                           f"expected float32{list(shape)}")
        return array

    def _load_format_1(self, checkpoint: pathlib.Path) -> None:
        """A checkpoint from before checksums: its vectors are read (the graph file is not
        trusted; the graph is rebuilt from them), then rewritten in the current format."""
        meta = json.loads((checkpoint / "meta.json").read_text())
        self.version = meta["version"]
        loaded = self._state_from_ids(meta["ids"])
        vectors = self._array(checkpoint / "vectors.npy", (len(loaded.ids), self.spec.dimension))
        live = sorted(loaded.slot.items(), key=lambda pair: pair[1])
        self._upsert_into(self._s, [item_id for item_id, _ in live], vectors[[n for _, n in live]])

    def _replay(self) -> None:
        """Applies the log's batches as one: each id's last write (a vector, or deleted) goes in
        once, so a log of many replacements costs one graph node per id, not one per write."""
        latest: dict[str, np.ndarray | None] = {}
        for payload in wal.replay(self.directory / "wal.log"):
            op, ids, vectors = wal.decode(payload, self.spec.dimension)
            latest.update(zip(ids, vectors, strict=True) if op == wal.UPSERT else dict.fromkeys(ids))
            self.version += 1
        self._delete_from(self._s, [item_id for item_id, vector in latest.items() if vector is None])
        kept = [item_id for item_id, vector in latest.items() if vector is not None]
        if kept:
            self._upsert_into(self._s, kept, np.stack([latest[item_id] for item_id in kept]))

    @staticmethod
    def _renumbered(ids: list[str]) -> _State:
        """A state of these live ids in slots 0..n-1."""
        return _State(ids, {item_id: n for n, item_id in enumerate(ids)}, np.ones(len(ids), bool))

    def _copied_rows(self, live: np.ndarray, names: list[str]) -> tuple[_State, np.ndarray]:
        """A graph's live slots (`live`, of items `names`) renumbered in their order, and their
        stored rows to build the new graph from. Copied in chunks, each under the read lock only
        (hnswlib's get_items is slow: writes would wait for all of it). A slot's row never
        changes (a replaced vector gets a new slot); one deleted meanwhile is left out, as its
        write, replayed from `_pending`, would leave it."""
        kept, rows, norms = [], [], []
        for start in range(0, len(live), _COPY_CHUNK):
            with self.lock.read():
                s = self._s
                chunk = np.flatnonzero(s.alive[live[start:start + _COPY_CHUNK]]) + start
                if len(chunk):
                    rows.append(np.asarray(s.graph.get_items(live[chunk]), np.float32))
                    if s.norms is not None:
                        norms.append(s.norms[live[chunk]])
            kept.extend(chunk.tolist())
        state = self._renumbered([names[n] for n in kept])
        if self.spec.metric == "cosine":
            state.norms = np.concatenate(norms) if norms else np.zeros(0, np.float32)
        return state, np.concatenate(rows).reshape(len(kept), self.spec.dimension) if rows \
            else np.zeros((0, self.spec.dimension), np.float32)

    def _build_rows(self, state: _State, rows: np.ndarray | None) -> None:
        """Builds `state`'s graph from the rows `_copied_rows` gave (none: no graph to build),
        on half the CPUs: it goes on beside the service's own work."""
        if rows is None:
            return
        # Room for the deleted nodes that make the next compaction due, so it comes before a resize.
        state.graph = self._new_graph(max(int(len(rows) / (1 - COMPACT_SHARE)) + 1, _INITIAL_CAPACITY))
        for start in range(0, len(rows), 4096):
            state.graph.add_items(rows[start:start + 4096], np.arange(start, min(start + 4096, len(rows))),
                                  num_threads=max(1, (os.cpu_count() or 2) // 2))

    def _compact(self) -> None:
        """Rewrites the collection without its deleted slots; reads and writes go on meanwhile."""
        started, before = time.monotonic(), len(self._s.ids)
        with self._writer:  # the slots listed here are those the writes recorded from now on start from
            with self.lock.read():
                s = self._s
                live = np.flatnonzero(s.alive[:len(s.ids)])
                names = [s.ids[n] for n in live]
                vectors = s.vectors[live].copy() if s.graph is None else None
            self._pending = []
        try:
            if vectors is not None:
                state, rows = self._renumbered(names), None
                state.vectors = vectors
            else:
                state, rows = self._copied_rows(live, names)
            self._build_rows(state, rows)
            del rows
            for round_ in range(_REPLAY_ROUNDS + 1):
                with self._writer:
                    pending, self._pending = self._pending, []
                    if len(pending) <= _SWAP_BATCHES or round_ == _REPLAY_ROUNDS:
                        with self.lock.write():
                            for write in pending:
                                self._into(state, *write)
                            self._s = state
                        break
                for write in pending:
                    self._into(state, *write)
        finally:
            self._pending = None
        log.info("collection %s: compacted %d slots to %d in %.2fs", self.name, before, len(state.ids),
                 time.monotonic() - started)

    def needs_compaction(self) -> bool:
        """True once deleted slots are COMPACT_SHARE of all (`compact` or a checkpoint then compacts)."""
        dead = len(self._s.ids) - len(self._s.slot)
        return dead > 0 and dead >= COMPACT_SHARE * len(self._s.ids)

    def compact(self) -> None:
        """Compacts, in memory, if deleted slots reached their share (see needs_compaction)."""
        with self._checkpointing:
            if self.needs_compaction():
                self._compact()

    def checkpoint(self) -> None:
        """Writes a new checkpoint (compacting first when many slots are dead), switches CURRENT
        to it, then empties the log. Searches go on meanwhile; writes wait while it is written."""
        with self._checkpointing:
            compacted = self.needs_compaction()
            if compacted:
                self._compact()
            with self._writer:
                if not compacted and not self._wal.has_records() and (self.directory / "CURRENT").exists():
                    return
                started = time.perf_counter()
                with self.lock.read():
                    self._write_checkpoint()
                self.timings.checkpoint(time.perf_counter() - started)

    def _write_checkpoint(self) -> None:
        s = self._s
        number = 1 + max((int(p.name.split("-")[1]) for p in self.directory.glob("ckpt-*")
                          if p.name.split("-")[1].isdigit()), default=0)
        name = f"ckpt-{number:06d}"
        temporary = self.directory / f"{name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        count = len(s.ids)
        if s.graph is not None:
            s.graph.save_index(str(temporary / "graph.bin"))
            if s.norms is not None:
                np.save(temporary / "norms.npy", s.norms[:count])
        else:
            np.save(temporary / "vectors.npy", s.vectors[:count])
        meta = {"format": CHECKPOINT_FORMAT, "dimension": self.spec.dimension, "ids": s.ids,
                "ef": self.spec.ef, "capacity": s.graph.get_max_elements() if s.graph is not None else 0,
                "version": self.version}
        (temporary / "meta.json").write_text(json.dumps(meta))
        files = {}
        for path in sorted(temporary.iterdir()):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        durable.write_file(temporary / "MANIFEST.json", json.dumps({"files": files}))
        durable.replace(temporary, self.directory / name)
        manifest_sha256 = _sha256(self.directory / name / "MANIFEST.json")
        durable.write_file(self.directory / "CURRENT",
                           json.dumps({"checkpoint": name, "manifest_sha256": manifest_sha256}))
        if self._wal is not None:
            self._wal.truncate(self.version)
        for old in self.directory.glob("ckpt-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def export_checkpoint(self, target: pathlib.Path) -> None:
        """Checkpoints, then copies that checkpoint (files and manifest) to `target`."""
        self.checkpoint()
        with self._writer:
            name = json.loads((self.directory / "CURRENT").read_text())["checkpoint"]
            shutil.copytree(self.directory / name, target)

    def log_bytes(self) -> int:
        """Size of the write-ahead log: what opening a copy of the files would replay."""
        return (self.directory / "wal.log").stat().st_size

    def link_files(self, target: pathlib.Path) -> list[str]:
        """Puts a consistent copy of the collection's files in the new folder `target` (on the
        same file system): the checkpoint hard-linked (a checkpoint's files never change; a newer
        one replaces the folder), CURRENT and the log copied. Returns their paths relative to
        `target`; opening a VectorCollection there gives this collection's state."""
        with self._writer:
            target.mkdir(parents=True)
            paths = []
            current = self.directory / "CURRENT"
            if current.exists():
                name = json.loads(current.read_text())["checkpoint"]
                (target / name).mkdir()
                for path in sorted((self.directory / name).iterdir()):
                    os.link(path, target / name / path.name)
                    paths.append(f"{name}/{path.name}")
                shutil.copyfile(current, target / "CURRENT")
                paths.append("CURRENT")
            shutil.copyfile(self.directory / "wal.log", target / "wal.log")
            return [*paths, "wal.log"]

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoints (unless told not to) and closes the log."""
        if checkpoint:
            self.checkpoint()
        self._wal.close()

    # ---- operations --------------------------------------------------------------------

    def check_rows(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """INVALID_ARGUMENT unless `vectors` are one row of the collection's dimension per id."""
        if vectors.ndim != 2 or vectors.shape[1] != self.spec.dimension:
            raise InvalidArgument(f"vectors have shape {list(vectors.shape)}; this collection needs "
                                  f"[N, {self.spec.dimension}]")
        if len(ids) != len(vectors):
            raise InvalidArgument(f"{len(ids)} ids for {len(vectors)} vectors; send one id per row")

    def _check_vectors(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """check_rows, and each id once, each row finite, of norm at most MAX_NORM."""
        self.check_rows(ids, vectors)
        if not len(ids):
            raise InvalidArgument("no vectors given; send at least one")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("an id appears twice in the batch; send each item once")
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise InvalidArgument(f"vector of item {ids[int(np.argmax(bad))]!r} has NaN or infinite "
                                  "values; send finite numbers")
        norms = _norms(vectors)
        if (norms > MAX_NORM).any():
            row = int(np.argmax(norms))
            raise InvalidArgument(f"vector of item {ids[row]!r} has norm {norms[row]:.3g}, over the limit of "
                                  f"{MAX_NORM:g} (its distances would overflow float32); scale the vectors down")

    def _log(self, payload: bytes) -> None:
        started = time.perf_counter()
        try:
            self._wal.append(payload)
        except wal.LogUnwritable as exc:
            raise Unavailable(f"collection {self.name} takes no writes until its next checkpoint empties its log: "
                              f"{exc}; nothing was stored: retry later", reason="LOG_UNWRITABLE",
                              retry_after_s=10.0) from None
        except OSError as exc:
            if durable.no_room(exc):
                raise ResourceExhausted(f"no room on the index's disk to log a write to collection {self.name} "
                                        f"({exc}); nothing was stored: free space and send it again",
                                        reason="DISK_FULL") from None
            raise
        self.timings.log_append(time.perf_counter() - started)

    @contextlib.contextmanager
    def _writing(self):
        with self._writer, self.lock.write():
            yield

    def upsert(self, ids: Sequence[str], vectors: np.ndarray,
               logged: Callable[[], None] = lambda: None) -> tuple[int, int]:
        """Inserts or replaces vectors; durable when it returns. (inserted, replaced). `logged`
        is called once the batch is in the log (durable: replayed after a crash) and before the
        graph takes it, which can take long (an in-place update costs hnswlib ~7x an insert)."""
        vectors = np.asarray(vectors, np.float32)
        self._check_vectors(ids, vectors)
        with self._writing():
            self._log(wal.encode(wal.UPSERT, list(ids), vectors))
            logged()
            return self._apply(wal.UPSERT, list(ids), vectors)

    def delete(self, ids: Sequence[str]) -> int:
        """Deletes the vectors of these items (those that have one); durable when it returns."""
        with self._writing():
            present = [item_id for item_id in ids if item_id in self._s.slot]
            if present:
                self._log(wal.encode(wal.DELETE, present))
            return self._apply(wal.DELETE, present) if present else 0

    def has(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """(ids with a vector, ids without)."""
        with self.lock.read():
            slot = self._s.slot
            return [i for i in ids if i in slot], [i for i in ids if i not in slot]

    def get(self, ids: Sequence[str]) -> tuple[list[str], np.ndarray, list[str]]:
        """(ids found, their vectors, ids without a vector)."""
        with self.lock.read():
            slot = self._s.slot
            found = [item_id for item_id in ids if item_id in slot]
            vectors = self._rows(np.array([slot[item_id] for item_id in found], np.int64))
            return found, vectors.reshape(len(found), self.spec.dimension), [i for i in ids if i not in slot]

    def __len__(self) -> int:
        return len(self._s.slot)

    def search(self, queries: np.ndarray, k: int, ef: int = 0, keep: Callable[[str], bool] | None = None,
               exact: bool = False, exact_below: int = 2000) -> tuple[list[tuple[list[str], np.ndarray]], bool]:
        """k nearest live items per query, nearest first: ([(ids, distances)] per query, exact?).

        `keep` tells which item ids may be found (asked under the lock, so writes and compaction
        cannot move the slots under it); when it leaves fewer than
        `exact_below` candidates (or fewer than 5% of the items), exact search answers, since a
        graph walk would have to skip most of what it visits. Exact search ranks by float64
        distances, ties broken by item id; the graph ranks by float32 distances.
        """
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.spec.dimension:
            raise InvalidArgument(f"queries have shape {list(queries.shape)}; this collection needs "
                                  f"[Q, {self.spec.dimension}]")
        if not np.isfinite(queries).all():
            raise InvalidArgument("a query vector has NaN or infinite values; send finite numbers")
        norms = _norms(queries)
        if (norms > MAX_NORM).any():
            raise InvalidArgument(f"a query vector has a norm over the limit of {MAX_NORM:g} (its distances would "
                                  "overflow float32); scale it down")
        ef = ef or self.spec.ef
        lock = self.lock.read() if ef == self.spec.ef else self.lock.write()  # ef is the graph's state
        with lock:
            s = self._s
            live = s.alive[:len(s.ids)]
            if keep is not None:
                live = np.fromiter((item_id is not None and keep(item_id) for item_id in s.ids), bool, len(s.ids))
            candidates = len(s.slot) if keep is None else int(live.sum())
            if candidates == 0:
                return [([], np.zeros(0, np.float32)) for _ in queries], True
            use_exact = exact or s.graph is None or (
                keep is not None and (candidates < exact_below or candidates < 0.05 * len(s.slot)))
            if not use_exact:
                found = self._graph_search(queries, norms, min(k, candidates), ef, live if keep is not None else None)
                if found is not None:
                    return found, False
            slots, distances = exact_knn(queries, self._rows, np.flatnonzero(live), k, self.spec.metric,
                                         self.spec.minkowski_p, names=s.ids)
            return self._hits(slots, distances.astype(np.float32)), True

    def _hits(self, slots: np.ndarray, distances: np.ndarray) -> list[tuple[list[str], np.ndarray]]:
        by_slot = self._s.ids.__getitem__
        return [(list(map(by_slot, row)), row_dist) for row, row_dist in zip(slots.tolist(), distances, strict=True)]

    def _graph_search(self, queries: np.ndarray, norms: np.ndarray, k: int, ef: int, allowed: np.ndarray | None):
        graph = self._s.graph
        if self.spec.metric == "cosine":
            queries = queries / np.maximum(norms, 1e-30)[:, None]
        if ef != self.spec.ef:
            graph.set_ef(ef)
        try:
            labels, distances = graph.knn_query(
                queries, k=k, filter=None if allowed is None else (lambda slot: bool(allowed[slot])))
        except RuntimeError:
            return None  # fewer than k results survived: answer exactly instead
        finally:
            if ef != self.spec.ef:
                graph.set_ef(self.spec.ef)
        return self._hits(labels, from_hnsw(distances, self.spec.metric))

    def stats(self) -> dict:
        """count, deleted, capacity, version, memory_bytes, approximate.

        memory_bytes counts what the collection allocates: hnswlib's nodes (vector, level-0
        links, label, per-node bookkeeping) over its capacity, the numpy arrays, and an estimate
        of the id maps.
        """
        with self.lock.read():
            s = self._s
            memory = s.alive.nbytes + _ID_MAP_BYTES * len(s.ids)
            if s.graph is not None:
                capacity = s.graph.get_max_elements()
                node = self.spec.dimension * 4 + (2 * self.spec.m * 4 + 4) + 8 + 8 + 4 + 40
                memory += capacity * node + (s.norms.nbytes if s.norms is not None else 0)
            else:
                capacity = len(s.vectors)
                memory += s.vectors.nbytes
            return {"count": len(s.slot), "deleted": len(s.ids) - len(s.slot), "capacity": capacity,
                    "version": self.version, "memory_bytes": int(memory), "approximate": s.graph is not None}


def install_checkpoint(source: pathlib.Path, directory: pathlib.Path, fsync: bool = True) -> None:
    """Makes a copied checkpoint folder (see export_checkpoint) the state of a new collection in
    `directory`, on disk before it returns (with `fsync`); opening it verifies every file."""
    directory.mkdir(parents=True)
    shutil.copytree(source, directory / "ckpt-000001")
    if fsync:
        durable.fsync_tree(directory)
        durable.fsync_path(directory.parent)
    manifest = directory / "ckpt-000001" / "MANIFEST.json"
    pointer = json.dumps({"checkpoint": "ckpt-000001", "manifest_sha256": _sha256(manifest)}) \
        if manifest.exists() else "ckpt-000001"  # a checkpoint from before checksums
    durable.write_file(directory / "CURRENT", pointer, fsync)
