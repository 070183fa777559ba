"""Limits that make the API safe to expose, in-process: images are checked on their header
before any decode (one pixel limit shared with the extractor) and must decode completely to be
stored; fetches of stored images are bounded by bytes, not counts; the index's snapshots can be
listed, deleted and kept to a retention limit, and replies carry no server paths; malformed
values are INVALID_ARGUMENT, not INTERNAL or NOT_FOUND; error messages cut what they echo and
list no other datasets or snapshots."""

import io
import struct
import time
import zlib
from unittest import mock

import grpc
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from PIL.ImageFile import ImageFile

from convsearch.common.v1 import common_pb2
from convsearch.errors import InvalidArgument, shown
from convsearch.extractor.v1 import extractor_pb2, extractor_pb2_grpc
from convsearch.gateway.v1 import gateway_pb2 as gw
from convsearch.gateway.v1 import gateway_pb2_grpc
from convsearch.image_limits import DEFAULT_MAX_PIXELS, ImageError, verify_image
from convsearch.index.v1 import index_pb2 as ix
from convsearch.index.v1 import index_pb2_grpc
from convsearch.scoring import search_score
from convsearch.tensors import from_tensor
from convsearch_gateway import images
from convsearch_gateway.indexing import page_budget
from tests.conftest import jpeg_bytes, serve_extractor, serve_gateway, serve_index

LITE0 = gw.Configuration(model="efficientnet_lite0", layers=["_conv_head"])
MIB = 1 << 20


# ---- images --------------------------------------------------------------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR (8-bit RGB), nothing else."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def bomb_png(size_bytes: int = 2_600_000) -> bytes:
    """A 2.6 MB PNG declaring 30000x30000 pixels (900M, 2.7 GB of RGB once decoded)."""
    return png_header(30000, 30000) + _chunk(b"IDAT", bytes(size_bytes)) + _chunk(b"IEND", b"")


def png_bytes(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


@pytest.fixture(scope="module")
def good_jpeg() -> bytes:
    return jpeg_bytes(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))


def never_decoded():
    """Fails the test if Pillow decodes any pixels meanwhile."""
    return mock.patch.object(ImageFile, "load", side_effect=AssertionError("an image was decoded"))


def test_a_bomb_is_refused_from_its_header_and_never_decoded():
    bomb = bomb_png()
    assert 2_500_000 < len(bomb) < 2_700_000
    with never_decoded():
        started = time.perf_counter()
        with pytest.raises(ImageError, match="30000x30000 = 900,000,000 pixels, over the limit of 40,000,000"):
            images.check_image(bomb)
        with pytest.raises(ImageError, match="over the limit"):
            images.thumbnail(bomb, 64)
        assert time.perf_counter() - started < 0.5


