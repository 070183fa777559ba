"""A review of the web page as a hostile client of its HTTP API and a demanding user in a browser:
each test reproduces a defect found (and fixed) in services/web."""

import pathlib

import pytest
from fastapi.testclient import TestClient
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from convsearch.client import Client
from convsearch.datasets import encode_png, fashion_mnist_sample
from convsearch.embedding import Configuration
from convsearch.local import LocalStack
from convsearch_web.app import create_app
from convsearch_web.config import WebConfig
from tests.conftest import running_backends, running_gateway
from tests.test_web_browser import choose, headless_chromium, text_of, tiles, wait_for

DATASET = "shop"
PIXELS = Configuration("pixels", ("8x8", "16x16"), metric="cosine")
SEARCH = {"model": "pixels", "layer": "16x16", "pooling": "avg", "metric": "cosine"}
PAGE = {"X-Requested-With": "convsearch"}  # what the page sends with every call


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A gateway over 30 labeled images indexed with pixels at 8x8 and 16x16."""
    with running_backends(tmp_path_factory.mktemp("web-review")) as backends:
        with running_gateway(*backends) as (_, _, address):
            with Client(address, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
                client.create_dataset(DATASET)
                items = [(f"{label}/{image_id}", label, encode_png(pixels))
                         for image_id, label, pixels in fashion_mnist_sample(per_class=3)]
                assert all(r.status != "failed" for r in client.ingest(DATASET, items, [PIXELS]))
            yield address


@pytest.fixture(scope="module")
def web(gateway):
    with TestClient(create_app(WebConfig(gateway=gateway)), base_url="http://localhost", headers=PAGE,
                    raise_server_exceptions=False) as client:  # a 500 as a browser sees it
        yield client


def violation(response, status: int, field: str) -> dict:
    """The error of a 4xx answer that names `field` among its field violations."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert field in [v["field"] for v in error["field_violations"]], error
    return error


def test_a_projection_seed_beyond_32_bits_is_a_4xx_naming_the_seed(web):
    """The seed had no upper bound, and the gateway's field is an int32: seed=4294967296 failed
    while building the request, a 500 "Internal Server Error" in plain text."""
    for seed in (2**31, 2**32, 10**30):
        answer = web.get(f"/api/datasets/{DATASET}/projection", params={**SEARCH, "method": "pca", "seed": seed})
        violation(answer, 422, "seed")
    largest = web.get(f"/api/datasets/{DATASET}/projection", params={**SEARCH, "method": "pca", "seed": 2**31 - 1})
    assert largest.status_code == 200, largest.text


@pytest.mark.parametrize("metrics", ["", ","])
def test_an_evaluation_without_a_metric_is_refused_not_widened_to_every_model(web, metrics):
    """`metrics=` (or `,`) left no configuration, and the gateway scores every available model
    at its featured layers when given none: asked for pixels, it indexed and evaluated all the
    models of the catalogue."""
    with web.stream("GET", f"/api/datasets/{DATASET}/evaluate/events",
                    params={"models": "pixels", "metrics": metrics}) as answer:
        answer.read()
        assert answer.status_code == 422, answer.text[:300]
        error = answer.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "metrics" in error["message"], error


def test_a_body_that_is_no_json_names_the_body(web):
    """A malformed JSON body was a violation of the field "0" (the offset of the syntax error)."""
    answer = web.post(f"/api/datasets/{DATASET}/search", content=b"{not json",
                      headers={"Content-Type": "application/json"})
    error = violation(answer, 422, "body")
    assert error["message"].startswith("body: ")


def test_the_pages_scripts_and_styles_are_revalidated(web):
    """The page itself said `Cache-Control: no-cache`, but its script and stylesheet (same URLs
    in every release) said nothing, so a browser kept a heuristically fresh copy: after an
    upgrade, the new page ran with the old app.js."""
    for path in ("/", "/static/app.js", "/static/style.css"):
        answer = web.get(path)
        assert answer.status_code == 200 and answer.headers.get("cache-control") == "no-cache", (path, answer.headers)
    assert web.get("/static/nothing.js").status_code == 404


