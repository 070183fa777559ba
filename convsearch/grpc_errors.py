"""Maps domain errors to gRPC status codes at the edge, so no RPC ever fails with a bare UNKNOWN."""

import functools
import inspect
import logging

import grpc

from convsearch.errors import ConvsearchError, shown

log = logging.getLogger("convsearch.grpc")


MAX_DETAILS = 2000
"""UTF-8 bytes of a status message: it travels percent-encoded (up to 3x) in a trailer, which
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


def map_errors(method):
    """Decorates a servicer method (unary or streaming response) to abort with a mapped status."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
                return
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                code, message = _status(exc)
            context.abort(code, message)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = _status(exc)
        context.abort(code, message)

    return unary
