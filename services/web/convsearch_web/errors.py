"""gRPC status codes (as the client's `convsearch.errors` exceptions) to HTTP answers: the
gateway's message and details in a JSON body the page shows as it is."""

import math

from fastapi import HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from convsearch.errors import ConvsearchError

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 413,
    "DATA_LOSS": 500,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
RATE_LIMITED = 429
ROUTE_ERRORS = {404: ("NOT_FOUND", "ROUTE_NOT_FOUND", "no such API route: {method} {path}; /api/openapi.json "
                      "lists them"),
                405: ("UNIMPLEMENTED", "METHOD_NOT_ALLOWED", "{path} does not answer {method}; "
                      "/api/openapi.json lists its methods")}
INSUFFICIENT_STORAGE = 507


class WebError(Exception):
    """A refusal of the web service itself (before the gateway is asked): HTTP status and message."""

    def __init__(self, status: int, code: str, message: str, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason or code


class BodyTooLarge(HTTPException):
    """Raised while a request's body is read, once it passes the limit: an HTTPException, so the
    parser of the body lets it through rather than answering that the body could not be parsed."""

    def __init__(self, limit_mb: float):
        super().__init__(413)
        self.limit_mb = limit_mb


def refusal(status: int, code: str, reason: str, message: str) -> JSONResponse:
    """A refusal of the web service itself, as the JSON body every error has."""
    return JSONResponse({"error": {"code": code, "reason": reason, "message": message, "metadata": {},
                                   "field_violations": []}}, status_code=status)


def too_large(limit_mb: float) -> JSONResponse:
    """The answer to a body beyond the upload limit."""
    return refusal(413, "RESOURCE_EXHAUSTED", "UPLOAD_TOO_LARGE",
                   f"the upload is larger than {limit_mb:g} MiB; upload a smaller image")


def http_status(error: ConvsearchError) -> int:
    """The HTTP status of a gateway error: RESOURCE_EXHAUSTED is 429 for too many requests (the
    rate limiter, which says when to retry, or too many streams at once), 507 for a full disk,
    413 otherwise (an image or a message too large)."""
    if error.code == "RESOURCE_EXHAUSTED":
        if error.retry_after_s is not None or error.reason == "TOO_MANY_STREAMS":
            return RATE_LIMITED
        if error.reason == "DISK_FULL":
            return INSUFFICIENT_STORAGE
    return HTTP_STATUS.get(error.code, 500)


def error_body(error: ConvsearchError) -> dict:
    """The JSON of a gateway error: code, reason, message and what the details name."""
    return {"error": {"code": error.code, "reason": error.reason, "message": str(error),
                      "metadata": error.metadata,
                      "field_violations": [{"field": f, "description": d} for f, d in error.field_violations]}}


def _gateway_error(_request: Request, error: ConvsearchError) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return JSONResponse(error_body(error), status_code=http_status(error), headers=headers)


def _web_error(_request: Request, error: WebError) -> JSONResponse:
    return refusal(error.status, error.code, error.reason, str(error))


def _field(error: dict) -> str:
    """The field a validation error names; the body itself when it is no JSON (its loc holds the offset)."""
    if error["type"] == "json_invalid":
        return "body"
    return ".".join(str(part) for part in error["loc"][1:]) or str(error["loc"][0])


def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    violations = [{"field": _field(e), "description": e["msg"]} for e in error.errors()]
    message = "; ".join(f"{v['field']}: {v['description']}" for v in violations)
    return JSONResponse({"error": {"code": "INVALID_ARGUMENT", "reason": "INVALID_ARGUMENT", "message": message,
                                   "metadata": {}, "field_violations": violations}}, status_code=422)


async def _route_error(request: Request, error: StarletteHTTPException):
    """An unknown API route or a wrong method, in the API's JSON body (elsewhere, FastAPI's)."""
    if not request.url.path.startswith("/api/"):
        return await http_exception_handler(request, error)
    code, reason, message = ROUTE_ERRORS.get(error.status_code, ("INVALID_ARGUMENT", "HTTP_ERROR", "{detail}"))
    answer = refusal(error.status_code, code, reason, message.format(method=request.method, path=request.url.path,
                                                                     detail=error.detail))
    answer.headers.update(error.headers or {})
    return answer


def install(app) -> None:
    """Registers the handlers that turn every refusal into a readable JSON body."""
    app.add_exception_handler(ConvsearchError, _gateway_error)
    app.add_exception_handler(WebError, _web_error)
    app.add_exception_handler(BodyTooLarge, lambda _request, error: too_large(error.limit_mb))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _route_error)
