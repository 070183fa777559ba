"""The three real services as subprocesses on free ports, driven through the Python client:
ingest fashion200, index, search by image and by id, scores, deletes, interrupted indexing,
and backends going down and coming back."""

import os
import pathlib
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.channels import create_channel
from convsearch.cli import FASHION200, read_items
from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.errors import NotFound, Unavailable
from convsearch.local import EXTRACTOR, GATEWAY, INDEX, LocalStack
from convsearch.processes import free_port, start_service, stop_service
from convsearch.scoring import search_score

LAYERS = ("_blocks.9._expand_conv", "_conv_head")
LITE0 = Configuration("efficientnet_lite0", LAYERS)
LAST = Configuration("efficientnet_lite0", ("_conv_head",))
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("data")) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.gateway) as connected:
        connected.create_dataset("fashion200", "Fashion-MNIST, 10 x 20")
        items = list(read_items(FASHION200))
        results = list(connected.ingest("fashion200", items))
        assert [r.status for r in results] == ["stored"] * 200
        progress = list(connected.index("fashion200", [LITE0]))
        assert progress[-1].finished and progress[-1].done == progress[-1].total == 200
        assert progress[-1].failed == 0
        yield connected


def gateway_health(stack, service=GATEWAY) -> str:
    channel = create_channel(stack.gateway)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    finally:
        channel.close()


