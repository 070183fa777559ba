"""Read replicas: followers (`convsearch-index --follow`) copy a primary, tail its changes and
answer reads exactly as it does; writes go to the primary; min_version never reads older data;
kill -9 of either side loses and duplicates nothing."""

import contextlib
import hashlib
import json
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from convsearch.channels import create_channel
from convsearch.common.v1 import common_pb2
from convsearch.grpc_errors import error_from_call
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.processes import free_port, start_service, stop_service
from convsearch.tensors import to_tensor
from convsearch_index import replication
from convsearch_index.changes import LOG_END, ChangeLog
from convsearch_index.engine import CollectionKey, Index
from convsearch_index.follower import Follower
from convsearch_index.records import ItemRecord
from convsearch_index.replication import change_message
from convsearch_index.server import SERVICE_NAME
from tests.conftest import damage_collection, serve_index

pytestmark = pytest.mark.slow
DIM = 16
COSINE, EUCLID = "m/l/avg/cosine", "m/l/avg/euclidean"


def _stub(channel):
    return index_pb2_grpc.IndexServiceStub(channel)


def _spec(metric=common_pb2.METRIC_COSINE):
    return pb.CollectionSpec(model="m", layer="l", dimension=DIM, metric=metric)


def _metric(service, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def state_of(stub, min_version: int = 0, queries: np.ndarray | None = None) -> dict:
    """Everything a reader can see, with images left out: datasets, items, collections, exact
    search answers and attachments."""
    state = {}
    datasets = stub.ListDatasets(pb.ListDatasetsRequest(min_version=min_version), timeout=60).datasets
    for dataset in datasets:
        items, token = [], ""
        while True:
            page = stub.ScanItems(pb.ScanItemsRequest(dataset=dataset.name, page_size=1000, page_token=token,
                                                      min_version=min_version))
            items += [(i.id, i.label, dict(i.metadata), i.image_digest, i.image_size) for i in page.items]
            token = page.next_page_token
            if not token:
                break
        collections = {}
        for info in stub.ListCollections(pb.ListCollectionsRequest(dataset=dataset.name)).collections:
            entry = {"count": info.count, "spec": info.spec.SerializeToString(deterministic=True)}
            if info.count and queries is not None:
                reply = stub.Search(pb.SearchRequest(dataset=dataset.name, collection=info.name, k=10, exact=True,
                                                     queries=to_tensor(queries)))
                entry["hits"] = [(list(r.ids), list(r.distances)) for r in reply.results]
                ids = [i[0] for i in items]
                entry["vectors"] = stub.GetVectors(pb.GetVectorsRequest(
                    dataset=dataset.name, collection=info.name, ids=ids)).SerializeToString(deterministic=True)
                attachment = stub.GetAttachment(pb.GetAttachmentRequest(dataset=dataset.name, collection=info.name,
                                                                        key="eval"))
                entry["attachment"] = (attachment.found, attachment.version, attachment.data)
            collections[info.name] = entry
        state[dataset.name] = {"description": dataset.description, "items": items, "collections": collections,
                               "counts": (dataset.item_count, dataset.collection_count)}
    return state


class RandomWriter:
    """Random writes at a primary (items put, replaced with another image, deleted; vectors
    upserted; collections created and deleted; a second dataset), remembering the latest version."""

    def __init__(self, stub, seed: int = 0):
        self.stub, self.rng = stub, np.random.default_rng(seed)
        self.version = 0
        self.items: dict[str, set[str]] = {"a": set(), "b": set()}
        self.collections: dict[str, set[str]] = {"a": set(), "b": set()}
        for dataset in ("a", "b"):
            self._note(stub.CreateDataset(pb.CreateDatasetRequest(name=dataset, description=f"set {dataset}")))
            self._create(dataset, COSINE)
        self._create("a", EUCLID)

    def _note(self, reply) -> None:
        assert reply.version > 0
        self.version = max(self.version, reply.version)

    def _create(self, dataset: str, name: str) -> None:
        metric = common_pb2.METRIC_COSINE if name == COSINE else common_pb2.METRIC_EUCLIDEAN
        self._note(self.stub.CreateCollection(pb.CreateCollectionRequest(dataset=dataset, spec=_spec(metric))))
        self.collections[dataset].add(name)

    def step(self) -> None:
        rng, stub = self.rng, self.stub
        dataset = "a" if rng.random() < 0.7 else "b"
        items, op = self.items[dataset], rng.random()
        ids = [f"i{n}" for n in rng.integers(0, 400, rng.integers(1, 6))]
        ids = sorted(set(ids))
        if op < 0.35 or not items:  # new items, or replaced images (their vectors drop)
            self._note(stub.PutItems(pb.PutItemsRequest(dataset=dataset, items=[
                pb.Item(id=i, label=f"c{rng.integers(0, 5)}", metadata={"n": str(rng.integers(0, 9))},
                        image=rng.bytes(int(rng.integers(1, 40)))) for i in ids])))
            items.update(ids)
        elif op < 0.75 and self.collections[dataset]:
            name = sorted(self.collections[dataset])[rng.integers(0, len(self.collections[dataset]))]
            present = sorted(items)
            chosen = sorted({present[n] for n in rng.integers(0, len(present), 6)})
            reply = stub.UpsertVectors(pb.UpsertVectorsRequest(
                dataset=dataset, collection=name, ids=chosen,
                vectors=to_tensor(rng.normal(size=(len(chosen), DIM)).astype(np.float32))))
            self._note(reply)
        elif op < 0.9:
            self._note(stub.DeleteItems(pb.DeleteItemsRequest(dataset=dataset, ids=ids)))
            items.difference_update(ids)
        elif op < 0.95 and self.collections[dataset]:
            name = sorted(self.collections[dataset])[0]
            self._note(stub.PutAttachment(pb.PutAttachmentRequest(dataset=dataset, collection=name, key="eval",
                                                                  version=int(rng.integers(0, 99)),
                                                                  data=rng.bytes(8))))
        elif op < 0.975 and self.collections[dataset]:
            name = sorted(self.collections[dataset])[-1]
            self._note(stub.DeleteCollection(pb.DeleteCollectionRequest(dataset=dataset, collection=name)))
            self.collections[dataset].discard(name)
        else:
            missing = sorted({COSINE, EUCLID} - self.collections[dataset])
            if missing:
                self._create(dataset, missing[0])


def assert_converged(primary, followers, version: int) -> None:
    queries = np.random.default_rng(99).normal(size=(8, DIM)).astype(np.float32)
    expected = state_of(primary, 0, queries)
    assert expected
    for follower in followers:
        assert state_of(follower, version, queries) == expected


def test_two_followers_converge_on_10k_random_writes(tmp_path):
    primary, primary_channel, address = serve_index(tmp_path / "p", fsync=False)
    followers = [serve_index(tmp_path / f"f{n}", follow=address, fsync=False, max_lag_wait=60.0) for n in (1, 2)]
    try:
        writer = RandomWriter(_stub(primary_channel))
        started = time.monotonic()
        for _ in range(10_000):
            writer.step()
        print(f"10k writes in {time.monotonic() - started:.1f}s")
        assert_converged(_stub(primary_channel), [_stub(channel) for _, channel, _ in followers], writer.version)
        # A follower that joins now copies the current state whole.
        late = serve_index(tmp_path / "f3", follow=address, fsync=False, max_lag_wait=60.0)
        followers.append(late)
        assert_converged(_stub(primary_channel), [_stub(late[1])], writer.version)
    finally:
        for service, channel, _ in [*followers, (primary, primary_channel, address)]:
            channel.close()
            service.stop(0.5)


def test_min_version_reads_never_see_older_data_and_writes_go_to_the_primary(tmp_path):
    primary, primary_channel, address = serve_index(tmp_path / "p", fsync=False)
    follower, follower_channel, _ = serve_index(tmp_path / "f", follow=address, fsync=False, max_lag_wait=0.5)
    try:
        stub, reader = _stub(primary_channel), _stub(follower_channel)
        stub.CreateDataset(pb.CreateDatasetRequest(name="d"))
        stub.CreateCollection(pb.CreateCollectionRequest(dataset="d", spec=_spec()))
        rng = np.random.default_rng(1)
        for n in range(60):
            reply = stub.PutItems(pb.PutItemsRequest(dataset="d", items=[pb.Item(id=f"x{n}", label=str(n))]))
            seen = reader.GetItems(pb.GetItemsRequest(dataset="d", ids=[f"x{n}"], min_version=reply.version))
            assert [i.label for i in seen.items] == [str(n)]
            vector = rng.normal(size=(1, DIM)).astype(np.float32)
            reply = stub.UpsertVectors(pb.UpsertVectorsRequest(dataset="d", collection=COSINE, ids=[f"x{n}"],
                                                               vectors=to_tensor(vector)))
            hits = reader.Search(pb.SearchRequest(dataset="d", collection=COSINE, k=1, exact=True,
                                                  queries=to_tensor(vector), min_version=reply.version))
            assert list(hits.results[0].ids) == [f"x{n}"]
            stats = reader.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="d", collection=COSINE,
                                                                           min_version=reply.version))
            assert stats.collection.count == n + 1
        # Writes, image reads and snapshots are refused, naming the primary.
        refused = [
            lambda: reader.PutItems(pb.PutItemsRequest(dataset="d", items=[pb.Item(id="y")])),
            lambda: reader.CreateDataset(pb.CreateDatasetRequest(name="e")),
            lambda: reader.UpsertVectors(pb.UpsertVectorsRequest(dataset="d", collection=COSINE, ids=["x0"],
                                                                 vectors=to_tensor(np.ones((1, DIM), np.float32)))),
            lambda: reader.DeleteItems(pb.DeleteItemsRequest(dataset="d", ids=["x0"])),
            lambda: reader.GetItems(pb.GetItemsRequest(dataset="d", ids=["x0"], include_images=True)),
            lambda: reader.SnapshotDataset(pb.SnapshotDatasetRequest(dataset="d")),
        ]
        for call in refused:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert address in caught.value.details()
            error = error_from_call(caught.value)
            assert error.reason == "READ_ONLY_FOLLOWER" and error.metadata["primary"] == address
        # Without its primary the follower keeps serving what it has; a version it has not
        # applied waits max_lag_wait, then answers UNAVAILABLE.
        primary_channel.close()
        primary.stop(0.5)
        primary = None
        assert len(reader.GetItems(pb.GetItemsRequest(dataset="d", ids=["x0", "x59"])).items) == 2
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            reader.GetItems(pb.GetItemsRequest(dataset="d", ids=["x0"], min_version=reply.version + 10))
        waited = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_from_call(caught.value).reason == "FOLLOWER_BEHIND"
        assert 0.5 <= waited < 5  # the channel retries UNAVAILABLE up to 3 times
    finally:
        follower_channel.close()
        follower.stop(0.5)
        if primary is not None:
            primary.stop(0.5)


