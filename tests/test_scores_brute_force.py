"""Evaluate's and Compare's numbers against an independent brute force: numpy float64 distances
over the vectors the index stores, every other item ranked by (distance, id), the query left out,
and the ConvNet Playground search score, precision@k and average precision@k computed here by
their definitions. The images are crafted for the `pixels` model: a 64x64 picture of 8x8 uniform
blocks, whose 8x8 layer is those blocks' colours, so duplicates, near-ties, zero vectors and
labels are exactly what each case needs."""

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from convsearch.channels import create_channel
from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.index.v1 import index_pb2, index_pb2_grpc
from convsearch.naming import collection_name
from convsearch.tensors import from_tensor
from tests.conftest import running_backends, running_gateway

pytestmark = pytest.mark.slow
LAYER = "8x8"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(a client of an in-process gateway, a stub of its index)."""
    with running_backends(pathlib.Path(tmp_path_factory.mktemp("data")), default_model="pixels") as (extractor, index):
        with running_gateway(extractor, index) as (_, _, gateway):
            channel = create_channel(index)
            with Client(gateway) as client:
                yield client, index_pb2_grpc.IndexServiceStub(channel)
            channel.close()


def picture(blocks: np.ndarray) -> bytes:
    """A PNG of 8x8 uniform blocks of 8x8 pixels: its `pixels` 8x8 layer is `blocks` / 255."""
    pixels = np.repeat(np.repeat(np.asarray(blocks, np.uint8), 8, 0), 8, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def distance(query: np.ndarray, other: np.ndarray, metric: str, p: float) -> float:
    if metric == "cosine":
        norms = np.linalg.norm(query) * np.linalg.norm(other)
        return 1.0 - query @ other / norms if norms else 1.0
    if metric == "ip":
        return 1.0 - query @ other
    diff = np.abs(query - other)
    if metric == "minkowski":
        return (diff**p).sum() ** (1 / p)
    return {"euclidean": np.sqrt((diff**2).sum()), "sqeuclidean": (diff**2).sum(), "manhattan": diff.sum(),
            "chebyshev": diff.max()}[metric]


def brute_force(vectors: dict[str, np.ndarray], labels: dict[str, str], metric: str, k: int, p: float = 2.0):
    """(mean score, P@k, mAP@k, per-label mean, per-query score) by the definitions."""
    ids = sorted(vectors)
    per_query, precisions, aps = {}, [], []
    for query in ids:
        label = labels[query]
        if not label:
            continue
        ranked = [labels[other] for _, other in sorted(
            (distance(vectors[query], vectors[other], metric, p), other) for other in ids if other != query)]
        weights = [(16 - rank) / 15 for rank in range(1, min(15, len(ranked)) + 1)]
        per_query[query] = 100 * sum(w for w, other in zip(weights, ranked, strict=False)
                                     if other == label) / sum(weights) \
            if weights else 0.0
        hits = [other == label for other in ranked[:k]]
        precisions.append(sum(hits) / k)
        relevant, found, total = ranked.count(label), 0, 0.0
        for rank, hit in enumerate(hits, 1):
            found += hit
            total += found / rank if hit else 0.0
        aps.append(total / min(k, relevant) if relevant else 0.0)
    per_label: dict[str, list[float]] = {}
    for query, score in per_query.items():
        per_label.setdefault(labels[query], []).append(score)
    return (float(np.mean(list(per_query.values()))), float(np.mean(precisions)), float(np.mean(aps)),
            {label: float(np.mean(scores)) for label, scores in per_label.items()}, per_query)


def stored(index, dataset: str, collection: str, ids: list[str]) -> dict[str, np.ndarray]:
    """The vectors the index holds (float32, as the extractor made them), in float64."""
    reply = index.GetVectors(index_pb2.GetVectorsRequest(dataset=dataset, collection=collection, ids=ids))
    assert not reply.missing_ids
    return dict(zip(reply.ids, from_tensor(reply.vectors).astype(np.float64), strict=True))


def item_scores(client: Client, dataset: str, collection: str, ids) -> dict[str, float]:
    """Each labeled item's score as Compare answers it."""
    return {item_id: dict(client.compare(dataset, item_id=item_id).item_scores)[collection] for item_id in ids}


