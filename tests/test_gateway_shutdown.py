"""A gateway stopping while a handler still calls a backend (a cancelled IndexDataset cleaning
up, say) closed the backend's channel under the call: gRPC Python can crash the whole process
(a segfault in _get_registered_call_handle) when a call starts on a channel being closed, and a
call under way was cancelled. Closing a backend now waits for the calls under way and refuses
new ones with UNAVAILABLE GATEWAY_STOPPING."""

import threading
import time
from concurrent import futures

import grpc
import prometheus_client as prom
import pytest

from convsearch.errors import Unavailable
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch_gateway.backends import Backend


class SlowIndex(index_pb2_grpc.IndexServiceServicer):
    """An index whose GetDataset answers after `delay_s`."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.started = threading.Event()

    def GetDataset(self, request, context):
        self.started.set()
        time.sleep(self.delay_s)
        return pb.GetDatasetResponse(dataset=pb.Dataset(name=request.name))


@pytest.fixture
def slow_index():
    servicer = SlowIndex(0.5)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    index_pb2_grpc.add_IndexServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def _backend(address: str) -> Backend:
    latency = prom.Histogram("calls", "calls", ("backend", "method", "code"), registry=prom.CollectorRegistry())
    return Backend("index", address, index_pb2_grpc.IndexServiceStub, "convsearch.index.v1.IndexService", 10.0, 4,
                   latency)


def _closed_mid_call(slow_index, **close_options) -> tuple[Backend, list]:
    """A backend closed while one GetDataset is under way: (the backend, that call's answers)."""
    servicer, address = slow_index
    backend = _backend(address)
    answers = []
    caller = threading.Thread(target=lambda: answers.append(backend.call("GetDataset", pb.GetDatasetRequest(
        name="shoes"))))
    caller.start()
    assert servicer.started.wait(10)
    backend.close(**close_options)
    caller.join(10)
    return backend, answers


def test_closing_a_backend_lets_the_call_under_way_finish_and_refuses_new_ones(slow_index):
    backend, answers = _closed_mid_call(slow_index)
    assert [answer.dataset.name for answer in answers] == ["shoes"]  # not cancelled by the close
    with pytest.raises(Unavailable) as refused:
        backend.call("GetDataset", pb.GetDatasetRequest(name="shoes"))
    assert refused.value.reason == "GATEWAY_STOPPING" and refused.value.metadata == {"backend": "index"}


def test_a_call_that_outlasts_the_wait_keeps_its_channel(slow_index):
    slow_index[0].delay_s = 2.0
    _, answers = _closed_mid_call(slow_index, wait_s=0.2)  # gives up waiting: the channel is left open
    assert [answer.dataset.name for answer in answers] == ["shoes"]
