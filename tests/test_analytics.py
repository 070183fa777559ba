"""The playground's analytics through the real services: evaluation against plain searches,
pretrained against random weights, stored results and their invalidation, projections,
looking inside a layer, and the CLI's tables and pictures."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from convsearch.cli import FASHION200, main, read_items
from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.local import LocalStack
from convsearch.scoring import TOP, search_score
from convsearch_extractor.catalog import load_catalog
from convsearch_extractor.imaging import decode
from convsearch_extractor.runtime import EmbedSpec, LoadedModel
from convsearch_gateway.evaluation import query_metrics

pytestmark = pytest.mark.slow
MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("data")) as running:
        yield running


@pytest.fixture(scope="module")
def evaluated(stack):
    """A client, and the evaluation of fashion200 at lite0's featured layers with cosine."""
    with Client(stack.gateway) as client:
        client.create_dataset("fashion200")
        list(client.ingest("fashion200", list(read_items(FASHION200))))
        progress = list(client.evaluate("fashion200", models=[MODEL], metrics=["cosine"]))
        assert [p.phase for p in progress][0] == "indexing" and progress[-1].finished
        yield client, progress[-1].results


def test_precision_and_average_precision_on_hand_made_rankings():
    assert query_metrics("a", ["a"] * 15, 15, 19) == (100.0, 1.0, 1.0)
    assert query_metrics("a", ["b"] * 15, 15, 19) == (0.0, 0.0, 0.0)
    score, precision, ap = query_metrics("a", ["a", "b", "a", "b"], 4, 2)
    assert precision == 0.5 and ap == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert score == pytest.approx(100 * (1 + 13 / 15) / (1 + 14 / 15 + 13 / 15 + 12 / 15))


def test_evaluation_covers_every_featured_layer(evaluated):
    _, results = evaluated
    assert len(results) == 8 and {r.model for r in results} == {MODEL}
    assert [r.mean_score for r in results] == sorted((r.mean_score for r in results), reverse=True)
    for score in results:
        assert score.queries == 200 and score.unlabeled == 0 and score.k == 15
        assert set(score.per_label_score) == {label for _, label, _ in read_items(FASHION200)}
        assert 0 < score.precision_at_k <= 1 and 0 < score.map_at_k <= 1 and score.dimension > 0
    best = results[0]
    assert best.layer == "_conv_head" and best.mean_score > 50


def test_per_query_scores_equal_scores_from_plain_searches(evaluated):
    client, results = evaluated
    for item_id in ("coat/t10k-00006", "trouser/t10k-00002", "bag/t10k-00018"):
        comparison = client.compare("fashion200", item_id=item_id)
        by_collection = dict(comparison.item_scores)
        for score in results[:3]:
            plain = client.search("fashion200", item_id=item_id, configuration=Configuration(MODEL, (score.layer,)),
                                  k=TOP)
            independent = search_score(plain.query_label, [hit.label for hit in plain.hits])
            assert by_collection[score.collection] == pytest.approx(independent)


def test_pretrained_best_layer_beats_random_weights(evaluated, tmp_path):
    _, results = evaluated
    spec = load_catalog(tmp_path)[MODEL]
    items = list(read_items(FASHION200))
    labels = np.array([label for _, label, _ in items])
    pixels = np.stack([decode(data, spec.preprocess, 10**8) for _, _, data in items])
    torch.manual_seed(0)
    random_model = LoadedModel(spec, spec.build(False), False, torch.device("cpu"))
    layers = tuple(score.layer for score in results)
    vectors = random_model.embed(pixels, EmbedSpec(MODEL, layers))
    random_scores = {}
    for layer in layers:
        unit = vectors[layer] / np.linalg.norm(vectors[layer], axis=1, keepdims=True)
        distance = 1 - unit @ unit.T
        np.fill_diagonal(distance, np.inf)
        ranked = np.argsort(distance, axis=1, kind="stable")[:, :TOP]
        random_scores[layer] = np.mean([search_score(labels[q], labels[ranked[q]]) for q in range(len(items))])
    assert results[0].mean_score > max(random_scores.values()) + 5, (results[0].mean_score, random_scores)