def _wait_until_copied(service, full_syncs: int, timeout_s: float = 60.0) -> None:
    """Waits until an in-process follower has completed its `full_syncs`-th whole copy (it
    answers no reads while one is under way)."""
    deadline = time.monotonic() + timeout_s
    while not (_metric(service, "convsearch_index_follower_full_syncs_total") == full_syncs
               and service.follower.ready):
        assert time.monotonic() < deadline, f"no whole copy number {full_syncs} completed in {timeout_s:g}s"
        time.sleep(0.05)


class Followed:
    """A primary after `steps` random writes and a follower of it (stopped and started again by
    the tests), both in this process."""

    def __init__(self, tmp_path, seed: int, steps: int, **primary_options):
        self.primary, self.primary_channel, self.address = serve_index(tmp_path / "p", fsync=False, **primary_options)
        self.stub = _stub(self.primary_channel)
        self.writer = RandomWriter(self.stub, seed)
        for _ in range(steps):
            self.writer.step()
        self._data_dir = tmp_path / "f"
        self.start_follower()

    def start_follower(self) -> None:
        self.follower, self.channel, _ = serve_index(self._data_dir, follow=self.address, fsync=False,
                                                     max_lag_wait=60.0)

    def stop_follower(self) -> None:
        self.channel.close()
        self.follower.stop(0.5)

    def assert_converged(self) -> None:
        assert_converged(self.stub, [_stub(self.channel)], self.writer.version)

    def close(self) -> None:
        self.stop_follower()
        self.primary_channel.close()
        self.primary.stop(0.5)


