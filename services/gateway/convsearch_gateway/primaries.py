"""The index primaries behind the gateway, called as one backend: `call(method, request, remaining)`.

Each dataset lives on one primary, the one that owns its name (convsearch.placement), and every
call about it goes there. ListDatasets and ListSnapshots ask every primary and merge the answers;
calls that name a snapshot go to the primary holding it; RestoreDataset onto another primary than
the snapshot's streams it over (ReadSnapshot into WriteSnapshot) and restores it there.

The gateway never moves a dataset. One created before its owner joined stays where it is until
`convsearch rebalance` moves it, and keeps working meanwhile: when the primary asked answers that
the dataset does not exist, the others are asked in turn, and where it was found is remembered
until that primary says it is gone. Creating or restoring a dataset under a name that any primary
holds is ALREADY_EXISTS. With one primary every call goes straight to it, as it always has.

The version each write reply carries is kept per dataset (`versions`), so that reads sent to the
index's followers (convsearch_gateway.replicas) see this gateway's own writes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from convsearch import placement
from convsearch.errors import AlreadyExists, ConvsearchError, NotFound, Unavailable, shown
from convsearch.index.v1 import index_pb2
from convsearch.snapshot_copy import SourceFailed, copy_snapshot
from convsearch_gateway.replicas import Versions, dataset_of

if TYPE_CHECKING:
    from convsearch_gateway.backends import Backend

log = logging.getLogger("convsearch.gateway.primaries")


def _dataset_missing(error: ConvsearchError) -> bool:
    return isinstance(error, NotFound) and error.reason == "DATASET_NOT_FOUND"


class IndexPrimaries:
    """The primaries by their configured names (placement hashes those, never resolved IPs)."""

    def __init__(self, backends: Sequence[Backend]):
        self.backends = {backend.address: backend for backend in backends}
        self._found: dict[str, str] = {}  # dataset -> the primary other than its owner that has it
        self._lock = threading.Lock()
        self.versions = Versions()

    def check(self) -> bool:
        """Asks every primary's health; True when all are SERVING (any dataset may be on any)."""
        return all([backend.check() for backend in self.backends.values()])  # a list: asks every one

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()

    def owner(self, dataset: str) -> Backend:
        return self.backends[placement.owner(dataset, list(self.backends))]

    def call(self, method: str, request, remaining: float | None = None):
        """One index call, sent where it belongs; raises the mapped domain error. A write's
        version is kept for the reads that follow it."""
        reply = self._sent(method, request, remaining)
        self.versions.record(dataset_of(method, request), getattr(reply, "version", 0))
        return reply

    def _sent(self, method: str, request, remaining: float | None):
        if len(self.backends) == 1:
            return next(iter(self.backends.values())).call(method, request, remaining)
        if method == "ListDatasets":
            datasets = [d for reply in self._every(method, request, remaining) for d in reply.datasets]
            return index_pb2.ListDatasetsResponse(datasets=sorted(datasets, key=lambda d: d.name))
        if method == "ListSnapshots":
            snapshots = [s for reply in self._every(method, request, remaining) for s in reply.snapshots]
            return index_pb2.ListSnapshotsResponse(
                snapshots=sorted(snapshots, key=lambda s: (s.create_time.ToNanoseconds(), s.name)))
        if method == "DeleteSnapshot":
            holders = self._holders(request.snapshot, remaining) or list(self.backends.values())[:1]  # its error
            return [holder.call(method, request, remaining) for holder in holders][-1]
        if method == "CreateDataset":
            self._refuse_taken(request.name, remaining)
            return self.owner(request.name).call(method, request, remaining)
        if method == "RestoreDataset":
            return self._restore(request, remaining)
        dataset = dataset_of(method, request)
        reply = self._routed(dataset, method, request, remaining)
        if method == "DeleteDataset":
            with self._lock:
                self._found.pop(dataset, None)
        return reply

    def _every(self, method: str, request, remaining: float | None) -> list:
        """Every primary's answer: a list that misses one primary would be wrong, so any failure raises."""
        return [backend.call(method, request, remaining) for backend in self.backends.values()]

    def _routed(self, dataset: str, method: str, request, remaining: float | None):
        """The call sent to the primary where the dataset is: where it was last found, else its
        owner; when that one says the dataset does not exist (or the one where it was found
        cannot answer: it may have been moved), the others in placement order."""
        with self._lock:
            remembered = self._found.get(dataset)
        first = remembered or placement.owner(dataset, list(self.backends))
        missing, unreachable = None, None
        try:
            return self.backends[first].call(method, request, remaining)
        except Unavailable as exc:
            if not remembered:
                raise
            unreachable = exc  # a rebalance may have moved it since: the others are asked
        except ConvsearchError as exc:
            if not _dataset_missing(exc):
                raise
            missing = exc
        if remembered:
            with self._lock:
                self._found.pop(dataset, None)
        for name in placement.ranked(dataset, list(self.backends)):
            if name == first:
                continue
            try:
                reply = self.backends[name].call(method, request, remaining)
            except Unavailable as exc:
                unreachable = exc
                continue
            except ConvsearchError as exc:
                if _dataset_missing(exc):
                    continue
                self._remember(dataset, name)  # it is there; the call failed for another reason
                raise
            self._remember(dataset, name)
            return reply
        raise unreachable or missing  # a primary that cannot answer may hold it: no NOT_FOUND then

    def _remember(self, dataset: str, primary: str) -> None:
        if primary != placement.owner(dataset, list(self.backends)):
            log.info("dataset %s is on index primary %s, not its owner %s: run `convsearch rebalance` to move it",
                     dataset, primary, self.owner(dataset).address)
            with self._lock:
                self._found[dataset] = primary

    def _refuse_taken(self, dataset: str, remaining: float | None, owner: Backend | None = None) -> None:
        """ALREADY_EXISTS when a primary other than the dataset's owner holds the name (the owner
        answers for itself)."""
        owner = owner or self.owner(dataset)
        for backend in self.backends.values():
            if backend is owner:
                continue
            try:
                backend.call("GetDataset", index_pb2.GetDatasetRequest(name=dataset), remaining)
            except ConvsearchError as exc:
                if _dataset_missing(exc):
                    continue
                raise
            raise AlreadyExists(f"dataset {shown(dataset)} exists already; pick another name or delete it first",
                                reason="DATASET_ALREADY_EXISTS", resource_type="dataset", resource_name=dataset,
                                metadata={"dataset": dataset})

    def _holders(self, snapshot: str, remaining: float | None) -> list[Backend]:
        """The primaries that keep a snapshot of this name."""
        listing = index_pb2.ListSnapshotsRequest()
        return [backend for backend in self.backends.values()
                if any(s.name == snapshot for s in backend.call("ListSnapshots", listing, remaining).snapshots)]

    def _restore(self, request: index_pb2.RestoreDatasetRequest, remaining: float | None):
        """Restores on the new dataset's owner, first copying the snapshot there when another
        primary keeps it; the copy is deleted afterwards, so the snapshot stays where it was taken."""
        owner = self.owner(request.dataset)
        holders = self._holders(request.snapshot, remaining)
        if not holders:
            return owner.call("RestoreDataset", request, remaining)  # the owner's own NOT_FOUND
        self._refuse_taken(request.dataset, remaining, owner)  # the owner answers for itself
        if owner in holders:
            return owner.call("RestoreDataset", request, remaining)
        source = holders[0]
        try:
            with source.opened(), owner.opened():
                copy_snapshot(source.stub, owner.stub, request.snapshot, owner.timeout(remaining))
        except SourceFailed as exc:
            raise source.error(exc.error) from None
        except grpc.RpcError as exc:
            raise owner.error(exc) from None
        try:
            return owner.call("RestoreDataset", request, remaining)
        finally:
            try:
                owner.call("DeleteSnapshot", index_pb2.DeleteSnapshotRequest(snapshot=request.snapshot), remaining)
            except ConvsearchError as exc:  # the restore's outcome matters more than a leftover copy
                log.warning("could not delete the copy of snapshot %s on %s: %s", request.snapshot, owner.address,
                            exc)