def test_results_are_reused_until_the_collection_changes(evaluated):
    client, results = evaluated
    again = list(client.evaluate("fashion200", models=[MODEL], metrics=["cosine"]))[-1].results
    assert all(score.cached for score in again)
    assert [s.mean_score for s in again] == [s.mean_score for s in results]
    assert client.delete_items("fashion200", ["sandal/t10k-00008"]) == 1
    comparison = client.compare("fashion200")
    assert len(comparison.stale) == 8 and not comparison.ranked
    fresh = list(client.evaluate("fashion200", models=[MODEL], metrics=["cosine"]))[-1].results
    assert not any(score.cached for score in fresh) and all(score.queries == 199 for score in fresh)
    comparison = client.compare("fashion200")
    assert comparison.best.collection == fresh[0].collection and not comparison.stale
    assert comparison.best_layer_per_model[MODEL].layer == fresh[0].layer
    images = {item_id: (label, data) for item_id, label, data in read_items(FASHION200)}
    list(client.ingest("fashion200", [("sandal/t10k-00008", *images["sandal/t10k-00008"])]))


def test_projections_are_repeatable_and_labelled(evaluated):
    client, _ = evaluated
    config = Configuration(MODEL, ("_conv_head",))
    first = client.project("fashion200", config, "pca")
    second = client.project("fashion200", config, "pca")
    assert first == second and len(first.ids) == len(set(first.ids)) == first.total
    labels = {item_id: label for item_id, label, _ in read_items(FASHION200)}
    assert all(labels[i] == label for i, label in zip(first.ids, first.labels, strict=True))
    sample = client.project("fashion200", config, "umap", seed=3, max_points=60)
    assert sample.sampled and len(sample.ids) == 60 and sample.total == first.total
    assert sample == client.project("fashion200", config, "umap", seed=3, max_points=60)
    assert np.isfinite(sample.x).all() and np.std(sample.x) > 0


def test_inspecting_a_stored_item(evaluated):
    client, _ = evaluated
    found = client.inspect("_blocks.9._expand_conv", dataset="fashion200", item_id="bag/t10k-00018", top_channels=3)
    assert (found.width, found.height) == (28, 28) and len(found.channels) == 3
    means = [mean for _, mean, _ in found.channels]
    assert means == sorted(means, reverse=True)
    assert all(Image.open(io.BytesIO(png)).size == (28, 28) for _, _, png in found.channels)


def test_cli_tables_json_and_pictures(stack, evaluated, tmp_path, capsys):
    gateway = ["--gateway", stack.gateway]
    assert main([*gateway, "evaluate", "--dataset", "fashion200", "--models", MODEL,
                 "--plot", str(tmp_path / "layers.png")]) == 0
    table = capsys.readouterr().out
    assert "_conv_head" in table and "best: efficientnet_lite0 _conv_head cosine" in table
    assert Image.open(tmp_path / "layers.png").size[0] > 500
    assert main([*gateway, "--json", "compare", "--dataset", "fashion200", "--id", "coat/t10k-00006"]) == 0
    assert len(json.loads(capsys.readouterr().out)["item_scores"]) == 8
    assert main([*gateway, "project", "--dataset", "fashion200", "--model", MODEL, "--plot",
                 str(tmp_path / "map.png")]) == 0
    assert Image.open(tmp_path / "map.png").format == "PNG"
    assert main([*gateway, "inspect", "--dataset", "fashion200", "--id", "bag/t10k-00018", "--layer",
                 "_conv_head", "--top", "2", "--out", str(tmp_path / "maps")]) == 0
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2
    capsys.readouterr()
    assert main([*gateway, "compare", "--dataset", "nothing"]) == 1
    assert "does not exist" in capsys.readouterr().err