def test_the_extractor_and_the_gateway_share_one_pixel_limit():
    from convsearch_extractor import imaging
    from convsearch_extractor.config import ExtractorConfig
    from convsearch_gateway.config import GatewayConfig

    assert ExtractorConfig().max_pixels == GatewayConfig().max_pixels == DEFAULT_MAX_PIXELS
    assert imaging.open_checked is images.open_checked  # one function, not a copy
    small = png_bytes(np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(ImageError, match="over the limit of 1,999"):
        images.check_image(small, max_pixels=1999)
    with pytest.raises(ImageError, match="over the limit of 1,999"):
        imaging.open_upright(small, max_pixels=1999)
    assert verify_image(small, 2000) == (50, 40)


def test_header_only_and_truncated_images_fail_the_check(good_jpeg):
    with pytest.raises(ImageError, match="truncated or corrupt"):
        images.check_image(png_header(10, 10))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        images.check_image(good_jpeg[:len(good_jpeg) // 2])
    images.check_image(good_jpeg)


def test_a_jpeg_is_checked_and_thumbnailed_in_draft_mode():
    big = jpeg_bytes(np.random.default_rng(1).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    with mock.patch.object(JpegImagePlugin.JpegImageFile, "draft", autospec=True,
                           side_effect=JpegImagePlugin.JpegImageFile.draft) as draft:
        images.check_image(big)
        data, mime, width, height = images.thumbnail(big, 100)
    requested = [call.args[2] for call in draft.call_args_list]
    assert requested[:2] == [(64, 64), (100, 100)]  # (Image.thumbnail asks again, once loaded: a no-op)
    assert (mime, max(width, height)) == ("image/jpeg", 100)
    assert Image.open(io.BytesIO(data)).size == (width, height)


# ---- the stack -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    extractor, extractor_channel, extractor_address = serve_extractor()
    index, index_channel, index_address = serve_index(tmp_path_factory.mktemp("index"), snapshot_retention=2)
    gateway, gateway_channel, _ = serve_gateway(extractor_address, index_address)
    small, small_channel, _ = serve_gateway(extractor_address, index_address, max_message_mb=8)
    yield type("Stack", (), dict(
        gateway=gateway_pb2_grpc.GatewayServiceStub(gateway_channel),
        small_gateway=gateway_pb2_grpc.GatewayServiceStub(small_channel),
        index=index_pb2_grpc.IndexServiceStub(index_channel),
        extractor=extractor_pb2_grpc.ExtractorServiceStub(extractor_channel)))
    for service, channel in ((small, small_channel), (gateway, gateway_channel), (index, index_channel),
                             (extractor, extractor_channel)):
        channel.close()
        service.stop(1.0)


def dataset(stack, name: str) -> str:
    stack.gateway.CreateDataset(gw.CreateDatasetRequest(name=name))
    return name


def ingest(stub, name: str, items: list[tuple[str, bytes]]) -> list[gw.IngestResponse]:
    return list(stub.Ingest(iter([gw.IngestRequest(dataset=name, items=[
        gw.Item(id=item_id, image=data) for item_id, data in items])])))


def stored(stack, name: str, ids: list[str]) -> list[str]:
    return [item.id for item in stack.index.GetItems(ix.GetItemsRequest(dataset=name, ids=ids)).items]


def test_ingest_fails_bombs_header_only_and_truncated_items_and_stores_none_of_them(stack, good_jpeg):
    name = dataset(stack, "bad-images")
    with never_decoded():
        results = ingest(stack.gateway, name, [("bomb", bomb_png())])
    assert results[0].status == gw.INGEST_STATUS_FAILED and "over the limit" in results[0].error
    results = ingest(stack.gateway, name, [("header", png_header(10, 10)), ("cut", good_jpeg[:len(good_jpeg) // 2]),
                                           ("good", good_jpeg)])
    assert [(r.id, r.status) for r in results] == [("header", gw.INGEST_STATUS_FAILED),
                                                   ("cut", gw.INGEST_STATUS_FAILED), ("good", gw.INGEST_STATUS_STORED)]
    assert all("truncated or corrupt" in r.error for r in results[:2])
    assert stored(stack, name, ["bomb", "header", "cut", "good"]) == ["good"]
    thumb = stack.gateway.GetImage(gw.GetImageRequest(dataset=name, item_id="good", thumbnail_size=32))
    assert thumb.mime_type == "image/jpeg" and max(thumb.width, thumb.height) == 32


def test_ingest_fails_an_item_with_too_much_metadata_or_too_long_a_label_and_search_keeps_answering(
        stack, good_jpeg):
    """Metadata had no limit: six items with 12 MiB each made every later Search of the dataset
    fail (its answer over the message limit) for every reader; a label over 256 characters
    failed the whole message at the index instead of its item."""
    name = dataset(stack, "big-metadata")
    results = list(stack.gateway.Ingest(iter([gw.IngestRequest(dataset=name, items=[
        gw.Item(id="huge", image=good_jpeg, metadata={"blob": "x" * (1 << 20)}),
        gw.Item(id="many", image=good_jpeg, metadata={f"k{i}": "v" for i in range(65)}),
        gw.Item(id="long-label", image=good_jpeg, label="l" * 257),
        gw.Item(id="fine", image=good_jpeg, label="shoe", metadata={"sku": "123", "note": "y" * 10_000}),
    ])])))
    assert [(r.id, r.status) for r in results] == [
        ("huge", gw.INGEST_STATUS_FAILED), ("many", gw.INGEST_STATUS_FAILED),
        ("long-label", gw.INGEST_STATUS_FAILED), ("fine", gw.INGEST_STATUS_STORED)]
    assert "use at most 16384" in results[0].error and "65 entries" in results[1].error
    assert "257 characters" in results[2].error
    assert stored(stack, name, ["huge", "many", "long-label", "fine"]) == ["fine"]
    with pytest.raises(grpc.RpcError) as error:  # the index refuses them too, whoever writes
        stack.index.PutItems(ix.PutItemsRequest(dataset=name, items=[
            ix.Item(id="direct", image=good_jpeg, metadata={"blob": "x" * (1 << 20)})]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'direct'" in error.value.details()


def test_a_stored_bomb_is_refused_by_get_image_without_decoding(stack):
    name = dataset(stack, "stored-bomb")
    stack.index.PutItems(ix.PutItemsRequest(dataset=name, items=[ix.Item(id="bomb", image=bomb_png(10_000))]))
    with never_decoded(), pytest.raises(grpc.RpcError) as error:
        stack.gateway.GetImage(gw.GetImageRequest(dataset=name, item_id="bomb", thumbnail_size=64))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit" in error.value.details()


# ---- fetches bounded by bytes --------------------------------------------------------------

def noise_png(megabytes: float, seed: int) -> bytes:
    """An uncompressed PNG of noise of about this size."""
    side = int((megabytes * MIB / 3) ** 0.5)
    return png_bytes(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8), 0)


def run_index(stub, name: str) -> gw.IndexDatasetResponse:
    return list(stub.IndexDataset(gw.IndexDatasetRequest(dataset=name, configurations=[LITE0])))[-1]


def test_indexing_three_24_mib_images_fetches_them_in_pages_under_the_message_limit(stack):
    name = dataset(stack, "big-images")
    for number in range(3):  # one by one: together they are over the 64 MiB limit
        image = noise_png(24, number)
        assert 24 * MIB <= len(image) < 25 * MIB
        stack.index.PutItems(ix.PutItemsRequest(dataset=name, items=[ix.Item(id=f"big{number}", image=image)]))
    sizes = stack.index.GetItems(ix.GetItemsRequest(dataset=name, ids=["big0"])).items
    assert sizes[0].image == b"" and sizes[0].image_size >= 24 * MIB  # sizes come without the images
    last = run_index(stack.gateway, name)
    assert (last.finished, last.done, last.failed, list(last.errors)) == (True, 3, 0, [])


def test_an_image_too_large_for_a_message_is_a_failed_item_not_a_failed_run(stack, good_jpeg):
    name = dataset(stack, "one-too-big")
    stack.index.PutItems(ix.PutItemsRequest(dataset=name, items=[ix.Item(id="huge", image=noise_png(10, 7))]))
    assert ingest(stack.gateway, name, [(f"small{i}", good_jpeg) for i in range(3)])[-1].status == \
        gw.INGEST_STATUS_STORED
    last = run_index(stack.small_gateway, name)  # its messages are at most 8 MiB
    assert (last.finished, last.done, last.failed) == (True, 4, 1)
    assert last.errors[0].startswith("huge: its image is") and "--max-message-mb" in last.errors[0]
    assert page_budget(8 * MIB) == 7 * MIB


def test_vectors_of_a_wide_layer_are_upserted_in_messages_under_the_limit(stack, good_jpeg):
    """Upserts were bounded by their count alone: 256 vectors of the pixels model's 64x64 layer
    (48 KiB each) made one 12 MiB message, over the gateway's 8 MiB limit, and the run failed
    with gRPC's 'Sent message larger than max'."""
    name = dataset(stack, "wide-vectors")
    ingest(stack.gateway, name, [(f"i{n:03d}", good_jpeg) for n in range(256)])
    wide = gw.Configuration(model="pixels", layers=["64x64"], pooling=common_pb2.POOLING_FLATTEN)
    last = list(stack.small_gateway.IndexDataset(gw.IndexDatasetRequest(dataset=name, configurations=[wide],
                                                                        batch_size=256)))[-1]
    assert (last.finished, last.done, last.failed) == (True, 256, 0)
    collection, = stack.index.ListCollections(ix.ListCollectionsRequest(dataset=name)).collections
    assert collection.count == 256


def test_evaluate_leaves_out_a_labeled_item_that_could_not_be_embedded(stack, good_jpeg):
    """Evaluate queried every labeled item: one whose image could not be embedded (a failed
    item of the indexing) made it fail with NOT_FOUND, for good, at that configuration."""
    name = dataset(stack, "one-unembeddable")
    stack.index.PutItems(ix.PutItemsRequest(dataset=name, items=[ix.Item(id="huge", label="a",
                                                                         image=noise_png(10, 8))]))
    photos = {"a": good_jpeg, "b": jpeg_bytes(np.full((64, 64, 3), 128, np.uint8))}
    stack.gateway.Ingest(iter([gw.IngestRequest(dataset=name, items=[
        gw.Item(id=f"{label}{i}", label=label, image=photos[label]) for label in "ab" for i in range(2)])])).next()
    pixels = gw.Configuration(model="pixels", layers=["8x8"])
    progress = list(stack.small_gateway.Evaluate(gw.EvaluateRequest(dataset=name, configurations=[pixels])))
    score, = progress[-1].results
    assert score.queries == 4  # each finds its twin first, then the other class
    assert score.mean_score == pytest.approx(search_score("a", ["a", "b", "b"]))


def test_evaluate_and_compare_rank_equal_scores_alike(stack, good_jpeg):
    """Both sorted by score alone: Evaluate kept equal scores in the request's order, Compare in
    the index's, so each named a different best configuration."""
    name = dataset(stack, "ties")
    photos = {"a": good_jpeg, "b": jpeg_bytes(np.full((64, 64, 3), 128, np.uint8))}
    stack.gateway.Ingest(iter([gw.IngestRequest(dataset=name, items=[
        gw.Item(id=f"{label}{i}", label=label, image=photos[label]) for label in "ab" for i in range(2)])])).next()
    configurations = [gw.Configuration(model="pixels", layers=[layer]) for layer in ("8x8", "16x16")]
    evaluated = list(stack.gateway.Evaluate(gw.EvaluateRequest(dataset=name, configurations=configurations)))
    ranked = [score.collection for score in evaluated[-1].results]
    assert ranked == ["pixels/16x16/avg/cosine", "pixels/8x8/avg/cosine"]  # tied: in collection order
    assert len({score.mean_score for score in evaluated[-1].results}) == 1
    compared = stack.gateway.Compare(gw.CompareRequest(dataset=name))
    assert [score.collection for score in compared.ranked] == ranked and compared.best.collection == ranked[0]


# ---- snapshots -----------------------------------------------------------------------------

def test_snapshots_are_listed_deleted_kept_to_the_retention_limit_and_carry_no_paths(stack, good_jpeg):
    assert "path" not in ix.SnapshotDatasetResponse.DESCRIPTOR.fields_by_name
    name = dataset(stack, "snapped")
    ingest(stack.gateway, name, [("a", good_jpeg)])
    taken = []
    for _ in range(3):
        reply = stack.gateway.SnapshotDataset(gw.SnapshotDatasetRequest(dataset=name))
        assert reply.snapshot.dataset == name and reply.snapshot.size_bytes > 0 and "/" not in reply.snapshot.name
        taken.append((reply.snapshot.name, list(reply.deleted)))
    assert [deleted for _, deleted in taken] == [[], [], [taken[0][0]]]  # --snapshot-retention 2
    listed = stack.gateway.ListSnapshots(gw.ListSnapshotsRequest(dataset=name)).snapshots
    assert [s.name for s in listed] == [taken[1][0], taken[2][0]]
    assert {s.name for s in stack.gateway.ListSnapshots(gw.ListSnapshotsRequest()).snapshots} >= {taken[2][0]}
    restored = stack.gateway.RestoreDataset(gw.RestoreDatasetRequest(snapshot=taken[2][0], dataset="snapped-copy"))
    assert restored.dataset.item_count == 1
    stack.gateway.DeleteSnapshot(gw.DeleteSnapshotRequest(snapshot=taken[1][0]))
    assert [s.name for s in stack.gateway.ListSnapshots(gw.ListSnapshotsRequest(dataset=name)).snapshots] == \
        [taken[2][0]]
    with pytest.raises(grpc.RpcError) as error:
        stack.gateway.DeleteSnapshot(gw.DeleteSnapshotRequest(snapshot=taken[1][0]))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert taken[2][0] not in error.value.details()  # names no other snapshot


def test_the_cli_parses_the_snapshot_commands():
    from convsearch.cli import parser

    args = parser().parse_args(["snapshot", "restore", "x-20260101T000000-abcdef", "--dataset", "y"])
    assert (args.command, args.snapshot_command, args.snapshot, args.dataset) == \
        ("snapshot", "restore", "x-20260101T000000-abcdef", "y")
    assert parser().parse_args(["snapshot", "list"]).dataset == ""


# ---- validation ----------------------------------------------------------------------------

LONG = "x" * 10_000


def minkowski(p: float) -> gw.Configuration:
    return gw.Configuration(model="efficientnet_lite0", layers=["_conv_head"], metric=common_pb2.METRIC_MINKOWSKI,
                            minkowski_p=p)


def bad_requests(stack):
    """(call, status, words the details must hold)."""
    g, i = stack.gateway, stack.index
    overflow = common_pb2.FloatTensor(data=b"", shape=[2**40, 2**40, 2**40])
    calls = [
        (lambda: i.UpsertVectors(ix.UpsertVectorsRequest(dataset="shoes", collection="c", ids=["a"],
                                                         vectors=overflow)), "INVALID_ARGUMENT", "bytes do not hold"),
        (lambda: i.Search(ix.SearchRequest(dataset="shoes", collection="c", queries=overflow, k=1)),
         "INVALID_ARGUMENT", "bytes do not hold"),
        (lambda: g.RestoreDataset(gw.RestoreDatasetRequest(snapshot=LONG, dataset="fresh")),
         "INVALID_ARGUMENT", "invalid snapshot name"),
        (lambda: g.DeleteSnapshot(gw.DeleteSnapshotRequest(snapshot=LONG)), "INVALID_ARGUMENT",
         "invalid snapshot name"),
        (lambda: g.DeleteSnapshot(gw.DeleteSnapshotRequest(snapshot="../../etc/passwd")), "INVALID_ARGUMENT",
         "invalid snapshot name"),
        (lambda: g.ListSnapshots(gw.ListSnapshotsRequest(dataset=LONG)), "INVALID_ARGUMENT", "invalid dataset name"),
        (lambda: g.GetDataset(gw.GetDatasetRequest(name=LONG)), "INVALID_ARGUMENT", "invalid dataset name"),
        (lambda: g.Project(gw.ProjectRequest(dataset="shoes", configuration=LITE0, method=gw.PROJECTION_METHOD_UMAP,
                                             seed=-1)), "INVALID_ARGUMENT", "seed -1 is negative"),
        (lambda: g.Compare(gw.CompareRequest(dataset="nosuch")), "NOT_FOUND", "does not exist"),
        (lambda: g.Search(gw.SearchRequest(dataset="shoes", item_id="a", configuration=gw.Configuration(
            model="../weights"))), "INVALID_ARGUMENT", "invalid model name"),
        (lambda: g.Search(gw.SearchRequest(dataset="shoes", item_id="a", configuration=gw.Configuration(
            model="a/b"))), "INVALID_ARGUMENT", "invalid model name"),
        (lambda: stack.extractor.Embed(extractor_pb2.EmbedRequest(
            config=extractor_pb2.EmbedConfig(model="../x"), images=[b"x"])),
         "INVALID_ARGUMENT", "invalid model name"),
        (lambda: i.CreateCollection(ix.CreateCollectionRequest(dataset="shoes", spec=ix.CollectionSpec(
            model="../x", layer="l", dimension=4))), "INVALID_ARGUMENT", "invalid model name"),
        (lambda: i.CreateCollection(ix.CreateCollectionRequest(dataset="shoes", spec=ix.CollectionSpec(
            model="m", layer="l", dimension=4, metric=common_pb2.METRIC_MINKOWSKI))),
         "INVALID_ARGUMENT", "minkowski needs minkowski_p set"),
    ]
    changed = [gw.IngestRequest(dataset="shoes"), gw.IngestRequest(configurations=[gw.Configuration(model="pixels")])]
    calls.append((lambda: list(g.Ingest(iter(changed))), "INVALID_ARGUMENT",  # were ignored, even unknown models
                  "a later message of the ingest stream changes its configurations"))
    for size in (-3, 1000):  # -3 was taken; 1000 failed mid-run with the extractor's limit of a stream message
        calls.append((lambda size=size: list(g.IndexDataset(gw.IndexDatasetRequest(dataset="shoes", batch_size=size))),
                      "INVALID_ARGUMENT", f"batch_size {size} is out of range; use 1 to 256"))
    calls.append((lambda: list(g.Evaluate(gw.EvaluateRequest(dataset="shoes", models=["pixels"],  # scored at p 2
                                                             metrics=[common_pb2.METRIC_MINKOWSKI]))),
                  "INVALID_ARGUMENT", "minkowski needs its p"))
    for p in (0.0, -1.0, float("nan"), float("inf"), 1e300):
        calls.append((lambda p=p: g.Search(gw.SearchRequest(dataset="shoes", item_id="a", configuration=minkowski(p))),
                      "INVALID_ARGUMENT", "minkowski p must be >= 1"))
    return calls


def test_malformed_values_are_invalid_argument_with_short_messages(stack, good_jpeg):
    ingest(stack.gateway, dataset(stack, "shoes"), [("a", good_jpeg)])
    for number, (call, code, words) in enumerate(bad_requests(stack)):
        with pytest.raises(grpc.RpcError) as error:
            call()
        details = error.value.details()
        assert (number, error.value.code().name) == (number, code), details
        assert words in details, (number, details)
        assert len(details) < 400, (number, len(details))  # the 10k-character name is cut


def test_minkowski_with_an_explicit_p_still_works(stack):
    from convsearch.embedding import minkowski_p_of

    assert minkowski_p_of("minkowski", 3) == 3.0
    assert minkowski_p_of("cosine", 0) == minkowski_p_of("cosine", float("nan")) == 2.0  # ignored


def test_not_found_messages_list_no_other_datasets_or_snapshots(stack):
    dataset(stack, "secret-dataset")
    stack.gateway.SnapshotDataset(gw.SnapshotDatasetRequest(dataset="secret-dataset"))
    for call in (lambda: stack.gateway.GetDataset(gw.GetDatasetRequest(name="nosuch")),
                 lambda: stack.gateway.RestoreDataset(gw.RestoreDatasetRequest(
                     snapshot="nosuch-20260101T000000-abcdef", dataset="x")),
                 lambda: stack.gateway.DeleteSnapshot(gw.DeleteSnapshotRequest(snapshot="nosuch"))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "secret" not in error.value.details() and "known" not in error.value.details()


def test_echoed_values_are_cut_in_one_helper():
    assert shown("ab") == "'ab'"
    cut = shown("y" * 10_000)
    assert len(cut) == 80 and cut.endswith("…")
    with pytest.raises(InvalidArgument) as error:
        from_tensor(common_pb2.FloatTensor(data=b"", shape=[1] * 40))
    assert "at most 32" in str(error.value)
    with pytest.raises(InvalidArgument, match="cannot be used"):
        from_tensor(common_pb2.FloatTensor(data=b"", shape=[0, 2**62, 2**62]))


def test_every_status_message_is_capped_below_the_metadata_limit():
    from convsearch.errors import NotFound
    from convsearch.grpc_errors import MAX_DETAILS, _status

    code, message = _status(NotFound("é" * 5000))
    assert code == grpc.StatusCode.NOT_FOUND and len(message.encode()) <= MAX_DETAILS and message.endswith("…")
    assert _status(NotFound("dataset 'x' does not exist"))[1] == "dataset 'x' does not exist"
    assert len(_status(ValueError("q" * 10_000))[1]) < 200  # an unexpected error's text is cut too
