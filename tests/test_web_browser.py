"""The web page in a real browser (headless Chromium from Debian, driven by Selenium) against the
whole local stack as processes, as `convsearch up` runs it: pick a dataset and a configuration,
index it from the page, click an image and get 15 results and a score, search with an uploaded
image, evaluate and draw the chart, draw the map and search from it, look at activation maps, and
read an error. Screenshots go to test-output/web/."""

import functools
import http.server
import os
import pathlib
import shutil
import threading
import urllib.parse

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from convsearch.client import Client
from convsearch.datasets import encode_png, fashion_mnist_sample
from convsearch.embedding import Configuration
from convsearch.local import LocalStack

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "web"
CHROMIUM = os.environ.get("CONVSEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CONVSEARCH_CHROMEDRIVER", "/usr/bin/chromedriver")
DATASET = "closet"
ODD = "odd"  # partly indexed, some items unlabeled, a label and ids that are HTML
LINK = '<a href="#clicked">click</a>'
PER_CLASS = 4
WAIT_S = 90
VICTIM = "victim.test"  # the page's name on a LAN (plain HTTP, not localhost: no Fetch Metadata)
ATTACKER = "attacker.test"  # another site a visitor has open; both resolve to 127.0.0.1 in the browser


def browser_paths() -> tuple[str, str]:
    """Chromium and its driver; a failure (never a skip) naming the packages when either is missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    assert not missing, (f"{', '.join(missing)} not found: install Debian's chromium and chromium-driver "
                         "(scripts/setup.sh does as root)")
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local stack with the web page, and a labeled dataset of 40 images, not yet indexed."""
    with pytest.MonkeyPatch.context() as env:  # the services start in __init__, with this environment
        env.setenv("CONVSEARCH_WEB_ALLOWED_HOSTS", VICTIM)
        running = LocalStack(tmp_path_factory.mktemp("data"), web=True)
    with running:
        with Client(running.gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
            client.create_dataset(DATASET, "for the browser test")
            items = [(f"{label}/{image_id}", label, encode_png(pixels))
                     for image_id, label, pixels in fashion_mnist_sample(per_class=PER_CLASS)]
            assert all(r.status != "failed" for r in client.ingest(DATASET, items))
        yield running


def headless_chromium(*arguments: str) -> webdriver.Chrome:
    """Debian's chromium, headless, through chromedriver, with these further arguments."""
    chromium, chromedriver = browser_paths()
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600",
                     "--disable-gpu", *arguments):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(f"--host-resolver-rules=MAP {VICTIM} 127.0.0.1, MAP {ATTACKER} 127.0.0.1")
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    """Waits until condition(driver) is truthy; on a timeout fails with the page's error banner."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(SHOTS / "failure.png"))
        banner = driver.find_element(By.ID, "error-text").text
        pytest.fail(f"waited {timeout:.0f} s for {what}; error shown: {banner or '(none)'}")


def shoot(driver, name: str, element_id: str = "") -> None:
    """A screenshot of the window, or of one section, under test-output/web/."""
    path = str(SHOTS / f"{name}.png")
    if element_id:
        element = driver.find_element(By.ID, element_id)
        driver.execute_script("arguments[0].scrollIntoView(true)", element)
        element.screenshot(path)
    else:
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(path)


def tiles(driver, container: str):
    return driver.find_elements(By.CSS_SELECTOR, f"#{container} .tile")


def choose(driver, select_id: str, value: str) -> None:
    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def no_error(driver) -> None:
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error-text").text


def odd_dataset(gateway: str) -> list[str]:
    """ODD: five items, three of them indexed with pixels at 8x8 (one unlabeled, two labeled
    LINK), two not yet; the ids are HTML too. Returns the ids."""
    images = fashion_mnist_sample(per_class=1)
    ids = [f"<b>{n}</b>{image_id}" for n, (image_id, _, _) in enumerate(images[:5])]
    items = [(item_id, "" if n in (0, 3) else LINK, encode_png(images[n][2])) for n, item_id in enumerate(ids)]
    with Client(gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        client.create_dataset(ODD)
        list(client.ingest(ODD, items[:3], [Configuration("pixels", ("8x8",))]))
        list(client.ingest(ODD, items[3:]))
    return ids


def options(driver, select_id: str) -> list[str]:
    return [o.get_attribute("value") for o in Select(driver.find_element(By.ID, select_id)).options]


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def slow_first(driver, path_end: str, delay_ms: int = 1500) -> None:
    """Delays the page's next request whose URL ends with path_end: its answer comes after later ones."""
    driver.execute_script("""
        const [end, delay] = arguments, real = window.fetch;
        let slowed = false;
        window.fetch = (url, options) => {
          if (slowed || !String(url).endsWith(end)) return real(url, options);
          slowed = true;
          return new Promise((done) => setTimeout(done, delay)).then(() => real(url, options));
        };""", path_end, delay_ms)