def wait_for_health(stack, expected: str, service=GATEWAY, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while gateway_health(stack, service) != expected:
        assert time.monotonic() < deadline, f"gateway health never became {expected}"
        time.sleep(0.2)


def test_ingest_is_idempotent_and_reports_each_item(client):
    items = list(read_items(FASHION200))[:3] + [("broken", "bag", b"not an image"), ("", "bag", items_png())]
    results = list(client.ingest("fashion200", items))
    assert [r.status for r in results] == ["replaced", "replaced", "replaced", "failed", "failed"]
    assert "not a recognised image" in results[3].error and "1 to 256" in results[4].error
    assert client.dataset("fashion200").item_count == 200


def items_png() -> bytes:
    return next(read_items(FASHION200))[2]


def test_search_by_image_finds_the_image_itself(client):
    item_id, label, image = list(read_items(FASHION200))[57]
    result = client.search("fashion200", image=image, configuration=LAST, k=5)
    assert result.hits[0].id == item_id and result.hits[0].distance < 1e-3
    assert result.hits[0].label == label and result.search_score is None
    assert result.collection == "efficientnet_lite0/_conv_head/avg/cosine"


def test_search_by_id_scores_by_the_formula(client):
    for item_id in ("trouser/t10k-00002", "shirt/t10k-00004"):
        result = client.search("fashion200", item_id=item_id, configuration=LAST, k=15)
        labels = [hit.label for hit in result.hits]
        assert item_id not in [hit.id for hit in result.hits] and len(labels) == 15
        assert result.search_score == pytest.approx(search_score(result.query_label, labels))
        assert result.same_label_count == labels.count(result.query_label)
        distances = [hit.distance for hit in result.hits]
        assert distances == sorted(distances)
    trouser = client.search("fashion200", item_id="trouser/t10k-00002", configuration=LAST, k=15)
    assert trouser.query_label == "trouser" and trouser.search_score > 80


def test_label_filters_and_thumbnails(client):
    result = client.search("fashion200", item_id="bag/t10k-00018", configuration=LAST, k=10,
                           include_labels=["sandal", "sneaker"])
    assert {hit.label for hit in result.hits} <= {"sandal", "sneaker"} and len(result.hits) == 10
    # The score is over the whole dataset: a filtered top 15 would make it whatever the filter says.
    assert result.search_score is None and result.same_label_count is None
    thumbnail = client.image("fashion200", "bag/t10k-00018", thumbnail_size=16)
    assert thumbnail.startswith(b"\x89PNG")
    assert client.image("fashion200", "bag/t10k-00018") == dict(
        (i, data) for i, _, data in read_items(FASHION200))["bag/t10k-00018"]


def test_deleted_items_disappear_from_results(client):
    before = client.search("fashion200", item_id="dress/t10k-00013", configuration=LAST, k=5)
    gone = [hit.id for hit in before.hits[:2]]
    assert client.delete_items("fashion200", gone) == 2
    after = client.search("fashion200", item_id="dress/t10k-00013", configuration=LAST, k=50)
    assert not set(gone) & {hit.id for hit in after.hits}
    images = dict((i, (label, data)) for i, label, data in read_items(FASHION200))
    again = list(client.ingest("fashion200", [(i, *images[i]) for i in gone], configurations=[LITE0]))
    assert [(r.status, r.indexed) for r in again] == [("stored", True), ("stored", True)]
    restored = client.search("fashion200", item_id="dress/t10k-00013", configuration=LAST, k=5)
    assert [hit.id for hit in restored.hits] == [hit.id for hit in before.hits]


def test_interrupted_indexing_resumes_without_reembedding(client):
    config = Configuration("efficientnet_lite0", ("_blocks.4._project_conv",))
    done_before_stop = 0
    for progress in client.index("fashion200", [config], batch_size=16):
        done_before_stop = progress.done
        if progress.done >= 48:
            break  # the client goes away mid-run
    assert 48 <= done_before_stop < 200
    rerun = list(client.index("fashion200", [config], batch_size=16))
    assert rerun[0].total <= 200 - done_before_stop
    assert rerun[-1].finished and rerun[-1].done == rerun[-1].total
    collection = next(c for c in client.dataset("fashion200").collections if "_blocks.4._project_conv" in c.name)
    assert collection.count == 200
    assert list(client.index("fashion200", [config]))[-1].total == 0  # nothing left to do


def test_unknown_things_are_named(client):
    with pytest.raises(NotFound, match="no item 'nope'"):
        client.search("fashion200", item_id="nope", configuration=LAST)
    with pytest.raises(NotFound, match="unknown model 'alexnet'"):
        client.search("fashion200", item_id="bag/t10k-00018", configuration=Configuration("alexnet"))
    with pytest.raises(NotFound, match="does not exist"):
        client.dataset("nothing-here")


def test_a_stopped_backend_gives_a_fast_clear_unavailable_and_recovers(stack, client):
    image = items_png()
    for name, command, service, args in (
            ("extractor", "convsearch-extractor", EXTRACTOR, ("--metrics-port", "-1")),
            ("index", "convsearch-index", INDEX, ("--data-dir", str(stack.index_dir)))):
        address = getattr(stack, name)
        stop_service(stack.processes.pop(name))
        started = time.monotonic()
        with pytest.raises(Unavailable, match=f"the {name} at {address} is unavailable"):
            client.search("fashion200", image=image, configuration=LAST, k=3)
        assert time.monotonic() - started < 5.0
        wait_for_health(stack, "NOT_SERVING", f"{GATEWAY}/{name}")
        # The gateway stays ready: a Kubernetes readiness probe on it must not empty its Service
        # (and the web page's) while one backend restarts.
        assert gateway_health(stack) == "SERVING"
        if name == "extractor":  # what needs only the index still works
            assert client.search("fashion200", item_id="bag/t10k-00018", configuration=LAST, k=3).hits
        stack.processes[name], _ = start_service(command, *args, service=service, port=int(address.rsplit(":")[1]))
        wait_for_health(stack, "SERVING", f"{GATEWAY}/{name}")
        assert client.search("fashion200", image=image, configuration=LAST, k=3).hits


def test_the_readme_python_example_runs_as_written(stack, client):
    block = re.search(r"```python\n(# the API in brief.*?)```", README.read_text(), re.S)
    assert block, "README lost its Python example"
    result = subprocess.run([sys.executable, "-c", block.group(1)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CONVSEARCH_GATEWAY": stack.gateway}, cwd=README.parent)
    assert result.returncode == 0, result.stderr
    assert "search score" in result.stdout


def test_the_gateway_balances_over_several_extractors(stack, client):
    metrics = [free_port(), free_port()]
    extractors = [start_service("convsearch-extractor", "--metrics-port", str(port), service=EXTRACTOR)
                  for port in metrics]
    gateway, address = start_service("convsearch-gateway", "--extractor", ",".join(a for _, a in extractors),
                                     "--index", stack.index, service=GATEWAY)
    def embedded(port: int) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return float(re.search(r"^convsearch_extractor_images_total (\S+)$", text, re.M).group(1))

    try:
        before = [embedded(port) for port in metrics]
        with Client(address) as balanced:
            for _ in range(12):
                assert balanced.search("fashion200", image=items_png(), configuration=LAST, k=3).hits
        served = [embedded(port) - start for port, start in zip(metrics, before, strict=True)]
        assert sum(served) == 12 and min(served) >= 3, served
    finally:
        stop_service(gateway)
        for process, _ in extractors:
            stop_service(process)