def ingest(client: Client, dataset: str, items, configuration: Configuration | None = None) -> None:
    results = list(client.ingest(dataset, [(item_id, label, picture(blocks)) for item_id, label, blocks in items],
                                 configurations=[configuration] if configuration else ()))
    assert all(result.status == "stored" for result in results), results


# ---- defects: what Evaluate answered through the approximate graph --------------------------

@pytest.mark.parametrize("metric", ["cosine", "euclidean", "sqeuclidean", "ip"])
def test_tied_duplicates_rank_by_id_whatever_order_they_were_indexed_in(stack, metric):
    """Six copies of one image, two labeled A and four B, plus ten other images. Exact search
    ranks equal distances by id; Evaluate searched the graph, which ranks them by the slot each
    vector got, so items indexed later (here the A copies, d00 and d01) came after the other
    copies: the same data scored differently depending on the order it was indexed in (and
    differently from Search with exact)."""
    client, index = stack
    rng = np.random.default_rng(7)
    copy = rng.integers(0, 256, (8, 8, 3))
    items = [(f"d{n:02d}", "A" if n < 2 else "B", copy) for n in range(6)]
    items += [(f"o{n:02d}", "C", rng.integers(0, 256, (8, 8, 3))) for n in range(10)]
    dataset, configuration = f"ties-{metric}", Configuration("pixels", (LAYER,), metric=metric)
    client.create_dataset(dataset)
    ingest(client, dataset, items[2:], configuration)
    ingest(client, dataset, items[:2], configuration)  # the A copies get the last slots
    score, = list(client.evaluate(dataset, configurations=[configuration]))[-1].results
    labels = {item_id: label for item_id, label, _ in items}
    mean, precision, mean_ap, per_label, per_query = brute_force(
        stored(index, dataset, score.collection, list(labels)), labels, metric, 15)
    assert item_scores(client, dataset, score.collection, per_query) == pytest.approx(per_query, abs=1e-9)
    assert score.mean_score == pytest.approx(mean, abs=1e-9)
    assert score.per_label_score == pytest.approx(per_label, abs=1e-9)
    assert (score.precision_at_k, score.map_at_k) == pytest.approx((precision, mean_ap), abs=1e-12)
    exact = client.search(dataset, item_id="d00", configuration=configuration, exact=True)
    assert exact.search_score == pytest.approx(per_query["d00"], abs=1e-9)


def test_near_parallel_vectors_rank_by_their_float64_cosine_distances(stack):
    """Eight images one to eight pixel levels darker, in a few blocks, than a query image: their
    cosine distances to it are 4e-8 to 5e-7, all different in float64, but under float32's
    resolution, where the graph cannot tell them apart. Evaluate answered the graph's order."""
    client, index = stack
    rng = np.random.default_rng(8)
    bright = np.full((8, 8, 3), 250)
    items = [("q", "A", bright)]
    for n in range(8):
        darker = bright.copy()
        darker.reshape(-1)[:n + 1] -= 1
        items.append((f"n{7 - n}", "BA"[n % 2], darker))
    items += [(f"o{n:02d}", "A", rng.integers(0, 256, (8, 8, 3))) for n in range(8)]
    dataset, configuration = "near-ties", Configuration("pixels", (LAYER,), metric="cosine")
    client.create_dataset(dataset)
    ingest(client, dataset, items)
    score, = list(client.evaluate(dataset, configurations=[configuration]))[-1].results
    labels = {item_id: label for item_id, label, _ in items}
    vectors = stored(index, dataset, score.collection, list(labels))
    near = sorted(distance(vectors["q"], vectors[f"n{n}"], "cosine", 2) for n in range(8))
    assert near[-1] < 1e-6 and min(np.diff(near)) > 1e-9  # tiny, but no two equal: no tie to break
    mean, precision, mean_ap, per_label, per_query = brute_force(vectors, labels, "cosine", 15)
    assert item_scores(client, dataset, score.collection, per_query) == pytest.approx(per_query, abs=1e-9)
    assert score.mean_score == pytest.approx(mean, abs=1e-9)
    assert (score.precision_at_k, score.map_at_k) == pytest.approx((precision, mean_ap), abs=1e-12)


# ---- edge cases that were right, kept right ---------------------------------------------------

