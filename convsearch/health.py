"""Waiting for a service's grpc.health.v1 status: for tests, benchmarks and `convsearch up`.

Not part of the client package (convsearch-client), which needs no grpcio-health-checking."""

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_until_serving(channel: grpc.Channel, service: str = "", timeout_s: float = 60.0) -> None:
    """Polls grpc.health.v1 until `service` is SERVING; TimeoutError naming the last state if not."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    state = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            state = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.1)
    raise TimeoutError(f"service {service or '(server)'} not SERVING after {timeout_s:.0f}s; last: {state}")
