"""The web service's JSON API against a real gateway, extractor and index (in-process, on free
ports): what the page asks for, and the HTTP answers to bad input and to the gateway's refusals."""

import contextlib
import http.client
import json
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from convsearch.api_keys import key_line, new_key
from convsearch.channels import create_channel
from convsearch.cli import main
from convsearch.client import Client
from convsearch.datasets import encode_png, fashion_mnist_sample
from convsearch.embedding import Configuration
from convsearch.errors import ResourceExhausted
from convsearch.health import wait_until_serving
from convsearch.local import GATEWAY
from convsearch.processes import free_port
from convsearch.tls import channel_credentials
from convsearch_gateway.config import GatewayConfig
from convsearch_gateway.server import build_server as build_gateway
from convsearch_web.app import create_app
from convsearch_web.config import WebConfig, load_config
from convsearch_web.errors import http_status
from convsearch_web.server import listen
from tests.conftest import running_backends, running_gateway

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATASET = "shop"
PIXELS = Configuration("pixels", ("8x8", "16x16"), metric="cosine")
SEARCH = {"model": "pixels", "layer": "16x16", "pooling": "avg", "metric": "cosine"}
PER_CLASS = 3
PAGE = {"X-Requested-With": "convsearch"}  # what the page sends with every call


def page_client(config: WebConfig, host: str = "localhost", headers: dict | None = None) -> TestClient:
    """A client of the app as the page's scripts are (at http://localhost, with the page's header),
    or with other headers, at another host name."""
    return TestClient(create_app(config), base_url=f"http://{host}", headers=PAGE if headers is None else headers)


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    with running_backends(tmp_path_factory.mktemp("web-index")) as addresses:
        yield addresses