def test_a_follower_behind_the_change_log_copies_everything_again(tmp_path):
    with contextlib.closing(Followed(tmp_path, seed=3, steps=300, replication_log_mb=1)) as pair:
        pair.assert_converged()
        assert _metric(pair.follower, "convsearch_index_follower_full_syncs_total") == 1
        pair.stop_follower()
        writer, stub, rng = pair.writer, pair.stub, np.random.default_rng(5)
        ids = sorted(writer.items["a"])
        for _ in range(40):  # 40 x 200 x 64 bytes: more than the 1 MiB log holds
            writer._note(stub.PutItems(pb.PutItemsRequest(dataset="a", items=[pb.Item(id=i, label="z")
                                                                             for i in ids])))
            chosen = [f"v{n}" for n in range(200)]
            writer._note(stub.PutItems(pb.PutItemsRequest(dataset="b", items=[pb.Item(id=i) for i in chosen])))
            writer.items["b"].update(chosen)
            writer._note(stub.UpsertVectors(pb.UpsertVectorsRequest(
                dataset="b", collection=COSINE, ids=chosen,
                vectors=to_tensor(rng.normal(size=(200, DIM)).astype(np.float32)))))
        pair.start_follower()
        _wait_until_copied(pair.follower, 1)  # in this process; it answers no reads until then
        pair.assert_converged()


def test_a_follower_that_cannot_apply_a_change_or_starts_damaged_copies_everything_again(tmp_path):
    with contextlib.closing(Followed(tmp_path, seed=4, steps=200)) as pair:
        pair.assert_converged()
        # At run time: the next change to the damaged collection cannot be applied.
        damage_collection(pair.follower, "a", COSINE)
        pair.writer._note(pair.stub.UpsertVectors(pb.UpsertVectorsRequest(
            dataset="a", collection=COSINE, ids=sorted(pair.writer.items["a"])[:3],
            vectors=to_tensor(np.ones((3, DIM), np.float32)))))
        _wait_until_copied(pair.follower, 2)
        assert _metric(pair.follower, "convsearch_index_follower_diverged_total") == 1
        pair.assert_converged()
        # At a restart: a collection whose files fail their checks.
        directory = pair.follower.index.collection("a", COSINE).directory
        pair.stop_follower()
        graph = directory / json.loads((directory / "CURRENT").read_text())["checkpoint"] / "graph.bin"
        graph.write_bytes(b"\0" * graph.stat().st_size)
        pair.start_follower()
        _wait_until_copied(pair.follower, 1)
        pair.assert_converged()


def test_a_follower_whose_recorded_position_is_unreadable_copies_everything_again(tmp_path):
    with contextlib.closing(Followed(tmp_path, seed=6, steps=100)) as pair:
        pair.assert_converged()
        pair.stop_follower()
        (tmp_path / "f" / "follower.json").write_bytes(b"")  # as a power cut may leave it
        pair.start_follower()
        _wait_until_copied(pair.follower, 1)
        pair.assert_converged()


