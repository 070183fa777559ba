"""Results kept with a collection (evaluations, projections) as index attachments."""

import logging

from convsearch.errors import Aborted
from convsearch.index.v1 import index_pb2
from convsearch_gateway.backends import Backends

log = logging.getLogger(__name__)


def keep(backends: Backends, request: index_pb2.PutAttachmentRequest) -> None:
    """Stores a result computed from the collection version and id the request names. A collection
    deleted and created again meanwhile (ABORTED) keeps nothing: the result, made from the old
    one, is still the caller's answer, but never passes for the new one's."""
    try:
        backends.index.call("PutAttachment", request)
    except Aborted as exc:
        log.info("result %s of %s/%s not kept: %s", request.key, request.dataset, request.collection, exc)
