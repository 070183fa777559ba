"""The gateway's two backends: channels, stubs, deadlines, and errors that name the backend.

The index may be several primaries, each owning whole datasets (see convsearch_gateway.primaries);
`Backends.index` calls them as one backend, and it is up when every primary is. With followers of
the primary (`--index-replicas`), `Backends.reads` sends the read-only paths' calls to them (see
convsearch_gateway.replicas); their health is watched too, but the gateway serves without them.

Every call to a backend (unary or streaming, through `Backend.call` or the stub) passes the
request id of the RPC being served on (x-request-id) and is timed, to its end, in
convsearch_gateway_backend_duration_seconds (labels backend, method, code). Calls made on
other threads carry the id only when their work was submitted with its context (see
convsearch.observability); the health checks run on a thread of their own and carry none.
"""

import contextlib
import logging
import threading
from collections.abc import Callable

import grpc
import prometheus_client as prom
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.channels import create_channel
from convsearch.errors import ConvsearchError, Unavailable
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.grpc_errors import error_from_call, status_of_call
from convsearch.index.v1 import index_pb2_grpc
from convsearch.observability import LATENCY_BUCKETS, CallObserver
from convsearch.placement import parse_primaries
from convsearch_gateway.primaries import IndexPrimaries
from convsearch_gateway.replicas import IndexReads

log = logging.getLogger("convsearch.gateway.backends")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
UNAVAILABLE_RETRY_S = 1.0
"""RetryInfo of a backend that cannot be reached: about the health checks' period, a restart's scale."""
CLOSE_WAIT_S = 5.0
"""How long closing a backend waits for the calls under way (see Backend.opened)."""


class Backend:
    """One backend service behind a channel, called with a deadline."""

    def __init__(self, name: str, address: str, stub_class, service: str, deadline_s: float, max_message_mb: int,
                 latency: prom.Histogram, credentials: grpc.ChannelCredentials | None = None, server_name: str = ""):
        self.name = name
        self.address = address
        self.service = service
        self.deadline_s = deadline_s
        self.channel = grpc.intercept_channel(create_channel(address, max_message_mb, credentials, server_name),
                                              CallObserver(name, latency))
        self.stub = stub_class(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.serving = False
        self._state = threading.Condition()
        self._calls = 0  # started through `opened` and not ended
        self._closed = False

    @contextlib.contextmanager
    def opened(self):
        """Keeps the channel open for a call started inside: gRPC Python can crash the process
        when a call starts on a channel being closed (as a handler still running at shutdown
        did). UNAVAILABLE GATEWAY_STOPPING once the backend is closed."""
        with self._state:
            if self._closed:
                raise Unavailable(f"the gateway is stopping: no new call to the {self.name} at {self.address}; "
                                  "retry, another gateway answers", reason="GATEWAY_STOPPING",
                                  retry_after_s=UNAVAILABLE_RETRY_S, metadata={"backend": self.name})
            self._calls += 1
        try:
            yield
        finally:
            with self._state:
                self._calls -= 1
                self._state.notify_all()

    def error(self, exc: grpc.RpcError) -> ConvsearchError:
        """The domain error for a failed call, with the google.rpc.Status details the backend sent
        (reason, field violations, resource, retry delay), so they pass through to the client,
        an UNAVAILABLE the backend itself answered (a dataset being moved) included; a backend
        that could not be reached (no details: gRPC's own status) is named with its address and
        comes with a retry delay."""
        status = status_of_call(exc)
        if exc.code() in _UNREACHABLE and not (status is not None and status.details):
            return Unavailable(f"the {self.name} at {self.address} is unavailable ({exc.code().name}: "
                               f"{exc.details()}); check that it is running", reason="BACKEND_UNAVAILABLE",
                               retry_after_s=UNAVAILABLE_RETRY_S, metadata={"backend": self.name})
        return error_from_call(exc)

    def timeout(self, remaining: float | None) -> float:
        """This call's deadline: the backend's own, or what is left of the client's if less."""
        return self.deadline_s if remaining is None else max(0.001, min(self.deadline_s, remaining))

    def call(self, method: str, request, remaining: float | None = None):
        """A unary call; raises the mapped domain error."""
        try:
            with self.opened():
                return getattr(self.stub, method)(request, timeout=self.timeout(remaining))
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def check(self) -> bool:
        """Asks the backend's health; remembers and returns whether it is SERVING."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=1.0)
            self.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            self.serving = False
        return self.serving

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Refuses new calls and closes the channel once those under way have ended; after
        `wait_s` it is left to the process's end instead (closing it under them could crash)."""
        with self._state:
            self._closed = True
            ended = self._state.wait_for(lambda: not self._calls, wait_s)
        if ended:
            self.channel.close()
        else:
            log.warning("%d calls to the %s still under way after %.0fs: its channel is left open", self._calls,
                        self.name, wait_s)


class Backends:
    """The extractor and the index, and a thread that keeps their health current.

    `index` is one primary's address or several, comma-separated (each a primary of its own).
    With `credentials` (convsearch.tls.channel_credentials) both are reached over TLS, their
    certificates checked for the host names in their addresses, or for `server_name` when given.
    """

    def __init__(self, extractor: str, index: str, deadline_s: float, max_message_mb: int,
                 registry: prom.CollectorRegistry, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str = "", index_replicas: str = ""):
        latency = prom.Histogram("convsearch_gateway_backend_duration_seconds",
                                 "Time from the start to the end of a call to a backend", ("backend", "method", "code"),
                                 registry=registry, buckets=LATENCY_BUCKETS)
        self.extractor = Backend("extractor", extractor, extractor_pb2_grpc.ExtractorServiceStub,
                                 "convsearch.extractor.v1.ExtractorService", deadline_s, max_message_mb, latency,
                                 credentials, server_name)
        def index_backend(name: str, address: str) -> Backend:
            return Backend(name, address, index_pb2_grpc.IndexServiceStub, "convsearch.index.v1.IndexService",
                           deadline_s, max_message_mb, latency, credentials, server_name)

        self.index = IndexPrimaries([index_backend("index", primary) for primary in parse_primaries(index)])
        self.followers = index_backend("index follower", index_replicas) if index_replicas else None
        self.reads = IndexReads(self.index, self.followers, self.index.versions, registry)
        self.max_message_bytes = max_message_mb << 20  # either way; image fetches page under it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def watch(self, interval_s: float, on_change: Callable[[bool, bool], None]) -> None:
        """Checks both backends every `interval_s`; calls on_change(extractor_up, index_up) on changes."""
        def loop():
            last = None
            while True:
                state = (self.extractor.check(), self.index.check())
                followers = self.followers.check() if self.followers is not None else None
                if (state, followers) != last:
                    log.info("backends: extractor %s, index %s%s", *("up" if up else "DOWN" for up in state),
                             "" if followers is None else f", index followers {'up' if followers else 'DOWN'}")
                    on_change(*state)
                    last = (state, followers)
                if self._stop.wait(interval_s):
                    return

        self._watcher = threading.Thread(target=loop, name="backend-health", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    def close(self) -> None:
        self.stop_watching()
        self.extractor.close()
        self.index.close()
        if self.followers is not None:
            self.followers.close()
