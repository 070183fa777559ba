"""Moves datasets to the index primaries that own them (`convsearch rebalance`).

The gateway places each dataset on one primary by its name (convsearch.placement) but never
moves data: after a primary is added, the datasets it wins stay where they are (the gateway
still finds them there) until this moves them, talking to the primaries directly. A move of
dataset D from primary S to its owner O:

1. fence D on S (FenceDataset: its writes answer UNAVAILABLE, DATASET_MOVING, so clients retry
   them after the move; reads go on) and note its state: its item count and each collection's
   count and version;
2. snapshot D on S and stream the snapshot to O (ReadSnapshot into WriteSnapshot, SHA-256 checked);
3. restore it on O as D, fenced from its creation (the gateway sends D's calls to O as soon as D
   is there: no write may land on a copy that could still be thrown away), and check the copy:
   the same item count, the same collections, each with the same count;
4. only if D on S is still as noted (the fence expired mid-move, or S restarted and forgot it, and
   a write came), delete it there and lift the fence on O; otherwise delete the copy on O, lift
   the fence on S and skip D (run again);
5. delete the snapshot on S and its copy on O.
The move renews its fences every FENCE_S / 4 while it runs, so a move of a large dataset may
take longer than FENCE_S; they hold for FENCE_S at most after that, so a move cut short (the
command killed) holds no writes for longer. A copy that changed after all (O restarted
mid-move) is never deleted.

A dataset found on its owner as well as elsewhere is skipped, never overwritten: a person
compares the two and deletes one. A restored dataset's description says which snapshot it was
restored from, as RestoreDataset's always does.
"""

import dataclasses
import threading
from collections.abc import Callable, Iterator

import grpc

from convsearch import placement
from convsearch.channels import create_channel
from convsearch.grpc_errors import error_from_call
from convsearch.index.v1 import index_pb2 as pb
from convsearch.index.v1 import index_pb2_grpc
from convsearch.snapshot_copy import SourceFailed, copy_snapshot

CALL_TIMEOUT_S = 30.0
"""Deadline of the short calls; snapshots, copies and restores take as long as the data needs."""
FENCE_S = 600.0
"""How long a fence holds a dataset's writes past its last renewal (should a move be cut short,
they resume after this)."""


@dataclasses.dataclass
class Move:
    """One dataset to move, and what happened."""

    dataset: str
    source: str
    target: str
    status: str = "planned"  # planned, moved or skipped
    reason: str = ""  # why it was skipped
    items: int = 0
    collections: int = 0


@dataclasses.dataclass(frozen=True)
class State:
    """What a dataset holds, to tell whether it changed and whether a copy is whole."""

    items: int
    collections: dict[str, tuple[int, int]]  # name -> (count, version)
    version: int  # the dataset's change log position on its primary: any write changes it

    def same_content(self, other: "State") -> bool:
        return self.items == other.items and \
            {n: c for n, (c, _) in self.collections.items()} == {n: c for n, (c, _) in other.collections.items()}


class Primaries:
    """Channels to the index primaries, by their names as the gateway is given them."""

    def __init__(self, names: list[str], credentials: grpc.ChannelCredentials | None = None):
        self.names = names
        self._channels = {name: create_channel(name, credentials=credentials) for name in names}
        self.stubs = {name: index_pb2_grpc.IndexServiceStub(channel) for name, channel in self._channels.items()}

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> "Primaries":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _failure(exc: grpc.RpcError, primary: str) -> str:
    return f"{primary}: {exc.code().name}: {exc.details()}"


def plan(primaries: Primaries) -> list[Move]:
    """The datasets that are not on their owners, by name; raises the domain error of a primary
    that cannot list its datasets (a plan without it would be wrong)."""
    where: dict[str, list[str]] = {}
    for name, stub in primaries.stubs.items():
        try:
            listed = stub.ListDatasets(pb.ListDatasetsRequest(), timeout=CALL_TIMEOUT_S).datasets
        except grpc.RpcError as exc:
            raise error_from_call(exc, f"index primary {_failure(exc, name)}") from None
        for dataset in listed:
            where.setdefault(dataset.name, []).append(name)
    moves = []
    for dataset, holders in sorted(where.items()):
        owner = placement.owner(dataset, primaries.names)
        for source in holders:
            if source == owner:
                continue
            move = Move(dataset, source, owner)
            if owner in holders:
                move.status, move.reason = "skipped", (f"{owner} (its owner) has a dataset {dataset} as well; compare "
                                                       f"the two, delete one, and run again")
            moves.append(move)
    return moves


def state(stub: index_pb2_grpc.IndexServiceStub, dataset: str) -> State:
    found = stub.GetDataset(pb.GetDatasetRequest(name=dataset), timeout=CALL_TIMEOUT_S).dataset
    collections = stub.ListCollections(pb.ListCollectionsRequest(dataset=dataset), timeout=CALL_TIMEOUT_S).collections
    return State(found.item_count, {c.name: (c.count, c.version) for c in collections}, found.version)


def _attempt(call: Callable[[], object]) -> str:
    """Runs a call whose failure is reported, not raised (a clean-up, a renewal); "" when it
    worked, else what failed."""
    try:
        call()
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return ""


class _Renewals:
    """Renews the fences a move holds, every FENCE_S / 4 until stopped; a renewal that fails is
    let be (the move's end checks whether the dataset changed)."""

    def __init__(self, dataset: str):
        self._dataset = dataset
        self._stubs: list[index_pb2_grpc.IndexServiceStub] = []
        self._lock = threading.Lock()  # held by each round of renewals
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fence-renewal-{dataset}", daemon=True)
        self._thread.start()

    def add(self, stub: index_pb2_grpc.IndexServiceStub) -> None:
        with self._lock:
            self._stubs.append(stub)

    def stop(self) -> None:
        """No renewal after this returns: a fence lifted next stays lifted."""
        self._stopped.set()
        with self._lock:
            self._stubs.clear()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(FENCE_S / 4):
            with self._lock:
                for stub in self._stubs:
                    _attempt(lambda stub=stub: stub.FenceDataset(
                        pb.FenceDatasetRequest(dataset=self._dataset, ttl_s=FENCE_S), timeout=CALL_TIMEOUT_S))