# ---- in a browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local stack with the web page; a dataset of 70 images indexed with pixels at 8x8, and
    only 10 of them at 16x16."""
    with LocalStack(tmp_path_factory.mktemp("review-data"), web=True) as running:
        with Client(running.gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
            client.create_dataset(DATASET)
            items = [(f"{label}/{image_id}", label, encode_png(pixels))
                     for image_id, label, pixels in fashion_mnist_sample(per_class=7)]
            list(client.ingest(DATASET, items[:10], [Configuration("pixels", ("8x8", "16x16"))]))
            list(client.ingest(DATASET, items[10:], [Configuration("pixels", ("8x8",))]))
        yield running


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


def loaded(driver, url: str, dataset: str = DATASET) -> None:
    driver.get(url)
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "the page to load")
    choose(driver, "dataset", dataset)
    choose(driver, "model", "pixels")
    choose(driver, "layer", "8x8")


@pytest.mark.slow
def test_another_layer_with_fewer_images_does_not_leave_the_grid_on_a_page_past_its_end(stack, browser):
    """The page number stayed when another layer was chosen: on page 2 of a layer of 70 images,
    a layer holding 10 showed "page 2 of 1", no images, and only ‹ previous to get them back."""
    driver = browser
    loaded(driver, stack.web_url)
    wait_for(driver, lambda d: text_of(d, "page-info").startswith("page 1 of 2") and len(tiles(d, "grid")) == 60,
             "the first page at 8x8")
    driver.find_element(By.ID, "next-page").click()
    wait_for(driver, lambda d: text_of(d, "page-info").startswith("page 2 of 2") and len(tiles(d, "grid")) == 10,
             "the second page at 8x8")
    choose(driver, "layer", "16x16")
    wait_for(driver, lambda d: d.find_element(By.ID, "grid").get_attribute("data-collection")
             == "pixels/16x16/avg/cosine", "the grid at 16x16")
    wait_for(driver, lambda d: text_of(d, "page-info").startswith("page 1 of 1"), "the last page there is", 10)
    assert len(tiles(driver, "grid")) == 10
    assert not driver.find_element(By.ID, "prev-page").is_enabled()


@pytest.mark.slow
def test_activation_maps_of_one_query_do_not_stay_under_another(stack, browser, tmp_path):
    """The activation maps were cleared for another dataset or configuration, but not for
    another query: after a new upload, the last image's maps stayed under "Activation maps"
    (and a slow answer for the last image was drawn under the new one)."""
    driver = browser
    loaded(driver, stack.web_url)
    wait_for(driver, lambda d: len(tiles(d, "grid")) == 60, "the dataset's images")
    driver.find_element(By.CSS_SELECTOR, "#grid .tile[data-id^='coat/']").click()
    wait_for(driver, lambda d: len(tiles(d, "results")) == 15, "the results")
    choose(driver, "model", "efficientnet_lite0")  # a CNN to look into; the query stays
    choose(driver, "layer", "_blocks.4._project_conv")
    driver.find_element(By.ID, "inspect-button").click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps figure img")) == 8, "the coat's maps")

    other = pathlib.Path(tmp_path) / "other.png"
    other.write_bytes(encode_png(fashion_mnist_sample(per_class=8)[7][2]))
    driver.find_element(By.ID, "upload").send_keys(str(other))  # not indexed under this model: refused
    wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), "the upload's error")
    assert not driver.find_elements(By.CSS_SELECTOR, "#query img")  # the failed upload is no query
    assert not driver.find_elements(By.CSS_SELECTOR, "#maps figure"), "the coat's maps under no query"
    assert not text_of(driver, "inspect-note")


@pytest.mark.slow
def test_another_layer_without_the_chosen_class_lists_all_its_images_as_the_filter_says(stack, browser):
    """The class filter fell back to "all" when the new layer's collection had no image of the
    chosen class, but the grid was still asked for that class: "all" over an empty grid."""
    driver = browser
    loaded(driver, stack.web_url)
    wait_for(driver, lambda d: "=coat" in [o.get_attribute("value") for o in
                                           Select(d.find_element(By.ID, "label-filter")).options], "the classes")
    choose(driver, "label-filter", "=coat")  # none of the 10 images indexed at 16x16 is a coat
    wait_for(driver, lambda d: len(tiles(d, "grid")) == 7, "the coats at 8x8")
    choose(driver, "layer", "16x16")
    wait_for(driver, lambda d: d.find_element(By.ID, "grid").get_attribute("data-collection")
             == "pixels/16x16/avg/cosine", "the grid at 16x16")
    wait_for(driver, lambda d: len(tiles(d, "grid")) == 10, "the images at 16x16", 10)
    assert Select(driver.find_element(By.ID, "label-filter")).first_selected_option.text == "all"
    assert "10 images" in text_of(driver, "page-info")