@pytest.fixture(scope="module")
def gateway(backends):
    """A gateway over a labeled dataset of 30 Fashion-MNIST images, indexed and evaluated with pixels."""
    with running_gateway(*backends) as (_, _, address):
        with Client(address, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
            client.create_dataset(DATASET, "for the web API tests")
            items = [(f"{label}/{image_id}", label, encode_png(pixels))
                     for image_id, label, pixels in fashion_mnist_sample(per_class=PER_CLASS)]
            assert all(r.status != "failed" for r in client.ingest(DATASET, items))
            list(client.index(DATASET, [PIXELS]))
            list(client.evaluate(DATASET, configurations=[PIXELS]))
        yield address


@pytest.fixture(scope="module")
def web(gateway):
    with page_client(WebConfig(gateway=gateway, max_upload_mb=0.05)) as client:
        yield client


@pytest.fixture(scope="module")
def png_bytes():
    return encode_png(fashion_mnist_sample(per_class=1)[7][2])


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def test_the_page_its_scripts_and_the_chart_library_are_served(web):
    page = web.get("/")
    assert page.status_code == 200 and "ConvNet Search" in page.text
    for path in ("/static/app.js", "/static/style.css"):
        assert web.get(path).status_code == 200, path
    plotly = web.get("/vendor/plotly.min.js")
    assert plotly.status_code == 200 and len(plotly.content) > 1_000_000
    assert plotly.headers["content-type"].startswith("text/javascript")
    assert "//cdn" not in page.text and "https://" not in page.text  # nothing from elsewhere at run time
    assert web.get("/healthz").json() == {"status": "ok"}
    assert web.get("/readyz").status_code == 200
    assert web.get("/api/health").json()["serving"] is True
    assert "/api/datasets/{dataset}/search" in web.get("/api/openapi.json").json()["paths"]


def test_models_and_datasets_with_their_collections(web):
    models = {m["name"]: m for m in web.get("/api/models").json()}
    assert [layer["name"] for layer in models["pixels"]["layers"]] == ["8x8", "16x16", "32x32", "64x64"]
    listed = {d["name"]: d for d in web.get("/api/datasets").json()}
    assert listed[DATASET]["item_count"] == 10 * PER_CLASS
    found = web.get(f"/api/datasets/{DATASET}").json()
    assert {(c["model"], c["layer"], c["pooling"], c["metric"]) for c in found["collections"]} == {
        ("pixels", "8x8", "avg", "cosine"), ("pixels", "16x16", "avg", "cosine")}


def test_the_items_page_through_by_id_and_by_class(web):
    first = web.get(f"/api/datasets/{DATASET}/items", params={**SEARCH, "offset": 0, "limit": 12}).json()
    assert first["total"] == 30 and len(first["items"]) == 12 and len(first["labels"]) == 10
    rest = web.get(f"/api/datasets/{DATASET}/items", params={**SEARCH, "offset": 24, "limit": 12}).json()
    assert len(rest["items"]) == 6
    ids = [item["id"] for item in first["items"]]
    assert ids == sorted(ids)
    coats = web.get(f"/api/datasets/{DATASET}/items", params={**SEARCH, "label": "coat"}).json()
    assert coats["total"] == PER_CLASS and {item["label"] for item in coats["items"]} == {"coat"}


def test_the_items_of_a_collection_of_one_or_two_vectors_are_listed(web, gateway):
    """The items were listed through a PCA projection, refused under 3 vectors: a collection of
    one or two answered 400."""
    with Client(gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        client.create_dataset("pair")
        images = {item_id: encode_png(pixels) for item_id, _, pixels in fashion_mnist_sample(per_class=1)[:2]}
        list(client.ingest("pair", [(item_id, "", image) for item_id, image in images.items()], [PIXELS]))
    listed = web.get("/api/datasets/pair/items", params=SEARCH)
    assert listed.status_code == 200, listed.text
    assert [item["id"] for item in listed.json()["items"]] == sorted(images)


def test_thumbnails_come_with_their_type(web):
    thumbnail = web.get(f"/api/datasets/{DATASET}/image", params={"id": "coat/t10k-00006", "size": 64})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
    assert thumbnail.content.startswith(b"\x89PNG")
    error_of(web.get(f"/api/datasets/{DATASET}/image", params={"id": "coat/nothing"}), 404, "NOT_FOUND")
    error_of(web.get(f"/api/datasets/{DATASET}/image", params={"id": "coat/t10k-00006", "size": -1}), 422,
             "INVALID_ARGUMENT")


def test_a_search_by_item_has_15_results_marks_and_a_score(web):
    found = web.post(f"/api/datasets/{DATASET}/search", json={**SEARCH, "item_id": "trouser/t10k-00002"}).json()
    assert len(found["hits"]) == 15 and found["query_label"] == "trouser"
    assert all(hit["same"] == (hit["label"] == "trouser") for hit in found["hits"])
    assert "trouser/t10k-00002" not in [hit["id"] for hit in found["hits"]]
    assert 0 <= found["search_score"] <= 100 and found["same_label_count"] == sum(h["same"] for h in found["hits"])
    assert found["collection"] == "pixels/16x16/avg/cosine" and found["layer"] == "16x16"


def test_a_search_by_uploaded_image(web, png_bytes):
    found = web.post(f"/api/datasets/{DATASET}/search/image", data={**SEARCH, "k": "5"},
                     files={"file": ("query.png", png_bytes, "image/png")})
    assert found.status_code == 200, found.text
    body = found.json()
    assert len(body["hits"]) == 5 and body["search_score"] is None and body["hits"][0]["same"] is None
    assert body["hits"][0]["distance"] < 1e-4  # the image is in the dataset


def test_bad_input_is_a_readable_4xx(web, png_bytes):
    search = f"/api/datasets/{DATASET}/search"
    error = error_of(web.post("/api/datasets/nowhere/search", json={**SEARCH, "item_id": "a"}), 404, "NOT_FOUND")
    assert error["reason"] == "DATASET_NOT_FOUND"
    error_of(web.post(search, json={**SEARCH, "item_id": "nobody"}), 404, "NOT_FOUND")
    error_of(web.post(search, json={**SEARCH, "item_id": "coat/t10k-00006", "layer": "nonsense"}), 400,
             "INVALID_ARGUMENT")
    error_of(web.post(search, json={**SEARCH, "item_id": "coat/t10k-00006", "metric": "hamming"}), 422,
             "INVALID_ARGUMENT")
    error_of(web.post(search, json={**SEARCH, "item_id": "coat/t10k-00006", "k": 0}), 422, "INVALID_ARGUMENT")
    unset_p = error_of(web.post(search, json={**SEARCH, "item_id": "coat/t10k-00006", "metric": "minkowski"}), 400,
                       "INVALID_ARGUMENT")  # searched at a silent p = 2
    assert unset_p["reason"] == "MINKOWSKI_P_OUT_OF_RANGE"
    error_of(web.post(search, json={**SEARCH}), 422, "INVALID_ARGUMENT")
    error_of(web.post("/api/datasets/Bad..Name/search", json={**SEARCH, "item_id": "a"}), 400, "INVALID_ARGUMENT")
    upload = f"/api/datasets/{DATASET}/search/image"
    not_image = web.post(upload, data=SEARCH, files={"file": ("notes.png", b"not an image at all", "image/png")})
    assert "image" in error_of(not_image, 400, "INVALID_ARGUMENT")["message"]
    error_of(web.post(upload, data=SEARCH, files={"file": ("empty.png", b"", "image/png")}), 400, "INVALID_ARGUMENT")
    big = png_bytes + b"\0" * 60_000  # over this service's 0.05 MiB limit
    too_large = error_of(web.post(upload, data=SEARCH, files={"file": ("big.png", big, "image/png")}), 413,
                         "RESOURCE_EXHAUSTED")
    assert "MiB" in too_large["message"]
    huge = png_bytes + b"\0" * 200_000  # refused on its declared length, before it is read
    error_of(web.post(upload, data=SEARCH, files={"file": ("huge.png", huge, "image/png")}), 413, "RESOURCE_EXHAUSTED")
    error_of(web.post("/api/datasets/nowhere/search/image", data=SEARCH,
                      files={"file": ("query.png", png_bytes, "image/png")}), 404, "NOT_FOUND")
    error_of(web.post(upload, data=SEARCH), 422, "INVALID_ARGUMENT")  # no file


def test_a_chunked_upload_is_refused_once_past_the_limit_without_reading_the_rest():
    """Only a declared Content-Length was checked: a chunked body of any size was read and
    spooled to disk whole (200 MiB against a 10 MiB limit) before the 413."""
    port = free_port()
    web_service = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "convsearch-web"), "--host", "127.0.0.1",
                                    "--port", str(port), "--gateway", "127.0.0.1:1", "--max-upload-mb", "0.05"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.connect()
                break
            except OSError:
                assert time.monotonic() < deadline and web_service.poll() is None, "convsearch-web did not start"
                time.sleep(0.2)
        connection.putrequest("POST", f"/api/datasets/{DATASET}/search/image")
        connection.putheader("Content-Type", "multipart/form-data; boundary=b")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.putheader("X-Requested-With", "convsearch")
        connection.endheaders()
        envelope = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for chunk in (envelope, *[bytes(256 << 10)] * 4):  # 1 MiB of a body that never ends
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = connection.getresponse()  # before the body's end, which never comes
        assert answer.status == 413
        error = json.loads(answer.read())["error"]
        assert error["reason"] == "UPLOAD_TOO_LARGE" and "0.05 MiB" in error["message"]
    finally:
        web_service.terminate()
        web_service.wait(10)


def test_a_page_of_another_site_cannot_use_the_api_through_a_visitors_browser(web, gateway):
    """The API acts with the service's own key, and indexing starts with a GET: any page a
    visitor had open could start it (an <img> of the events URL did), or read the datasets."""
    events = f"/api/datasets/{DATASET}/index/events"
    for site in ("cross-site", "same-site"):
        refused = web.get(events, params={"model": "pixels", "layers": "32x32"}, headers={"Sec-Fetch-Site": site})
        assert error_of(refused, 403, "PERMISSION_DENIED")["reason"] == "CROSS_SITE"
        error_of(web.get("/api/datasets", headers={"Sec-Fetch-Site": site}), 403, "PERMISSION_DENIED")
    with Client(gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        assert "pixels/32x32/avg/cosine" not in [c.name for c in client.dataset(DATASET).collections]
    for site in ("same-origin", "none"):  # the page itself; an address typed in
        assert web.get("/api/datasets", headers={"Sec-Fetch-Site": site}).status_code == 200
    assert web.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # a link to the page


def collection_names(gateway: str) -> list[str]:
    with Client(gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        return [c.name for c in client.dataset(DATASET).collections]


def test_a_page_of_another_site_cannot_start_work_over_plain_http(web, gateway, png_bytes):
    """Browsers send Sec-Fetch-Site only to secure or localhost origins: with the page at
    http://host:8080 on a LAN, an <img> of the events URL on any page a visitor had open started
    indexing (and evaluation), and a cross-site form could post an upload."""
    other_site = TestClient(web.app, base_url="http://localhost")  # no Sec-Fetch-*, no page header
    jobs = [(f"/api/datasets/{DATASET}/index/events", {"model": "pixels", "layers": "64x64", "metric": "manhattan"}),
            (f"/api/datasets/{DATASET}/evaluate/events", {"models": "pixels", "metrics": "manhattan"})]
    for path, params in jobs:
        refused = error_of(other_site.get(path, params=params), 403, "PERMISSION_DENIED")
        assert refused["reason"] == "CSRF" and "X-Requested-With: convsearch" in refused["message"]
        forged = other_site.get(path, params=params, headers={"X-Requested-With": "XMLHttpRequest"})
        assert error_of(forged, 403, "PERMISSION_DENIED")["reason"] == "CSRF"
    assert not [name for name in collection_names(gateway) if name.endswith("/manhattan")]
    form = {"file": ("query.png", png_bytes, "image/png")}
    for path, data in ((f"/api/datasets/{DATASET}/search/image", SEARCH),
                       ("/api/inspect", {"model": "pixels", "layer": "16x16"})):
        assert error_of(other_site.post(path, data=data, files=form), 403, "PERMISSION_DENIED")["reason"] == "CSRF"
    search = other_site.post(f"/api/datasets/{DATASET}/search", json={**SEARCH, "item_id": "coat/t10k-00006"})
    assert error_of(search, 403, "PERMISSION_DENIED")["reason"] == "CSRF"
    assert other_site.get("/api/datasets").status_code == 200  # reading: another site cannot see the answer
    assert web.post(f"/api/datasets/{DATASET}/search", json={**SEARCH, "item_id": "coat/t10k-00006"}).status_code == 200


def test_a_host_name_the_service_was_not_told_is_refused(web, gateway):
    """DNS rebinding: a page at http://attacker.example:8080, its name then resolving to this
    service, is same-origin with it (Sec-Fetch-Site: same-origin) and read the API."""
    rebound = TestClient(web.app, base_url="http://attacker.example:8080", headers=PAGE)
    for path in ("/api/datasets", "/"):
        refused = error_of(rebound.get(path, headers={"Sec-Fetch-Site": "same-origin"}), 403, "PERMISSION_DENIED")
        assert refused["reason"] == "HOST_NOT_ALLOWED" and "--allowed-hosts" in refused["message"], refused
    assert rebound.get("/healthz").status_code == 200 and rebound.get("/readyz").status_code == 200  # probes by IP
    for host in ("localhost:8080", "127.0.0.1:1234", "[::1]:8080", "LOCALHOST"):
        assert TestClient(web.app, base_url=f"http://{host}").get("/api/datasets").status_code == 200, host
    config = WebConfig(gateway=gateway, allowed_hosts="convsearch-web, Search.Example.org,[fd00::1]")
    for host in ("convsearch-web:8080", "search.example.org", "[FD00::1]:80"):
        with page_client(config, host) as allowed:
            assert allowed.get("/api/datasets").status_code == 200, host
    with page_client(config, "convsearch-web.attacker.example") as other:
        assert error_of(other.get("/api/datasets"), 403, "PERMISSION_DENIED")["reason"] == "HOST_NOT_ALLOWED"
    with page_client(WebConfig(gateway=gateway, allowed_hosts="*"), "anything.example:8080") as anyone:
        assert anyone.get("/api/datasets").status_code == 200


def test_the_allowed_hosts_flag_and_variable(monkeypatch, capsys):
    monkeypatch.setenv("CONVSEARCH_WEB_ALLOWED_HOSTS", "convsearch-web,search.example.org")
    assert load_config([]).allowed_hosts == "convsearch-web,search.example.org"
    assert load_config(["--allowed-hosts", "*"]).allowed_hosts == "*"
    with pytest.raises(SystemExit):
        load_config(["--allowed-hosts", "http://search.example.org:8080"])
    assert "not a host name" in capsys.readouterr().err


def test_the_page_and_the_api_may_not_be_framed_nor_sniffed(web):
    """Any site could show the page in an invisible frame and have a visitor click Index."""
    rebound = TestClient(web.app, base_url="http://attacker.example")
    for response in (web.get("/"), web.get("/static/app.js"), web.get("/api/datasets"),
                     web.get("/api/datasets/nowhere"), rebound.get("/")):
        assert response.headers["x-frame-options"] == "DENY", response.url
        assert response.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("error, status", [
    (ResourceExhausted("rate limit", reason="RATE_LIMITED", retry_after_s=0.5), 429),
    (ResourceExhausted("too many streams", reason="TOO_MANY_STREAMS"), 429),
    (ResourceExhausted("no room on the index's disk", reason="DISK_FULL"), 507),
    (ResourceExhausted("the image is larger than 10 MiB"), 413),
])
def test_resource_exhausted_answers_the_http_status_of_what_ran_out(error, status):
    """Too many streams at once, and a full disk, answered 413 Payload Too Large."""
    assert http_status(error) == status


def test_compare_ranks_configurations_and_scores_one_item_under_each(web):
    found = web.get(f"/api/datasets/{DATASET}/compare").json()
    assert {(s["model"], s["layer"]) for s in found["ranked"]} == {("pixels", "8x8"), ("pixels", "16x16")}
    assert all(s["baseline"] and s["queries"] == 30 for s in found["ranked"])
    assert found["best_layer_per_model"]["pixels"]["mean_score"] == found["best"]["mean_score"]
    item = web.get(f"/api/datasets/{DATASET}/compare", params={"item_id": "coat/t10k-00006"}).json()
    assert set(item["item_scores"]) == {"pixels/8x8/avg/cosine", "pixels/16x16/avg/cosine"}
    error_of(web.get("/api/datasets/nowhere/compare"), 404, "NOT_FOUND")


def test_the_projection_has_a_point_per_item(web):
    found = web.get(f"/api/datasets/{DATASET}/projection", params={**SEARCH, "method": "pca"}).json()
    assert len(found["points"]) == 30 and not found["sampled"]
    assert {p["label"] for p in found["points"]} == set(
        web.get(f"/api/datasets/{DATASET}/items", params=SEARCH).json()["labels"])
    error_of(web.get(f"/api/datasets/{DATASET}/projection", params={**SEARCH, "method": "tsne"}), 422,
             "INVALID_ARGUMENT")
    missing = web.get(f"/api/datasets/{DATASET}/projection", params={**SEARCH, "layer": "64x64", "method": "pca"})
    error_of(missing, 404, "NOT_FOUND")


def test_activation_maps_of_a_stored_item_and_of_an_upload(web, png_bytes):
    params = {"id": "bag/t10k-00018", "model": "efficientnet_lite0", "layer": "_blocks.2._project_conv", "top": 3}
    found = web.get(f"/api/datasets/{DATASET}/inspect", params=params)
    assert found.status_code == 200, found.text
    channels = found.json()["channels"]
    assert len(channels) == 3 and all(c["png"].startswith("data:image/png;base64,") for c in channels)
    uploaded = web.post("/api/inspect", data={"model": "efficientnet_lite0", "layer": "_blocks.2._project_conv",
                                              "top": "2"}, files={"file": ("q.png", png_bytes, "image/png")})
    assert uploaded.status_code == 200 and len(uploaded.json()["channels"]) == 2
    error_of(web.get(f"/api/datasets/{DATASET}/inspect", params={**params, "layer": "nonsense"}), 400,
             "INVALID_ARGUMENT")


def events(response) -> list[tuple[str, dict]]:
    """The server-sent events of a response: (event name, data)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    found = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_indexing_and_evaluation_stream_their_progress(web):
    indexed = events(web.get(f"/api/datasets/{DATASET}/index/events",
                             params={"model": "pixels", "layers": "32x32", "metric": "euclidean"}))
    assert [name for name, _ in indexed][-1] == "done" and {name for name, _ in indexed} == {"progress", "done"}
    last = indexed[-1][1]
    assert last["finished"] and last["total"] == 30 and last["collections"] == ["pixels/32x32/avg/euclidean"]
    evaluated = events(web.get(f"/api/datasets/{DATASET}/evaluate/events",
                               params={"models": "pixels", "metrics": "euclidean"}))
    assert evaluated[-1][0] == "done" and {p["phase"] for _, p in evaluated} <= {"indexing", "evaluating"}
    assert {s["layer"] for s in evaluated[-1][1]["results"]} == {"8x8", "16x16", "32x32", "64x64"}
    error_of(web.get("/api/datasets/nowhere/index/events", params={"model": "pixels"}), 404, "NOT_FOUND")
    error_of(web.get("/api/datasets/nowhere/evaluate/events"), 404, "NOT_FOUND")
    error_of(web.get(f"/api/datasets/{DATASET}/evaluate/events", params={"metrics": "cosine,hamming"}), 422,
             "INVALID_ARGUMENT")


def test_a_failure_during_a_job_is_an_event_with_the_error(web):
    failed = events(web.get(f"/api/datasets/{DATASET}/index/events", params={"model": "pixels", "layers": "9x9"}))
    assert failed[-1][0] == "failure"
    assert failed[-1][1]["status"] == 400 and failed[-1][1]["error"]["code"] == "INVALID_ARGUMENT"


def test_an_unreachable_gateway_is_503(tmp_path):
    with page_client(WebConfig(gateway=f"127.0.0.1:{free_port()}", timeout_s=2.0)) as web:
        assert web.get("/healthz").status_code == 200
        assert web.get("/readyz").status_code == 503
        error_of(web.get("/api/datasets"), 503, "UNAVAILABLE")
        error_of(web.get("/api/health"), 503, "UNAVAILABLE")


def test_the_api_key_is_sent_and_a_missing_one_is_401(gateway, backends, tmp_path):
    key = new_key()
    keys = tmp_path / "keys.txt"
    keys.write_text(key_line(key, "read") + "\n")
    with running_gateway(*backends, api_keys=str(keys)) as (_, _, address):
        with page_client(WebConfig(gateway=address, api_key=key)) as web:
            assert DATASET in [d["name"] for d in web.get("/api/datasets").json()]
            # a read key may not index: the gateway's PERMISSION_DENIED ends the stream as a 403 failure
            refused = events(web.get(f"/api/datasets/{DATASET}/index/events", params={"model": "pixels"}))
            assert refused[-1][0] == "failure" and refused[-1][1]["status"] == 403
        with page_client(WebConfig(gateway=address, api_key="")) as web:
            error_of(web.get("/api/datasets"), 401, "UNAUTHENTICATED")


def test_a_busy_port_stops_the_web_service_and_up_before_anything_starts(busy_port, tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{busy_port}"):
        listen("127.0.0.1", busy_port)
    assert main(["up", "--data-dir", str(tmp_path), "--port", "0", "--extractor-port", "0", "--index-port", "0",
                 "--web-port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert f"port {busy_port}" in err and "--web-port" in err and "starting" not in err


@contextlib.contextmanager
def tls_gateway(backends, certs: pathlib.Path):
    """An in-process gateway serving TLS with dev_certs.py's gateway certificate (it names 127.0.0.1)."""
    config = GatewayConfig(host="127.0.0.1", port=0, metrics_port=-1, extractor=backends[0], index=backends[1],
                           health_interval_s=0.2, tls_cert=str(certs / "gateway.crt"),
                           tls_key=str(certs / "gateway.key"))
    service, port = build_gateway(config)
    service.start()
    address = f"127.0.0.1:{port}"
    channel = create_channel(address, credentials=channel_credentials(str(certs / "ca.crt")))
    try:
        wait_until_serving(channel, GATEWAY, timeout_s=30)
        yield address
    finally:
        channel.close()
        service.stop(0.5)


def test_the_web_service_reaches_a_tls_gateway_with_its_ca(gateway, backends, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "dev_certs.py"), "--out", str(certs)], check=True,
                   capture_output=True)
    with tls_gateway(backends, certs) as address:
        with page_client(WebConfig(gateway=address, tls_ca=str(certs / "ca.crt"))) as web:
            assert DATASET in [d["name"] for d in web.get("/api/datasets").json()]
            assert web.get("/readyz").status_code == 200
        with page_client(WebConfig(gateway=address, timeout_s=2.0)) as web:  # plaintext to TLS
            error_of(web.get("/api/datasets"), 503, "UNAVAILABLE")


def test_evaluation_scores_the_chosen_pooling(web):
    """The page's pooling was not sent nor taken: Evaluate scored avg whatever the page showed."""
    evaluated = events(web.get(f"/api/datasets/{DATASET}/evaluate/events",
                               params={"models": "pixels", "metrics": "cosine", "pooling": "max"}))
    assert evaluated[-1][0] == "done", evaluated[-1]
    results = evaluated[-1][1]["results"]
    assert {(s["pooling"], s["metric"]) for s in results} == {("max", "cosine")}
    assert {s["layer"] for s in results} == {"8x8", "16x16", "32x32", "64x64"}  # the featured layers


def test_minkowski_needs_its_p_and_its_collections_name_metric_and_p(web):
    """An upload was searched at a silent p = 2, and a minkowski collection's metric was
    `minkowski3`, which no control of the page can show."""
    with Client(web.app.state.config.gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        client.create_dataset("distances")
        items = [(item_id, label, encode_png(pixels)) for item_id, label, pixels in fashion_mnist_sample(per_class=1)]
        list(client.ingest("distances", items, [Configuration("pixels", ("8x8",), metric="minkowski", minkowski_p=3)]))
    found = web.get("/api/datasets/distances").json()
    assert [(c["metric"], c["p"]) for c in found["collections"]] == [("minkowski", 3.0)]
    form = {"model": "pixels", "layer": "8x8", "metric": "minkowski"}
    unset = web.post("/api/datasets/distances/search/image", data=form,
                     files={"file": ("query.png", items[0][2], "image/png")})
    assert error_of(unset, 400, "INVALID_ARGUMENT")["reason"] == "MINKOWSKI_P_OUT_OF_RANGE"
    found = web.post("/api/datasets/distances/search/image", data={**form, "p": "3"},
                     files={"file": ("query.png", items[0][2], "image/png")}).json()
    assert (found["metric"], found["p"]) == ("minkowski", 3.0)


def test_the_items_of_no_label_can_be_listed_alone(web):
    """The class filter offered a blank option for the "" label, which listed every item."""
    with Client(web.app.state.config.gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        client.create_dataset("mixed")
        items = [(item_id, label if n % 2 else "", encode_png(pixels))
                 for n, (item_id, label, pixels) in enumerate(fashion_mnist_sample(per_class=1)[:6])]
        list(client.ingest("mixed", items, [PIXELS]))
    listed = web.get("/api/datasets/mixed/items", params={**SEARCH, "unlabeled": "true"}).json()
    assert sorted(item["id"] for item in listed["items"]) == sorted(i for i, label, _ in items if not label)
    assert "" in listed["labels"] and listed["total"] == 3


def test_unknown_routes_and_methods_answer_the_apis_error_body(web):
    """They answered FastAPI's {"detail": ...}, which the page cannot read."""
    unknown = error_of(web.get("/api/nothing/here"), 404, "NOT_FOUND")
    assert unknown["reason"] == "ROUTE_NOT_FOUND" and "/api/nothing/here" in unknown["message"]
    wrong = web.delete("/api/datasets")
    assert error_of(wrong, 405, "UNIMPLEMENTED")["reason"] == "METHOD_NOT_ALLOWED"
    assert "GET" in wrong.headers["allow"]
    assert web.get("/nothing").status_code == 404  # the page's own paths are not the API's


def test_an_upload_that_is_no_image_is_named_as_the_uploaded_file(web):
    """The message named `image 0`, an index in a batch the page never sent."""
    for path, data in ((f"/api/datasets/{DATASET}/search/image", SEARCH),
                       ("/api/inspect", {"model": "efficientnet_lite0", "layer": "_blocks.2._project_conv"})):
        refused = web.post(path, data=data, files={"file": ("notes.png", b"not an image at all", "image/png")})
        message = error_of(refused, 400, "INVALID_ARGUMENT")["message"]
        assert message.startswith("the uploaded file is not a recognised image"), message


def test_closing_a_jobs_event_stream_cancels_the_job(backends):
    """The page's reload or navigation closed the stream, but the gateway's stream, and the job,
    went on to the end; a second Index then embedded everything again."""
    with running_gateway(*backends) as (service, _, address):
        with Client(address, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
            client.create_dataset("long")
            items = [(f"{label}/{image_id}", label, encode_png(pixels))
                     for image_id, label, pixels in fashion_mnist_sample(per_class=30)]
            assert all(r.status != "failed" for r in client.ingest("long", items))
        sock = listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(create_app(WebConfig(gateway=address)), log_config=None))
        serving = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        serving.start()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=30)
            eventually(lambda: server.started)
            connection.request("GET", "/api/datasets/long/index/events?model=efficientnet_lite0", headers=PAGE)
            answer = connection.getresponse()
            assert answer.status == 200 and answer.readline().startswith(b"event: progress")
            assert service.guard.streams.open == 1
            connection.close()  # the page goes away
            eventually(lambda: service.guard.streams.open == 0, timeout_s=5)
            with Client(address, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
                counts = [c.count for c in client.dataset("long").collections]
            assert all(count < len(items) for count in counts), counts
        finally:
            server.should_exit = True
            serving.join(10)


def eventually(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
