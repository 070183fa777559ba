"""Client-side channel helpers: channels with sane limits, balanced and retried.

Part of the client package (convsearch-client): imports nothing server-side. Waiting for a
service's health is in convsearch.health."""

import json

import grpc

MIB = 1 << 20
LOOPBACK = ("localhost", "127.0.0.1", "::1")
"""Host names only this machine reaches."""
# A session's versions (see the gateway's sessions.py): the gateway's replies carry the first in
# their trailing metadata, a client sends the highest it has seen as the second.
VERSION_KEY = "convsearch-version"
MIN_VERSION_KEY = "convsearch-min-version"

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
