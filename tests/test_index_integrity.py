"""Nothing lost, nothing wrong: regression tests for defects of the index's storage. Each
test names the defect it guards against; each failed before its fix.

Corrupt files make only their collection fail (DATA_LOSS, files kept); torn log tails are cut;
ghost nodes, stale vectors after an image replacement, absolute paths, dead rows and negative
distances are gone.
"""

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import resource
import shutil
import sqlite3
import tarfile
import threading
import zlib

import numpy as np
import pytest

from convsearch.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from convsearch.index.v1 import index_pb2 as pb
from convsearch.synthetic import clustered_vectors
from convsearch_index import wal
from convsearch_index.changes import ChangeLog
from convsearch_index.collection import VectorCollection, VectorSpec
from convsearch_index.engine import CollectionKey, Index
from convsearch_index.records import ItemRecord
from convsearch_index.servicer import IndexServicer

DIM = 16


def ids_of(n: int, start: int = 0) -> list[str]:
    return [f"item-{i:04d}" for i in range(start, start + n)]


def ranked(collection, queries, k, exact=False):
    results, _ = collection.search(queries, k, exact=exact)
    return [(ids, [float(d) for d in distances]) for ids, distances in results]


def tree_digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. ghost duplicates -----------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "euclidean", "ip"])
def test_reupserting_a_live_id_while_a_slot_is_deleted_leaves_no_ghost(tmp_path, metric):
    vectors = clustered_vectors(40, DIM, 4, 0)
    collection = VectorCollection(tmp_path, VectorSpec(DIM, metric, ef=200), fsync=False)
    collection.upsert(ids_of(30), vectors[:30])
    collection.delete(ids_of(3))  # deleted slots that replace_deleted could reuse
    collection.upsert(ids_of(5, 10), vectors[30:35])  # live ids, new vectors
    for exact in (False, True):
        ids, _ = ranked(collection, vectors[30:31], 40, exact)[0]
        assert len(ids) == len(set(ids)) == 27, ids
        assert ids[0] == "item-0010"  # the new vector, not the stale one
    collection.delete(["item-0010"])
    for exact in (False, True):
        ids, _ = ranked(collection, vectors[30:31], 40, exact)[0]
        assert "item-0010" not in ids and len(ids) == 26
    collection.close()
    reopened = VectorCollection(tmp_path, collection.spec, fsync=False)
    assert len(ranked(reopened, vectors[:1], 40)[0][0]) == 26


# ---- 2. write-ahead-log corruption versus a torn tail --------------------------------------

def logged_collection(tmp_path, batches=10, metric="cosine"):
    """A collection with `batches` logged batches of 5 vectors and no checkpoint."""
    vectors = clustered_vectors(5 * batches, DIM, 5, 1)
    collection = VectorCollection(tmp_path, VectorSpec(DIM, metric), fsync=False)
    for batch in range(batches):
        collection.upsert(ids_of(5, 5 * batch), vectors[5 * batch:5 * batch + 5])
    collection.close(checkpoint=False)
    return collection.spec, vectors


def record_offsets(path: pathlib.Path) -> list[int]:
    data, offsets, offset = path.read_bytes(), [], wal.PROLOGUE
    while offset < len(data):
        offsets.append(offset)
        offset += 12 + int.from_bytes(data[offset:offset + 4], "little")
    return offsets


def flip(path: pathlib.Path, offset: int, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for position in range(offset, offset + count):
        data[position] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("record", [2, 9])  # the third of ten, and the last
@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_corrupt_log_record_is_refused_and_kept_never_cut(tmp_path, record, where):
    spec, _ = logged_collection(tmp_path)
    log_path = tmp_path / "wal.log"
    offset = record_offsets(log_path)[record]
    flip(log_path, offset + (40 if where == "payload" else 1))
    before = log_path.read_bytes()
    with pytest.raises(DataLoss, match=f"record at byte {offset}"):
        VectorCollection(tmp_path, spec, fsync=False)
    assert log_path.read_bytes() == before  # nothing cut, nothing rewritten


def test_a_torn_tail_is_cut_and_everything_before_it_kept(tmp_path):
    spec, vectors = logged_collection(tmp_path)
    log_path = tmp_path / "wal.log"
    last = record_offsets(log_path)[9]
    with open(log_path, "r+b") as handle:
        handle.truncate(last + 30)  # the last write never finished: it was not acknowledged
    collection = VectorCollection(tmp_path, spec, fsync=False)
    assert len(collection) == 45
    assert log_path.stat().st_size == last
    collection.upsert(["after"], vectors[:1])
    collection.close(checkpoint=False)
    assert len(VectorCollection(tmp_path, spec, fsync=False)) == 46


def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path):
    spec, _ = logged_collection(tmp_path, batches=3)
    log_path = tmp_path / "wal.log"
    size = log_path.stat().st_size
    with open(log_path, "ab") as handle:
        handle.write(bytes(4096))  # space a crash left allocated but unwritten
    assert len(VectorCollection(tmp_path, spec, fsync=False)) == 15
    assert log_path.stat().st_size == size


def test_a_log_written_before_the_format_had_a_magic_is_still_read(tmp_path):
    vectors = clustered_vectors(10, DIM, 2, 2)
    spec = VectorSpec(DIM)
    legacy = b""
    for batch in range(2):
        payload = wal.encode(wal.UPSERT, ids_of(5, 5 * batch), vectors[5 * batch:5 * batch + 5])
        legacy += len(payload).to_bytes(4, "little") + zlib.crc32(payload).to_bytes(4, "little") + payload
    (tmp_path / "wal.log").write_bytes(legacy)
    collection = VectorCollection(tmp_path, spec, fsync=False)
    assert len(collection) == 10
    assert (tmp_path / "wal.log").read_bytes() == wal.prologue(2)  # now held by a checkpoint
    np.testing.assert_allclose(collection.get(ids_of(10))[1], vectors, rtol=1e-6)


def test_a_log_from_before_the_start_is_still_read(tmp_path):
    vectors = clustered_vectors(10, DIM, 2, 2)
    records = b"".join(wal.record(wal.encode(wal.UPSERT, ids_of(5, 5 * batch), vectors[5 * batch:5 * batch + 5]))
                       for batch in range(2))
    (tmp_path / "wal.log").write_bytes(wal.MAGIC_2 + records)
    collection = VectorCollection(tmp_path, VectorSpec(DIM), fsync=False)
    assert len(collection) == 10 and collection.version == 2
    assert (tmp_path / "wal.log").read_bytes() == wal.prologue(2)  # now held by a checkpoint
    np.testing.assert_allclose(collection.get(ids_of(10))[1], vectors, rtol=1e-6)


