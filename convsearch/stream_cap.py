"""A cap on the streams a service serves at once, kept below its RPC threads.

A gRPC server runs every call, health checks included, on its thread pool, and a stream holds
its thread for as long as it is open. Streams filling every thread made health checks wait
behind them, so a Kubernetes liveness probe restarted the service in the middle of its streams.
A stream over the cap is refused at once, UNAVAILABLE (`STREAMS_BUSY`, with a retry delay):
clients that balance over replicas, as the gateway does, retry it on another.
"""

import threading
from collections.abc import Callable

import grpc

from convsearch.errors import Unavailable
from convsearch.grpc_errors import abort
from convsearch.observability import behavior_of, with_behavior

RETRY_AFTER_S = 0.5


HELP = ("streaming calls served at once; more are refused UNAVAILABLE (STREAMS_BUSY), so that unary calls and "
        "health checks always find an RPC thread; 0: all RPC threads but a quarter (2 at least)")


def stream_cap(max_streams: int, rpc_workers: int) -> int:
    """The streams `rpc_workers` threads serve at once: `max_streams`, or with 0 all but a quarter
    of the threads (two at least), which stay for unary calls and health checks. Exits with a
    message when `max_streams` leaves no thread free."""
    if not max_streams:
        return max(1, rpc_workers - max(2, rpc_workers // 4))
    if not 0 < max_streams < rpc_workers:
        raise SystemExit(f"max_streams ({max_streams}) must be 1 to {rpc_workers - 1}: below the RPC threads "
                         f"({rpc_workers}), so that health checks always find one")
    return max_streams


class StreamCap(grpc.ServerInterceptor):
    """Serves at most `limit` streaming calls (any kind) at once; refuses the others."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._open

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        return with_behavior(handler, self._capped(behavior_of(handler), handler.response_streaming,
                                                   handler_call_details.method))

    def _capped(self, behavior, response_streaming: bool, method: str):
        def capped(request, context):
            if not self._take():
                abort(context, Unavailable(
                    f"this server serves {self.limit} streams at once and all are busy ({method}); retry shortly, "
                    "or on another replica", reason="STREAMS_BUSY", retry_after_s=RETRY_AFTER_S,
                    metadata={"max_streams": str(self.limit)}))
            release = released_with_rpc(context, self._release)
            try:
                result = behavior(request, context)
            except BaseException:
                release()
                raise
            if not response_streaming:
                release()
                return result
            return _released_after(result, release)

        return capped

    def _take(self) -> bool:
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._open -= 1


def released_with_rpc(context, release: Callable[[], None]) -> Callable[[], None]:
    """`release` made to run once: at the RPC's end (a callback of `context`; at once when the RPC
    has already ended) or when the returned function is called first, at the handler's end."""
    done = threading.Lock()

    def once() -> None:
        if done.acquire(blocking=False):
            release()

    if not context.add_callback(once):
        once()
    return once


def _released_after(responses, release):
    try:
        yield from responses
    finally:
        release()