def test_a_follower_copying_everything_again_answers_no_reads_until_the_copy_is_done(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from convsearch.errors import Unavailable
    from convsearch.health import wait_until_serving

    port = free_port()
    primary, primary_channel, address = serve_index(tmp_path / "p", port=port, fsync=False)
    stub = _stub(primary_channel)
    writer = RandomWriter(stub, seed=7)
    for _ in range(100):
        writer.step()
    follower, channel, _ = serve_index(tmp_path / "f", follow=address, fsync=False, max_lag_wait=60.0)
    follower_stub, health = _stub(channel), health_pb2_grpc.HealthStub(channel)
    following = follower.follower
    copying, release = threading.Event(), threading.Event()
    begin_copy = following._begin_copy

    def held_begin_copy(message):  # the first dataset is replaced, then the copy waits for the test
        begin_copy(message)
        copying.set()
        release.wait(60)

    try:
        assert_converged(stub, [follower_stub], writer.version)
        assert following.ready
        # The primary restarts after a crash (no record of where its log ended): another epoch,
        # so the follower copies everything again.
        primary_channel.close()
        primary.stop(0.5)
        (tmp_path / "p" / LOG_END).unlink()
        following._begin_copy = held_begin_copy
        primary, primary_channel, _ = serve_index(tmp_path / "p", port=port, fsync=False)
        stub = writer.stub = _stub(primary_channel)
        assert copying.wait(30)
        # Mid-copy: not ready, NOT_SERVING, and reads (even of versions applied before) are refused.
        assert not following.ready
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(Unavailable) as refused:
            following.admit("ScanItems", pb.ScanItemsRequest(dataset="a", min_version=writer.version))
        assert refused.value.reason == "FOLLOWER_SYNCING"
        for read, request in ((follower_stub.ScanItems, pb.ScanItemsRequest(dataset="a", min_version=writer.version)),
                              (follower_stub.GetDataset, pb.GetDatasetRequest(name="a")),
                              (follower_stub.ListDatasets, pb.ListDatasetsRequest())):
            with pytest.raises(grpc.RpcError) as failed:
                read(request, timeout=10)
            error = error_from_call(failed.value)
            assert isinstance(error, Unavailable) and error.reason == "FOLLOWER_SYNCING"
        release.set()
        wait_until_serving(channel, SERVICE_NAME, timeout_s=30)
        assert following.ready
        for _ in range(50):
            writer.step()
        assert_converged(stub, [follower_stub], writer.version)
        assert _metric(follower, "convsearch_index_follower_full_syncs_total") == 2
    finally:
        release.set()
        channel.close()
        follower.stop(0.5)
        primary_channel.close()
        primary.stop(0.5)


def _write_in_background(stub, seed: int, stop: threading.Event, acknowledged: list) -> threading.Thread:
    """Puts items with vectors until stopped or the primary dies; `acknowledged` lists the ids
    whose item and vector were both acknowledged."""
    def run():
        rng, n = np.random.default_rng(seed), 0
        while not stop.is_set():
            ids = [f"w{seed}-{n + k}" for k in range(5)]
            n += 5
            try:
                stub.PutItems(pb.PutItemsRequest(dataset="live", items=[pb.Item(id=i, image=i.encode())
                                                                        for i in ids]), timeout=10)
                stub.UpsertVectors(pb.UpsertVectorsRequest(
                    dataset="live", collection=COSINE, ids=ids,
                    vectors=to_tensor(rng.normal(size=(5, DIM)).astype(np.float32))), timeout=10)
            except grpc.RpcError:
                return
            acknowledged.extend(ids)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _until_acknowledged(acknowledged: list, count: int) -> None:
    """Waits until the background writer has had `count` writes acknowledged."""
    while len(acknowledged) < count:
        time.sleep(0.05)


def _converge_live(primary_stub, follower_stubs, acknowledged: list) -> None:
    """Every follower answers what the primary does; every acknowledged item and vector is
    there once."""
    version = primary_stub.PutItems(pb.PutItemsRequest(dataset="live", items=[pb.Item(id="marker")])).version
    assert_converged(primary_stub, follower_stubs, version)
    for stub in [primary_stub, *follower_stubs]:
        found = stub.GetVectors(pb.GetVectorsRequest(dataset="live", collection=COSINE, ids=acknowledged,
                                                     ids_only=True))
        assert list(found.missing_ids) == [] and len(found.ids) == len(set(acknowledged))
        stats = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="live", collection=COSINE))
        items = stub.GetDataset(pb.GetDatasetRequest(name="live")).dataset.item_count
        assert stats.collection.count <= items - 1  # one vector per item at most (the marker has none)


def test_kill_9_of_a_follower_mid_stream_resumes_from_its_position(tmp_path):
    primary, primary_channel, address = serve_index(tmp_path / "p", fsync=False)
    stub = _stub(primary_channel)
    stub.CreateDataset(pb.CreateDatasetRequest(name="live"))
    stub.CreateCollection(pb.CreateCollectionRequest(dataset="live", spec=_spec()))
    data_dir = str(tmp_path / "f")
    process, follower_address = start_service("convsearch-index", "--data-dir", data_dir, "--follow", address,
                                              service=SERVICE_NAME)
    stop, acknowledged = threading.Event(), []
    writer = _write_in_background(stub, 1, stop, acknowledged)
    try:
        _until_acknowledged(acknowledged, 300)
        process.send_signal(signal.SIGKILL)
        process.wait()
        _until_acknowledged(acknowledged, 600)  # writes go on while it is down
        process, follower_address = start_service("convsearch-index", "--data-dir", data_dir, "--follow", address,
                                                  service=SERVICE_NAME)
        _until_acknowledged(acknowledged, 900)
        stop.set()
        writer.join()
        follower_channel = create_channel(follower_address)
        _converge_live(stub, [_stub(follower_channel)], acknowledged)
        follower_channel.close()
    finally:
        stop.set()
        log = stop_service(process)
        primary_channel.close()
        primary.stop(0.5)
    assert "resumed after version" in log and "copying everything" not in log