METRICS = [("cosine", 0.0), ("euclidean", 0.0), ("sqeuclidean", 0.0), ("ip", 0.0), ("manhattan", 0.0),
           ("chebyshev", 0.0), ("minkowski", 1.0), ("minkowski", 1.5), ("minkowski", 3.0), ("minkowski", 100.0)]


@pytest.mark.parametrize("k", [18, 1000])
def test_every_metric_with_awkward_labels_matches_brute_force(stack, k):
    """Labels that differ by case or whitespace are different classes, unlabeled items are misses
    and no queries, classes of one score 0, a black image (a zero vector: cosine distance 1 to
    everything) ties with everything, and k beyond the dataset still divides P@k by k."""
    client, index = stack
    rng = np.random.default_rng(9)
    labels = list("AAAAABBBBCCC") + ["Cat", "cat", " cat", "cat ", "", "", "D", "A"]
    items = [(f"i{n:02d}", label, rng.integers(0, 256, (8, 8, 3))) for n, label in enumerate(labels)]
    items[-1] = (items[-1][0], "A", np.zeros((8, 8, 3), int))
    dataset = f"awkward-{k}"
    configurations = [Configuration("pixels", (LAYER,), metric=metric, minkowski_p=p) for metric, p in METRICS]
    client.create_dataset(dataset)
    ingest(client, dataset, items)
    results = {score.collection: score for score in list(client.evaluate(dataset, configurations=configurations,
                                                                         k=k))[-1].results}
    by_id = {item_id: label for item_id, label, _ in items}
    for (metric, p), configuration in zip(METRICS, configurations, strict=True):
        score = results[collection_name("pixels", LAYER, "avg", metric, p)]
        mean, precision, mean_ap, per_label, per_query = brute_force(
            stored(index, dataset, score.collection, list(by_id)), by_id, metric, k, p)
        assert (score.queries, score.unlabeled, score.single_item_classes, score.small_dataset) == (18, 2, 5, False)
        assert score.mean_score == pytest.approx(mean, abs=1e-9), configuration
        assert score.precision_at_k == pytest.approx(precision, abs=1e-12), configuration
        assert score.map_at_k == pytest.approx(mean_ap, abs=1e-12), configuration
        assert score.per_label_score == pytest.approx(per_label, abs=1e-9), configuration
        assert set(score.per_label_score) == {"A", "B", "C", "Cat", "cat", " cat", "cat ", "D"}


@pytest.mark.parametrize("labels", [["A"], ["A", "A"], ["A", "B"], ["", "A"], ["A", "A", "A"], ["A", "B", "A"],
                                    ["", "", "A"]])
def test_datasets_of_one_to_three_items_match_brute_force(stack, labels):
    client, index = stack
    rng = np.random.default_rng(len(labels))
    items = [(f"s{n}", label, rng.integers(0, 256, (8, 8, 3))) for n, label in enumerate(labels)]
    dataset = "tiny-" + "".join(label or "x" for label in labels).lower()
    configuration = Configuration("pixels", (LAYER,), metric="euclidean")
    client.create_dataset(dataset)
    ingest(client, dataset, items)
    score, = list(client.evaluate(dataset, configurations=[configuration], k=15))[-1].results
    by_id = {item_id: label for item_id, label, _ in items}
    mean, precision, mean_ap, per_label, per_query = brute_force(
        stored(index, dataset, score.collection, list(by_id)), by_id, "euclidean", 15)
    assert score.small_dataset and score.queries == len(per_query)
    assert (score.mean_score, score.precision_at_k, score.map_at_k) == pytest.approx((mean, precision, mean_ap))
    assert score.per_label_score == pytest.approx(per_label)
    assert item_scores(client, dataset, score.collection, per_query) == pytest.approx(per_query)


def test_the_exact_ranking_bound_is_a_gateway_option():
    from convsearch_gateway.config import GatewayConfig
    from convsearch_gateway.evaluation import EXACT_UP_TO

    assert GatewayConfig().evaluate_exact_up_to == EXACT_UP_TO == 5000
    GatewayConfig(evaluate_exact_up_to=0).validate()  # always the graph
    with pytest.raises(ValueError, match="evaluate_exact_up_to must be 0"):
        GatewayConfig(evaluate_exact_up_to=-1).validate()