def test_the_playground_in_a_browser(stack, browser, tmp_path):
    driver = browser
    odd_ids = odd_dataset(stack.gateway)
    driver.get(stack.web_url)
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "the page to load")
    no_error(driver)

    # A dataset and a configuration not indexed yet: the page says so, and indexes it with a progress bar.
    choose(driver, "dataset", DATASET)
    wait_for(driver, lambda d: "Index" in d.find_element(By.ID, "grid-note").text, "the not-indexed note")
    choose(driver, "model", "pixels")
    choose(driver, "metric", "cosine")
    # While the page's job runs, it cannot start another (two ran at once and embedded everything twice).
    assert driver.execute_async_script("""
        const [button, done] = arguments;
        button.click();
        setTimeout(() => done(button.disabled), 0);""", driver.find_element(By.ID, "index-button"))
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs .job progress"), "a progress bar")
    wait_for(driver, lambda d: len(tiles(d, "grid")) == 10 * PER_CLASS, "the dataset's images after indexing")
    assert "✓" in Select(driver.find_element(By.ID, "layer")).first_selected_option.text
    choose(driver, "layer", "16x16")
    wait_for(driver, lambda d: d.find_element(By.ID, "grid").get_attribute("data-collection")
             == "pixels/16x16/avg/cosine", "the grid at 16x16")
    assert len(tiles(driver, "grid")) == 10 * PER_CLASS
    wait_for(driver, lambda d: d.find_element(By.ID, "index-button").is_enabled(), "Index enabled after the job")
    shoot(driver, "1-dataset")

    # Two quick clicks: only the second image's results show, even when the first one's answer comes last.
    slow_first(driver, "/search")
    driver.find_element(By.CSS_SELECTOR, "#grid .tile[data-id^='coat/']").click()
    driver.find_element(By.CSS_SELECTOR, "#grid .tile[data-id^='bag/']").click()
    wait_for(driver, lambda d: "(bag)" in text_of(d, "score"), "the second image's results")
    driver.execute_script("return new Promise((done) => setTimeout(done, 2000))")  # the first answer has come
    assert "(bag)" in text_of(driver, "score") and "bag/" in text_of(driver, "query")
    assert driver.find_element(By.CSS_SELECTOR, "#query img").get_attribute("alt").startswith("query: bag/")

    # Click an image: its 15 nearest, marked, and its search score.
    driver.find_element(By.CSS_SELECTOR, "#grid .tile[data-id^='coat/']").click()
    wait_for(driver, lambda d: len(tiles(d, "results")) == 15, "15 results")
    wait_for(driver, lambda d: "Search score" in d.find_element(By.ID, "score").text, "the search score")
    score = driver.find_element(By.ID, "score").text
    assert "/ 15 results in the same category (coat)" in score
    marked = driver.find_elements(By.CSS_SELECTOR, "#results .result.same, #results .result.other")
    assert len(marked) == 15
    assert text_of(driver, "results-collection") == "Results from pixels/16x16/avg/cosine"
    shoot(driver, "2-search", "search")

    # Another layer: the query is searched again under it, and the results say which collection gave them.
    choose(driver, "layer", "8x8")
    wait_for(driver, lambda d: text_of(d, "results-collection") == "Results from pixels/8x8/avg/cosine",
             "the results at 8x8")
    assert len(tiles(driver, "results")) == 15
    choose(driver, "layer", "16x16")
    wait_for(driver, lambda d: text_of(d, "results-collection") == "Results from pixels/16x16/avg/cosine",
             "the results at 16x16")

    # Upload an image to search with it (no class, so no score).
    query = tmp_path / "query.png"
    query.write_bytes(encode_png(fashion_mnist_sample(per_class=PER_CLASS + 1)[PER_CLASS][2]))
    driver.find_element(By.ID, "upload").send_keys(str(query))
    wait_for(driver, lambda d: "uploaded image" in d.find_element(By.ID, "score").text, "the upload's results")
    assert len(tiles(driver, "results")) == 15
    shoot(driver, "3-upload", "search")
    driver.execute_script("document.getElementById('score').textContent = ''")
    driver.find_element(By.ID, "upload").send_keys(str(query))  # the same file again searches again
    wait_for(driver, lambda d: "uploaded image" in d.find_element(By.ID, "score").text, "the same file's results")

    # A file that is no image: the message names the upload, and no broken query nor old results stay.
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"not an image at all")
    driver.find_element(By.ID, "upload").send_keys(str(not_image))
    wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), "the upload's error")
    assert "the uploaded file is not a recognised image" in text_of(driver, "error-text")
    wait_for(driver, lambda d: not tiles(d, "results"), "the results cleared")
    assert not driver.find_elements(By.CSS_SELECTOR, "#query img") and not text_of(driver, "score")
    driver.execute_script("document.getElementById('error-close').click()")  # under the sticky controls

    # Evaluate from the page: the per-layer chart of the mean search score.
    driver.find_element(By.ID, "evaluate-button").click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart-layers .bars .point")) >= 4,
             "the chart's bars")
    assert "Best: pixels" in driver.find_element(By.ID, "compare-note").text
    shoot(driver, "4-compare", "compare")

    # The map, coloured by class; hovering shows the image, clicking searches with it.
    driver.find_element(By.ID, "map-button").click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#map .scatterlayer .point")) == 10 * PER_CLASS,
             "the map's points")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#map .legend .traces")) == 10
    point = driver.find_elements(By.CSS_SELECTOR, "#map .scatterlayer .point")[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", point)
    ActionChains(driver).move_to_element(point).perform()
    wait_for(driver, lambda d: d.find_element(By.ID, "hover-thumb").is_displayed(), "the hover thumbnail", 15)
    shoot(driver, "5-map", "map-section")
    ActionChains(driver).move_to_element(point).click().perform()
    wait_for(driver, lambda d: "Search score" in d.find_element(By.ID, "score").text, "a search from the map")

    # Activation maps of the query at a layer of a CNN.
    choose(driver, "model", "efficientnet_lite0")
    choose(driver, "layer", "_blocks.4._project_conv")
    driver.find_element(By.ID, "inspect-button").click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#maps figure img")) == 8, "activation maps")
    shoot(driver, "6-inspect", "inspect")

    # An error is a readable message: a map of a configuration that is not indexed.
    driver.find_element(By.ID, "map-button").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "error").is_displayed(), "the error banner")
    assert "HTTP 404" in driver.find_element(By.ID, "error-text").text
    shoot(driver, "7-error")
    severe = [entry for entry in driver.get_log("browser")
              if entry["level"] == "SEVERE" and "status of 40" not in entry["message"]]
    assert not severe, severe
    driver.execute_script("document.getElementById('error-close').click()")  # under the sticky controls
    odd_dataset_on_the_page(driver, stack, odd_ids)


