"""Read-your-writes through any gateway: a client's session version.

Every reply of the gateway, a failed one too (a stream may have written before it failed),
carries the trailing metadata `convsearch-version`: the highest of the version the call asked for
and the index version of the latest write this gateway made to the call's dataset (for calls about
no dataset, of any). A client that sends the highest one it has seen as `convsearch-min-version`
on its next calls reads its own writes through any gateway replica, also one it never wrote
through: a follower that has not applied that version waits (`--max-lag-wait` of the index, at
most half the call's time left), then the read goes to the primary. The Python client does this by
itself (`Client.session_version`). It is a version of writes: a read answered by an up-to-date
follower does not raise it.
"""

import contextvars
import re

import grpc

from convsearch.channels import MIN_VERSION_KEY, VERSION_KEY
from convsearch.errors import InvalidArgument
from convsearch.grpc_errors import abort
from convsearch.observability import behavior_of, with_behavior
from convsearch_gateway.replicas import SESSION_VERSION, Versions, dataset_of

_VERSION = re.compile(r"\d{1,19}")
MAX_VERSION = (1 << 63) - 1


def _min_version(context) -> int:
    for key, value in context.invocation_metadata() or ():
        if key == MIN_VERSION_KEY:
            if not _VERSION.fullmatch(value) or int(value) > MAX_VERSION:
                raise InvalidArgument(f"metadata {MIN_VERSION_KEY} must be a version a reply's {VERSION_KEY} gave "
                                      f"(digits, 0 to {MAX_VERSION}), got {value[:40]!r}", field=MIN_VERSION_KEY)
            return int(value)
    return 0


class Sessions(grpc.ServerInterceptor):
    """Serves each call of `service` (its full name) with its client's min version in reach of
    the index reads (replicas.SESSION_VERSION), and answers with the version it reached."""

    def __init__(self, versions: Versions, service: str):
        self.versions = versions
        self._prefix = f"/{service}/"
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        full_name = handler_call_details.method
        wrapped = self._handlers.get(full_name)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None or not full_name.startswith(self._prefix):
                return handler
            wrapped = self._handlers[full_name] = self._wrapped(handler, full_name[len(self._prefix):])
        return wrapped

    def _wrapped(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior, streaming = behavior_of(handler), handler.response_streaming

        def serve(request_or_requests, context):
            try:
                wanted = _min_version(context)
            except InvalidArgument as exc:
                abort(context, exc)
            datasets: set[str] = set()
            if handler.request_streaming:
                request_or_requests = _noting(request_or_requests, method, datasets)
            else:
                datasets.add(dataset_of(method, request_or_requests))
            call = contextvars.copy_context()
            call.run(SESSION_VERSION.set, wanted)
            if not streaming:
                try:
                    return call.run(behavior, request_or_requests, context)
                finally:  # a failed call too: it may have written first (the status is sent after this)
                    self._answer(context, datasets, wanted)
            return self._streamed(call, call.run(behavior, request_or_requests, context), context, datasets, wanted)

        return with_behavior(handler, serve)

    def _streamed(self, call: contextvars.Context, replies, context, datasets: set[str], wanted: int):
        try:
            while True:
                try:
                    reply = call.run(next, replies)
                except StopIteration:
                    break
                yield reply
        finally:  # ended, failed or cancelled: the handler's own clean-up runs now, in its context
            close = getattr(replies, "close", None)
            if close is not None:
                call.run(close)
            self._answer(context, datasets, wanted)

    def _answer(self, context, datasets: set[str], wanted: int) -> None:
        reached = max([wanted, *(self.versions.of(dataset) for dataset in datasets or {""})])
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), (VERSION_KEY, str(reached))))


def _noting(requests, method: str, datasets: set[str]):
    for request in requests:
        dataset = dataset_of(method, request)
        if dataset:  # a stream's later messages may leave it out
            datasets.add(dataset)
        yield request
