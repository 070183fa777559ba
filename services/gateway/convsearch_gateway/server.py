"""Entry point of `convsearch-gateway`: wires config, backends, servicer and server together."""

import logging

from grpc_health.v1 import health_pb2

from convsearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from convsearch.logs import setup_logging
from convsearch.observability import RpcObserver, metrics_registry
from convsearch.serving import RunningService, add_health_and_reflection, bind, create_server, tls_credentials, tls_note
from convsearch.tls import TLSError, channel_credentials
from convsearch_gateway.auth import Guard, KeysFile
from convsearch_gateway.backends import Backends
from convsearch_gateway.config import GatewayConfig, load_config
from convsearch_gateway.servicer import GatewayServicer
from convsearch_gateway.sessions import Sessions

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
# Health names for what the gateway can do: everything needs the index; embedding needs the extractor.
INDEX_HEALTH, EXTRACTOR_HEALTH = f"{SERVICE_NAME}/index", f"{SERVICE_NAME}/extractor"
log = logging.getLogger("convsearch.gateway")


class _GatewayService(RunningService):
    """Ready (its service name SERVING) once both backends have been up, and from then on until
    it stops: a backend's outage is the same for every gateway, so taking them all out of their
    Service would only turn clear UNAVAILABLE answers (and the reads a follower or the index
    alone can serve) into refused connections. The per-capability names follow the backends."""

    def __init__(self, backends: Backends, interval_s: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backends = backends
        self._interval_s = interval_s
        self._ready = False

    def start(self) -> None:
        super().start()
        self.backends.watch(self._interval_s, self._on_backends)

    def begin_stop(self) -> None:
        self.backends.stop_watching()  # so a backend's change cannot turn it SERVING again
        super().begin_stop()

    def _on_backends(self, extractor_up: bool, index_up: bool) -> None:
        def status(up: bool):
            return health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING

        self._ready = self._ready or (extractor_up and index_up)
        self.set_serving(self._ready)
        self.health.set(INDEX_HEALTH, status(index_up))
        self.health.set(EXTRACTOR_HEALTH, status(extractor_up))


def _keys_file(path: str) -> KeysFile | None:
    """The API keys file, or None without one; exits with a message naming a bad line."""
    if not path:
        return None
    try:
        return KeysFile(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(f"API keys: {exc}") from None


def build_server(config: GatewayConfig) -> tuple[RunningService, int]:
    """Builds the gateway's server on config.port (0 picks one) and its metrics endpoint on
    config.metrics_port; returns it and its port."""
    credentials = tls_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    try:
        backend_credentials = channel_credentials(config.backend_tls_ca, config.backend_tls_cert,
                                                  config.backend_tls_key)
    except (TLSError, ValueError) as exc:
        raise SystemExit(f"backend TLS: {exc}") from None
    registry = metrics_registry()
    backends = Backends(config.extractor, config.index, config.deadline_s, config.max_message_mb, registry,
                        backend_credentials, config.backend_tls_server_name, config.index_replicas)
    guard = Guard(SERVICE_NAME, _keys_file(config.api_keys), config.rate_limit_per_s, config.rate_burst,
                  config.stream_cap, config.max_streams_per_key, config.stream_idle_timeout_s)
    # Observed first: refusals are counted too; the session's version is read last, for the servicer.
    server = create_server(config.max_concurrent_rpcs, config.max_message_mb,
                           [RpcObserver("gateway", registry), guard, Sessions(backends.index.versions, SERVICE_NAME)],
                           config.server_options())
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(
        backends, config.batch_size, max_pixels=config.max_pixels, evaluate_exact_up_to=config.evaluate_exact_up_to),
        server)
    health = add_health_and_reflection(server, [SERVICE_NAME], health_names=[INDEX_HEALTH, EXTRACTOR_HEALTH])
    port = bind(server, config.host, config.port, credentials)
    if guard.keys is None:
        log.warning("no --api-keys: the gateway on %s:%d is open, anyone who reaches it may read, write and delete "
                    "(fine on 127.0.0.1, as `convsearch up` runs it; set --api-keys before exposing it)",
                    config.host, port)
    service = _GatewayService(backends, config.health_interval_s, server, health, [SERVICE_NAME], log,
                              on_stop=backends.close, metrics_registry=registry, metrics_port=config.metrics_port,
                              metrics_host=config.host)
    service.guard = guard  # its keys and limits, for tests and tooling
    return service, port


def main(argv=None) -> None:
    """Runs the gateway until SIGTERM or SIGINT."""
    config = load_config(argv)
    setup_logging("convsearch.gateway", config.log_format)
    service, port = build_server(config)
    service.start()
    backend_security = ("mutual TLS" if config.backend_tls_cert else "TLS") if config.backend_tls_ca else "plaintext"
    log.info("gateway listening on %s:%d%s (extractor %s, index %s over %s, metrics port %d)", config.host, port,
             tls_note(config.tls_cert, config.tls_client_ca), config.extractor, config.index, backend_security,
             service.metrics_port)
    service.run_until_signalled(config.grace_s)


if __name__ == "__main__":
    main()
