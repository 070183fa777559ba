"""A collection against a plain dict, as a Hypothesis state machine: random upserts, re-upserts,
deletes, searches, checkpoints, restarts and crash-restarts (with a torn log tail). Exact search
must equal brute force over the dict (identical vectors ranked by id); approximate search must
return only live ids, each once; what was acknowledged must survive every restart."""

import itertools
import pathlib
import shutil
import tempfile

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from convsearch_index import wal
from convsearch_index.collection import VectorCollection, VectorSpec

DIM = 6
IDS = st.sampled_from([f"id-{n:02d}" for n in range(14)])


def brute_force(model: dict[str, np.ndarray], query: np.ndarray, metric: str) -> list[tuple[float, str]]:
    """(distance, id) of every stored vector, nearest first, ties by id; float64 throughout."""
    q = query.astype(np.float64)
    ranked = []
    for item_id, vector in model.items():
        v = vector.astype(np.float64)
        if metric == "cosine":
            distance = 1.0 - float(q @ v) / max(float(np.linalg.norm(q) * np.linalg.norm(v)), 1e-300)
        elif metric == "euclidean":
            distance = float(np.sqrt(((q - v) ** 2).sum()))
        else:
            distance = float(np.abs(q - v).sum())
        ranked.append((max(distance, 0.0), item_id))
    return sorted(ranked)


class CollectionMachine(RuleBasedStateMachine):
    metric = "cosine"

    @initialize()
    def open(self):
        self.folder = pathlib.Path(tempfile.mkdtemp(prefix="collection-machine-"))
        self.spec = VectorSpec(DIM, self.metric, m=8, ef_construction=64, ef=64)
        self.collection = VectorCollection(self.folder, self.spec, fsync=False)
        self.model: dict[str, np.ndarray] = {}

    def teardown(self):
        if hasattr(self, "collection"):
            self.collection.close(checkpoint=False)
            shutil.rmtree(self.folder, ignore_errors=True)

    @rule(ids=st.lists(IDS, min_size=1, max_size=6, unique=True), seed=st.integers(0, 50))
    def upsert(self, ids, seed):
        # Small integers make exact ties (and identical vectors under other ids) common.
        vectors = np.random.default_rng(seed).integers(-3, 4, size=(len(ids), DIM)).astype(np.float32)
        vectors[~vectors.any(axis=1), 0] = 1.0  # no zero vectors: cosine is undefined there
        inserted, replaced = self.collection.upsert(ids, vectors)
        assert (inserted, replaced) == (sum(i not in self.model for i in ids), sum(i in self.model for i in ids))
        self.model.update(zip(ids, vectors, strict=True))

    @rule(ids=st.lists(IDS, min_size=1, max_size=5, unique=True))
    def delete(self, ids):
        assert self.collection.delete(ids) == sum(i in self.model for i in ids)
        for item_id in ids:
            self.model.pop(item_id, None)

    @rule(seed=st.integers(0, 50), k=st.integers(1, 16))
    def search(self, seed, k):
        query = np.random.default_rng(1000 + seed).integers(-3, 4, size=(1, DIM)).astype(np.float32)
        query[0, 1] += 0.5
        results, _ = self.collection.search(query, k, exact=True)
        ids, distances = results[0]
        truth = brute_force(self.model, query[0], self.metric)
        # Distances equal in exact arithmetic may round either way; compare them to 1e-9.
        rounded = {item_id: round(distance, 9) for distance, item_id in truth}
        assert [rounded[i] for i in ids] == [round(d, 9) for d, _ in truth[:k]], (ids, truth)
        np.testing.assert_allclose(distances, [d for d, _ in truth[:k]], atol=1e-5)
        for first, second in itertools.pairwise(ids):  # identical vectors: a true tie, ranked by id
            if np.array_equal(self.model[first], self.model[second]):
                assert first < second, ids
        approximate, _ = self.collection.search(query, k)
        found = approximate[0][0]
        assert len(found) == len(set(found)) == min(k, len(self.model))
        assert set(found) <= set(self.model)
        assert (approximate[0][1] >= 0).all()

    @rule()
    def checkpoint(self):
        self.collection.checkpoint()

    @rule()
    def restart(self):
        self.collection.close()
        self.collection = VectorCollection(self.folder, self.spec, fsync=False)

    @rule(ids=st.lists(IDS, min_size=1, max_size=6, unique=True), share=st.floats(0.0, 0.99))
    def crash_restart(self, ids, share):
        """Killed without a checkpoint while writing one more record (never acknowledged): the
        log ends with a prefix of it."""
        self.collection.close(checkpoint=False)
        record = wal.record(wal.encode(wal.UPSERT, ids, np.ones((len(ids), DIM), np.float32)))
        with open(self.folder / "wal.log", "ab") as handle:
            handle.write(record[:int(share * len(record))])
        self.collection = VectorCollection(self.folder, self.spec, fsync=False)

    @invariant()
    def holds_what_was_acknowledged(self):
        if not hasattr(self, "collection"):
            return
        assert len(self.collection) == len(self.model)
        ids = sorted(self.model)
        found, vectors, missing = self.collection.get(ids)
        assert found == ids and missing == []
        if ids:
            np.testing.assert_allclose(vectors, np.stack([self.model[i] for i in ids]), rtol=1e-6, atol=1e-6)


class EuclideanMachine(CollectionMachine):
    metric = "euclidean"


class ManhattanMachine(CollectionMachine):
    metric = "manhattan"  # exact only: the numpy store


SETTINGS = settings(max_examples=80, stateful_step_count=30, deadline=None)
TestCosineCollection = CollectionMachine.TestCase
TestEuclideanCollection = EuclideanMachine.TestCase
TestManhattanCollection = ManhattanMachine.TestCase
for case in (TestCosineCollection, TestEuclideanCollection, TestManhattanCollection):
    case.settings = SETTINGS
