"""Several index primaries behind one gateway: each dataset on its owner only, calls routed and
lists merged, snapshots streamed between primaries (ReadSnapshot/WriteSnapshot), datasets that
predate a primary still served where they are, and `convsearch rebalance` moving them to their
owners (skipping, and leaving nothing behind, when a write comes during a move)."""

import hashlib
import json
import os
import time
from unittest import mock

import grpc
import numpy as np
import prometheus_client as prom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch import placement, rebalance
from convsearch.cli import main
from convsearch.gateway.v1 import gateway_pb2 as gw
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.grpc_errors import error_from_call
from convsearch.health import wait_until_serving
from convsearch.index.v1 import index_pb2 as ix
from convsearch.index.v1 import index_pb2_grpc
from convsearch.snapshot_copy import copy_snapshot
from convsearch_gateway.backends import Backend
from convsearch_gateway.config import GatewayConfig
from convsearch_gateway.primaries import IndexPrimaries
from convsearch_gateway.server import EXTRACTOR_HEALTH, INDEX_HEALTH, build_server
from tests.conftest import jpeg_bytes, running_gateway, serve_extractor, serve_index

pytestmark = pytest.mark.slow

LITE0 = gw.Configuration(model="efficientnet_lite0", layers=["_conv_head"])
MIB = 1 << 20


