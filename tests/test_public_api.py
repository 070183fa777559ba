"""The public API as a client in another language meets it: a self-contained gateway.proto that
buf lints clean, public messages that carry what the internal ones know, timestamps, optional
scores, and distances that never read -0."""

import datetime
import math
import pathlib
import shutil
import subprocess

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_tools import protoc

from convsearch.extractor.v1 import extractor_pb2
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.index.v1 import index_pb2
from convsearch_gateway.public import convert
from tests.conftest import running_backends, running_gateway

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
WELL_KNOWN = pathlib.Path(protoc.__file__).parent / "_proto"
LAST = pb.Configuration(model="efficientnet_lite0", layers=["_conv_head"])

# Each public message and the internal one the gateway makes it from.
PAIRS = [(index_pb2.Dataset, pb.Dataset), (index_pb2.Item, pb.Item), (index_pb2.Collection, pb.Collection),
         (index_pb2.CollectionSpec, pb.CollectionSpec), (index_pb2.Snapshot, pb.Snapshot),
         (extractor_pb2.ModelInfo, pb.ModelInfo), (extractor_pb2.LayerInfo, pb.LayerInfo),
         (extractor_pb2.InspectLayerResponse, pb.InspectLayerResponse),
         (extractor_pb2.ChannelActivation, pb.ChannelActivation)]


def test_the_gateway_api_depends_only_on_common_and_well_known_types(tmp_path):
    assert {d.name for d in pb.DESCRIPTOR.dependencies} == {
        "convsearch/common/v1/common.proto", "google/protobuf/timestamp.proto"}
    # A client with just these two files generates its code.
    for proto in ("convsearch/gateway/v1/gateway.proto", "convsearch/common/v1/common.proto"):
        (tmp_path / "protos" / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROTOS / proto, tmp_path / "protos" / proto)
    (tmp_path / "out").mkdir()
    assert protoc.main(["protoc", f"-I{tmp_path / 'protos'}", f"-I{WELL_KNOWN}", f"--python_out={tmp_path / 'out'}",
                        "convsearch/gateway/v1/gateway.proto", "convsearch/common/v1/common.proto"]) == 0
    assert (tmp_path / "out" / "convsearch" / "gateway" / "v1" / "gateway_pb2.py").exists()


@pytest.mark.parametrize("command", [["lint"], ["format", "-d", "--exit-code"]])
def test_buf_finds_nothing(command):
    assert BUF.exists(), "buf is missing: run scripts/setup.sh (it installs @bufbuild/buf into .tools)"
    run = subprocess.run([str(BUF), *command], cwd=PROTOS, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_every_proto_names_its_packages_for_other_languages():
    for proto in PROTOS.rglob("*.proto"):
        text = proto.read_text()
        for option in ("go_package", "java_package", "java_multiple_files", "csharp_namespace"):
            assert f"option {option} = " in text, f"{proto.name} lacks {option}"


@pytest.mark.parametrize(("internal", "public"), PAIRS, ids=[p.DESCRIPTOR.name for _, p in PAIRS])
def test_every_public_field_has_its_internal_source(internal, public):
    """The gateway fills a public message from the same-named fields of the internal one: a public
    field without one would always be empty."""
    source = internal.DESCRIPTOR.fields_by_name
    for field in public.DESCRIPTOR.fields:
        assert field.name in source, f"{public.DESCRIPTOR.full_name}.{field.name} has no internal source"
        assert field.type == source[field.name].type and field.is_repeated == source[field.name].is_repeated, field.name


def test_convert_carries_nested_repeated_map_and_timestamp_fields():
    created = Timestamp(seconds=1_790_000_000, nanos=5000)
    internal = index_pb2.Collection(name="m/l/avg/cosine", dataset="d", count=7, damage="", version=3, spec=(
        index_pb2.CollectionSpec(model="m", layer="l", dimension=512, metric=1, weights="random")))
    public = convert(internal, pb.Collection())
    assert public.spec.dimension == 512 and public.spec.weights == "random" and public.count == 7
    assert convert(index_pb2.Dataset(name="d", create_time=created), pb.Dataset()).create_time == created
    item = convert(index_pb2.Item(id="a", metadata={"k": "v"}, image=b"x", image_digest="ab"), pb.Item())
    assert dict(item.metadata) == {"k": "v"} and item.image == b"x"
    model = convert(extractor_pb2.ModelInfo(name="m", layers=[extractor_pb2.LayerInfo(name="a", output_shape=[3, 2])]),
                    pb.ModelInfo())
    assert [(layer.name, list(layer.output_shape)) for layer in model.layers] == [("a", [3, 2])]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, chelsea_jpeg, coffee_jpeg):
    with running_backends(tmp_path_factory.mktemp("index")) as addresses, \
            running_gateway(*addresses) as (_, channel, _):
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        stub.CreateDataset(pb.CreateDatasetRequest(name="cats"))
        items = [pb.Item(id="chelsea", label="cat", image=chelsea_jpeg), pb.Item(id="coffee", image=coffee_jpeg),
                 pb.Item(id="chelsea2", label="cat", image=chelsea_jpeg)]
        assert [r.indexed for r in stub.Ingest(iter([pb.IngestRequest(dataset="cats", items=items,
                                                                      configurations=[LAST])]))] == [True] * 3
        yield stub


def test_times_are_timestamps(gateway):
    now = datetime.datetime.now(datetime.UTC)
    created = gateway.GetDataset(pb.GetDatasetRequest(name="cats")).dataset.create_time.ToDatetime(datetime.UTC)
    assert abs((now - created).total_seconds()) < 600
    snapshot = gateway.SnapshotDataset(pb.SnapshotDatasetRequest(dataset="cats")).snapshot
    assert abs((snapshot.create_time.ToDatetime(datetime.UTC) - datetime.datetime.now(datetime.UTC))
               .total_seconds()) < 60
    listed = gateway.ListSnapshots(pb.ListSnapshotsRequest(dataset="cats")).snapshots
    assert [(s.name, s.create_time) for s in listed] == [(snapshot.name, snapshot.create_time)]


def test_a_score_is_set_only_for_a_labeled_stored_query(gateway, chelsea_jpeg):
    by_id = gateway.Search(pb.SearchRequest(dataset="cats", configuration=LAST, item_id="chelsea", k=2))
    assert by_id.HasField("search_score") and by_id.HasField("same_label_count") and by_id.same_label_count == 1
    unlabeled = gateway.Search(pb.SearchRequest(dataset="cats", configuration=LAST, item_id="coffee", k=2))
    by_image = gateway.Search(pb.SearchRequest(dataset="cats", configuration=LAST, image=chelsea_jpeg, k=3))
    for reply in (unlabeled, by_image):
        assert not reply.HasField("search_score") and not reply.HasField("same_label_count")


@pytest.mark.parametrize("exact", [False, True])
def test_an_identical_image_is_at_distance_zero_never_minus_zero(gateway, chelsea_jpeg, exact):
    reply = gateway.Search(pb.SearchRequest(dataset="cats", configuration=LAST, image=chelsea_jpeg, k=3, exact=exact))
    assert {hit.id for hit in reply.hits[:2]} == {"chelsea", "chelsea2"}
    for hit in reply.hits:
        assert math.copysign(1.0, hit.distance) == 1.0, hit
    assert reply.hits[0].distance < 1e-5
