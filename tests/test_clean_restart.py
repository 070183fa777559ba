"""A clean restart of the primary lets its followers resume instead of copying everything: that
is only sound when the data the next start opens is exactly what the change log listed up to
where it ended. These tests break that with writes that failed part-way and with restores cut
short, and check that no follower keeps data its primary does not have, and that no
acknowledged write is lost across the restart."""

import contextlib
import sqlite3
import time

import grpc
import numpy as np
import pytest

from convsearch.index.v1 import index_pb2 as pb
from convsearch.processes import free_port
from convsearch.tensors import to_tensor
from convsearch_index.changes import ChangeLog
from convsearch_index.engine import RESTORING, CollectionKey, Index
from convsearch_index.records import ItemRecord
from tests.conftest import serve_index
from tests.test_replication import COSINE, DIM, _spec, _stub, state_of

pytestmark = pytest.mark.slow


def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _caught_up(follower, primary) -> bool:
    """The follower follows the primary's current process and has applied all it logged."""
    state = follower.follower
    return state.ready and state.epoch == primary.index.changes.epoch and state.position >= primary.index.changes.last


@contextlib.contextmanager
def _primary_and_follower(tmp_path, port: int):
    """A primary (restarted by `restart` in the yielded dict) and one follower of it."""
    running = {}
    running["primary"], running["channel"], address = serve_index(tmp_path / "p", port=port, fsync=False)
    running["follower"], running["follower_channel"], _ = serve_index(tmp_path / "f", follow=address, fsync=False,
                                                                      max_lag_wait=30.0)

    def restart():
        """A clean stop of the primary (as SIGTERM), then a start on its data dir."""
        running["channel"].close()
        running["primary"].stop(5.0)
        running["primary"], running["channel"], _ = serve_index(tmp_path / "p", port=port, fsync=False)
        _until(lambda: _caught_up(running["follower"], running["primary"]))

    running["restart"] = restart
    try:
        yield running
    finally:
        running["follower_channel"].close()
        running["follower"].stop(0.5)
        running["channel"].close()
        running["primary"].stop(0.5)


def test_a_delete_that_failed_part_way_leaves_no_follower_with_vectors_its_primary_dropped(tmp_path, monkeypatch):
    """DeleteItems deletes the vectors (durably), then the items; when the items' delete fails,
    the primary has dropped vectors its change log never listed. A clean restart must not let
    the follower resume with them."""
    with _primary_and_follower(tmp_path, free_port()) as running:
        stub = _stub(running["channel"])
        stub.CreateDataset(pb.CreateDatasetRequest(name="live"))
        stub.CreateCollection(pb.CreateCollectionRequest(dataset="live", spec=_spec()))
        ids = ["x", "y"]
        stub.PutItems(pb.PutItemsRequest(dataset="live", items=[pb.Item(id=i, image=i.encode()) for i in ids]))
        vectors = np.random.default_rng(0).normal(size=(2, DIM)).astype(np.float32)
        stub.UpsertVectors(pb.UpsertVectorsRequest(dataset="live", collection=COSINE, ids=ids,
                                                   vectors=to_tensor(vectors)))
        _until(lambda: _caught_up(running["follower"], running["primary"]))

        records = running["primary"].index.records

        def failing_delete(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(records, "delete_items", failing_delete)
        with pytest.raises(grpc.RpcError):
            stub.DeleteItems(pb.DeleteItemsRequest(dataset="live", ids=["x"]))
        monkeypatch.undo()

        running["restart"]()
        stub = _stub(running["channel"])
        queries = np.random.default_rng(1).normal(size=(2, DIM)).astype(np.float32)
        assert state_of(_stub(running["follower_channel"]), 0, queries) == state_of(stub, 0, queries)


def test_a_restore_that_failed_to_create_its_dataset_leaves_no_marker_to_delete_a_later_one(tmp_path, monkeypatch):
    """A restore whose dataset could not be created (SQLite failed: a full disk) must not leave
    its restore marker behind: the next start would delete the dataset of that name created
    (and written to, acknowledged) since."""
    index = Index(tmp_path, fsync=False, changes=ChangeLog(1 << 20))
    index.create_dataset("a")
    snapshot = index.snapshot("a")[0].name

    def failing_create(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(index.records, "create_dataset", failing_create)
    with pytest.raises(sqlite3.OperationalError):
        index.restore(snapshot, "b")
    monkeypatch.undo()
    index.create_dataset("b")
    index.put_items("b", [ItemRecord("kept", "", {}, b"image")])
    assert index.seal(5.0)
    index.close()

    again = Index(tmp_path, fsync=False, changes=ChangeLog(1 << 20))
    try:
        assert again.get_items("b", ["kept"], False)[1] == []  # the acknowledged item is still there
    finally:
        again.close()


def test_a_start_that_deletes_a_dataset_a_restore_left_does_not_continue_the_log(tmp_path, monkeypatch):
    """A restore cut short whose clean-up failed leaves its marker; should the dataset of that
    name be deleted and created again, written to and given to the followers, the next start
    deletes it without a change in the log. The followers must then copy everything, not
    resume with a dataset their primary no longer has."""
    index = Index(tmp_path, fsync=False, changes=ChangeLog(1 << 20))
    index.create_dataset("a")
    index.create_collection("a", CollectionKey("m", "l", "avg", "cosine", 0), DIM)
    snapshot = index.snapshot("a")[0].name
    delete_dataset = Index.delete_dataset

    def failing_clean_up(self, name, logged=True):
        if not logged:
            raise OSError("device busy")
        return delete_dataset(self, name, logged)

    monkeypatch.setattr(Index, "delete_dataset", failing_clean_up)
    with pytest.raises(Exception):  # noqa: B017 - whichever the restore answers
        index.restore(snapshot, "b", fence_ttl_s=-1.0)  # refused once its dataset exists
    monkeypatch.undo()
    assert (tmp_path / RESTORING / "b").exists()
    index.delete_dataset("b")
    index.create_dataset("b")
    index.put_items("b", [ItemRecord("given", "", {}, b"image")])
    epoch, last = index.changes.epoch, index.changes.last  # a follower that applied all of it is here
    assert index.seal(5.0)
    index.close()

    changes = ChangeLog(1 << 20)
    again = Index(tmp_path, fsync=False, changes=changes)
    try:
        if "b" not in {record.name for record in again.datasets()}:
            assert not changes.continues(epoch, last)  # the follower holds "b": it must copy everything
    finally:
        again.close()