def odd_dataset_on_the_page(driver, stack, ids: list[str]) -> None:
    """Another dataset: nothing of the last one's query stays; a partly indexed layer says so; an
    unlabeled item is no upload; ids and labels are text, never HTML; a deleted dataset goes."""
    choose(driver, "dataset", ODD)
    wait_for(driver, lambda d: len(tiles(d, "grid")) == 3, "the odd dataset's indexed images")
    assert not tiles(driver, "results") and not text_of(driver, "score") and not text_of(driver, "maps")
    assert not driver.find_elements(By.CSS_SELECTOR, "#query img, #chart-query .bars, #map .point")
    assert Select(driver.find_element(By.ID, "layer")).first_selected_option.text == "8x8 (partial)"
    assert "partial: 3 of 5" in text_of(driver, "config-note")
    classes = {o.text: o.get_attribute("value") for o in Select(driver.find_element(By.ID, "label-filter")).options}
    assert set(classes) == {"all", "(no label)", LINK}
    choose(driver, "label-filter", classes["(no label)"])
    wait_for(driver, lambda d: d.execute_script("return [...document.querySelectorAll('#grid .tile')]"
                                                ".map((t) => t.dataset.id)") == [ids[0]], "the unlabeled item")
    tiles(driver, "grid")[0].click()
    wait_for(driver, lambda d: "no label, so no search score" in text_of(d, "score"), "the unlabeled item's results")

    choose(driver, "map-method", "pca")
    driver.find_element(By.ID, "map-button").click()
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#map .scatterlayer .point")) == 3, "the odd map")
    legend = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#map .legend .traces")]
    assert LINK in legend and not driver.find_elements(By.CSS_SELECTOR, "#map .legend a, #map .legend b"), legend

    with Client(stack.gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        client.delete_dataset(ODD)
    driver.find_element(By.ID, "map-button").click()
    wait_for(driver, lambda d: ODD not in options(d, "dataset"), "the deleted dataset gone")
    wait_for(driver, lambda d: tiles(d, "grid"), "another dataset's images")


def test_without_the_model_catalogue_the_page_shows_the_datasets(stack, browser):
    """With the extractor down, /api/models failed and so did the whole page: no dataset listed."""
    driver = browser
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/api/models"]})
    try:
        driver.get(stack.web_url)
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "the page")
        assert "The models could not be listed" in text_of(driver, "error-text")
        choose(driver, "dataset", DATASET)
        wait_for(driver, lambda d: "pixels ✓" in [o.text for o in Select(d.find_element(By.ID, "model")).options],
                 "the dataset's indexed models")
        wait_for(driver, lambda d: len(tiles(d, "grid")) == 10 * PER_CLASS, "the dataset's images")
    finally:
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})


