"""Streams never take every RPC thread: health checks, which a liveness probe makes, and unary
calls keep answering while streams hold the rest, and a stream over the cap is refused at once
(UNAVAILABLE STREAMS_BUSY, retryable elsewhere) instead of queueing behind them."""

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.extractor.v1 import extractor_pb2, extractor_pb2_grpc
from convsearch.grpc_errors import error_from_call
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.stream_cap import stream_cap
from tests.conftest import serve_extractor, serve_index

RPC_WORKERS = 4  # a cap of 2 streams by default


class HeldStreams:
    """Streams that send their first message and then wait, each holding a server thread."""

    def __init__(self, start, first):
        self._start, self._first = start, first
        self._release = threading.Event()
        self.calls = []

    def _requests(self):
        yield self._first
        self._release.wait(60)

    def open(self):
        call = self._start(self._requests(), timeout=60)
        self.calls.append(call)
        return call

    def close(self):
        self._release.set()
        for call in self.calls:
            call.cancel()


def health_answers(channel, service: str) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def check_capped(channel, held: HeldStreams, service: str, outcome) -> None:
    try:
        for _ in range(2):
            held.open()
        with pytest.raises(grpc.RpcError) as raised:
            outcome(held.open())  # the third: over the cap of 2, at once
        error = raised.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        found = error_from_call(error)
        assert found.reason == "STREAMS_BUSY" and found.retry_after_s and "2 streams at once" in error.details()
        for _ in range(3):  # a liveness probe and unary calls still find a thread
            assert health_answers(channel, "liveness") == "SERVING"
            assert health_answers(channel, service) == "SERVING"
    finally:
        held.close()


def test_extractor_streams_leave_threads_for_health_checks():
    service, channel, _ = serve_extractor(rpc_workers=RPC_WORKERS, default_model="pixels")
    try:
        stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
        config = extractor_pb2.BulkEmbedRequest(config=extractor_pb2.EmbedConfig(model="pixels", layers=["8x8"]))
        held = HeldStreams(stub.BulkEmbed, config)
        check_capped(channel, held, "convsearch.extractor.v1.ExtractorService", next)
        stub.ListModels(extractor_pb2.ListModelsRequest(), timeout=10)  # served again once they ended
    finally:
        channel.close()
        service.stop(0.5)


def test_index_streams_leave_threads_for_health_checks(tmp_path):
    service, channel, _ = serve_index(tmp_path, rpc_workers=RPC_WORKERS)
    try:
        stub = index_pb2_grpc.IndexServiceStub(channel)
        stub.CreateDataset(index_pb2.CreateDatasetRequest(name="shoes"))
        first = index_pb2.PutItemsStreamRequest(dataset="shoes", items=[index_pb2.Item(id="a", image=b"x")])
        held = HeldStreams(stub.PutItemsStream.future, first)
        check_capped(channel, held, "convsearch.index.v1.IndexService", lambda call: call.result(timeout=10))
        assert stub.GetDataset(index_pb2.GetDatasetRequest(name="shoes"), timeout=10).dataset.name == "shoes"
    finally:
        channel.close()
        service.stop(0.5)


def test_the_cap_leaves_a_quarter_of_the_threads_and_refuses_one_that_leaves_none():
    assert [stream_cap(0, workers) for workers in (1, 4, 8, 32, 48)] == [1, 2, 6, 24, 36]
    assert stream_cap(5, 8) == 5
    with pytest.raises(SystemExit, match="must be 1 to 7"):
        stream_cap(8, 8)
