"""Copies a snapshot from one index to another: ReadSnapshot streamed straight into
WriteSnapshot, checked by the SHA-256 the source sends. Used by the gateway to restore a
snapshot on the primary that owns the new dataset, and by `convsearch rebalance`."""

import grpc

from convsearch.index.v1 import index_pb2, index_pb2_grpc


class SourceFailed(Exception):
    """Reading the snapshot from the source failed; `error` is its grpc.RpcError."""

    def __init__(self, error: grpc.RpcError):
        super().__init__(error.details())
        self.error = error


def copy_snapshot(source: index_pb2_grpc.IndexServiceStub, target: index_pb2_grpc.IndexServiceStub, snapshot: str,
                  timeout: float | None = None) -> index_pb2.Snapshot:
    """Streams `snapshot` from source to target under the same name; returns it as the target
    stored it. Raises SourceFailed when reading failed (the target then keeps nothing: the stream
    it got ended without a SHA-256) and the target's grpc.RpcError when writing failed
    (ALREADY_EXISTS when the target has a snapshot of that name)."""
    failed: list[grpc.RpcError] = []
    reading = source.ReadSnapshot(index_pb2.ReadSnapshotRequest(snapshot=snapshot), timeout=timeout)

    def messages():
        try:
            for number, chunk in enumerate(reading):
                yield index_pb2.WriteSnapshotRequest(snapshot=snapshot if number == 0 else "", data=chunk.data,
                                                     sha256=chunk.sha256)
        except grpc.RpcError as exc:
            failed.append(exc)

    try:
        return target.WriteSnapshot(messages(), timeout=timeout).snapshot
    except grpc.RpcError:
        if failed:
            raise SourceFailed(failed[0]) from None
        raise
    finally:
        reading.cancel()  # when the target refused early, the source stops sending
