"""The collection core: recall against exact search, filters, deletes, re-upserts, k beyond the
count, the exact-only metrics, durability across restarts, and concurrent use."""

import threading

import numpy as np
import pytest

from convsearch.errors import InvalidArgument
from convsearch.synthetic import clustered_vectors
from convsearch_index import wal
from convsearch_index.collection import VectorCollection, VectorSpec
from convsearch_index.distances import exact_knn, pairwise


def clustered(n: int, dim: int, clusters: int = 50, seed: int = 0) -> np.ndarray:
    return clustered_vectors(n, dim, clusters, seed)


def search_pairs(collection, *args, **options):
    """The collection's search as [(id, distance), ...] per query."""
    results, exact = collection.search(*args, **options)
    return [[(i, float(d)) for i, d in zip(ids, distances, strict=True)] for ids, distances in results], exact


def ids_of(n: int, start: int = 0) -> list[str]:
    return [f"item-{i}" for i in range(start, start + n)]


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_recall_at_10_against_exact_search(tmp_path, metric):
    vectors = clustered(20_000, 512)
    collection = VectorCollection(tmp_path, VectorSpec(dimension=512, metric=metric), fsync=False)
    for start in range(0, len(vectors), 5000):
        collection.upsert(ids_of(5000, start), vectors[start:start + 5000])
    queries = clustered(200, 512, seed=1)
    approximate, was_exact = search_pairs(collection, queries, 10)
    exact, _ = search_pairs(collection, queries, 10, exact=True)
    assert not was_exact
    recall = np.mean([len({i for i, _ in a} & {i for i, _ in e}) / 10
                      for a, e in zip(approximate, exact, strict=True)])
    assert recall >= 0.98, recall
    # Exact search is the ground truth: it agrees with brute force over every vector.
    truth = np.argsort(pairwise(queries[:5], vectors, metric), axis=1)[:, :10]
    assert [[i for i, _ in row] for row in exact[:5]] == [[f"item-{j}" for j in row] for row in truth]


def small(tmp_path, metric="cosine", n=300, **spec):
    vectors = clustered(n, 16, clusters=5)
    collection = VectorCollection(tmp_path, VectorSpec(dimension=16, metric=metric, **spec), fsync=False)
    collection.upsert(ids_of(n), vectors)
    return collection, vectors


def test_distances_are_in_the_metrics_units(tmp_path):
    for metric in ("cosine", "euclidean", "sqeuclidean", "ip"):
        collection, vectors = small(tmp_path / metric, metric)
        hits, _ = search_pairs(collection, vectors[:3], 5)
        truth = pairwise(vectors[:3], vectors, metric)
        for q, row in enumerate(hits):
            for item_id, distance in row:
                assert distance == pytest.approx(truth[q, int(item_id.split("-")[1])], abs=1e-3), metric


def test_k_above_the_count_returns_what_exists(tmp_path):
    collection, vectors = small(tmp_path, n=7)
    hits, _ = search_pairs(collection, vectors[:2], 50)
    assert [len(row) for row in hits] == [7, 7]
    assert hits[0][0][0] == "item-0"


def test_deleted_items_never_come_back_and_reupserts_replace(tmp_path):
    collection, vectors = small(tmp_path)
    assert collection.delete(["item-0", "item-1", "nope"]) == 2
    for exact in (False, True):
        hits, _ = search_pairs(collection, vectors[:2], 300, exact=exact)
        returned = {item_id for row in hits for item_id, _ in row}
        assert "item-0" not in returned and "item-1" not in returned
        assert len(hits[0]) == 298
    # Re-upsert with another vector: it comes back with the new vector, once.
    assert collection.upsert(["item-0", "item-5"], vectors[[100, 101]]) == (1, 1)
    hits, _ = search_pairs(collection, vectors[[100]], 3, exact=True)
    assert {"item-0", "item-100"} <= {item_id for item_id, _ in hits[0]}
    found, got, missing = collection.get(["item-0", "item-1", "item-5"])
    assert found == ["item-0", "item-5"] and missing == ["item-1"]
    np.testing.assert_allclose(got, vectors[[100, 101]], rtol=1e-6)  # cosine keeps unit vectors + norms
    assert len(collection) == 299


