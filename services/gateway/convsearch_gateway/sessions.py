"""Read-your-writes through any gateway: a client's session version.

Every reply of the gateway carries the trailing metadata `convsearch-version`: the index version
the call's dataset had reached here (that of this gateway's latest write to it, or the version a
read was made at; for calls about no dataset, the highest of all). A client that sends the highest
one it has seen as `convsearch-min-version` on its next calls reads its own writes, and never
older data than it has seen, through any gateway replica, also one it never wrote through: a
follower that has not applied that version waits (`--max-lag-wait` of the index), then the read
goes to the primary. The Python client does this by itself (`Client.session_version`).
"""

import contextvars

import grpc

from convsearch.channels import MIN_VERSION_KEY, VERSION_KEY
from convsearch.errors import InvalidArgument
from convsearch.grpc_errors import abort
from convsearch.observability import behavior_of, with_behavior
from convsearch_gateway.replicas import SESSION_VERSION, Versions, dataset_of


def _min_version(context) -> int:
    for key, value in context.invocation_metadata() or ():
        if key == MIN_VERSION_KEY:
            try:
                version = int(value)
            except ValueError:
                version = -1
            if version < 0:
                raise InvalidArgument(f"metadata {MIN_VERSION_KEY} must be a version a reply's {VERSION_KEY} gave "
                                      f"(a whole number, 0 or more), got {value!r}", field=MIN_VERSION_KEY)
            return version
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
                reply = call.run(behavior, request_or_requests, context)
                self._answer(context, datasets, wanted)
                return reply
            return self._streamed(call, call.run(behavior, request_or_requests, context), context, datasets, wanted)

        return with_behavior(handler, serve)

    def _streamed(self, call: contextvars.Context, replies, context, datasets: set[str], wanted: int):
        while True:
            try:
                reply = call.run(next, replies)
            except StopIteration:
                break
            yield reply
        self._answer(context, datasets, wanted)

    def _answer(self, context, datasets: set[str], wanted: int) -> None:
        reached = max([wanted, *(self.versions.of(dataset) for dataset in datasets or {""})])
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), (VERSION_KEY, str(reached))))


def _noting(requests, method: str, datasets: set[str]):
    for request in requests:
        datasets.add(dataset_of(method, request))
        yield request
