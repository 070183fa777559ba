"""One vector collection: its vectors, an hnswlib graph (for metrics hnswlib serves), its
write-ahead log and checkpoints. All of hnswlib's rules live here:

- add_items never overlaps knn_query (reader-writer lock); searches run in parallel;
- labels are ints: each item id gets a slot, never reused, so deleted items never come back;
- capacity grows before it runs out; deleted slots' memory is reused (replace_deleted);
- ef is not saved with the graph: it is kept in the checkpoint's metadata and set after load;
- knn_query raises when fewer than k results survive: k is capped and exact search answers.
"""

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Sequence

import hnswlib
import numpy as np

from convsearch.errors import InvalidArgument
from convsearch_index import wal
from convsearch_index.distances import HNSW_SPACES, exact_knn, from_hnsw
from convsearch_index.rwlock import RWLock

_INITIAL_CAPACITY = 1024


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


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VectorCollection:
    """Vectors of one (dataset, model, layer, pooling, metric), durable in `directory`."""

    def __init__(self, directory: pathlib.Path, spec: VectorSpec, fsync: bool = True):
        self.directory = directory
        self.spec = spec
        self.fsync = fsync
        self.lock = RWLock()
        directory.mkdir(parents=True, exist_ok=True)
        self._ids: list[str | None] = []
        self._slot: dict[str, int] = {}
        self._vectors = np.zeros((0, spec.dimension), np.float32)
        self._alive = np.zeros(0, bool)
        self.version = 0  # applied batches since creation; replay recounts the logged ones
        self._graph: hnswlib.Index | None = None
        self._load_checkpoint()
        self._replay()
        self._wal = wal.WriteAheadLog(directory / "wal.log", fsync)

    # ---- state -------------------------------------------------------------------------

    def _new_graph(self, capacity: int) -> hnswlib.Index | None:
        if not self.spec.approximate:
            return None
        graph = hnswlib.Index(space=HNSW_SPACES[self.spec.metric], dim=self.spec.dimension)
        graph.init_index(max_elements=capacity, M=self.spec.m, ef_construction=self.spec.ef_construction,
                         allow_replace_deleted=True)
        graph.set_ef(self.spec.ef)
        return graph

    def _ensure_capacity(self, extra: int) -> None:
        needed = len(self._ids) + extra
        if needed > len(self._vectors):
            grown = np.zeros((max(needed, 2 * len(self._vectors), _INITIAL_CAPACITY), self.spec.dimension),
                             np.float32)
            grown[:len(self._ids)] = self._vectors[:len(self._ids)]
            self._vectors = grown
            alive = np.zeros(len(grown), bool)
            alive[:len(self._ids)] = self._alive[:len(self._ids)]
            self._alive = alive
        if self._graph is None and self.spec.approximate:
            self._graph = self._new_graph(max(_INITIAL_CAPACITY, needed))
        if self._graph is not None:
            live_needed = self._graph.get_current_count() + extra
            if live_needed > self._graph.get_max_elements():
                self._graph.resize_index(max(live_needed, 2 * self._graph.get_max_elements()))

    def _apply_upsert(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[int, int]:
        self.version += 1
        fresh = [i for i, item_id in enumerate(ids) if item_id not in self._slot]
        self._ensure_capacity(len(fresh))
        for i in fresh:
            self._slot[ids[i]] = len(self._ids)
            self._ids.append(ids[i])
        slots = np.array([self._slot[item_id] for item_id in ids], np.int64)
        self._vectors[slots] = vectors
        self._alive[slots] = True
        if self._graph is not None:
            self._graph.add_items(vectors, slots, replace_deleted=True)
        return len(fresh), len(ids) - len(fresh)

    def _apply_delete(self, ids: Sequence[str]) -> int:
        self.version += 1
        deleted = 0
        for item_id in ids:
            slot = self._slot.pop(item_id, None)
            if slot is None:
                continue
            self._ids[slot] = None
            self._alive[slot] = False
            if self._graph is not None:
                self._graph.mark_deleted(slot)
            deleted += 1
        return deleted

    # ---- durability --------------------------------------------------------------------

    def _load_checkpoint(self) -> None:
        current = self.directory / "CURRENT"
        if not current.exists():
            return
        checkpoint = self.directory / current.read_text().strip()
        meta = json.loads((checkpoint / "meta.json").read_text())
        self._ids = meta["ids"]
        self.version = meta["version"]
        self._slot = {item_id: slot for slot, item_id in enumerate(self._ids) if item_id is not None}
        self._vectors = np.load(checkpoint / "vectors.npy")
        self._alive = np.array([item_id is not None for item_id in self._ids], bool)
        if self.spec.approximate and (checkpoint / "graph.bin").exists():
            graph = hnswlib.Index(space=HNSW_SPACES[self.spec.metric], dim=self.spec.dimension)
            graph.load_index(str(checkpoint / "graph.bin"), max_elements=meta["capacity"],
                             allow_replace_deleted=True)
            graph.set_ef(meta["ef"])  # hnswlib does not save ef
            self._graph = graph

    def _replay(self) -> None:
        for payload in wal.replay(self.directory / "wal.log"):
            op, ids, vectors = wal.decode(payload, self.spec.dimension)
            if op == wal.UPSERT:
                self._apply_upsert(ids, vectors)
            else:
                self._apply_delete(ids)

    def checkpoint(self) -> None:
        """Saves everything to a new checkpoint, switches CURRENT to it, then empties the log."""
        with self.lock.read():  # writers wait; searches go on
            if self._wal.size() == 0 and (self.directory / "CURRENT").exists():
                return
            number = 1 + max((int(p.name.split("-")[1]) for p in self.directory.glob("ckpt-*")
                              if p.name.split("-")[1].isdigit()), default=0)
            name = f"ckpt-{number:06d}"
            temporary = self.directory / f"{name}.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            with open(temporary / "vectors.npy", "wb") as handle:
                np.save(handle, self._vectors[:len(self._ids)])
                handle.flush()
                os.fsync(handle.fileno())
            capacity = 0
            if self._graph is not None:
                self._graph.save_index(str(temporary / "graph.bin"))
                capacity = self._graph.get_max_elements()
            meta = {"ids": self._ids, "ef": self.spec.ef, "capacity": capacity, "version": self.version}
            (temporary / "meta.json").write_text(json.dumps(meta))
            for path in temporary.iterdir():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(temporary)
            os.replace(temporary, self.directory / name)
            pointer = self.directory / "CURRENT.tmp"
            pointer.write_text(name)
            with open(pointer, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(pointer, self.directory / "CURRENT")
            _fsync_dir(self.directory)
            self._wal.truncate()
            for old in self.directory.glob("ckpt-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    def close(self, checkpoint: bool = True) -> None:
        """Checkpoints (unless told not to) and closes the log."""
        if checkpoint:
            self.checkpoint()
        self._wal.close()

    # ---- operations --------------------------------------------------------------------

    def _check_vectors(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.spec.dimension:
            raise InvalidArgument(f"vectors have shape {list(vectors.shape)}; this collection needs "
                                  f"[N, {self.spec.dimension}]")
        if len(ids) != len(vectors):
            raise InvalidArgument(f"{len(ids)} ids for {len(vectors)} vectors; send one id per row")
        if not len(ids):
            raise InvalidArgument("no vectors given; send at least one")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("an id appears twice in the batch; send each item once")
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise InvalidArgument(f"vector of item {ids[int(np.argmax(bad))]!r} has NaN or infinite "
                                  "values; send finite numbers")

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> tuple[int, int]:
        """Inserts or replaces vectors; durable when it returns. (inserted, replaced)."""
        vectors = np.asarray(vectors, np.float32)
        self._check_vectors(ids, vectors)
        with self.lock.write():
            self._wal.append(wal.encode(wal.UPSERT, list(ids), vectors))
            return self._apply_upsert(ids, vectors)

    def delete(self, ids: Sequence[str]) -> int:
        """Deletes the vectors of these items (those that have one); durable when it returns."""
        with self.lock.write():
            present = [item_id for item_id in ids if item_id in self._slot]
            if present:
                self._wal.append(wal.encode(wal.DELETE, present))
            return self._apply_delete(present)

    def has(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """(ids with a vector, ids without)."""
        with self.lock.read():
            slot = self._slot
            return [i for i in ids if i in slot], [i for i in ids if i not in slot]

    def get(self, ids: Sequence[str]) -> tuple[list[str], np.ndarray, list[str]]:
        """(ids found, their vectors, ids without a vector)."""
        with self.lock.read():
            found = [item_id for item_id in ids if item_id in self._slot]
            vectors = self._vectors[[self._slot[item_id] for item_id in found]].copy()
            return found, vectors.reshape(len(found), self.spec.dimension), \
                [item_id for item_id in ids if item_id not in self._slot]

    def slot_ids(self) -> list[str | None]:
        """Item id of each slot (None where deleted); positions are the `allowed` mask's."""
        with self.lock.read():
            return list(self._ids)

    def __len__(self) -> int:
        return len(self._slot)

    def search(self, queries: np.ndarray, k: int, ef: int = 0, allowed: np.ndarray | None = None,
               exact: bool = False, exact_below: int = 2000) -> tuple[list[tuple[list[str], np.ndarray]], bool]:
        """k nearest live items per query, nearest first: ([(ids, distances)] per query, exact?).

        `allowed` is a boolean mask over slots (see `slot_ids`); when it leaves fewer than
        `exact_below` candidates (or fewer than 5% of the items), exact search answers, since a
        graph walk would have to skip most of what it visits.
        """
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.spec.dimension:
            raise InvalidArgument(f"queries have shape {list(queries.shape)}; this collection needs "
                                  f"[Q, {self.spec.dimension}]")
        if not np.isfinite(queries).all():
            raise InvalidArgument("a query vector has NaN or infinite values; send finite numbers")
        ef = ef or self.spec.ef
        lock = self.lock.read() if ef == self.spec.ef else self.lock.write()  # ef is the graph's state
        with lock:
            live = self._alive[:len(self._ids)]
            if allowed is not None:
                live = live & allowed[:len(live)]
            candidates = len(self._slot) if allowed is None else int(live.sum())
            if candidates == 0:
                return [([], np.zeros(0, np.float32)) for _ in queries], True
            use_exact = exact or self._graph is None or (
                allowed is not None and (candidates < exact_below or candidates < 0.05 * len(self._slot)))
            if not use_exact:
                found = self._graph_search(queries, min(k, candidates), ef, live if allowed is not None else None)
                if found is not None:
                    return found, False
            rows = np.flatnonzero(live)
            slots, distances = exact_knn(queries, self._vectors, rows, k, self.spec.metric, self.spec.minkowski_p)
            return self._hits(slots, distances), True

    def _hits(self, slots: np.ndarray, distances: np.ndarray) -> list[tuple[list[str], np.ndarray]]:
        by_slot = self._ids.__getitem__
        return [(list(map(by_slot, row)), row_dist) for row, row_dist in zip(slots.tolist(), distances, strict=True)]

    def _graph_search(self, queries: np.ndarray, k: int, ef: int, allowed: np.ndarray | None):
        graph = self._graph
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
        """count, deleted, capacity, version, memory_bytes, approximate."""
        with self.lock.read():
            graph = self._graph
            capacity = graph.get_max_elements() if graph is not None else len(self._vectors)
            deleted = len(self._ids) - len(self._slot)
            links = self.spec.m * 2 * 4 + 8 if graph is not None else 0
            memory = self._vectors.nbytes + (capacity * (self.spec.dimension * 4 + links) if graph else 0)
            return {"count": len(self._slot), "deleted": deleted, "capacity": capacity, "version": self.version,
                    "memory_bytes": int(memory), "approximate": graph is not None or self.spec.approximate}