def _has(stub: index_pb2_grpc.IndexServiceStub, dataset: str) -> bool | None:
    """Whether the primary answers that it has the dataset; None when it cannot answer."""
    try:
        stub.GetDataset(pb.GetDatasetRequest(name=dataset), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return False if exc.code() == grpc.StatusCode.NOT_FOUND else None
    return True


def _unchanged(stub: index_pb2_grpc.IndexServiceStub, dataset: str, restored: State) -> bool:
    """Whether the copy is still as restored (False also when its primary cannot answer)."""
    try:
        return state(stub, dataset) == restored
    except grpc.RpcError:
        return False


def move(primaries: Primaries, planned: Move) -> Move:
    """Moves one dataset (see the module's steps); fills in its status and returns it."""
    source, target = primaries.stubs[planned.source], primaries.stubs[planned.target]
    dataset = planned.dataset
    snapshot, restored, fenced, step = "", None, False, planned.source
    deleting = False  # whether this move asked the source to delete the dataset
    renewals = _Renewals(dataset)
    try:
        source.FenceDataset(pb.FenceDatasetRequest(dataset=dataset, ttl_s=FENCE_S), timeout=CALL_TIMEOUT_S)
        fenced = True
        renewals.add(source)
        before = state(source, dataset)
        taken = source.SnapshotDataset(pb.SnapshotDatasetRequest(dataset=dataset, skip_retention=True))
        snapshot = taken.snapshot
        step = planned.target
        try:
            copy_snapshot(source, target, snapshot)
        except SourceFailed as exc:
            step = planned.source
            raise exc.error from None
        try:
            target.RestoreDataset(pb.RestoreDatasetRequest(snapshot=snapshot, dataset=dataset, fence_ttl_s=FENCE_S))
        finally:
            left = _attempt(lambda: target.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot=snapshot)))
        renewals.add(target)
        restored = copy = state(target, dataset)
        step = planned.source
        if not copy.same_content(before):
            planned.status, planned.reason = "skipped", (
                f"the copy on {planned.target} holds {copy.items} items and {len(copy.collections)} collections, "
                f"the source {before.items} and {len(before.collections)}; run again")
        elif state(source, dataset) != before:
            planned.status, planned.reason = "skipped", (f"it changed on {planned.source} during the move (a write "
                                                         "came); run again")
        else:
            deleting = True
            renewals.stop()
            source.DeleteDataset(pb.DeleteDatasetRequest(name=dataset))
            restored, fenced = None, False  # the copy is the dataset now; the original's fence went with it
            planned.status, planned.items, planned.collections = "moved", copy.items, len(copy.collections)
            held = _attempt(lambda: target.FenceDataset(pb.FenceDatasetRequest(dataset=dataset, ttl_s=0),
                                                       timeout=CALL_TIMEOUT_S))
            if held:
                planned.reason = (f"its writes on {planned.target} stay held until the fence expires (at most "
                                  f"{FENCE_S:g}s): lifting it failed ({held})")
        if left:
            planned.reason = f"{planned.reason}; " if planned.reason else ""
            planned.reason += f"the snapshot copy {snapshot} on {planned.target} is left: {left}"
    except grpc.RpcError as exc:
        planned.status, planned.reason = "skipped", _failure(exc, step)
    finally:
        renewals.stop()
        held = _has(source, dataset) if restored else None
        if restored and held is False and not deleting:
            planned.reason += f"; it was deleted on {planned.source} during the move (by a client), so its copy is too"
            fenced = False  # its fence went with it
        elif restored and not held:  # never delete the copy unless the source surely has it
            planned.reason += (f"; {planned.source} does not answer that it still has {dataset}, so the copy on "
                               f"{planned.target} is kept: check both before deleting either")
            restored = None
        elif restored and not _unchanged(target, dataset, restored):
            planned.reason += (f"; the copy on {planned.target} changed after it was restored (a write reached it), "
                               "so it is kept: compare the two, delete one, and run again")
            restored = None
        if restored:  # a copy that did not become the dataset
            failed = _attempt(lambda: target.DeleteDataset(pb.DeleteDatasetRequest(name=dataset),
                                                          timeout=CALL_TIMEOUT_S))
            if failed:
                planned.reason += (f"; its copy on {planned.target} could not be deleted ({failed}): delete it "
                                   "there by hand")
        if snapshot:
            failed = _attempt(lambda: source.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot=snapshot),
                                                           timeout=CALL_TIMEOUT_S))
            if failed:
                planned.reason += f"; the snapshot {snapshot} on {planned.source} is left: {failed}"
        if fenced:
            failed = _attempt(lambda: source.FenceDataset(pb.FenceDatasetRequest(dataset=dataset, ttl_s=0),
                                                         timeout=CALL_TIMEOUT_S))
            if failed:
                planned.reason += (f"; its writes on {planned.source} stay held until the fence expires (at most "
                                   f"{FENCE_S:g}s): lifting it failed ({failed})")
    return planned


def rebalance(primaries: Primaries, dry_run: bool = False) -> Iterator[Move]:
    """Each planned move as it is done (or, with dry_run, as planned); raises the domain error
    (convsearch.errors) of a primary that cannot list its datasets."""
    for planned in plan(primaries):
        yield planned if dry_run or planned.status == "skipped" else move(primaries, planned)