def test_filters_are_exact_even_when_few_items_match(tmp_path):
    collection, vectors = small(tmp_path, n=3000)
    for wanted in (3, 400):  # very selective, then broad
        allowed = np.array([n % (3000 // wanted) == 0 for n in range(3000)])
        keep = allowed.__getitem__
        hits, _ = search_pairs(collection, vectors[:4], 10, keep=lambda i, keep=keep: bool(keep(int(i.split("-")[1]))))
        rows = np.flatnonzero(allowed)
        truth_rows, _ = exact_knn(vectors[:4], vectors, rows, 10, "cosine")
        for row, truth in zip(hits, truth_rows, strict=True):
            assert all(allowed[int(i.split("-")[1])] for i, _ in row)
            assert len(row) == min(10, len(rows))
            overlap = len({i for i, _ in row} & {f"item-{t}" for t in truth})
            assert overlap >= 0.9 * len(row)


def test_minkowski_p2_is_euclidean_and_p1_is_manhattan(tmp_path):
    vectors = clustered(500, 16)
    spaces = {}
    for name, metric, p in (("mk2", "minkowski", 2.0), ("l2", "euclidean", 2.0), ("mk1", "minkowski", 1.0),
                            ("l1", "manhattan", 2.0), ("cheb", "chebyshev", 2.0)):
        collection = VectorCollection(tmp_path / name, VectorSpec(16, metric, p), fsync=False)
        collection.upsert(ids_of(500), vectors)
        spaces[name] = search_pairs(collection, vectors[:5], 10, exact=True)[0]
    for a, b in (("mk2", "l2"), ("mk1", "l1")):
        for row_a, row_b in zip(spaces[a], spaces[b], strict=True):
            assert [i for i, _ in row_a] == [i for i, _ in row_b]
            np.testing.assert_allclose([d for _, d in row_a], [d for _, d in row_b], rtol=1e-4, atol=1e-5)
    cheb = np.abs(vectors[0] - vectors[int(spaces["cheb"][0][1][0].split("-")[1])]).max()
    assert spaces["cheb"][0][1][1] == pytest.approx(cheb, rel=1e-5)


def test_bad_vectors_are_refused_and_change_nothing(tmp_path):
    collection, vectors = small(tmp_path, n=10)
    bad = vectors[:2].copy()
    bad[1, 3] = np.nan
    for ids, data, words in ((["a", "b"], bad, "NaN"), (["a"], vectors[:1, :8], "[N, 16]"),
                             (["a", "a"], vectors[:2], "twice"), (["a"], vectors[:2], "1 ids for 2")):
        with pytest.raises(InvalidArgument, match=words.replace("[", r"\[")):
            collection.upsert(ids, data)
    assert len(collection) == 10
    with pytest.raises(InvalidArgument, match="infinite"):
        search_pairs(collection, np.full((1, 16), np.inf, np.float32), 3)


def test_restart_restores_everything_from_checkpoint_and_log(tmp_path):
    collection, vectors = small(tmp_path)
    collection.checkpoint()
    collection.upsert(["late"], vectors[[7]])  # only in the log
    collection.delete(["item-3"])
    before, _ = search_pairs(collection, vectors[:5], 10)
    collection.close(checkpoint=False)
    reopened = VectorCollection(tmp_path, collection.spec, fsync=False)
    assert len(reopened) == 300
    assert search_pairs(reopened, vectors[:5], 10)[0] == before
    reopened.close()  # checkpoints and empties the log
    assert (tmp_path / "wal.log").read_bytes() == wal.prologue(reopened.version)  # no records
    again = VectorCollection(tmp_path, collection.spec, fsync=False)
    assert search_pairs(again, vectors[:5], 10)[0] == before and again.get(["item-3"])[2] == ["item-3"]


def test_a_torn_log_tail_is_cut_off(tmp_path):
    collection, vectors = small(tmp_path, n=20)
    collection.close(checkpoint=False)
    with open(tmp_path / "wal.log", "ab") as handle:
        handle.write(b"\x40\x00\x00\x00\x01\x02")  # a record header whose body never made it
    reopened = VectorCollection(tmp_path, collection.spec, fsync=False)
    assert len(reopened) == 20
    reopened.upsert(["after"], vectors[:1])
    reopened.close(checkpoint=False)
    assert len(VectorCollection(tmp_path, collection.spec, fsync=False)) == 21


def test_searches_while_upserts_stream_in(tmp_path):
    vectors = clustered(6000, 32)
    collection = VectorCollection(tmp_path, VectorSpec(dimension=32), fsync=False)
    collection.upsert(ids_of(1000), vectors[:1000])
    errors, done = [], threading.Event()

    def writer():
        for start in range(1000, 6000, 250):
            collection.upsert(ids_of(250, start), vectors[start:start + 250])
        done.set()

    def reader():
        try:
            while not done.is_set():
                hits, _ = search_pairs(collection, vectors[:8], 10)
                for q, row in enumerate(hits):
                    assert len(row) == 10 and row[0][0] == f"item-{q}"
                    assert [d for _, d in row] == sorted(d for _, d in row)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert len(collection) == 6000


def test_ties_are_broken_the_same_way_every_time(tmp_path):
    vector = np.ones((1, 16), np.float32)
    collection = VectorCollection(tmp_path, VectorSpec(dimension=16), fsync=False)
    collection.upsert([f"twin-{i}" for i in range(6)], np.repeat(vector, 6, axis=0))
    for exact in (True, False):
        rankings = {tuple(i for i, _ in search_pairs(collection, vector, 6, exact=exact)[0][0]) for _ in range(5)}
        assert len(rankings) == 1
    exact_order = search_pairs(collection, vector, 6, exact=True)[0][0]
    assert [i for i, _ in exact_order] == [f"twin-{i}" for i in range(6)]  # insertion order
