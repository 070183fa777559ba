"""The `convsearch-index` command as an operator runs it: a lock on the data dir, no
acknowledged write lost to `kill -9`, and no stale vector left by one."""

import hashlib
import os
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from convsearch.channels import create_channel
from convsearch.common.v1 import common_pb2
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch.tensors import from_tensor, to_tensor
from convsearch_index.server import SERVICE_NAME

INDEX = os.path.join(os.path.dirname(sys.executable), "convsearch-index")


def test_a_second_process_on_the_same_data_dir_fails_at_start(tmp_path):
    process, _ = start_service("convsearch-index", "--data-dir", str(tmp_path), service=SERVICE_NAME)
    try:
        result = subprocess.run([INDEX, "--data-dir", str(tmp_path), "--port", "0"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0 and "in use by another index process" in result.stderr
    finally:
        log = stop_service(process)
    assert process.returncode == 0 and "stopped" in log


def test_kill_9_loses_no_acknowledged_upsert(tmp_path):
    process, address = start_service("convsearch-index", "--data-dir", str(tmp_path), service=SERVICE_NAME)
    stub = index_pb2_grpc.IndexServiceStub(create_channel(address))
    stub.CreateDataset(pb.CreateDatasetRequest(name="crash"))
    stub.PutItems(pb.PutItemsRequest(dataset="crash", items=[pb.Item(id=f"v{i}", label="x") for i in range(5000)]))
    stub.CreateCollection(pb.CreateCollectionRequest(dataset="crash", spec=pb.CollectionSpec(
        model="m", layer="l", dimension=32)))
    acknowledged: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)

    def upsert_until_killed():
        for start in range(0, 5000, 20):
            ids = [f"v{i}" for i in range(start, start + 20)]
            vectors = rng.normal(size=(20, 32)).astype(np.float32)
            try:
                stub.UpsertVectors(pb.UpsertVectorsRequest(dataset="crash", collection="m/l/avg/cosine", ids=ids,
                                                           vectors=to_tensor(vectors)), timeout=10)
            except grpc.RpcError:
                return
            acknowledged.update(zip(ids, vectors, strict=True))

    writer = threading.Thread(target=upsert_until_killed)
    writer.start()
    while len(acknowledged) < 1000:
        writer.join(0.01)
    process.send_signal(signal.SIGKILL)
    writer.join()
    process.wait()
    assert 1000 <= len(acknowledged) < 5000

    process, address = start_service("convsearch-index", "--data-dir", str(tmp_path), service=SERVICE_NAME)
    try:
        stub = index_pb2_grpc.IndexServiceStub(create_channel(address))
        ids = list(acknowledged)
        reply = stub.GetVectors(pb.GetVectorsRequest(dataset="crash", collection="m/l/avg/cosine", ids=ids))
        assert list(reply.missing_ids) == []
        np.testing.assert_allclose(from_tensor(reply.vectors), np.stack([acknowledged[i] for i in ids]), rtol=1e-6)
        stats = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="crash", collection="m/l/avg/cosine"))
        assert stats.collection.count % 20 == 0  # whole batches only: nothing half-written
    finally:
        stop_service(process)


def vector_of(image: bytes) -> np.ndarray:
    """The vector this test derives from an image, so a stale one is recognised."""
    return np.frombuffer(hashlib.sha256(image).digest(), np.uint8)[:8].astype(np.float32) + 1.0