def _primary_process_and_followers(tmp_path):
    """A primary in a process of its own, holding dataset `live` with a cosine collection, and
    two followers of it in this process: (primary_args, port, process, channel, stub, followers)."""
    port = free_port()
    primary_args = ("convsearch-index", "--data-dir", str(tmp_path / "p"))
    process, address = start_service(*primary_args, service=SERVICE_NAME, port=port)
    primary_channel = create_channel(address)
    stub = _stub(primary_channel)
    stub.CreateDataset(pb.CreateDatasetRequest(name="live"))
    stub.CreateCollection(pb.CreateCollectionRequest(dataset="live", spec=_spec()))
    followers = [serve_index(tmp_path / f"f{n}", follow=address, max_lag_wait=60.0) for n in (1, 2)]
    return primary_args, port, process, primary_channel, stub, followers


def _restarted_under_writes(primary_args, port: int, stub, seed: int, acknowledged: list):
    """Starts the primary's process again on its port, then writes 200 more acknowledged items
    with vectors through `stub`; the process."""
    process, _ = start_service(*primary_args, service=SERVICE_NAME, port=port)
    stop = threading.Event()
    writer = _write_in_background(stub, seed, stop, acknowledged)
    _until_acknowledged(acknowledged, len(acknowledged) + 200)
    stop.set()
    writer.join()
    return process


def _stop_all(followers, primary_channel, process) -> str:
    """Stops the in-process followers and the primary's process; what the primary logged."""
    for service, channel, _ in followers:
        channel.close()
        service.stop(0.5)
    primary_channel.close()
    return stop_service(process)


def test_kill_9_of_the_primary_mid_write_followers_reconnect_and_converge(tmp_path):
    primary_args, port, process, primary_channel, stub, followers = _primary_process_and_followers(tmp_path)
    stop, acknowledged = threading.Event(), []
    writer = _write_in_background(stub, 2, stop, acknowledged)
    try:
        _until_acknowledged(acknowledged, 300)
        process.send_signal(signal.SIGKILL)
        writer.join()
        process.wait()
        # Meanwhile the followers serve what they have.
        for _, channel, _ in followers:
            assert _stub(channel).GetDataset(pb.GetDatasetRequest(name="live")).dataset.item_count > 0
        process = _restarted_under_writes(primary_args, port, stub, 3, acknowledged)
        for service, _, _ in followers:
            _wait_until_copied(service, 2)  # another epoch: whole (no reads answered meanwhile)
        _converge_live(stub, [_stub(channel) for _, channel, _ in followers], acknowledged)
    finally:
        stop.set()
        _stop_all(followers, primary_channel, process)


def test_followers_resume_across_a_clean_restart_of_the_primary_mid_write(tmp_path):
    """A rollout of the primary (SIGTERM while writes go on, then a start on the same data dir)
    costs its followers no whole copy: they serve throughout and take the writes after it."""
    primary_args, port, process, primary_channel, stub, followers = _primary_process_and_followers(tmp_path)
    stop, acknowledged = threading.Event(), []
    writer = _write_in_background(stub, 4, stop, acknowledged)
    try:
        _until_acknowledged(acknowledged, 300)
        log = stop_service(process)  # SIGTERM mid-write: writes after the seal are refused, none lost
        writer.join()
        assert "this primary is stopping" in log
        for service, channel, _ in followers:
            assert service.follower.ready
            assert _stub(channel).GetDataset(pb.GetDatasetRequest(name="live")).dataset.item_count > 0
        process = _restarted_under_writes(primary_args, port, stub, 5, acknowledged)
        _converge_live(stub, [_stub(channel) for _, channel, _ in followers], acknowledged)
        for service, _, _ in followers:
            assert _metric(service, "convsearch_index_follower_full_syncs_total") == 1  # the first copy only
    finally:
        stop.set()
        log = _stop_all(followers, primary_channel, process)
    assert "the change log continues epoch" in log


def test_a_dataset_copy_reads_its_items_as_they_were_while_writes_go_on(tmp_path):
    from convsearch_index.changes import ChangeLog
    from convsearch_index.engine import Index
    from convsearch_index.records import ItemRecord

    index = Index(tmp_path / "p", fsync=False, changes=ChangeLog(1 << 20))
    try:
        index.create_dataset("d")
        index.put_items("d", [ItemRecord(f"i{n:03d}", f"c{n % 3}", {"n": str(n)} if n % 2 else {}, b"x" * n)
                              for n in range(250)])
        before = index.scan_items("d", "", 1000, include_images=False)
        (tmp_path / "copy").mkdir()
        copy = index.copy_dataset("d", tmp_path / "copy" / "d")
        try:
            # Writes to the dataset are not held up by the copy, nor seen by it.
            index.put_items("d", [ItemRecord("i000", "changed"), ItemRecord("new")])
            index.delete_items("d", ["i001"])
            pages = list(copy.items.pages(100))
        finally:
            copy.items.close()
        assert [len(page) for page in pages] == [100, 100, 50]
        # What a follower stores from those rows reads back as the primary's items did then.
        follower = Index(tmp_path / "f", fsync=False)
        try:
            follower.create_dataset("d")
            for page in pages:
                follower.put_copied_items("d", page)
            assert follower.scan_items("d", "", 1000, include_images=False) == before
            assert follower.labels("d") == {item.id: item.label for item in before}
        finally:
            follower.close()
    finally:
        index.close()