def test_a_log_the_checkpoint_already_holds_is_not_counted_twice(tmp_path):
    """A crash after a checkpoint's CURRENT was written and before the log was emptied left a
    log whose batches the checkpoint held: replay applied them again and counted them twice in
    the collection's version, so stored evaluations and projections looked stale."""
    spec, vectors = logged_collection(tmp_path, batches=4)
    collection = VectorCollection(tmp_path, spec, fsync=False)
    log_before_checkpoint = (tmp_path / "wal.log").read_bytes()
    collection.checkpoint()
    collection.close(checkpoint=False)
    (tmp_path / "wal.log").write_bytes(log_before_checkpoint)  # the crash: CURRENT switched, log not emptied
    reopened = VectorCollection(tmp_path, spec, fsync=False)
    assert reopened.version == 4 and len(reopened) == 20
    np.testing.assert_allclose(reopened.get(ids_of(20))[1], vectors, rtol=1e-6)
    assert (tmp_path / "wal.log").read_bytes() == wal.prologue(4)
    reopened.upsert(["after"], vectors[:1])
    reopened.close(checkpoint=False)
    again = VectorCollection(tmp_path, spec, fsync=False)
    assert again.version == 5 and len(again) == 21


def test_a_log_that_follows_a_newer_checkpoint_than_the_one_loaded_is_data_loss(tmp_path):
    """A folder whose CURRENT names an older checkpoint than the log follows (files put back
    by hand, a partial copy) opened without the batches between the two, silently."""
    spec, vectors = logged_collection(tmp_path, batches=2)
    collection = VectorCollection(tmp_path, spec, fsync=False)
    collection.checkpoint()
    old_current = (tmp_path / "CURRENT").read_bytes()
    kept = tmp_path.parent / "kept-checkpoint"
    shutil.copytree(tmp_path / "ckpt-000001", kept)
    collection.upsert(["later"], vectors[:1])
    collection.checkpoint()  # ckpt-000002 at version 3; the log now follows it
    collection.upsert(["latest"], vectors[1:2])
    collection.close(checkpoint=False)
    shutil.rmtree(tmp_path / "ckpt-000002")
    shutil.copytree(kept, tmp_path / "ckpt-000001")
    (tmp_path / "CURRENT").write_bytes(old_current)
    log_bytes = (tmp_path / "wal.log").read_bytes()
    with pytest.raises(DataLoss, match="follows version 3, but the checkpoint holds version 2"):
        VectorCollection(tmp_path, spec, fsync=False)
    assert (tmp_path / "wal.log").read_bytes() == log_bytes  # kept as it was


@pytest.mark.parametrize("kept", [3, 8, 12])  # inside MAGIC, after it, inside the start
def test_a_log_whose_beginning_never_reached_the_disk_holds_no_batch(tmp_path, kept):
    spec, vectors = logged_collection(tmp_path, batches=2)
    collection = VectorCollection(tmp_path, spec, fsync=False)
    collection.checkpoint()
    collection.close(checkpoint=False)
    with open(tmp_path / "wal.log", "r+b") as handle:
        handle.truncate(kept)  # a crash while the emptied log was begun again
    reopened = VectorCollection(tmp_path, spec, fsync=False)
    assert reopened.version == 2 and len(reopened) == 10
    reopened.upsert(["after"], vectors[:1])
    reopened.close(checkpoint=False)
    assert len(VectorCollection(tmp_path, spec, fsync=False)) == 11


def test_a_log_whose_start_fails_its_checksum_is_data_loss(tmp_path):
    spec, _ = logged_collection(tmp_path, batches=2)
    flip(tmp_path / "wal.log", len(wal.MAGIC) + 2)
    with pytest.raises(DataLoss, match="its start fails its checksum"):
        VectorCollection(tmp_path, spec, fsync=False)


def crashed_copy(collection: VectorCollection, target: pathlib.Path) -> VectorCollection:
    """The collection opened from a copy of its files as they are: what a crash leaves."""
    shutil.copytree(collection.directory, target)
    return VectorCollection(target, collection.spec, fsync=False)


def test_a_write_that_finds_the_disk_full_is_taken_back_and_later_writes_survive_a_crash(tmp_path):
    """A failed append left its partial record in the log, the next acknowledged batch went
    after it, and replay took that batch for the rest of a torn tail: cut, lost after a crash.
    The failed write also answered INTERNAL."""
    vectors = clustered_vectors(56, DIM, 5, 1)
    collection = VectorCollection(tmp_path / "c", VectorSpec(DIM, "manhattan"), fsync=False)
    collection.upsert(ids_of(5), vectors[:5])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # A file-size limit just past the log's end: the next record is written in part, as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, ((collection.directory / "wal.log").stat().st_size + 100, hard))
    try:
        with pytest.raises(ResourceExhausted, match="no room on the index's disk.*nothing was stored"):
            collection.upsert(ids_of(50, 5), vectors[5:55])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    collection.upsert(["after"], vectors[55:])
    reopened = crashed_copy(collection, tmp_path / "crash")
    assert reopened.has([*ids_of(6), "after"]) == ([*ids_of(5), "after"], ["item-0005"])


def test_a_collection_whose_log_finds_the_disk_full_is_not_half_created(tmp_path, monkeypatch):
    """CreateCollection named the collection in SQLite before it began its log: on a full disk it
    answered INTERNAL, the dataset counted a collection no call could list, delete or create again
    (IntegrityError) until a restart, and followers were told to create it."""
    index = Index(tmp_path, fsync=False, changes=ChangeLog(1 << 20))
    index.create_dataset("shoes")
    position = index.changes.last

    def full(self, version):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(wal.WriteAheadLog, "_start", full)
        with pytest.raises(ResourceExhausted, match="no room on the index's disk.*nothing was created"):
            index.create_collection("shoes", CollectionKey("m", "l"), DIM)
    assert index.dataset("shoes").collection_count == 0 and not any((tmp_path / "collections").iterdir())
    assert index.changes.after(position, 1 << 20, 0) == []
    index.create_collection("shoes", CollectionKey("m", "l"), DIM)
    index.close()
    index = Index(tmp_path, fsync=False)
    assert [info.key.name for info in index.collections("shoes")] == ["m/l/avg/cosine"]
    index.close()


