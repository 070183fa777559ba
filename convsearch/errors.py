"""Domain errors raised by proto-free core code; servicers map them to gRPC status codes.

Each error's message should name the offending item and say what to do about it.

Errors also carry structured fields that travel as google.rpc.Status details (see
convsearch.grpc_errors), so a program can act on them without parsing the message: a `reason`
(UPPER_SNAKE, ErrorInfo), `metadata` (names, ErrorInfo), the request `field` at fault
(BadRequest), the resource (ResourceInfo) and how long to wait before retrying (RetryInfo).
All are optional and default from the class, so `raise NotFound("...")` keeps working.
"""

DOMAIN = "convsearch.dev"
"""ErrorInfo.domain of every error this system sends."""


class ConvsearchError(Exception):
    """Base class; `code` names the gRPC status code it maps to, `reason` the default ErrorInfo reason."""

    code = "INTERNAL"
    reason = "INTERNAL"

    def __init__(self, message: str = "", *, reason: str | None = None, field: str | None = None,
                 field_violations: tuple[tuple[str, str], ...] = (), resource_type: str = "",
                 resource_name: str = "", retry_after_s: float | None = None,
                 metadata: dict[str, str] | None = None):
        """Args:
            message: what went wrong and what to do, for a person.
            reason: UPPER_SNAKE cause for programs (default: the class's).
            field: the request field at fault (a BadRequest field violation described by message).
            field_violations: further (field, description) pairs.
            resource_type, resource_name: the missing or existing thing (ResourceInfo).
            retry_after_s: how long to wait before retrying (RetryInfo).
            metadata: names a program may need (dataset, collection, item, ...), values as given.
        """
        super().__init__(message)
        if reason:
            self.reason = reason
        violations = tuple(field_violations)
        if field:
            violations = ((field, message), *violations)
        self.field_violations: tuple[tuple[str, str], ...] = violations
        self.resource_type = resource_type
        self.resource_name = resource_name
        self.retry_after_s = retry_after_s
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}

    @property
    def message(self) -> str:
        return str(self)

    @property
    def resource(self) -> tuple[str, str] | None:
        """(resource_type, resource_name), or None when the error names no resource."""
        return (self.resource_type, self.resource_name) if self.resource_type or self.resource_name else None


class InvalidArgument(ConvsearchError):
    """The request is malformed: a bad image, an unknown layer, a value out of range."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class NotFound(ConvsearchError):
    """A named thing (model, dataset, collection, item) does not exist."""

    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(ConvsearchError):
    """Creating something that exists already."""

    code = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class FailedPrecondition(ConvsearchError):
    """The system is not in a state to do this, e.g. a model's weights are missing."""

    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(ConvsearchError):
    """A limit was hit: too many images, a message too large, memory."""

    code = "RESOURCE_EXHAUSTED"
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(ConvsearchError):
    """A backend or resource cannot be reached right now; retrying may help."""

    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class DataLoss(ConvsearchError):
    """Stored data failed its checks: what is damaged is refused whole, never half-served."""

    code = "DATA_LOSS"
    reason = "DATA_LOSS"


class DeadlineExceeded(ConvsearchError):
    """Time ran out, e.g. a client stream that sent nothing for the gateway's idle timeout."""

    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class Cancelled(ConvsearchError):
    """The client cancelled the call, or its deadline passed: the work for it was stopped."""

    code = "CANCELLED"
    reason = "CANCELLED"


class Aborted(ConvsearchError):
    """A conditional write whose condition no longer holds (what it was computed from changed);
    read again, then write."""

    code = "ABORTED"
    reason = "ABORTED"


class Unauthenticated(ConvsearchError):
    """No API key, or one the gateway does not know."""

    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDenied(ConvsearchError):
    """The API key's role (or its datasets) does not allow this."""

    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


ERRORS_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                            ResourceExhausted, Unavailable, DataLoss, DeadlineExceeded, Cancelled,
                                            Aborted, Unauthenticated, PermissionDenied)}


SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as a message may echo it: repr'd and cut to about `limit` characters with an
    ellipsis, so a huge name can never overflow gRPC's metadata limit (status details travel
    in a header) or flood a log."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def item_not_found(dataset: str, item_id: str) -> dict:
    """The structured fields of a NotFound for a missing item: `NotFound(message, **item_not_found(d, i))`."""
    return dict(reason="ITEM_NOT_FOUND", resource_type="item", resource_name=item_id,
                metadata={"dataset": dataset, "item": item_id})