def test_a_copied_collection_is_verified_with_the_digests_taken_as_it_arrived(tmp_path):
    from convsearch.errors import DataLoss
    from convsearch_index.collection import VectorCollection, VectorSpec

    spec = VectorSpec(DIM)
    source = VectorCollection(tmp_path / "source", spec, fsync=False)
    source.upsert([f"v{n}" for n in range(50)], np.random.default_rng(0).normal(size=(50, DIM)))
    source.checkpoint()
    files = source.link_files(tmp_path / "copy")
    source.close(checkpoint=False)
    digests = {path: hashlib.sha256((tmp_path / "copy" / path).read_bytes()).hexdigest() for path in files}
    copied = VectorCollection(tmp_path / "copy", spec, fsync=False, sha256=digests)
    assert len(copied) == 50
    copied.close(checkpoint=False)
    # A digest that does not match the manifest refuses the collection, as a file failing it would.
    graph = next(path for path in files if path.endswith("graph.bin"))
    with pytest.raises(DataLoss, match="graph.bin"):
        VectorCollection(tmp_path / "copy", spec, fsync=False, sha256={**digests, graph: "0" * 64})


def test_a_data_dir_is_never_started_as_the_other_role_by_mistake(tmp_path):
    primary, primary_channel, address = serve_index(tmp_path / "p", fsync=False)
    follower, channel, _ = serve_index(tmp_path / "f", follow=address, fsync=False, max_lag_wait=60.0)
    stub = _stub(primary_channel)
    version = stub.CreateDataset(pb.CreateDatasetRequest(name="kept")).version
    assert [d.name for d in _stub(channel).ListDatasets(pb.ListDatasetsRequest(min_version=version)).datasets] == [
        "kept"]
    channel.close()
    follower.stop(0.5)
    primary_channel.close()
    primary.stop(0.5)
    # The primary's data with --follow: refused, its datasets untouched.
    with pytest.raises(SystemExit, match=r"holds the datasets of a primary index \(1\); following .* would replace"):
        serve_index(tmp_path / "p", follow=address, fsync=False)
    # The follower's copy without --follow: refused, then promoted on purpose.
    with pytest.raises(SystemExit, match=rf"is a follower's copy of {address}.*--follow {address}.*--promote"):
        serve_index(tmp_path / "f", fsync=False)
    state = (tmp_path / "f" / "follower.json").read_bytes()
    (tmp_path / "f" / "follower.json").unlink()  # as a whole copy under way leaves it
    with pytest.raises(SystemExit, match="incomplete copy .* cannot become a primary"):
        serve_index(tmp_path / "f", fsync=False, promote=True)
    (tmp_path / "f" / "follower.json").write_bytes(state)
    promoted, channel, _ = serve_index(tmp_path / "f", fsync=False, promote=True)
    try:
        stub = _stub(channel)
        stub.CreateDataset(pb.CreateDatasetRequest(name="new"))
        assert [d.name for d in stub.ListDatasets(pb.ListDatasetsRequest()).datasets] == ["kept", "new"]
    finally:
        channel.close()
        promoted.stop(0.5)
    restarted, channel, _ = serve_index(tmp_path / "p", fsync=False)  # a primary still, its data whole
    try:
        assert [d.name for d in _stub(channel).ListDatasets(pb.ListDatasetsRequest()).datasets] == ["kept"]
    finally:
        channel.close()
        restarted.stop(0.5)


def test_a_collection_damaged_at_the_primary_is_damaged_at_its_followers_and_the_rest_serves(tmp_path):
    primary, primary_channel, address = serve_index(tmp_path / "p", fsync=False)
    stub = _stub(primary_channel)
    stub.CreateDataset(pb.CreateDatasetRequest(name="d"))
    stub.PutItems(pb.PutItemsRequest(dataset="d", items=[pb.Item(id=f"i{n}") for n in range(50)]))
    vectors = np.random.default_rng(2).normal(size=(50, DIM)).astype(np.float32)
    for metric, name in ((common_pb2.METRIC_COSINE, COSINE), (common_pb2.METRIC_EUCLIDEAN, EUCLID)):
        stub.CreateCollection(pb.CreateCollectionRequest(dataset="d", spec=_spec(metric)))
        stub.UpsertVectors(pb.UpsertVectorsRequest(dataset="d", collection=name, ids=[f"i{n}" for n in range(50)],
                                                   vectors=to_tensor(vectors)))
        stub.PutAttachment(pb.PutAttachmentRequest(dataset="d", collection=name, key="eval", data=b"scores"))
    directory = primary.index.collection("d", COSINE).directory
    primary_channel.close()
    primary.stop(0.5)
    graph = directory / json.loads((directory / "CURRENT").read_text())["checkpoint"] / "graph.bin"
    graph.write_bytes(b"\0" * graph.stat().st_size)
    primary, primary_channel, _ = serve_index(tmp_path / "p", fsync=False, port=int(address.rsplit(":", 1)[1]))
    follower, channel, _ = serve_index(tmp_path / "f", follow=address, fsync=False)  # SERVING: its copy is done
    for restart in (False, True):  # damaged after a restart too: its folder points to no checkpoint
        if restart:
            channel.close()
            follower.stop(0.5)
            follower, channel, _ = serve_index(tmp_path / "f", follow=address, fsync=False)
        assert "damaged at the primary" in {c.name: c.damage for c in _stub(channel).ListCollections(
            pb.ListCollectionsRequest(dataset="d")).collections}[COSINE]
    try:
        reader = _stub(channel)
        listed = {c.name: c.damage for c in reader.ListCollections(pb.ListCollectionsRequest(dataset="d")).collections}
        assert set(listed) == {COSINE, EUCLID} and listed[EUCLID] == "" and "damaged at the primary" in listed[COSINE]
        with pytest.raises(grpc.RpcError) as caught:  # as at the primary: the gateway reads it there
            reader.Search(pb.SearchRequest(dataset="d", collection=COSINE, k=1, queries=to_tensor(vectors[:1])))
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert reader.GetAttachment(pb.GetAttachmentRequest(dataset="d", collection=EUCLID, key="eval")).data == \
            b"scores"
        hits = reader.Search(pb.SearchRequest(dataset="d", collection=EUCLID, k=1, exact=True,
                                              queries=to_tensor(vectors[7:8])))
        assert list(hits.results[0].ids) == ["i7"]
    finally:
        for service, open_channel in ((follower, channel), (primary, primary_channel)):
            open_channel.close()
            service.stop(0.5)


