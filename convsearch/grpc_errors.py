"""Maps domain errors to gRPC status codes at the edge, so no RPC ever fails with a bare UNKNOWN.

Every status also carries google.rpc.Status details (trailer `grpc-status-details-bin`, readable
with grpc_status.rpc_status.from_call): an ErrorInfo (reason, domain, metadata) always; a
BadRequest with field violations, a ResourceInfo, a RetryInfo when the error has them.
`error_from_call` turns such a status back into the domain error, details included.
"""

import functools
import inspect
import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from convsearch.errors import DOMAIN, ERRORS_BY_CODE, ConvsearchError, shown

log = logging.getLogger("convsearch.grpc")


MAX_DETAILS = 1200
"""UTF-8 bytes of a status message: it travels percent-encoded (up to 3x) in a trailer, and again
(base64, 4/3x) inside the google.rpc.Status details with their ErrorInfo and the rest; all of it
must stay under gRPC's 8 KiB metadata limit. Messages cut what they echo (errors.shown); this is
the backstop for the rest."""


def _capped(message: str) -> str:
    encoded = message.encode()
    if len(encoded) <= MAX_DETAILS:
        return message
    return encoded[:MAX_DETAILS - 3].decode(errors="ignore") + "…"


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ConvsearchError):
        return getattr(grpc.StatusCode, exc.code), _capped(str(exc))
    log.exception("unexpected error")
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {shown(str(exc))}); see the server log"


_DETAILS_KEY = "grpc-status-details-bin"
_SHOWN_DETAIL = 200  # characters of one detail value (names are cut; the status travels in a trailer)


def _cut(value: str) -> str:
    return value if len(value) <= _SHOWN_DETAIL else f"{value[:_SHOWN_DETAIL - 1]}…"


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(exc: Exception) -> status_pb2.Status:
    """The google.rpc.Status for an error: code, capped message, and its details."""
    code, message = _status(exc)
    error = exc if isinstance(exc, ConvsearchError) else ConvsearchError()
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.append(_packed(error_details_pb2.ErrorInfo(
        reason=error.reason, domain=DOMAIN, metadata={_cut(k): _cut(v) for k, v in error.metadata.items()})))
    if error.field_violations:
        status.details.append(_packed(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=_cut(f), description=_cut(d))
            for f, d in error.field_violations])))
    if error.resource is not None:
        status.details.append(_packed(error_details_pb2.ResourceInfo(
            resource_type=_cut(error.resource_type), resource_name=_cut(error.resource_name))))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, int(error.retry_after_s * 1e9)))
        status.details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status


def abort_with(context, status: status_pb2.Status) -> None:
    """Ends the RPC with this google.rpc.Status, keeping trailing metadata set before
    (abort_with_status alone would replace it, e.g. the rate limiter's `retry-after-ms`)."""
    grpc_status = rpc_status.to_status(status)
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != _DETAILS_KEY)
    context.abort_with_status(type(grpc_status)(grpc_status.code, grpc_status.details,
                                                (*kept, *grpc_status.trailing_metadata)))


def abort(context, exc: Exception) -> None:
    """Ends the RPC with `exc`'s status and details (see to_rpc_status)."""
    abort_with(context, to_rpc_status(exc))


def details_of(status: status_pb2.Status | None) -> dict:
    """The structured fields of a google.rpc.Status, as keyword arguments of ConvsearchError."""
    fields: dict = {}
    if status is None:
        return fields
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            fields["reason"] = info.reason or None
            fields["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields["field_violations"] = tuple((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            fields["resource_type"], fields["resource_name"] = resource.resource_type, resource.resource_name
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            fields["retry_after_s"] = retry.retry_delay.ToNanoseconds() / 1e9
    return fields


def status_of_call(call) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call (a grpc.RpcError) carries, or None."""
    try:
        return rpc_status.from_call(call)
    except (ValueError, AttributeError, TypeError):  # details that disagree with the status, or none at all
        return None


def error_from_call(call, message: str | None = None) -> ConvsearchError:
    """The domain error for a failed call (a grpc.RpcError), with the details it carries;
    `message` replaces its text when given."""
    cls = ERRORS_BY_CODE.get(call.code().name, ConvsearchError)
    return cls(call.details() if message is None else message, **details_of(status_of_call(call)))


def _handler_status(exc: Exception, context) -> status_pb2.Status:
    """The status a handler's error ends its RPC with; an unexpected error is logged with its
    trace, unless the client is gone (it cancelled, or its deadline passed): its stream then
    fails in the handler, which is no defect."""
    if not context.is_active():
        return status_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="the client is gone")
    return to_rpc_status(exc)


def map_errors(method):
    """Decorates a servicer method (unary or streaming response) to abort with a mapped status."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
                return
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                status = _handler_status(exc, context)
            abort_with(context, status)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            status = _handler_status(exc, context)
        abort_with(context, status)

    return unary
