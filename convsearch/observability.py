"""What every service shares to be observed: a Prometheus registry with the process collectors,
the server interceptor that counts, times and logs every RPC, the client interceptor that times
backend calls, and the request id that ties one request's log lines together across services.

The request id travels in the `x-request-id` metadata. The server interceptor takes it from the
incoming call (or makes one), returns it to the client in the trailing metadata, and sets it in a
contextvar while the RPC's handler runs, so every log line written there carries it. The client
interceptor adds the contextvar's id to every outgoing call, and runs a streaming call's request
iterator (which gRPC consumes on a thread of its own) in the caller's context. Work handed to
other threads keeps the id only when it is submitted with its context
(`contextvars.copy_context().run`).
"""

import collections
import contextvars
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

import grpc
import prometheus_client as prom

REQUEST_ID_KEY = "x-request-id"
# RPC latencies: sub-millisecond index lookups up to streams that run for minutes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 300.0)
# A client's id is kept when it is this tame; anything else is replaced by a fresh one.
_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# Probes and tooling: their RPCs are counted, but logged at DEBUG only.
_QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                   "grpc.reflection.v1.ServerReflection")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("convsearch_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served in this context, if any."""
    return _request_id.get()


def metrics_registry(registry: prom.CollectorRegistry | None = None) -> prom.CollectorRegistry:
    """`registry` (or a new one) with the process, platform and garbage collector collectors."""
    registry = prom.CollectorRegistry() if registry is None else registry
    prom.ProcessCollector(registry=registry)
    prom.PlatformCollector(registry=registry)
    prom.GCCollector(registry=registry)
    return registry


def serve_metrics(registry: prom.CollectorRegistry, host: str, port: int):
    """Serves `registry` at http://host:port/metrics (0 picks a free port); returns (http server,
    port). Exits with a message when the port cannot be had."""
    try:
        server, _ = prom.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SystemExit(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return server, server.server_port


class _Method:
    """One RPC method of a server: its series (children made once, for speed) and log level."""

    def __init__(self, requests: prom.Counter, duration: prom.Histogram, in_flight: prom.Gauge, full_name: str):
        self.full_name = full_name
        self.service, _, self.name = full_name.lstrip("/").rpartition("/")
        self.level = logging.DEBUG if self.service in _QUIET_SERVICES else logging.INFO
        self.in_flight = in_flight.labels(self.service, self.name)
        self._requests = requests
        self._duration = duration
        self._by_code: dict[grpc.StatusCode, tuple] = {}

    def series(self, code: grpc.StatusCode) -> tuple:
        """(requests counter, duration histogram) of this method's RPCs that ended with `code`."""
        found = self._by_code.get(code)
        if found is None:
            found = self._by_code[code] = (self._requests.labels(self.service, self.name, code.name),
                                           self._duration.labels(self.service, self.name, code.name))
        return found


class _Rpc:
    """One RPC being served: its request id, the context its handler runs in, and its end,
    recorded once."""

    def __init__(self, observer: "RpcObserver", method: _Method, request_id: str):
        self.observer = observer
        self.method = method
        self.request_id = request_id
        self.context = contextvars.copy_context()
        self.context.run(_request_id.set, request_id)
        self._lock = threading.Lock()
        self._finished = False
        self._started = time.perf_counter()

    def finish(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self.observer.record(self, code, time.perf_counter() - self._started)



def behavior_of(handler: grpc.RpcMethodHandler) -> Callable:
    """The function that serves a method handler, whatever its streaming kind."""
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


def with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serialisers as `handler`, served by `behavior`."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[handler.request_streaming,
                                                                 handler.response_streaming]
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

class RpcObserver(grpc.ServerInterceptor):
    """Counts, times and logs every RPC of a server, and gives it a request id (see the module).

    Metrics, on `registry`: convsearch_rpc_requests_total and convsearch_rpc_duration_seconds by
    service (the gRPC service), method and code, and convsearch_rpc_in_flight by service and
    method. A streaming RPC counts once, when it ends, with its final code; one the client
    cancels (or whose deadline passes) counts as CANCELLED (DEADLINE_EXCEEDED) when gRPC ends it.
    Each finished RPC is one log line on `convsearch.<component>.rpc`: at INFO, or DEBUG for
    health checks and reflection. Health's non-blocking Watch is passed through unobserved.
    """

    def __init__(self, component: str, registry: prom.CollectorRegistry):
        self.log = logging.getLogger(f"convsearch.{component}.rpc")
        self._requests = prom.Counter("convsearch_rpc_requests", "RPCs finished, by status code",
                                      ("service", "method", "code"), registry=registry)
        self._duration = prom.Histogram("convsearch_rpc_duration_seconds", "Time from the start to the end of an RPC",
                                        ("service", "method", "code"), registry=registry, buckets=LATENCY_BUCKETS)
        self._in_flight = prom.Gauge("convsearch_rpc_in_flight", "RPCs being served", ("service", "method"),
                                     registry=registry)
        # A server's handler for a method never changes, so each is wrapped once.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        observed = self._handlers.get(handler_call_details.method)
        if observed is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            observed = self._handlers[handler_call_details.method] = self._observed(
                handler, _Method(self._requests, self._duration, self._in_flight, handler_call_details.method))
        return observed

    def _observed(self, handler: grpc.RpcMethodHandler, method: _Method) -> grpc.RpcMethodHandler:
        behavior = behavior_of(handler)
        if getattr(behavior, "experimental_non_blocking", False):
            return handler  # answers through callbacks after it returns: no end to observe here
        observed = (self._streaming if handler.response_streaming else self._unary)(behavior, method)
        if hasattr(behavior, "experimental_thread_pool"):
            observed.experimental_thread_pool = behavior.experimental_thread_pool
        return with_behavior(handler, observed)

    def _start(self, method: _Method, context) -> _Rpc:
        incoming = next((value for key, value in context.invocation_metadata() or () if key == REQUEST_ID_KEY), None)
        request_id = incoming if incoming and _ACCEPTED_ID.fullmatch(incoming) else uuid.uuid4().hex
        rpc = _Rpc(self, method, request_id)
        method.in_flight.inc()
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))

        def ended():  # gRPC calls this when the RPC is over, also when the client has gone
            rpc.finish(grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0
                       else grpc.StatusCode.CANCELLED)

        context.add_callback(ended)
        return rpc

    def _unary(self, behavior: Callable, method: _Method) -> Callable:
        def observed(request, context):
            rpc = self._start(method, context)
            try:
                response = rpc.context.run(behavior, request, context)
            except BaseException:
                rpc.finish(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            rpc.finish(context.code() or grpc.StatusCode.OK)
            return response

        return observed

    def _streaming(self, behavior: Callable, method: _Method) -> Callable:
        def observed(request, context):
            rpc = self._start(method, context)
            try:
                responses = iter(rpc.context.run(behavior, request, context))
            except BaseException:
                rpc.finish(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            return self._responses(rpc, responses, context)

        return observed

    @staticmethod
    def _responses(rpc: _Rpc, responses: Iterator, context) -> Iterator:
        try:
            while True:
                try:
                    response = rpc.context.run(next, responses)
                except StopIteration:
                    break
                yield response
        except GeneratorExit:  # abandoned: the client has gone (the end callback has counted it)
            rpc.finish(grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            rpc.finish(context.code() or grpc.StatusCode.UNKNOWN)
            raise
        # A handler whose client cancelled may end normally (its requests ran out) before gRPC's
        # end callback has counted the RPC as CANCELLED.
        rpc.finish(context.code() or (grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED))

    def record(self, rpc: _Rpc, code: grpc.StatusCode, seconds: float) -> None:
        """Counts and logs one finished RPC."""
        method = rpc.method
        requests, duration = method.series(code)
        requests.inc()
        duration.observe(seconds)
        method.in_flight.dec()
        if self.log.isEnabledFor(method.level):
            milliseconds = seconds * 1000
            self.log.log(method.level, "%s %s %.1f ms", method.full_name, code.name, milliseconds,
                         extra={"method": method.full_name, "code": code.name,
                                "duration_ms": round(milliseconds, 3), "request_id": rpc.request_id})


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    """An outgoing call's details with our metadata added."""


def _in_context(requests: Iterable, context: contextvars.Context) -> Iterator:
    """`requests`, each produced in `context` (gRPC pulls them on a thread of its own)."""
    iterator = iter(requests)
    while True:
        try:
            yield context.run(next, iterator)
        except StopIteration:
            return


class CallObserver(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """A client interceptor: passes the current request id on in `x-request-id`, and observes how
    long each call to `target` took, to its end (a stream's too), in `histogram`, labelled with
    the target's name, the method and the final code."""

    def __init__(self, target: str, histogram: prom.Histogram):
        self.target = target
        self.histogram = histogram

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        request_id = _request_id.get()
        if request_id is None:
            return details
        metadata = [*(details.metadata or ()), (REQUEST_ID_KEY, request_id)]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def _observed(self, continuation, details, request_or_requests):
        method = details.method.rsplit("/", 1)[-1]
        started = time.perf_counter()
        call = continuation(self._details(details), request_or_requests)

        def done(finished):
            code = finished.code() or grpc.StatusCode.UNKNOWN
            self.histogram.labels(self.target, method, code.name).observe(time.perf_counter() - started)

        call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._observed(continuation, client_call_details, request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._observed(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._observed(continuation, client_call_details,
                              _in_context(request_iterator, contextvars.copy_context()))

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._observed(continuation, client_call_details,
                              _in_context(request_iterator, contextvars.copy_context()))