def image(seed: int) -> bytes:
    return jpeg_bytes(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """An extractor, three index primaries and a gateway over all three."""
    extractor, extractor_channel, extractor_address = serve_extractor()
    data_dirs = [tmp_path_factory.mktemp(f"primary{n}") for n in range(3)]
    indexes = [serve_index(data_dir) for data_dir in data_dirs]
    addresses = [address for _, _, address in indexes]
    with running_gateway(extractor_address, ",".join(addresses)) as (_, gateway_channel, _):
        yield type("Cluster", (), dict(
            extractor=extractor_address, addresses=addresses,
            index={address: index_pb2_grpc.IndexServiceStub(channel) for _, channel, address in indexes},
            data_dirs=dict(zip(addresses, data_dirs, strict=True)),
            gateway=gateway_pb2_grpc.GatewayServiceStub(gateway_channel)))
    for service, channel, _ in [*indexes, (extractor, extractor_channel, None)]:
        channel.close()
        service.stop(1.0)


def holders(cluster, dataset: str) -> list[str]:
    """The primaries that have the dataset, asked directly."""
    found = []
    for address, stub in cluster.index.items():
        try:
            stub.GetDataset(ix.GetDatasetRequest(name=dataset))
            found.append(address)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
    return found


def names_owned(primaries: list[str], wanted: str | None, count: int, prefix: str, exclude: str = "") -> list[str]:
    """`count` dataset names owned by `wanted` (or by any primary but `exclude`)."""
    names = (f"{prefix}-{n}" for n in range(10_000))
    return [name for name in names
            if (placement.owner(name, primaries) == wanted if wanted else placement.owner(name, primaries) != exclude)
            ][:count]


def ingest(gateway, dataset: str, count: int, seed: int = 0, first: int = 0) -> None:
    results = list(gateway.Ingest(iter([gw.IngestRequest(dataset=dataset, items=[
        gw.Item(id=f"i{n}", label=f"l{n % 2}", image=image(seed + n)) for n in range(first, first + count)])])))
    assert [r.status for r in results] == [gw.INGEST_STATUS_STORED] * count


def index_and_search(gateway, dataset: str) -> list[tuple[str, float]]:
    assert list(gateway.IndexDataset(gw.IndexDatasetRequest(dataset=dataset, configurations=[LITE0])))[-1].finished
    return searched(gateway, dataset)


def searched(gateway, dataset: str) -> list[tuple[str, float]]:
    reply = gateway.Search(gw.SearchRequest(dataset=dataset, item_id="i0", configuration=LITE0, k=3))
    return [(hit.id, hit.distance) for hit in reply.hits]


# ---- routing through the gateway -------------------------------------------------------------

def test_each_dataset_is_created_on_its_owner_only_and_listed_once(cluster):
    names = [f"placed-{n}" for n in range(9)]
    for name in names:
        cluster.gateway.CreateDataset(gw.CreateDatasetRequest(name=name))
        assert holders(cluster, name) == [placement.owner(name, cluster.addresses)]
    assert len({placement.owner(name, cluster.addresses) for name in names}) >= 2
    listed = [d.name for d in cluster.gateway.ListDatasets(gw.ListDatasetsRequest()).datasets]
    assert listed == sorted(listed) and set(names) <= set(listed) and len(listed) == len(set(listed))
    for name in names:
        cluster.gateway.DeleteDataset(gw.DeleteDatasetRequest(name=name))
        assert holders(cluster, name) == []


def test_ingest_index_and_search_work_on_datasets_of_different_primaries(cluster):
    first = names_owned(cluster.addresses, cluster.addresses[0], 1, "work")[0]
    second = names_owned(cluster.addresses, None, 1, "work", exclude=cluster.addresses[0])[0]
    for seed, name in enumerate((first, second)):
        cluster.gateway.CreateDataset(gw.CreateDatasetRequest(name=name))
        ingest(cluster.gateway, name, 4, seed * 10)
        hits = index_and_search(cluster.gateway, name)
        assert len(hits) == 3 and "i0" not in [i for i, _ in hits]  # the query item is left out
        got = cluster.gateway.GetDataset(gw.GetDatasetRequest(name=name))
        assert (got.dataset.item_count, len(got.collections)) == (4, 1)
        assert holders(cluster, name) == [placement.owner(name, cluster.addresses)]
    with pytest.raises(grpc.RpcError) as error:
        cluster.gateway.GetDataset(gw.GetDatasetRequest(name="nowhere"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_name_held_by_another_primary_cannot_be_created_again(cluster):
    name = names_owned(cluster.addresses, cluster.addresses[0], 1, "taken")[0]
    elsewhere = cluster.addresses[1]
    cluster.index[elsewhere].CreateDataset(ix.CreateDatasetRequest(name=name))
    try:
        with pytest.raises(grpc.RpcError) as error:
            cluster.gateway.CreateDataset(gw.CreateDatasetRequest(name=name))
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert holders(cluster, name) == [elsewhere]
    finally:
        cluster.index[elsewhere].DeleteDataset(ix.DeleteDatasetRequest(name=name))


def test_a_snapshot_restores_onto_the_owner_of_the_new_dataset(cluster):
    source = names_owned(cluster.addresses, cluster.addresses[0], 1, "snapped")[0]
    copy = names_owned(cluster.addresses, cluster.addresses[2], 1, "restored")[0]
    cluster.gateway.CreateDataset(gw.CreateDatasetRequest(name=source))
    ingest(cluster.gateway, source, 2)
    snapshot = cluster.gateway.SnapshotDataset(gw.SnapshotDatasetRequest(dataset=source)).snapshot.name
    listed = [s.name for s in cluster.gateway.ListSnapshots(gw.ListSnapshotsRequest()).snapshots]
    assert listed.count(snapshot) == 1
    restored = cluster.gateway.RestoreDataset(gw.RestoreDatasetRequest(snapshot=snapshot, dataset=copy)).dataset
    assert restored.item_count == 2 and holders(cluster, copy) == [cluster.addresses[2]]
    on_target = cluster.index[cluster.addresses[2]].ListSnapshots(ix.ListSnapshotsRequest()).snapshots
    assert snapshot not in [s.name for s in on_target]  # its copy there was deleted after the restore
    with pytest.raises(grpc.RpcError) as error:
        cluster.gateway.RestoreDataset(gw.RestoreDatasetRequest(snapshot=snapshot, dataset=source))
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    cluster.gateway.DeleteSnapshot(gw.DeleteSnapshotRequest(snapshot=snapshot))
    assert snapshot not in [s.name for s in cluster.gateway.ListSnapshots(gw.ListSnapshotsRequest()).snapshots]
    for name in (source, copy):
        cluster.gateway.DeleteDataset(gw.DeleteDatasetRequest(name=name))


def test_a_restore_onto_the_owner_that_keeps_the_snapshot_refuses_a_name_held_elsewhere(cluster):
    # The owner of `taken` keeps the snapshot, and `taken` lives (not yet rebalanced) on another
    # primary: restoring as `taken` must not make a second one on the owner.
    owner, elsewhere = cluster.addresses[0], cluster.addresses[1]
    source, taken = names_owned(cluster.addresses, owner, 2, "kept")
    cluster.gateway.CreateDataset(gw.CreateDatasetRequest(name=source))
    cluster.index[elsewhere].CreateDataset(ix.CreateDatasetRequest(name=taken))
    snapshot = cluster.gateway.SnapshotDataset(gw.SnapshotDatasetRequest(dataset=source)).snapshot.name
    try:
        with pytest.raises(grpc.RpcError) as error:
            cluster.gateway.RestoreDataset(gw.RestoreDatasetRequest(snapshot=snapshot, dataset=taken))
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert holders(cluster, taken) == [elsewhere]
    finally:
        cluster.gateway.DeleteSnapshot(gw.DeleteSnapshotRequest(snapshot=snapshot))
        cluster.gateway.DeleteDataset(gw.DeleteDatasetRequest(name=source))
        cluster.index[elsewhere].DeleteDataset(ix.DeleteDatasetRequest(name=taken))


def test_index_health_needs_every_primary(cluster):
    service, port = build_server(GatewayConfig(host="127.0.0.1", port=0, metrics_port=-1, extractor=cluster.extractor,
                                               index=",".join([*cluster.addresses[:2], "127.0.0.1:1"]),
                                               health_interval_s=0.2))
    service.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_until_serving(channel, EXTRACTOR_HEALTH, timeout_s=30)
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=INDEX_HEALTH))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        channel.close()
        service.stop(0.5)


# ---- datasets that predate a primary, and rebalance -------------------------------------------

def rebalance_cli(cluster, capsys, *flags: str) -> tuple[int, list[dict]]:
    code = main(["rebalance", "--index", ",".join(cluster.addresses), "--json", *flags])
    return code, json.loads(capsys.readouterr().out)["moves"]


def test_datasets_made_before_a_primary_joined_stay_readable_and_rebalance_moves_exactly_them(cluster, capsys):
    two, third = cluster.addresses[:2], cluster.addresses[2]
    winners = sorted(names_owned(cluster.addresses, third, 2, "older"))  # the third primary wins these
    stay = names_owned(cluster.addresses, None, 1, "older", exclude=third)
    with running_gateway(cluster.extractor, ",".join(two)) as (_, channel, _):
        before_gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        for seed, name in enumerate(winners + stay):
            before_gateway.CreateDataset(gw.CreateDatasetRequest(name=name))
            ingest(before_gateway, name, 4, 100 + 10 * seed)
        hits = {name: index_and_search(before_gateway, name) for name in (winners[0], stay[0])}
    sources = {name: placement.owner(name, two) for name in winners}
    for name in winners + stay:
        assert holders(cluster, name) == [placement.owner(name, two)]

    # The gateway over all three finds them where they are.
    for name, expected in hits.items():
        assert searched(cluster.gateway, name) == expected
    assert cluster.gateway.GetDataset(gw.GetDatasetRequest(name=winners[1])).dataset.item_count == 4
    ingest(cluster.gateway, winners[1], 1, 999, first=4)  # writes too, on the primary that has it
    assert holders(cluster, winners[1]) == [sources[winners[1]]]
    listed = {d.name for d in cluster.gateway.ListDatasets(gw.ListDatasetsRequest()).datasets}
    assert set(winners + stay) <= listed

    code, planned = rebalance_cli(cluster, capsys, "--dry-run")
    assert code == 0
    assert [(m["dataset"], m["source"], m["target"], m["status"]) for m in planned] == \
        [(name, sources[name], third, "planned") for name in winners]
    assert main(["rebalance", "--index", ",".join(cluster.addresses), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"would move {name}: {sources[name]} -> {third}" for name in winners]
    assert all(holders(cluster, name) == [sources[name]] for name in winners)  # nothing moved

    # A write that reaches a source during its move, its fence gone (expired, or the source
    # restarted): that dataset is skipped and nothing is left.
    late = winners[1]

    def copy_then_write(source, target, snapshot, timeout=None):
        copied = copy_snapshot(source, target, snapshot, timeout)
        if snapshot.startswith(f"{late}-"):
            source.FenceDataset(ix.FenceDatasetRequest(dataset=late, ttl_s=0))
            source.PutItems(ix.PutItemsRequest(dataset=late, items=[ix.Item(id="late", image=image(7))]))
        return copied

    with mock.patch.object(rebalance, "copy_snapshot", copy_then_write):
        code, moves = rebalance_cli(cluster, capsys)
    assert code == 1
    assert {m["dataset"]: m["status"] for m in moves} == {winners[0]: "moved", late: "skipped"}
    assert "changed" in next(m["reason"] for m in moves if m["dataset"] == late)
    assert holders(cluster, late) == [sources[late]] and holders(cluster, winners[0]) == [third]
    for stub in cluster.index.values():
        assert [s.name for s in stub.ListSnapshots(ix.ListSnapshotsRequest()).snapshots
                if s.dataset in winners] == []
    for data_dir in cluster.data_dirs.values():
        assert not [p for p in (data_dir / "snapshots").iterdir() if p.name.endswith(".tmp")]

    code, moves = rebalance_cli(cluster, capsys)
    assert code == 0 and [(m["dataset"], m["status"], m["items"]) for m in moves] == [(late, "moved", 6)]
    for name in winners + stay:
        assert holders(cluster, name) == [placement.owner(name, cluster.addresses)]
    for name, expected in hits.items():  # the same gateway: where it found them before is gone now
        assert searched(cluster.gateway, name) == expected
    got = cluster.gateway.GetDataset(gw.GetDatasetRequest(name=winners[0]))
    assert (got.dataset.item_count, [c.name for c in got.collections]) == (4, [LITE0.model + "/_conv_head/avg/cosine"])
    assert rebalance_cli(cluster, capsys) == (0, [])
    assert main(["rebalance", "--index", ",".join(cluster.addresses)]) == 0
    assert "nothing to move" in capsys.readouterr().out
    assert main(["rebalance", "--index", "nonsense"]) == 2
    assert main(["rebalance", "--index", f"{third},{third}"]) == 2


# ---- ReadSnapshot and WriteSnapshot ----------------------------------------------------------

@pytest.fixture()
def pair(tmp_path):
    """Two fresh index servers: (stubs, data dirs)."""
    served = [serve_index(tmp_path / name) for name in ("a", "b")]
    yield [index_pb2_grpc.IndexServiceStub(channel) for _, channel, _ in served], [tmp_path / "a", tmp_path / "b"]
    for service, channel, _ in served:
        channel.close()
        service.stop(1.0)


@pytest.fixture
def kept_snapshots(tmp_path):
    """Two primaries keeping one snapshot per dataset (--snapshot-retention 1), and a dataset
    holding one item on the one that does not own it: (addresses, stubs by address, dataset, source)."""
    served = [serve_index(tmp_path / name, snapshot_retention=1) for name in ("a", "b")]
    addresses = [address for _, _, address in served]
    stubs = {address: index_pb2_grpc.IndexServiceStub(channel) for _, channel, address in served}
    dataset = names_owned(addresses, addresses[1], 1, "kept")[0]
    source = stubs[addresses[0]]
    source.CreateDataset(ix.CreateDatasetRequest(name=dataset))
    source.PutItems(ix.PutItemsRequest(dataset=dataset, items=[ix.Item(id="one", label="a", image=image(1))]))
    yield addresses, stubs, dataset, source
    for service, channel, _ in served:
        channel.close()
        service.stop(1.0)


def test_a_move_costs_no_kept_snapshot(kept_snapshots):
    addresses, stubs, dataset, source = kept_snapshots
    kept = source.SnapshotDataset(ix.SnapshotDatasetRequest(dataset=dataset)).snapshot
    with rebalance.Primaries(addresses) as primaries:
        assert [m.status for m in rebalance.rebalance(primaries)] == ["moved"]
    assert [s.name for s in source.ListSnapshots(ix.ListSnapshotsRequest()).snapshots] == [kept]
    assert stubs[addresses[1]].GetDataset(ix.GetDatasetRequest(name=dataset)).dataset.item_count == 1


def test_a_dataset_a_client_deletes_during_its_move_stays_deleted(kept_snapshots):
    """A delete is no write a fence holds: a client's DeleteDataset during a move left the copy
    restored on the target, where the deleted dataset came back (its writes held for the fence)."""
    addresses, stubs, dataset, _ = kept_snapshots

    def copy_then_delete(source_stub, target_stub, snapshot, timeout=None):
        copied = copy_snapshot(source_stub, target_stub, snapshot, timeout)
        source_stub.DeleteDataset(ix.DeleteDatasetRequest(name=dataset))  # where the gateway finds it
        return copied

    with rebalance.Primaries(addresses) as primaries, mock.patch.object(rebalance, "copy_snapshot",
                                                                       copy_then_delete):
        [done] = rebalance.rebalance(primaries)
    assert done.status == "skipped" and "deleted on" in done.reason and "held" not in done.reason
    for stub in stubs.values():
        assert dataset not in [d.name for d in stub.ListDatasets(ix.ListDatasetsRequest()).datasets]


def test_a_moved_dataset_is_found_on_its_new_primary_while_the_old_one_is_down(tmp_path):
    """The gateway remembers where it found a dataset, and forgot it only when that primary said
    the dataset was gone: once it was moved and its old primary went down, every call about it
    answered UNAVAILABLE, though its new primary served it."""
    (old, old_channel, old_address), (new, new_channel, new_address) = (
        serve_index(tmp_path / name) for name in ("old", "new"))
    addresses = [old_address, new_address]
    dataset = names_owned(addresses, new_address, 1, "moved")[0]
    index_pb2_grpc.IndexServiceStub(old_channel).CreateDataset(ix.CreateDatasetRequest(name=dataset))
    latency = prom.Histogram("latency", "", ("backend", "method", "code"), registry=prom.CollectorRegistry())
    primaries = IndexPrimaries([Backend("index", address, index_pb2_grpc.IndexServiceStub, "index", 5.0, 64, latency)
                                for address in addresses])
    try:
        primaries.call("GetDataset", ix.GetDatasetRequest(name=dataset))  # found on the old one, remembered
        with rebalance.Primaries(addresses) as moving:
            assert [m.status for m in rebalance.rebalance(moving)] == ["moved"]
        old_channel.close()
        old.stop(0)
        assert primaries.call("GetDataset", ix.GetDatasetRequest(name=dataset)).dataset.name == dataset
        primaries.call("PutItems", ix.PutItemsRequest(dataset=dataset, items=[ix.Item(id="a", image=image(1))]))
    finally:
        primaries.close()
        new_channel.close()
        new.stop(0)


def test_writes_during_a_move_are_held_never_lost(kept_snapshots):
    addresses, stubs, dataset, source = kept_snapshots
    target = stubs[addresses[1]]
    relabel = ix.PutItemsRequest(dataset=dataset, items=[ix.Item(id="one", label="b", image=image(1))])
    refused = []

    def write(stub) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            stub.PutItems(relabel)
        error = error_from_call(caught.value)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and error.reason == "DATASET_MOVING"
        assert error.retry_after_s and "being moved" in caught.value.details()
        refused.append(stub)

    def copy_then_write(source_stub, target_stub, snapshot, timeout=None):
        write(source_stub)  # the original, fenced before its snapshot
        return copy_snapshot(source_stub, target_stub, snapshot, timeout)

    real_state = rebalance.state
    with rebalance.Primaries(addresses) as primaries:
        moved_to = primaries.stubs[addresses[1]]

        def state_after_a_write(stub, name):
            if stub is moved_to and len(refused) == 1:
                write(stub)  # the restored copy, which the gateway finds first, fenced from its creation
            return real_state(stub, name)

        with mock.patch.object(rebalance, "copy_snapshot", copy_then_write), \
                mock.patch.object(rebalance, "state", state_after_a_write):
            [done] = rebalance.rebalance(primaries)
    assert done.status == "moved" and done.reason == "" and len(refused) == 2
    target.PutItems(relabel)  # the move is over: writes go through, to the dataset's new home
    [item] = target.GetItems(ix.GetItemsRequest(dataset=dataset, ids=["one"])).items
    assert item.label == "b"
    with pytest.raises(grpc.RpcError) as missing:
        source.GetDataset(ix.GetDatasetRequest(name=dataset))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_move_longer_than_its_fence_keeps_the_writes_held(kept_snapshots, monkeypatch):
    """The fences were never renewed: a move that took longer than FENCE_S (a large dataset) let
    writes through on the original and on its copy, and was then skipped, as every run again."""
    addresses, stubs, dataset, _ = kept_snapshots
    monkeypatch.setattr(rebalance, "FENCE_S", 1.5)  # renewed every 0.375 s
    relabel = ix.PutItemsRequest(dataset=dataset, items=[ix.Item(id="one", label="b", image=image(1))])

    def held_after_twice_the_fence(stub) -> None:
        time.sleep(3.0)
        with pytest.raises(grpc.RpcError) as caught:
            stub.PutItems(relabel)
        assert error_from_call(caught.value).reason == "DATASET_MOVING"

    def slow_copy(source_stub, target_stub, snapshot, timeout=None):
        held_after_twice_the_fence(source_stub)
        return copy_snapshot(source_stub, target_stub, snapshot, timeout)

    real_state = rebalance.state
    with rebalance.Primaries(addresses) as primaries:
        moved_to = primaries.stubs[addresses[1]]

        def slow_state(stub, name):
            if stub is moved_to:
                held_after_twice_the_fence(stub)
            return real_state(stub, name)

        with mock.patch.object(rebalance, "copy_snapshot", slow_copy), \
                mock.patch.object(rebalance, "state", slow_state):
            [done] = rebalance.rebalance(primaries)
    assert (done.status, done.reason) == ("moved", "")
    stubs[addresses[1]].PutItems(relabel)  # the move is over: its fences are lifted, no renewal put one back
    time.sleep(0.5)
    stubs[addresses[1]].PutItems(relabel)


def test_a_fence_holds_writes_only_and_expires(pair):
    (a, _), _ = pair
    a.CreateDataset(ix.CreateDatasetRequest(name="held"))
    a.PutItems(ix.PutItemsRequest(dataset="held", items=[ix.Item(id="one", image=image(1))]))
    version = a.FenceDataset(ix.FenceDatasetRequest(dataset="held", ttl_s=0.5)).version
    with pytest.raises(grpc.RpcError) as caught:
        a.DeleteItems(ix.DeleteItemsRequest(dataset="held", ids=["one"]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert a.GetDataset(ix.GetDatasetRequest(name="held")).dataset.version == version  # reads go on
    a.SnapshotDataset(ix.SnapshotDatasetRequest(dataset="held"))
    time.sleep(0.6)
    a.DeleteItems(ix.DeleteItemsRequest(dataset="held", ids=["one"]))  # expired
    for ttl in (-1.0, float("nan"), 1e9):
        with pytest.raises(grpc.RpcError) as caught:
            a.FenceDataset(ix.FenceDatasetRequest(dataset="held", ttl_s=ttl))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ttl
    a.FenceDataset(ix.FenceDatasetRequest(dataset="held", ttl_s=60))
    a.DeleteDataset(ix.DeleteDatasetRequest(name="held"))  # deleting a fenced dataset is no write held
    a.CreateDataset(ix.CreateDatasetRequest(name="held"))  # the same name again: no fence of the old one
    a.PutItems(ix.PutItemsRequest(dataset="held", items=[ix.Item(id="two", image=image(2))]))


def snapshot_of_noise(stub, dataset: str, megabytes: int) -> str:
    stub.CreateDataset(ix.CreateDatasetRequest(name=dataset))
    stub.PutItems(ix.PutItemsRequest(dataset=dataset, items=[ix.Item(id="noise", image=os.urandom(megabytes * MIB))]))
    return stub.SnapshotDataset(ix.SnapshotDatasetRequest(dataset=dataset)).snapshot


def test_a_snapshot_streams_in_chunks_and_restores_on_another_index(pair):
    (a, b), _ = pair
    snapshot = snapshot_of_noise(a, "streamed", 3)
    chunks = list(a.ReadSnapshot(ix.ReadSnapshotRequest(snapshot=snapshot)))
    data = b"".join(c.data for c in chunks)
    assert len(chunks) >= 4 and all(len(c.data) <= MIB for c in chunks)
    assert chunks[0].size_bytes == len(data) > 3 * MIB and [c.size_bytes for c in chunks[1:]] == [0] * (len(chunks) - 1)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest() and not any(c.sha256 for c in chunks[:-1])
    stored = copy_snapshot(a, b, snapshot)
    assert (stored.name, stored.dataset, stored.size_bytes) == (snapshot, "streamed", len(data))
    assert [s.name for s in b.ListSnapshots(ix.ListSnapshotsRequest()).snapshots] == [snapshot]
    assert b"".join(c.data for c in b.ReadSnapshot(ix.ReadSnapshotRequest(snapshot=snapshot))) == data
    restored = b.RestoreDataset(ix.RestoreDatasetRequest(snapshot=snapshot, dataset="streamed")).dataset
    assert restored.item_count == 1
    item = b.GetItems(ix.GetItemsRequest(dataset="streamed", ids=["noise"], include_images=True)).items[0]
    assert item.image == a.GetItems(ix.GetItemsRequest(dataset="streamed", ids=["noise"], include_images=True)).items[
        0].image
    with pytest.raises(grpc.RpcError) as error:
        copy_snapshot(a, b, snapshot)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS


def write(stub, name: str, data: bytes, sha256: str):
    return stub.WriteSnapshot(iter([ix.WriteSnapshotRequest(snapshot=name, data=data[:10]),
                                    ix.WriteSnapshotRequest(data=data[10:], sha256=sha256)]))


def test_a_written_snapshot_is_refused_on_a_bad_checksum_a_taken_name_or_a_path(pair):
    (a, b), dirs = pair
    snapshot = snapshot_of_noise(a, "checked", 1)
    data = b"".join(c.data for c in a.ReadSnapshot(ix.ReadSnapshotRequest(snapshot=snapshot)))
    for bad in ("0" * 64, ""):
        with pytest.raises(grpc.RpcError) as error:
            write(b, snapshot, data, bad)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SHA-256" in error.value.details()
    assert list((dirs[1] / "snapshots").iterdir()) == []  # nothing left behind
    assert b.ListSnapshots(ix.ListSnapshotsRequest()).snapshots == []
    with pytest.raises(grpc.RpcError) as error:
        write(a, snapshot, data, hashlib.sha256(data).hexdigest())
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for trick in ("../checked-20260101T000000-abcdef", "a/b", "..", "checked-20260101T000000-abcdef.tar", "",
                  "/etc/passwd"):
        with pytest.raises(grpc.RpcError) as error:
            write(b, trick, data, hashlib.sha256(data).hexdigest())
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, trick
        with pytest.raises(grpc.RpcError) as error:
            list(a.ReadSnapshot(ix.ReadSnapshotRequest(snapshot=trick)))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, trick
    assert list((dirs[1] / "snapshots").iterdir()) == []
    with pytest.raises(grpc.RpcError) as error:
        list(a.ReadSnapshot(ix.ReadSnapshotRequest(snapshot="nosuch-20260101T000000-abcdef")))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
