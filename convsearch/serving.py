"""Server wiring shared by every service: gRPC server, TLS or plaintext port, health (with
`liveness`), reflection, metrics endpoint, graceful shutdown."""

import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
import prometheus_client as prom
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from convsearch import reflection
from convsearch.channels import MIB
from convsearch.config import option
from convsearch.observability import serve_metrics
from convsearch.stream_cap import StreamCap
from convsearch.tls import TLSError, server_credentials

# Health name that is SERVING from start until stop begins, whatever the service's readiness:
# what liveness probes ask (the service's own name is for readiness). Not a real service, so not
# listed by reflection.
LIVENESS = "liveness"
_INT_MAX = 2**31 - 1  # what gRPC reads as "no limit" in a milliseconds option


@dataclasses.dataclass(frozen=True)
class ConnectionAgeOptions:
    """The connection age limit of a service that clients balance over by DNS (its configuration's
    dataclass inherits these options): the extractor's replicas, the index's followers."""

    max_connection_age_s: float = option(30.0, "seconds after which a client connection is asked to go away "
                                               "(GOAWAY), so clients balancing over dns:/// reconnect, resolve "
                                               "again and reach new replicas; 0 disables")
    max_connection_age_grace_s: float = option(0.0, "seconds RPCs still running on a connection asked to go away "
                                                    "get before it is closed; 0: no limit (long streams always "
                                                    "finish)")

    def check_connection_age(self) -> None:
        """Raises ValueError for a negative age or grace."""
        for name in ("max_connection_age_s", "max_connection_age_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")

    def server_options(self) -> list[tuple[str, int]]:
        """gRPC server options of the limit. gRPC sends GOAWAY once a connection is
        max_connection_age_s old (+-10% jitter): RPCs running on it go on, new ones go to a new
        connection, and the client's resolver is asked to resolve again. After the grace, the
        connection is closed, failing what still runs on it."""
        if not self.max_connection_age_s:
            return []

        def milliseconds(seconds: float) -> int:
            return min(_INT_MAX, max(1, round(seconds * 1000))) if seconds else _INT_MAX

        return [("grpc.max_connection_age_ms", milliseconds(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", milliseconds(self.max_connection_age_grace_s))]



def create_server(max_workers: int, max_message_mb: int, interceptors: Sequence[grpc.ServerInterceptor] = (),
                  options: Sequence[tuple[str, int]] = (), max_streams: int = 0) -> grpc.Server:
    """A threaded gRPC server whose messages may be up to `max_message_mb` MiB each way, with
    these interceptors and further channel options; with `max_streams`, at most that many
    streaming calls at once (see convsearch.stream_cap; the interceptors see the refused ones too)."""
    limit = max_message_mb * MIB
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=[*interceptors, StreamCap(max_streams)] if max_streams else interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *options,
        ],
    )


def add_health_and_reflection(server: grpc.Server, service_names: Sequence[str],
                              health_names: Sequence[str] = ()) -> health.HealthServicer:
    """Registers grpc.health.v1 (every service, each of `health_names` and LIVENESS, NOT_SERVING
    until the service starts) and reflection (v1 and v1alpha).

    `service_names` are real gRPC services: health and reflection list them. `health_names` are
    health statuses only (e.g. the gateway's per-backend `GatewayService/index`): no service has
    that name, so reflection does not list them (a listed name must be one it can describe)."""
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", LIVENESS, *service_names, *health_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((*service_names, health.SERVICE_NAME), server)
    return health_servicer


def set_serving(health_servicer: health.HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    """Marks the overall server and each named service SERVING or NOT_SERVING."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *service_names):
        health_servicer.set(name, status)


def tls_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """The server's TLS credentials (mutual TLS with `client_ca`; reloaded when the files change),
    or None for plaintext; exits with a message naming the file when one cannot be used."""
    try:
        return server_credentials(cert, key, client_ca)
    except (TLSError, ValueError) as exc:
        raise SystemExit(f"TLS: {exc}") from None


def tls_note(cert: str, client_ca: str) -> str:
    """How a port is secured, for the start-up log line."""
    return " with mutual TLS" if client_ca else " with TLS" if cert else " in plaintext"


def bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds host:port (0 picks a free port) and returns the bound port; fails fast if it cannot.

    With `credentials` (see `tls_credentials`) the port serves TLS, health and reflection too."""
    try:
        address = f"{host}:{port}"
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise SystemExit(f"cannot listen on {host}:{port}: address in use or not available")
    return bound


class RunningService:
    """A built service: its gRPC server, health, metrics endpoint and shutdown hook.

    The metrics endpoint (`metrics_registry` at http://metrics_host:metrics_port/metrics; port 0
    picks one, -1 serves none) listens from construction; `metrics_port` is the bound port.
    """

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 service_names: Sequence[str], log: logging.Logger,
                 on_stop: Callable[[], None] = lambda: None, metrics_registry: prom.CollectorRegistry | None = None,
                 metrics_port: int = -1, metrics_host: str = "0.0.0.0"):
        self.server = server
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.log = log
        self._on_stop = on_stop
        self.failed = ""  # why the service failed for good (see fail)
        self._failure = threading.Event()
        self.metrics_port = -1
        self._metrics_server = None
        if metrics_registry is not None and metrics_port >= 0:
            self._metrics_server, self.metrics_port = serve_metrics(metrics_registry, metrics_host, metrics_port)

    def set_serving(self, serving: bool) -> None:
        """Health of the whole server and each of its services."""
        set_serving(self.health, self.service_names, serving)

    def start(self) -> None:
        """Starts answering RPCs: LIVENESS turns SERVING (the service's own health stays
        NOT_SERVING until `set_serving(True)`)."""
        self.server.start()
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

    def begin_stop(self) -> None:
        """The first step of stopping: every health name, LIVENESS too, turns NOT_SERVING."""
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.set_serving(False)

    def fail(self, reason: str) -> None:
        """Ends the service for a fault it cannot recover from: every health name turns
        NOT_SERVING at once (probes and callers go elsewhere), and run_until_signalled returns,
        so the process ends and its supervisor (Kubernetes, compose) starts it again."""
        if self._failure.is_set():
            return
        self.log.error("%s; this process can no longer serve, and stops to be started again", reason)
        self.failed = reason
        self.begin_stop()
        self._failure.set()

    def stop(self, grace_s: float = 5.0) -> None:
        """`begin_stop`, drain in-flight RPCs for `grace_s`, then the service's own shutdown."""
        self.begin_stop()
        self.server.stop(grace_s).wait()
        self._on_stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def run_until_signalled(self, grace_s: float) -> None:
        """Blocks until SIGTERM or SIGINT (or `fail`), then stops gracefully."""
        stop = threading.Event()

        def request_stop(signum, _frame):
            self.log.info("received %s; shutting down (grace %.0fs)", signal.Signals(signum).name,
                          grace_s)
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not stop.wait(0.5) and not self._failure.is_set():  # wake up regularly: the handler gets to run
            pass
        self.stop(grace_s)
        self.log.info("stopped")