class _Live:
    """The stream's context while its follower is connected."""

    @staticmethod
    def is_active() -> bool:
        return True

    @staticmethod
    def peer() -> str:
        return "follower"


def test_writes_during_a_whole_copy_do_not_make_the_follower_copy_everything_again(tmp_path):
    """Defect: the changes after a whole copy's position were not kept while the copy ran, so
    writes beyond --replication-log-mb during a long copy dropped them, and the follower copied
    everything again at its end (and again, under a steady load)."""
    from convsearch_index.changes import ChangeLog
    from convsearch_index.engine import Index
    from convsearch_index.records import ItemRecord
    from convsearch_index.replication import PROTOCOL, replicate

    index = Index(tmp_path / "p", fsync=False, changes=ChangeLog(64 << 10))
    index.create_dataset("d")
    index.put_items("d", [ItemRecord(f"i{n}") for n in range(10)])
    stream = replicate(index, pb.ReplicateRequest(follower="f", protocol=PROTOCOL), _Live())
    try:
        start = next(stream).start
        assert start.full_sync
        note = {"note": "x" * 1000}
        written = [index.put_items("d", [ItemRecord(f"w{n}", "x", note)]) for n in range(100)]  # ~2x the log
        events = []
        while not events or events[-1] != "sync_done":
            events.append(next(stream).WhichOneof("event"))
        assert "start" not in events
        positions = []
        while len(positions) < len(written):
            message = next(stream)
            assert message.WhichOneof("event") == "changes", "the copy started over"
            positions.extend(change.position for change in message.changes.changes)
        assert positions == list(range(start.position + 1, start.position + 1 + len(written)))
        index.put_items("d", [ItemRecord("last")])  # caught up: the log keeps its bound again
        assert not index.changes.holds(start.position)
    finally:
        stream.close()
        index.close()


def test_a_pinned_change_log_keeps_its_changes_up_to_a_headroom():
    from convsearch_index.changes import PINNED_HEADROOM, ChangeLog

    changes = ChangeLog(10_000)
    first = changes.record("put_items", "d", ids=["a"])
    with changes.pinned(first) as pin:
        for _ in range(20):  # about 2x the bound
            changes.record("put_items", "d", label="x" * 800)
        assert changes.holds(first)
        changes.move_pin(pin, changes.last - 5)
        changes.record("put_items", "d", label="x")
        assert not changes.holds(first) and changes.holds(changes.last - 6)
        for _ in range(PINNED_HEADROOM * 20):  # beyond the headroom: dropped all the same
            changes.record("put_items", "d", label="x" * 800)
        assert not changes.holds(changes.last - 6 - PINNED_HEADROOM * 20)
    changes.record("put_items", "d", label="x")
    assert not changes.holds(changes.last - 20)


def test_changes_a_follower_applies_again_after_a_crash_leave_out_vectors_of_a_replaced_image(tmp_path):
    """A follower records its position after a batch; killed mid-batch, it applies the batch's
    changes again. An upsert replayed after the item's image was replaced (which had dropped the
    vector) stored the vector again, for good: the primary had none, the follower served it."""
    primary = Index(tmp_path / "p", fsync=False, changes=ChangeLog(1 << 20))
    replica = Index(tmp_path / "f", fsync=False)
    key = CollectionKey("m", "l", metric="euclidean")
    primary.create_dataset("d")
    primary.create_collection("d", key, 4)
    primary.put_items("d", [ItemRecord("x", "c", image=b"the first image")])
    before = primary.changes.last
    primary.upsert_vectors("d", key.name, ["x"], np.ones((1, 4), np.float32))
    primary.put_items("d", [ItemRecord("x", "c", image=b"the image that replaced it")])  # drops x's vector

    def apply_after(position: int) -> None:
        follower = Follower(replica, "127.0.0.1:1")
        follower._stream_epoch, follower.position = primary.changes.epoch, position
        follower._apply(pb.ChangeBatch(changes=[change_message(change) for change in primary.changes.after(
            position, 1 << 30, 0)], primary_position=primary.changes.last))

    apply_after(primary.changes.start - 1)
    apply_after(before)  # again, from the position recorded before the crash
    for index in (primary, replica):
        assert index.collection("d", key.name).healthy().get(["x"])[0] == []
    primary.close()
    replica.close()


