"""Domain errors raised by proto-free core code; servicers map them to gRPC status codes.

Each error's message should name the offending item and say what to do about it.
"""


class ConvsearchError(Exception):
    """Base class; `code` names the gRPC status code it maps to."""

    code = "INTERNAL"


class InvalidArgument(ConvsearchError):
    """The request is malformed: a bad image, an unknown layer, a value out of range."""

    code = "INVALID_ARGUMENT"


class NotFound(ConvsearchError):
    """A named thing (model, dataset, collection, item) does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(ConvsearchError):
    """Creating something that exists already."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(ConvsearchError):
    """The system is not in a state to do this, e.g. a model's weights are missing."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(ConvsearchError):
    """A limit was hit: too many images, a message too large, memory."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ConvsearchError):
    """A backend or resource cannot be reached right now; retrying may help."""

    code = "UNAVAILABLE"


class DataLoss(ConvsearchError):
    """Stored data failed its checks: what is damaged is refused whole, never half-served."""

    code = "DATA_LOSS"


class DeadlineExceeded(ConvsearchError):
    """Time ran out, e.g. a client stream that sent nothing for the gateway's idle timeout."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(ConvsearchError):
    """No API key, or one the gateway does not know."""

    code = "UNAUTHENTICATED"


class PermissionDenied(ConvsearchError):
    """The API key's role (or its datasets) does not allow this."""

    code = "PERMISSION_DENIED"


ERRORS_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                            ResourceExhausted, Unavailable, DataLoss, Unauthenticated,
                                            PermissionDenied)}


SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` as a message may echo it: repr'd and cut to about `limit` characters with an
    ellipsis, so a huge name can never overflow gRPC's metadata limit (status details travel
    in a header) or flood a log."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}…"
