"""Server wiring shared by every service: gRPC server, health, reflection, graceful shutdown."""

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MIB = 1 << 20


def create_server(max_workers: int, max_message_mb: int) -> grpc.Server:
    """A threaded gRPC server whose messages may be up to `max_message_mb` MiB each way."""
    limit = max_message_mb * MIB
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )


def add_health_and_reflection(server: grpc.Server, service_names: Sequence[str]) -> health.HealthServicer:
    """Registers grpc.health.v1 (every service NOT_SERVING until `set_serving`) and reflection."""
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return health_servicer


def set_serving(health_servicer: health.HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    """Marks the overall server and each named service SERVING or NOT_SERVING."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *service_names):
        health_servicer.set(name, status)


def bind(server: grpc.Server, host: str, port: int) -> int:
    """Binds host:port (0 picks a free port) and returns the bound port; fails fast if it cannot."""
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise SystemExit(f"cannot listen on {host}:{port}: address in use or not available")
    return bound


class RunningService:
    """A built service: its gRPC server, health, metrics endpoint and shutdown hook."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 service_names: Sequence[str], log: logging.Logger,
                 on_stop: Callable[[], None] = lambda: None, metrics_registry=None,
                 metrics_port: int = -1, metrics_host: str = "0.0.0.0"):
        self.server = server
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.log = log
        self._on_stop = on_stop
        self.metrics_port = -1
        self._metrics_server = None
        if metrics_registry is not None and metrics_port >= 0:
            import prometheus_client

            self._metrics_server, _ = prometheus_client.start_http_server(
                metrics_port, addr=metrics_host, registry=metrics_registry)
            self.metrics_port = self._metrics_server.server_port

    def set_serving(self, serving: bool) -> None:
        """Health of the whole server and each of its services."""
        set_serving(self.health, self.service_names, serving)

    def start(self) -> None:
        """Starts answering RPCs (health stays NOT_SERVING until `set_serving(True)`)."""
        self.server.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING, drain in-flight RPCs for `grace_s`, then the service's own shutdown."""
        self.set_serving(False)
        self.server.stop(grace_s).wait()
        self._on_stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def run_until_signalled(self, grace_s: float) -> None:
        """Blocks until SIGTERM or SIGINT, then stops gracefully."""
        stop = threading.Event()

        def request_stop(signum, _frame):
            self.log.info("received %s; shutting down (grace %.0fs)", signal.Signals(signum).name,
                          grace_s)
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not stop.wait(0.5):  # wake up regularly so the handler always gets to run
            pass
        self.stop(grace_s)
        self.log.info("stopped")