def test_a_dataset_restored_at_the_primary_is_read_at_a_follower_only_once_its_copy_is_whole(tmp_path, monkeypatch):
    """A restore reaches the followers as a copy in the stream, which filled the dataset in place
    while they served it: reads saw it half restored, and a follower whose primary was lost
    mid-copy kept serving it so, and could be promoted with it."""
    monkeypatch.setattr(replication, "ITEMS_PER_MESSAGE", 2)
    held, copy_messages = threading.Event(), replication._copy_messages

    def held_copy(dataset, copy):
        for number, message in enumerate(copy_messages(dataset, copy)):
            if dataset == "restored" and number == 3:  # its header and two pages of items are sent
                held.wait(30)
            yield message

    monkeypatch.setattr(replication, "_copy_messages", held_copy)
    primary, primary_channel, address = serve_index(tmp_path / "p", fsync=False)
    stub = _stub(primary_channel)
    stub.CreateDataset(pb.CreateDatasetRequest(name="src"))
    stub.PutItems(pb.PutItemsRequest(dataset="src", items=[pb.Item(id=f"i{n}", image=b"%d" % n) for n in range(10)]))
    snapshot = stub.SnapshotDataset(pb.SnapshotDatasetRequest(dataset="src")).snapshot
    follower, follower_channel, _ = serve_index(tmp_path / "f", follow=address, fsync=False)
    reader = _stub(follower_channel)
    try:
        version = stub.GetDataset(pb.GetDatasetRequest(name="src")).dataset.version
        reader.GetDataset(pb.GetDatasetRequest(name="src", min_version=version), timeout=10)
        stub.RestoreDataset(pb.RestoreDatasetRequest(snapshot=snapshot, dataset="restored"))
        for _ in range(200):
            try:
                found = reader.GetDataset(pb.GetDatasetRequest(name="restored"), timeout=5).dataset
                assert found.item_count == 10, f"read half restored: {found.item_count} items of 10"
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    assert "is being copied from the primary" in exc.details()
                    break
                assert exc.code() == grpc.StatusCode.NOT_FOUND  # its copy has not begun
            time.sleep(0.05)
        else:
            pytest.fail("the copy never began")
        primary_channel.close()
        primary.stop(0)  # lost mid-copy
        held.set()
        with pytest.raises(grpc.RpcError) as unread:
            reader.GetDataset(pb.GetDatasetRequest(name="restored"), timeout=5)
        assert unread.value.code() == grpc.StatusCode.UNAVAILABLE
        assert reader.GetDataset(pb.GetDatasetRequest(name="src"), timeout=5).dataset.item_count == 10
    finally:
        follower_channel.close()
        follower.stop(0.5)
    with pytest.raises(SystemExit, match="incomplete copy of dataset 'restored'.*cannot become a primary"):
        serve_index(tmp_path / "f", fsync=False, promote=True)


def test_a_clean_stop_lets_writes_under_way_finish_refuses_later_ones_and_the_next_start_continues_its_log(
        tmp_path):
    from convsearch.errors import Unavailable

    index = Index(tmp_path, fsync=False, changes=ChangeLog(1 << 20))
    index.create_dataset("a")
    index.create_collection("a", CollectionKey("m", "l", "avg", "cosine", 0), DIM)
    snapshot = index.snapshot("a")[0].name
    entered, release = threading.Event(), threading.Event()
    fence = index.fence

    def held_fence(*args):  # a write under way (a restore), inside which another write comes
        entered.set()
        release.wait(10)
        fence(*args)

    index.fence = held_fence
    restoring = threading.Thread(target=index.restore, args=(snapshot, "b"))
    restoring.start()
    assert entered.wait(10)
    sealed = []
    sealing = threading.Thread(target=lambda: sealed.append(index.seal(10)))
    sealing.start()
    time.sleep(0.3)
    assert not sealed  # waits for the restore
    with pytest.raises(Unavailable) as refused:
        index.create_dataset("c")
    assert refused.value.reason == "INDEX_STOPPING" and refused.value.metadata == {"dataset": "c"}
    release.set()
    restoring.join()
    sealing.join()
    assert sealed == [True] and index.changes.sealed
    assert index.dataset("b").collection_count == 1  # the restore finished whole
    epoch, last = index.changes.epoch, index.changes.last
    assert index.changes.after(last, 1 << 20, 5.0) == []  # a follower's stream does not wait out the heartbeat
    index.close()
    assert json.loads((tmp_path / LOG_END).read_text()) == {"epoch": epoch, "last": last}

    changes = ChangeLog(1 << 20)
    again = Index(tmp_path, fsync=False, changes=changes)
    assert not (tmp_path / LOG_END).exists()
    assert changes.continues(epoch, last)
    assert not changes.continues(epoch, last - 1) and not changes.continues("another", last)
    assert again.version("b") == last
    again.create_dataset("c")
    assert changes.last == last + 1 and changes.continues(epoch, last)
    again.close()  # without a seal: to the next start, as a crash
    after_crash = ChangeLog(1 << 20)
    Index(tmp_path, fsync=False, changes=after_crash).close()
    assert after_crash.previous is None and not after_crash.continues(changes.epoch, changes.last)


def test_a_clean_stop_whose_writes_do_not_finish_in_time_leaves_no_log_end(tmp_path):
    index = Index(tmp_path, fsync=False, changes=ChangeLog(1 << 20))
    index.create_dataset("a")
    held = index._order_lock("a")
    taken = threading.Event()
    release = threading.Event()

    def hold():
        with held:
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    assert index.seal(0.2) is False and not index.changes.sealed
    release.set()
    holder.join()
    index.close()
    assert not (tmp_path / LOG_END).exists()
