"""Client-side channel helpers: channels with sane limits, and waiting for a service's health."""

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.serving import MIB


def create_channel(address: str, max_message_mb: int = 64) -> grpc.Channel:
    """An insecure channel to `address` (host:port or dns:///name, balanced round_robin)."""
    limit = max_message_mb * MIB
    return grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.lb_policy_name", "round_robin"),
    ])


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