class FailingDisk:
    """A log file whose writes fail (EIO) after a part is written, and whose truncation fails."""

    def __init__(self, file):
        self.file = file

    def write(self, data) -> int:
        self.file.write(bytes(data[:20]))
        raise OSError(errno.EIO, "Input/output error")

    def truncate(self, size: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_failed_write_that_cannot_be_taken_back_stops_writes_until_a_checkpoint(tmp_path):
    """The same defect where even cutting the log back fails: the log takes no record (an
    acknowledged one would be lost behind the partial one) until a checkpoint empties it."""
    vectors = clustered_vectors(7, DIM, 1, 1)
    collection = VectorCollection(tmp_path / "c", VectorSpec(DIM, "manhattan"), fsync=False)
    collection.upsert(ids_of(5), vectors[:5])
    disk = collection._wal._file
    collection._wal._file = FailingDisk(disk)
    with pytest.raises(OSError, match="Input/output error"):
        collection.upsert(["lost"], vectors[5:6])
    collection._wal._file = disk  # the disk works again; the partial record is still there
    with pytest.raises(Unavailable, match="no writes until its next checkpoint.*nothing was stored"):
        collection.upsert(["refused"], vectors[5:6])
    collection.checkpoint()
    collection.upsert(["after"], vectors[6:])
    reopened = crashed_copy(collection, tmp_path / "crash")
    assert reopened.has([*ids_of(5), "lost", "refused", "after"]) == ([*ids_of(5), "after"], ["lost", "refused"])


# ---- 3. corrupt checkpoints ----------------------------------------------------------------

def checkpointed(tmp_path, metric="cosine", n=400):
    vectors = clustered_vectors(n, DIM, 8, 3)
    collection = VectorCollection(tmp_path, VectorSpec(DIM, metric), fsync=False)
    collection.upsert(ids_of(n), vectors)
    collection.close()
    pointer = json.loads((tmp_path / "CURRENT").read_text())
    return collection.spec, tmp_path / pointer["checkpoint"]


def damage_flip_60(path):
    size = path.stat().st_size
    for offset in np.random.default_rng(0).integers(0, size, 60):
        flip(path, int(offset))


def damage_truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("metric,file_name,damage", [
    ("cosine", "graph.bin", damage_flip_60),
    ("cosine", "graph.bin", damage_truncate),
    ("cosine", "norms.npy", lambda p: flip(p, p.stat().st_size - 3)),
    ("manhattan", "vectors.npy", lambda p: flip(p, p.stat().st_size - 3)),  # one byte: a wrong vector
    ("manhattan", "vectors.npy", damage_truncate),
    ("euclidean", "meta.json", lambda p: p.write_text("{not json")),
    ("euclidean", "MANIFEST.json", lambda p: flip(p, 20)),
])
def test_a_damaged_checkpoint_file_is_refused_before_it_is_loaded(tmp_path, metric, file_name, damage):
    spec, checkpoint = checkpointed(tmp_path, metric)
    damage(checkpoint / file_name)
    before = tree_digest(tmp_path)
    with pytest.raises(DataLoss):
        VectorCollection(tmp_path, spec, fsync=False)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("pointer", ["garbage\x00\x01", "ckpt-999999", '{"checkpoint": "ckpt-000001"}',
                                     "../../etc"])
def test_a_bad_current_pointer_is_refused(tmp_path, pointer):
    spec, _ = checkpointed(tmp_path)
    (tmp_path / "CURRENT").write_text(pointer)
    with pytest.raises(DataLoss):
        VectorCollection(tmp_path, spec, fsync=False)


def test_a_checkpoint_from_before_checksums_is_rebuilt_from_its_vectors(tmp_path):
    """Format 1 had vectors.npy, graph.bin and meta.json, and CURRENT held the folder name."""
    vectors = clustered_vectors(50, DIM, 5, 4)
    folder = tmp_path / "ckpt-000003"
    folder.mkdir()
    np.save(folder / "vectors.npy", vectors)
    ids = ids_of(50)
    ids[7] = None  # a deleted slot
    (folder / "meta.json").write_text(json.dumps({"ids": ids, "ef": 64, "capacity": 1024, "version": 4}))
    (folder / "graph.bin").write_bytes(b"not trusted, never read")
    (tmp_path / "CURRENT").write_text("ckpt-000003")
    collection = VectorCollection(tmp_path, VectorSpec(DIM), fsync=False)
    assert len(collection) == 49 and collection.version == 4
    assert ranked(collection, vectors[3:4], 1)[0][0] == ["item-0003"]
    assert json.loads((tmp_path / "CURRENT").read_text())["checkpoint"] != "ckpt-000003"


# ---- 2-4 through the index core: one collection fails, the rest serves; the way back ----------

def make_index(data_dir, datasets=("shoes", "bags")):
    index = Index(data_dir, fsync=False)
    vectors = clustered_vectors(60, DIM, 3, 5)
    for name in datasets:
        index.create_dataset(name)
        index.put_items(name, [ItemRecord(i, "a", image=i.encode()) for i in ids_of(60)])
        for metric in ("cosine", "euclidean"):
            index.create_collection(name, CollectionKey("m", "l", metric=metric), DIM)
            index.upsert_vectors(name, f"m/l/avg/{metric}", ids_of(60), vectors)
    return index, vectors


def test_one_damaged_collection_answers_data_loss_and_the_rest_keeps_serving(tmp_path):
    index, vectors = make_index(tmp_path)
    directory = index.collection("shoes", "m/l/avg/cosine").directory
    index.close()
    damage_flip_60(directory / json.loads((directory / "CURRENT").read_text())["checkpoint"] / "graph.bin")
    index = Index(tmp_path, fsync=False)
    with pytest.raises(DataLoss, match=r"collection 'm/l/avg/cosine' of dataset 'shoes' is damaged.*"
                                       r"rebuild_damaged.*snapshot"):
        index.search("shoes", "m/l/avg/cosine", vectors[:1], 5)
    with pytest.raises(DataLoss):
        index.upsert_vectors("shoes", "m/l/avg/cosine", ids_of(1), vectors[:1])
    listed = {info.key.name: info.damage for info in index.collections("shoes")}
    assert listed["m/l/avg/euclidean"] == "" and "graph.bin" in listed["m/l/avg/cosine"]
    for dataset, name in (("shoes", "m/l/avg/euclidean"), ("bags", "m/l/avg/cosine")):
        results, _ = index.search(dataset, name, vectors[:1], 5)
        assert results[0][0][0] == "item-0000"
    # Items still change; the damaged collection is skipped (it is rebuilt whole).
    index.put_items("shoes", [ItemRecord("item-0001", "a", image=b"new image")])
    index.delete_items("shoes", ["item-0002"])
    # The way back: delete it (its files are kept), create it again, fill it from the items.
    index.delete_collection("shoes", "m/l/avg/cosine")
    kept = list((tmp_path / "damaged").iterdir())
    assert len(kept) == 1 and list(kept[0].glob("ckpt-*/graph.bin"))
    index.create_collection("shoes", CollectionKey("m", "l"), DIM)
    index.upsert_vectors("shoes", "m/l/avg/cosine", ids_of(2, 3), vectors[3:5])
    assert index.search("shoes", "m/l/avg/cosine", vectors[3:4], 1)[0][0][0] == ["item-0003"]
    index.close()


def test_a_damaged_collection_does_not_stop_the_index_from_starting(tmp_path):
    index, _ = make_index(tmp_path, datasets=("shoes",))
    directory = index.collection("shoes", "m/l/avg/euclidean").directory
    index.close()
    (directory / "CURRENT").write_text("\x00garbage")
    index = Index(tmp_path, fsync=False)
    assert [info.key.name for info in index.collections("shoes") if info.damage] == ["m/l/avg/euclidean"]
    index.close()


# ---- 5. a moved or copied data dir ----------------------------------------------------------

def test_a_copied_data_dir_works_and_never_writes_into_the_original(tmp_path):
    index, vectors = make_index(tmp_path / "original", datasets=("shoes",))
    expected = index.search("shoes", "m/l/avg/cosine", vectors[:3], 5)
    index.close()
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    original = tree_digest(tmp_path / "original")
    shutil.move(tmp_path / "original", tmp_path / "moved")
    copy = Index(tmp_path / "copy", fsync=False)
    assert copy.search("shoes", "m/l/avg/cosine", vectors[:3], 5)[0][0][0] == expected[0][0][0]
    copy.upsert_vectors("shoes", "m/l/avg/cosine", ids_of(10), vectors[10:20])
    copy.checkpoint()
    copy.close()
    assert tree_digest(tmp_path / "moved") == original
    moved = Index(tmp_path / "moved", fsync=False)
    assert len(moved.collection("shoes", "m/l/avg/cosine").healthy()) == 60
    moved.close()


def test_absolute_collection_paths_from_older_versions_are_made_relative(tmp_path):
    index, vectors = make_index(tmp_path / "a", datasets=("shoes",))
    for _, name, _, stored in index.records.collections():
        index.records.move_collection("shoes", name, str(tmp_path / "elsewhere" / pathlib.Path(stored).name))
    index.close()
    index = Index(tmp_path / "a", fsync=False)
    assert all(not pathlib.Path(d).is_absolute() for *_, d in index.records.collections())
    assert len(index.collection("shoes", "m/l/avg/cosine").healthy()) == 60
    index.close()


# ---- 6. an image replacement and its vectors ------------------------------------------------

@pytest.mark.parametrize("crash_in", ["vector delete", "items commit"])
def test_a_crash_during_an_image_replacement_never_leaves_the_new_image_with_old_vectors(
        tmp_path, monkeypatch, crash_in):
    index, _ = make_index(tmp_path, datasets=("shoes",))

    def crash(*args, **kwargs):
        raise SystemExit(f"killed during the {crash_in}")

    if crash_in == "items commit":
        monkeypatch.setattr(index.records, "put_items", crash)
    else:
        monkeypatch.setattr(VectorCollection, "delete", crash)
    with pytest.raises(SystemExit):
        index.put_items("shoes", [ItemRecord("item-0004", "a", image=b"a new image")])
    monkeypatch.undo()
    index.close()
    index = Index(tmp_path, fsync=False)
    item = index.get_items("shoes", ["item-0004"], True)[0][0]
    with_vectors = [info.key.name for info in index.collections("shoes") if info.healthy().has(["item-0004"])[0]]
    # Either the old image (with or without its vectors: IndexDataset embeds what lacks them) or
    # the new one without vectors; never the new image with the old image's vectors.
    assert item.image == b"item-0004" or not with_vectors, (item.image, with_vectors)
    index.close()


def test_vectors_made_from_a_replaced_image_are_not_stored(tmp_path):
    index, vectors = make_index(tmp_path, datasets=("shoes",))
    old = index.get_items("shoes", ["item-0001", "item-0002"], False)[0]
    index.put_items("shoes", [ItemRecord("item-0001", "a", image=b"replaced meanwhile")])
    inserted, replaced, stale = index.upsert_vectors("shoes", "m/l/avg/cosine", ["item-0001", "item-0002"],
                                                     vectors[:2], [item.digest for item in old])
    assert (inserted, replaced, stale) == (0, 1, ["item-0001"])
    assert index.collection("shoes", "m/l/avg/cosine").healthy().has(["item-0001"])[0] == []
    index.close()


@pytest.mark.parametrize("case", ["fewer rows", "more rows", "wrong shape, all stale"])
def test_vectors_sent_with_image_digests_are_checked_whole(tmp_path, case):
    """With image digests, the rows were picked by the fresh ids before any check: fewer rows
    than ids answered INTERNAL (IndexError), extra rows were dropped silently, and a batch whose
    ids were all stale was never looked at."""
    index, vectors = make_index(tmp_path, datasets=("shoes",))
    ids = ids_of(3)
    digests = [item.digest for item in index.get_items("shoes", ids, False)[0]]
    if case == "wrong shape, all stale":
        index.put_items("shoes", [ItemRecord(i, "a", image=b"replaced meanwhile") for i in ids])
    sent = {"fewer rows": vectors[:1], "more rows": vectors[:5],
            "wrong shape, all stale": np.zeros((3, DIM + 1), np.float32)}[case]
    with pytest.raises(InvalidArgument, match=r"3 ids for \d vectors|shape \[3, 17\]"):
        index.upsert_vectors("shoes", "m/l/avg/euclidean", ids, sent, digests)
    index.close()


def test_an_item_id_that_could_never_exist_is_refused_by_delete_as_by_put(tmp_path):
    """DeleteItems answered OK (not found) for an empty or a 100,000-character id, which
    PutItems refuses."""
    index, _ = make_index(tmp_path, datasets=("shoes",))
    for bad in ("", "x" * 100_000):
        with pytest.raises(InvalidArgument, match="item id"):
            index.delete_items("shoes", ["item-0001", bad])
    assert index.get_items("shoes", ["item-0001"], False)[0]  # nothing deleted
    index.close()


# ---- 7. compaction -------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "manhattan"])
def test_compaction_reclaims_deleted_rows_without_changing_any_answer(tmp_path, metric):
    vectors = clustered_vectors(1000, DIM, 10, 6)
    collection = VectorCollection(tmp_path, VectorSpec(DIM, metric, ef=1000), fsync=False)
    collection.upsert(ids_of(1000), vectors)
    collection.delete(ids_of(500, 250))
    queries = clustered_vectors(20, DIM, 10, 7)
    exact_before = ranked(collection, queries, 30, exact=True)
    approximate_before = ranked(collection, queries, 30)
    stored_before = collection.get(ids_of(1000))
    collection.checkpoint()
    stats = collection.stats()
    assert (stats["count"], stats["deleted"]) == (500, 0)
    if metric == "manhattan":
        assert stats["capacity"] == 500
    assert ranked(collection, queries, 30, exact=True) == exact_before
    assert [ids for ids, _ in ranked(collection, queries, 30)] == [ids for ids, _ in approximate_before]
    after = collection.get(ids_of(1000))
    assert after[0] == stored_before[0] and after[2] == stored_before[2]
    np.testing.assert_array_equal(after[1], stored_before[1])
    collection.close()
    reopened = VectorCollection(tmp_path, collection.spec, fsync=False)
    assert ranked(reopened, queries, 30, exact=True) == exact_before


@pytest.mark.parametrize("metric", ["cosine", "manhattan"])
def test_a_replaced_vector_gets_a_new_node_and_compaction_drops_the_old_one(tmp_path, metric):
    """Defect: a re-upserted vector was updated in place in the graph, which costs hnswlib about
    7x an insert (and held a follower's reads back as long); now it gets a new node."""
    vectors = clustered_vectors(400, DIM, 4, 10)
    collection = VectorCollection(tmp_path, VectorSpec(DIM, metric, ef=400), fsync=False)
    assert collection.upsert(ids_of(200), vectors[:200]) == (200, 0)
    assert collection.upsert(ids_of(100), vectors[200:300]) == (0, 100)
    stats = collection.stats()
    assert (stats["count"], stats["deleted"]) == (200, 100 if metric == "cosine" else 0)
    expected = vectors[list(range(200, 300)) + list(range(100, 200))]
    for exact in (False, True):
        ids, distances = ranked(collection, vectors[200:201], 200, exact)[0]
        assert ids[0] == "item-0000" and distances[0] < 1e-5 and len(set(ids)) == 200
    collection.checkpoint()
    assert (collection.stats()["count"], collection.stats()["deleted"]) == (200, 0)
    np.testing.assert_allclose(collection.get(ids_of(200))[1], expected, rtol=1e-5, atol=1e-6)
    collection.close()
    reopened = VectorCollection(tmp_path, collection.spec, fsync=False)
    np.testing.assert_allclose(reopened.get(ids_of(200))[1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("metric", "during"), [("cosine", "_build_rows"), ("manhattan", "_build_rows"),
                                                ("cosine", "_copied_rows")])
def test_writes_made_while_compaction_builds_its_graph_are_kept_and_not_held(tmp_path, metric, during):
    """Compaction no longer holds writes while it rebuilds: writes made meanwhile (here, from
    inside the copy of the rows or the build) go on at once and are in the compacted
    collection, on disk too."""
    vectors = clustered_vectors(3000, DIM, 10, 11)
    collection = VectorCollection(tmp_path, VectorSpec(DIM, metric, ef=400), fsync=False)
    collection.upsert(ids_of(1000), vectors[:1000])
    collection.delete(ids_of(500))
    expected = {item_id: vectors[500 + n] for n, item_id in enumerate(ids_of(500, 500))}

    def writes() -> None:
        for batch in range(20):  # more batches than one round replays under the lock
            ids = ids_of(10, 400 + 10 * batch)  # deleted ids back, then live ones replaced
            collection.upsert(ids, vectors[1000 + 10 * batch:1010 + 10 * batch])
            expected.update(zip(ids, vectors[1000 + 10 * batch:1010 + 10 * batch], strict=True))
        collection.delete(ids_of(5, 700))
        for item_id in ids_of(5, 700):
            expected.pop(item_id)

    step = getattr(collection, during)
    done = []

    def step_after_writes(*args):
        writer = threading.Thread(target=writes)
        writer.start()
        writer.join(timeout=30)  # writes wait for nothing the compaction holds
        done.append(not writer.is_alive())
        return step(*args)

    setattr(collection, during, step_after_writes)
    collection.checkpoint()
    assert done == [True]
    # Dead: only what the writes made during the build left (100 replaced, 5 deleted); those made
    # before the copy took the rows leave nothing dead.
    dead = 0 if during == "_copied_rows" else 105 if metric == "cosine" else 5
    stats = collection.stats()
    assert (stats["count"], stats["deleted"]) == (len(expected), dead)
    for opened in (collection, VectorCollection(tmp_path, collection.spec, fsync=False)):
        found, got, missing = opened.get(sorted(expected))
        assert found == sorted(expected) and not missing
        np.testing.assert_allclose(got, np.array([expected[i] for i in found]), rtol=1e-5, atol=1e-6)
        ids, _ = ranked(opened, vectors[1000:1001], len(expected), exact=True)[0]
        assert sorted(ids) == sorted(expected)
        if opened is collection:
            collection.close()


@pytest.mark.parametrize("write", ["compaction", "new slots"])
def test_a_filtered_search_stays_right_when_a_write_moves_the_slots_under_it(tmp_path, write):
    """Defect: a filtered search read the slots' item ids, then searched with a mask over those
    slots: a compaction in between (slots renumbered) made it filter the wrong items, and new
    slots in between made the mask too short (an error). Here the write lands in between."""
    index = Index(tmp_path, fsync=False)
    index.create_dataset("d")
    index.put_items("d", [ItemRecord(item_id, "even" if n % 2 == 0 else "odd")
                          for n, item_id in enumerate(ids_of(3000))])
    index.create_collection("d", CollectionKey("m", "l"), DIM)
    vectors = clustered_vectors(3000, DIM, 10, 12)
    index.upsert_vectors("d", "m/l/avg/cosine", ids_of(2000), vectors[:2000])
    collection = index.collection("d", "m/l/avg/cosine").vectors
    search = collection.search

    def search_after_a_write(*args, **kwargs):
        if write == "compaction":
            index.delete_items("d", ids_of(999, 1))
            index.checkpoint()
        else:
            index.upsert_vectors("d", "m/l/avg/cosine", ids_of(1000, 2000), vectors[2000:])
        return search(*args, **kwargs)

    collection.search = search_after_a_write
    results, _ = index.search("d", "m/l/avg/cosine", vectors[:2], 20, include_labels=["even"], exact=True)
    collection.search = search
    truth = index.search("d", "m/l/avg/cosine", vectors[:2], 20, include_labels=["even"], exact=True)[0]
    assert [(ids, labels) for ids, labels, _ in results] == [(ids, labels) for ids, labels, _ in truth]
    assert all(set(labels) == {"even"} and len(ids) == 20 for ids, labels, _ in results)
    index.close()


# ---- 11. near-parallel vectors under cosine ------------------------------------------------

def test_near_parallel_vectors_never_get_negative_distances_and_ties_rank_by_id(tmp_path):
    base = np.abs(np.random.default_rng(8).normal(size=(1, 64))).astype(np.float32) + 1.0
    near = base * np.float32(1.0 + 1e-7) + np.linspace(0, 1e-6, 64, dtype=np.float32)
    collection = VectorCollection(tmp_path, VectorSpec(64, "cosine"), fsync=False)
    collection.upsert(["z-near", "b-copy", "a-copy", "m-scaled"], np.concatenate([near, base, base, 3 * base]))
    for exact in (True, False):
        ids, distances = ranked(collection, base, 4, exact)[0]
        assert min(distances) >= 0 and not any(np.signbit(distances))
    ids, distances = ranked(collection, base, 4, exact=True)[0]
    assert ids.index("a-copy") < ids.index("b-copy") and ids[3] == "z-near", (ids, distances)
    assert distances[ids.index("a-copy")] == distances[ids.index("b-copy")] < distances[3]


# ---- 12. a restore that fails, and what a crash must not undo --------------------------------

def rewritten_snapshot(index, snapshot: str, name: str, damage) -> str:
    """Stores a copy of `snapshot` as `name` with `damage(folder)` done to its extracted files."""
    folder = pathlib.Path(index.data_dir) / "rewrite"
    with tarfile.open(index.data_dir / "snapshots" / f"{snapshot}.tar") as archive:
        archive.extractall(folder, filter="data")
    damage(folder)
    with tarfile.open(index.data_dir / "snapshots" / f"{name}.tar", "w") as archive:
        archive.add(folder, arcname=".")
    shutil.rmtree(folder)
    return name


def damage_a_graph(folder):
    damage_flip_60(next(folder.glob("collection-*/graph.bin")))


def damage_the_items(folder):
    (folder / "records.sqlite").write_bytes(b"not a database" * 100)


def damage_the_items_midway(folder):
    path = folder / "records.sqlite"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 8192] = b"\xa5" * 8192
    path.write_bytes(bytes(data))


def damage_the_manifest_with_a_path(folder):
    """A folder outside the snapshot (here a live collection's checkpoint): restoring it copied any
    directory the process can read into the data folder."""
    manifest = json.loads((folder / "manifest.json").read_text())
    live = next((folder.parent / "collections").iterdir())
    manifest["collections"][0]["folder"] = str(live / json.loads((live / "CURRENT").read_text())["checkpoint"])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def damage_a_spec(change: dict):
    """A collection spec no CreateCollection takes (an unknown pooling, ef not a whole number) was
    restored: listing the dataset's collections then failed, and so did every follower's copy."""
    def damage(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["collections"][0]["spec"].update(change)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return damage


def damage_the_manifest_listing_a_collection_twice(folder):
    """The second copy failed only once its files were in the data dir, and they were left there."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["collections"].append(manifest["collections"][0])
    (folder / "manifest.json").write_text(json.dumps(manifest))


def damage_an_image_bit(folder):
    """A flipped bit in an image passes SQLite's check: the item was restored with an image its
    digest does not match (the snapshot held no checksum of its items)."""
    path = folder / "records.sqlite"
    data = bytearray(path.read_bytes())
    data[data.index(b"item-0007" * 20) + 50] ^= 1
    path.write_bytes(bytes(data))


def damage_an_item(folder):
    """An item whose metadata is not JSON (a forged snapshot, its checksum made to match) was
    restored: reading it, and every follower's copy of the dataset, then failed."""
    with contextlib.closing(sqlite3.connect(folder / "records.sqlite")) as db, db:
        db.execute("UPDATE items SET metadata = 'not json' WHERE id = 'item-0007'")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["records_sha256"] = hashlib.sha256((folder / "records.sqlite").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def damage_the_layout(name: str):
    """A snapshot whose file is a folder (or folder a file): INTERNAL (IsADirectoryError, SQLite's
    OperationalError), not DATA_LOSS naming the snapshot."""
    def damage(folder):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
            path.write_text("x")
        else:
            path.unlink()
            path.mkdir()
    return damage


def damage_the_items_cut_off(folder):
    """A tar cut short after the manifest (tarfile reads it without complaint), of a snapshot from
    before its items had a checksum: ATTACH made an empty database of the missing items file, and
    the import failed with OperationalError (INTERNAL)."""
    (folder / "records.sqlite").unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["records_sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [
    damage_a_graph, damage_the_items, damage_the_items_midway, damage_the_manifest_with_a_path,
    damage_a_spec({"pooling": "weird"}), damage_a_spec({"ef": 64.5}), damage_the_manifest_listing_a_collection_twice,
    damage_an_image_bit, damage_an_item, damage_the_layout("manifest.json"), damage_the_layout("records.sqlite"),
    damage_the_layout("collection-0"), damage_the_items_cut_off])
def test_a_snapshot_that_fails_its_checks_restores_nothing_not_even_for_followers(tmp_path, damage):
    index = Index(tmp_path, fsync=False, changes=ChangeLog(1 << 20))
    index.create_dataset("shoes")
    index.put_items("shoes", [ItemRecord(i, "a", image=i.encode() * 300) for i in ids_of(2000)])
    index.create_collection("shoes", CollectionKey("m", "l"), DIM)
    index.upsert_vectors("shoes", "m/l/avg/cosine", ids_of(20), clustered_vectors(20, DIM, 2, 1))
    good = index.snapshot("shoes")[0].name
    bad = rewritten_snapshot(index, good, "shoes-20260101T000000-bad000", damage)
    before = {p.name for p in (tmp_path / "collections").iterdir()}
    position = index.changes.last
    with pytest.raises(DataLoss, match=r"snapshot 'shoes-20260101T000000-bad000' cannot be restored.*Nothing was "
                                       r"restored"):
        index.restore(bad, "copy")
    assert [d.name for d in index.datasets()] == ["shoes"]
    assert {p.name for p in (tmp_path / "collections").iterdir()} == before
    logged = [(c.kind, c.dataset) for c in index.changes.after(position, 1 << 20, 0)]
    assert logged == []  # a follower is given a restored dataset only once it is whole
    assert index.restore(good, "copy").item_count == 2000  # the name is free, the good snapshot restores
    index.create_dataset("more")  # the index still takes writes
    index.close()


def test_a_snapshot_and_a_restored_collection_are_on_disk_before_they_are_named(tmp_path, monkeypatch):
    index, _ = make_index(tmp_path, datasets=("shoes",))
    index.fsync = True
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    snapshot = index.snapshot("shoes")[0].name
    assert str(tmp_path / "snapshots" / f"{snapshot}.tar.tmp") in synced  # its bytes, before the rename
    assert str(tmp_path / "snapshots") in synced  # the rename
    synced.clear()
    index.restore(snapshot, "copy")
    restored = index.collection("copy", "m/l/avg/cosine").directory
    assert {str(restored), str(restored / "ckpt-000001"), str(restored / "ckpt-000001" / "graph.bin")} <= set(synced)
    index.close()


def test_a_restore_onto_a_taken_name_leaves_that_dataset_after_a_restart(tmp_path):
    """A restore wrote its marker before it found the name taken: the next start took the marker
    for a restore cut short and deleted the dataset that had the name."""
    index, _ = make_index(tmp_path)
    snapshot = index.snapshot("shoes")[0].name
    with pytest.raises(AlreadyExists, match="dataset 'bags' exists already"):
        index.restore(snapshot, "bags")
    index.close()
    index = Index(tmp_path, fsync=False)
    assert [(d.name, d.item_count, d.collection_count) for d in index.datasets()] == [("bags", 60, 2), ("shoes", 60, 2)]
    index.close()


def test_a_restore_cut_short_by_a_crash_is_gone_after_the_restart(tmp_path, monkeypatch):
    index, _ = make_index(tmp_path, datasets=("shoes",))
    snapshot = index.snapshot("shoes")[0].name
    real_open = Index._open_collection

    def crash_after_the_items(self, *args, **kwargs):
        raise SystemExit("killed during the restore")

    monkeypatch.setattr(Index, "_open_collection", crash_after_the_items)
    with pytest.raises(SystemExit):
        index.restore(snapshot, "copy")
    assert "copy" in [d.name for d in index.datasets()]  # its items are in: it looks whole
    index.close()
    monkeypatch.setattr(Index, "_open_collection", real_open)
    index = Index(tmp_path, fsync=False)
    assert [d.name for d in index.datasets()] == ["shoes"]
    assert index.restore(snapshot, "copy").collection_count == 2
    index.close()


# ---- 13. vectors at the edges of float range -------------------------------------------------

@pytest.mark.parametrize("scale", [1e-4, 5000.0])
def test_minkowski_with_a_large_p_ranks_by_true_distance(tmp_path, scale):
    """(diff ** p) underflowed to 0 for small differences and overflowed to inf for large ones at
    p = 100: every distance 0 (or inf) and the ranking by item id, the farthest first."""
    spec = VectorSpec(DIM, "minkowski", 100.0)
    collection = VectorCollection(tmp_path, spec, fsync=False)
    query = np.full(DIM, 0.5, np.float32)
    names = ["z-nearest", *(f"a-{i}" for i in range(1, 10))]  # by name, the nearest comes last
    # Item n differs from the query by (n + 1) * scale in every coordinate.
    collection.upsert(names, np.stack([query + (n + 1) * scale for n in range(10)]).astype(np.float32))
    [(found, distances)], _ = collection.search(query[None], 3)
    assert found == ["z-nearest", "a-1", "a-2"]
    differences = (np.stack([query + (n + 1) * scale for n in range(3)]).astype(np.float32) - query)[:, 0]
    np.testing.assert_allclose(distances, np.abs(differences.astype(np.float64)) * DIM ** (1 / 100), rtol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "ip"])
def test_a_vector_whose_distances_would_overflow_is_refused_and_changes_nothing(tmp_path, metric):
    """A finite vector of norm 1.4e20 was taken by a cosine collection: its norm overflowed
    float32 and it was stored, and given back after a restart, as NaN."""
    collection = VectorCollection(tmp_path, VectorSpec(4, metric), fsync=False)
    collection.upsert(["small"], np.array([[1, 0, 0, 0]], np.float32))
    huge = np.array([[1e20, 1e20, 0, 0]], np.float32)
    with pytest.raises(InvalidArgument, match="vector of item 'big' has norm 1.41e\\+20, over the limit"):
        collection.upsert(["big"], huge)
    with pytest.raises(InvalidArgument, match="a query vector has a norm over the limit"):
        collection.search(huge, 1)
    assert len(collection) == 1


def test_cosine_keeps_a_tiny_vector_as_it_was_sent(tmp_path):
    """Norms were summed in float32, where the squares of tiny values vanish: a vector of norm
    2e-25 got the norm 0, and came back (and was stored) as zeros."""
    collection = VectorCollection(tmp_path, VectorSpec(4, "cosine"), fsync=False)
    tiny = np.array([[1e-25, 2e-25, 0, 0]], np.float32)
    collection.upsert(["tiny"], tiny)
    collection.close()
    np.testing.assert_allclose(VectorCollection(tmp_path, collection.spec, fsync=False).get(["tiny"])[1], tiny,
                               rtol=1e-5)


# ---- 14. reads and snapshots racing a delete -----------------------------------------------

def test_a_snapshot_racing_the_delete_of_its_dataset_is_not_found_and_leaves_no_file(tmp_path):
    """Defect: a snapshot checked that its dataset existed before it took its lock, never after:
    a DeleteDataset in between gave an "OK" snapshot holding no dataset."""
    index, _ = make_index(tmp_path, datasets=("shoes",))
    guard = index._guard

    class DeleteFirst:
        """The index's guard, but the dataset is deleted before the write side is taken."""

        read = guard.read

        def write(self):
            index.delete_dataset("shoes")
            return guard.write()

    index._guard = DeleteFirst()
    with pytest.raises(NotFound, match="dataset 'shoes' does not exist"):
        index.snapshot("shoes")
    index._guard = guard
    assert not list((tmp_path / "snapshots").iterdir()) and index.snapshots() == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["collections", "snapshots"]
    index.close()


def delete_then(index, call):
    """`call`, run once the dataset 'shoes' is deleted: what a DeleteDataset landing just
    before it does to a read that found the dataset."""
    def deleted_first(*args, **kwargs):
        if "shoes" in index.records.dataset_names():
            index.delete_dataset("shoes")
        return call(*args, **kwargs)
    return deleted_first


def test_a_search_racing_the_delete_of_its_dataset_is_not_found(tmp_path, monkeypatch):
    """Defect: a search read the dataset's labels after it fetched the collection: a
    DeleteDataset in between made it fail INTERNAL (KeyError) instead of NOT_FOUND."""
    index, vectors = make_index(tmp_path, datasets=("shoes",))
    collection = index.collection

    def collection_then_delete(*args):
        found = collection(*args)
        index.delete_dataset("shoes")
        return found

    monkeypatch.setattr(index, "collection", collection_then_delete)
    with pytest.raises(NotFound, match="dataset 'shoes' does not exist"):
        index.search("shoes", "m/l/avg/cosine", vectors[:1], 5)
    index.close()


@pytest.mark.parametrize("read", ["get items", "scan items", "list collections", "get dataset", "list datasets",
                                  "get attachment"])
def test_a_read_racing_the_delete_of_its_dataset_is_not_found_never_empty(tmp_path, monkeypatch, read):
    """Defect: reads checked that the dataset existed, then read it: a DeleteDataset in between
    answered every item missing, an empty page or no collections (as if the dataset were empty,
    which it never was), an attachment not found, and GetDataset and ListDatasets failed
    INTERNAL (a None record)."""
    index, _ = make_index(tmp_path)
    index.put_attachment("shoes", "m/l/avg/cosine", "score", 1, b"0.5")
    records = index.records
    calls = {"get items": (records, "get_items", lambda: index.get_items("shoes", ids_of(2), False)),
             "scan items": (records, "scan_items", lambda: index.scan_items("shoes", "", 10, False)),
             "list collections": (index, "_dataset_collections", lambda: index.collections("shoes")),
             "get dataset": (records, "dataset", lambda: index.dataset("shoes")),
             "list datasets": (records, "dataset", lambda: index.datasets()),
             "get attachment": (records, "attachment", lambda: IndexServicer.GetAttachment.__wrapped__(
                 IndexServicer(index), pb.GetAttachmentRequest(dataset="shoes", collection="m/l/avg/cosine",
                                                               key="score"), None))}
    owner, method, call = calls[read]
    monkeypatch.setattr(owner, method, delete_then(index, getattr(owner, method)))
    if read == "list datasets":
        assert [d.name for d in call()] == ["bags"]
    else:
        with pytest.raises(NotFound, match="dataset 'shoes' does not exist"):
            call()
    monkeypatch.undo()
    assert [d.name for d in index.datasets()] == ["bags"]
    index.close()


# ---- 15. a collection damaged for a while ---------------------------------------------------

def test_a_collection_damaged_for_a_while_never_serves_items_deleted_or_replaced_meanwhile(tmp_path):
    """Defect: item deletions and image replacements skip a collection that failed its checks at
    start (here its CURRENT unreadable, as on an I/O error that passes); once a later start
    opened it healthy, searches found the deleted item, and the replaced one by the vector of
    its old image."""
    index, vectors = make_index(tmp_path, datasets=("shoes",))
    directory = index.collection("shoes", "m/l/avg/cosine").directory
    index.close()
    current = (directory / "CURRENT").read_bytes()
    (directory / "CURRENT").write_bytes(b"\x00unreadable")
    index = Index(tmp_path, fsync=False)
    assert index.collection("shoes", "m/l/avg/cosine").damage
    index.put_items("shoes", [ItemRecord("item-0001", "a", image=b"a new image"), ItemRecord("item-0003", "a",
                                                                                             image=b"item-0003")])
    index.delete_items("shoes", ["item-0002"])
    index.close()
    (directory / "CURRENT").write_bytes(current)  # the disk reads again
    for _ in range(2):  # and stays right after the next start
        index = Index(tmp_path, fsync=False)
        for name in ("m/l/avg/cosine", "m/l/avg/euclidean"):
            assert index.collection("shoes", name).healthy().has(ids_of(4)) == (
                ["item-0000", "item-0003"], ["item-0001", "item-0002"])
            found = index.search("shoes", name, vectors[1:3], 60)[0]
            assert all({"item-0001", "item-0002"}.isdisjoint(ids) for ids, _, _ in found)
        index.close()


# ---- 16. what a kill -9 leaves, and a full disk during a snapshot ----------------------------

def test_leftovers_of_a_killed_index_are_swept_at_start_and_nothing_else(tmp_path, caplog):
    """Defect: a kill -9 during a snapshot or a restore left its work folder (a whole copy of
    the dataset, images included) in the data dir and its unfinished file in snapshots/, and
    one during DeleteCollection or DeleteDataset left the collection's folder: all kept forever."""
    index, _ = make_index(tmp_path, datasets=("shoes",))
    kept_snapshot = index.snapshot("shoes")[0].name
    named = sorted(p.name for p in (tmp_path / "collections").iterdir())
    index.close()
    work = tmp_path / "index-work-k2j4h6g8"  # a snapshot's or restore's work folder
    work.mkdir()
    shutil.copyfile(tmp_path / "records.sqlite", work / "records.sqlite")
    unnamed = tmp_path / "collections" / ("0a" * 16)  # a collection whose row was deleted
    shutil.copytree(tmp_path / "collections" / named[0], unnamed)
    leftovers = [work, unnamed, tmp_path / "snapshots" / "shoes-20260101T000000-abcdef.tar.tmp",
                 tmp_path / "snapshots" / ".shoes-20260101T000000-fedcba.x1y2z3.tar.tmp"]  # WriteSnapshot's
    lookalikes = [tmp_path / "tmp-mine", tmp_path / "collections" / "keep-me", tmp_path / "damaged" / ("0b" * 16),
                  tmp_path / "snapshots" / "notes.tmp", tmp_path / "index-work-notes.txt"]
    for path in [*leftovers[2:], *lookalikes[3:]]:
        path.write_bytes(b"partial")
    for path in lookalikes[:3]:
        path.mkdir(parents=True)
    with caplog.at_level("WARNING", "convsearch.index"):
        index = Index(tmp_path, fsync=False)
    assert [path for path in leftovers if path.exists()] == []
    assert all(path.exists() for path in lookalikes)
    assert all(str(path) in caplog.text for path in leftovers)
    assert sorted(p.name for p in (tmp_path / "collections").iterdir()) == sorted([*named, "keep-me"])
    assert [info.name for info in index.snapshots()] == [kept_snapshot]
    assert all(len(info.healthy()) == 60 for info in index.collections("shoes"))
    index.close()


def full_sqlite(dataset, path):
    """Records.export_dataset on a full disk: SQLite's own error, not an OSError."""
    path.write_bytes(b"the items in part")
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL
    raise error


@pytest.mark.parametrize("full_at", ["the items", "the archive"])
def test_a_snapshot_that_finds_the_disk_full_answers_disk_full_and_leaves_nothing(tmp_path, monkeypatch, full_at):
    """Defect: a snapshot that found the disk full answered INTERNAL and left its unfinished
    file in snapshots/ (SQLite's error, writing the items, answered INTERNAL too)."""
    index, _ = make_index(tmp_path, datasets=("shoes",))
    first = index.snapshot("shoes")[0]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if full_at == "the items":
        monkeypatch.setattr(index.records, "export_dataset", full_sqlite)
    else:  # a file-size limit that each file in the snapshot stays under, but not the archive
        resource.setrlimit(resource.RLIMIT_FSIZE, (first.size_bytes - 1000, hard))
    try:
        with pytest.raises(ResourceExhausted, match="no room on the index's disk to snapshot dataset 'shoes'") as info:
            index.snapshot("shoes")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        monkeypatch.undo()
    assert info.value.reason == "DISK_FULL"
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == [f"{first.name}.tar"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["collections", "snapshots"]
    index.snapshot("shoes")  # with room again, it snapshots
    assert len(index.snapshots("shoes")) == 2
    index.close()
