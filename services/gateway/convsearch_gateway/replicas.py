"""Reads from the index's followers (`convsearch-index --follow`), with the gateway's own writes in them.

The gateway's read-only paths (search, dataset listings, projections, evaluation queries) call
`Backends.reads`; everything else, writes first of all, calls the primaries. A read goes to a
follower with `min_version` set to the version the primary gave this gateway's latest write to
that dataset (0 when it wrote none), or the client's session version when higher (sessions.py),
so a client reads its own writes through the gateway it wrote through, and through any other with
its session. A follower behind that version answers UNAVAILABLE after its --max-lag-wait, one that
cannot be reached at once, and one whose copy of a collection is damaged DATA_LOSS: the read then
goes to the primary, with what is left of the caller's time, as every read does while no follower
is SERVING or when it needs what followers do not keep (images). Evaluate and Project, which keep
what they compute under a collection version read from the primary, read at least the primary's
version of the dataset (`reading_from`).
"""

import contextlib
import contextvars
import threading
import time

import prometheus_client as prom

from convsearch.errors import DataLoss, Unavailable
from convsearch.index.v1.index_pb2 import GetDatasetRequest

SESSION_VERSION = contextvars.ContextVar("convsearch_session_version", default=0)
"""The version the client of the call being served has seen (see sessions.py): its reads see no older data."""


@contextlib.contextmanager
def reading_from(primaries, dataset: str):
    """Reads in this block see the dataset at least as the primary holds it now: a result stored
    under a collection version read from the primary is then computed from that version's data
    or a later one (then stored as stale), never from a follower's older copy."""
    now = primaries.call("GetDataset", GetDatasetRequest(name=dataset)).dataset.version
    token = SESSION_VERSION.set(max(SESSION_VERSION.get(), now))
    try:
        yield
    finally:
        SESSION_VERSION.reset(token)

READS = frozenset({"Search", "GetItems", "ScanItems", "GetVectors", "ListCollections", "GetCollectionStats",
                   "GetDataset", "ListDatasets"})
"""Index RPCs a follower answers (GetItems and ScanItems without images)."""


def dataset_of(method: str, request) -> str:
    """The dataset an index request is about ("" for ListDatasets and snapshot calls by name)."""
    if method in ("CreateDataset", "GetDataset", "DeleteDataset"):
        return request.name
    return getattr(request, "dataset", "")


class Versions:
    """The highest version the primary gave each dataset's writes through this gateway."""

    def __init__(self):
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()

    def record(self, dataset: str, version: int) -> None:
        if version:
            with self._lock:
                self._latest[dataset] = max(version, self._latest.get(dataset, 0))

    def of(self, dataset: str) -> int:
        """The version a read of `dataset` must see; for "" (every dataset), the highest of all."""
        with self._lock:
            if dataset:
                return self._latest.get(dataset, 0)
            return max(self._latest.values(), default=0)


class IndexReads:
    """`call(method, request, remaining)` like the primaries', served by a follower when it can be."""

    def __init__(self, primaries, followers, versions: Versions, registry: prom.CollectorRegistry):
        self.primaries = primaries
        self.followers = followers  # a Backend balanced over every follower, or None
        self.versions = versions
        self._served = prom.Counter("convsearch_gateway_index_reads",
                                    "Reads of the gateway's read-only paths by where they were answered "
                                    "(follower, or primary: no follower serving, or one behind or unreachable)",
                                    ("by",), registry=registry)

    def call(self, method: str, request, remaining: float | None = None):
        if (self.followers is None or not self.followers.serving or method not in READS
                or getattr(request, "include_images", False)):
            self._served.labels("primary").inc()
            return self.primaries.call(method, request, remaining)
        pinned = type(request)()
        pinned.CopyFrom(request)
        pinned.min_version = max(self.versions.of(dataset_of(method, request)), SESSION_VERSION.get())
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            reply = self.followers.call(method, pinned, remaining)
        except (Unavailable, DataLoss):
            self._served.labels("primary").inc()
            return self.primaries.call(method, request, None if deadline is None else deadline - time.monotonic())
        self._served.labels("follower").inc()
        return reply
