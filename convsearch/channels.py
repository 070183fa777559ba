"""Client-side channel helpers: channels with sane limits, and waiting for a service's health."""

import json
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.serving import MIB

# Balance over every resolved address; retry calls that found a backend UNAVAILABLE, with backoff.
_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{}], "retryPolicy": {
        "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]}}],
})


def channel_target(addresses: str) -> str:
    """A gRPC target for one address, a dns:///name, or several comma-separated IPv4 host:port."""
    parts = [part.strip() for part in addresses.split(",") if part.strip()]
    if len(parts) == 1:
        return parts[0]
    return "ipv4:" + ",".join(part.replace("localhost:", "127.0.0.1:") for part in parts)


def create_channel(address: str, max_message_mb: int = 64, credentials: grpc.ChannelCredentials | None = None,
                   server_name: str = "") -> grpc.Channel:
    """A channel to `address` (see `channel_target`), balanced round_robin, with retries.

    Plaintext without `credentials` (see convsearch.tls.channel_credentials); with them, TLS, the
    server's certificate matching the host name of the address, or `server_name` when given (for
    addresses by IP whose certificates name a host).
    """
    limit = max_message_mb * MIB
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
    ]
    if credentials is None:
        return grpc.insecure_channel(channel_target(address), options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(channel_target(address), credentials, options=options)


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
