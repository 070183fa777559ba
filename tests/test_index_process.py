"""The `convsearch-index` command as an operator runs it: a lock on the data dir, and no
acknowledged write lost to `kill -9`."""

import os
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np

from convsearch.channels import create_channel
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
        np.testing.assert_array_equal(from_tensor(reply.vectors), np.stack([acknowledged[i] for i in ids]))
        stats = stub.GetCollectionStats(pb.GetCollectionStatsRequest(dataset="crash", collection="m/l/avg/cosine"))
        assert stats.collection.count % 20 == 0  # whole batches only: nothing half-written
    finally:
        stop_service(process)