@pytest.mark.slow
def test_kill_9_loop_of_upserts_replacements_and_deletes(tmp_path):
    """20 cycles of mixed writes, each ended by SIGKILL at a random moment: after every restart
    every acknowledged write is there, and no item has a vector made from an image it no longer has."""
    collection = "m/l/avg/euclidean"
    items: dict[str, bytes] = {}  # acknowledged: id -> image
    vectors: dict[str, np.ndarray] = {}  # acknowledged: id -> vector
    rng = np.random.default_rng(7)
    ids = [f"it{n:03d}" for n in range(60)]
    for cycle in range(20):
        process, address = start_service("convsearch-index", "--data-dir", str(tmp_path), service=SERVICE_NAME)
        stub = index_pb2_grpc.IndexServiceStub(create_channel(address))
        if cycle == 0:
            stub.CreateDataset(pb.CreateDatasetRequest(name="crash"))
            stub.CreateCollection(pb.CreateCollectionRequest(dataset="crash", spec=pb.CollectionSpec(
                model="m", layer="l", dimension=8, metric=common_pb2.METRIC_EUCLIDEAN)))
        check_against_acknowledged(stub, collection, items, vectors)
        in_flight: list[set[str]] = []
        writer = threading.Thread(target=write_until_killed,
                                  args=(stub, collection, ids, rng, items, vectors, in_flight))
        writer.start()
        writer.join(rng.uniform(0.2, 0.8))
        process.send_signal(signal.SIGKILL)
        writer.join()
        process.wait()
        # The write in flight at the kill may or may not have happened: learn which from the index.
        uncertain = in_flight[-1] if in_flight else set()
        process, address = start_service("convsearch-index", "--data-dir", str(tmp_path), service=SERVICE_NAME)
        stub = index_pb2_grpc.IndexServiceStub(create_channel(address))
        adopt(stub, collection, sorted(uncertain), items, vectors)
        check_against_acknowledged(stub, collection, items, vectors)
        stop_service(process)
    assert len(items) > 10


def write_until_killed(stub, collection, ids, rng, items, vectors, in_flight) -> None:
    """Random writes until the index dies; the model dicts hold what was acknowledged."""
    while True:
        batch = sorted(set(rng.choice(ids, 4).tolist()))
        op = rng.choice(["put", "put", "embed", "delete"])
        in_flight.append(set(batch))
        try:
            if op == "put":  # new items or replaced images
                images = {i: rng.bytes(16) for i in batch}
                stub.PutItems(pb.PutItemsRequest(dataset="crash", items=[
                    pb.Item(id=i, label="x", image=images[i]) for i in batch]), timeout=10)
                for i in batch:
                    if items.get(i) != images[i]:
                        vectors.pop(i, None)
                    items[i] = images[i]
            elif op == "embed":
                found = stub.GetItems(pb.GetItemsRequest(dataset="crash", ids=batch, include_images=True),
                                      timeout=10).items
                if found:
                    reply = stub.UpsertVectors(pb.UpsertVectorsRequest(
                        dataset="crash", collection=collection, ids=[f.id for f in found],
                        vectors=to_tensor(np.stack([vector_of(f.image) for f in found])),
                        image_digests=[f.image_digest for f in found]), timeout=10)
                    vectors.update((f.id, vector_of(f.image)) for f in found if f.id not in reply.stale_ids)
            else:
                stub.DeleteItems(pb.DeleteItemsRequest(dataset="crash", ids=batch), timeout=10)
                for i in batch:
                    items.pop(i, None)
                    vectors.pop(i, None)
        except grpc.RpcError:
            return
        in_flight.pop()


def adopt(stub, collection, ids, items, vectors) -> None:
    if not ids:
        return
    found = {f.id: f.image for f in stub.GetItems(pb.GetItemsRequest(dataset="crash", ids=ids,
                                                                     include_images=True)).items}
    reply = stub.GetVectors(pb.GetVectorsRequest(dataset="crash", collection=collection, ids=ids))
    held = dict(zip(reply.ids, from_tensor(reply.vectors), strict=True)) if reply.ids else {}
    for i in ids:
        items.pop(i, None)
        vectors.pop(i, None)
        if i in found:
            items[i] = found[i]
        if i in held:
            vectors[i] = held[i]


def check_against_acknowledged(stub, collection, items, vectors) -> None:
    every = [f"it{n:03d}" for n in range(60)]
    found = {f.id: f.image for f in stub.GetItems(pb.GetItemsRequest(dataset="crash", ids=every,
                                                                     include_images=True)).items}
    assert found == items
    reply = stub.GetVectors(pb.GetVectorsRequest(dataset="crash", collection=collection, ids=every))
    held = dict(zip(reply.ids, from_tensor(reply.vectors), strict=True)) if reply.ids else {}
    assert set(held) == set(vectors)
    for i, vector in held.items():
        np.testing.assert_array_equal(vector, vector_of(found[i]))  # made from the image it has now