@pytest.fixture
def attacker_site(tmp_path):
    """Serves tmp_path as another site on a free port; yields its folder and port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_another_sites_page_cannot_index_frame_the_page_or_rebind_its_name(stack, browser, attacker_site):
    """With the page reached over plain HTTP by a host name, the browser sends no Sec-Fetch-Site:
    an <img> of the events URL on another site's page started indexing, the page could be framed
    (clickjacking), and a name of the attacker's resolving to the service read its API."""
    driver = browser
    port = urllib.parse.urlsplit(stack.web_url).port
    victim = f"http://{VICTIM}:{port}"
    driver.get(f"{victim}/")  # the page itself works under the name it was told
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "the page to load")
    no_error(driver)

    folder, attacker_port = attacker_site
    events = f"{victim}/api/datasets/{DATASET}/index/events?model=pixels&amp;layers=64x64&amp;metric=manhattan"
    (folder / "page.html").write_text(f'<img src="{events}"><iframe id="frame" src="{victim}/"></iframe>')
    driver.get(f"http://{ATTACKER}:{attacker_port}/page.html")
    wait_for(driver, lambda d: d.execute_script("return document.readyState") == "complete", "the attacker's page")
    with Client(stack.gateway, tls_ca="", tls_cert="", tls_key="", api_key="") as client:
        assert not [c.name for c in client.dataset(DATASET).collections if c.name.endswith("/manhattan")]
    driver.switch_to.frame("frame")
    framed = driver.execute_script("return [location.href, document.title]")
    assert framed[1] != "ConvNet Search playground", framed  # the browser refused to show it in a frame
    driver.switch_to.default_content()

    driver.get(f"http://{ATTACKER}:{port}/api/datasets")  # DNS rebinding: the attacker's name, the service's address
    assert "HOST_NOT_ALLOWED" in driver.page_source and DATASET not in driver.page_source
