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


ERRORS_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                            ResourceExhausted, Unavailable, DataLoss)}
