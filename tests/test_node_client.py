"""The Node.js example client (examples/node/client.js) against the real services, as a user runs
it: loading the repository's protos/ at run time, against an open gateway and against one that
requires API keys. It keeps the example working and shows the public API usable from another
language (streams, optional fields, timestamps, metadata)."""

import contextlib
import datetime
import json
import os
import pathlib
import shutil
import subprocess

import pytest

from convsearch.api_keys import key_line, new_key
from tests.conftest import running_backends, running_gateway

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
TIMEOUT_S = 300  # the first run loads the model on CPU


def node() -> str:
    """The node executable. Called in each test so that a missing one fails it: a broken set-up,
    not a reason to skip."""
    executable = shutil.which("node")
    if executable is None:
        pytest.fail("node is missing: install Node.js 18 or later, then run scripts/setup.sh")
    if not all((EXAMPLE / "node_modules" / "@grpc" / name).is_dir() for name in ("grpc-js", "proto-loader")):
        pytest.fail("examples/node/node_modules is missing: run scripts/setup.sh (npm ci --prefix examples/node)")
    return executable


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    with running_backends(tmp_path_factory.mktemp("index")) as addresses:
        yield addresses


@contextlib.contextmanager
def gateway(backends, **overrides):
    """The address of a gateway over the backends."""
    with running_gateway(*backends, **overrides) as (_, _, address):
        yield address


@pytest.fixture(scope="module")
def images(tmp_path_factory, chelsea_jpeg, coffee_jpeg) -> list[str]:
    """Arguments of the client: two identical labeled images and an unlabeled one."""
    folder = tmp_path_factory.mktemp("images")
    for name, data in (("chelsea", chelsea_jpeg), ("chelsea2", chelsea_jpeg), ("coffee", coffee_jpeg)):
        (folder / f"{name}.jpg").write_bytes(data)
    return [f"cat={folder / 'chelsea.jpg'}", f"cat={folder / 'chelsea2.jpg'}", str(folder / "coffee.jpg")]


def run_client(executable: str, address: str, dataset: str, images: list[str],
               **env: str) -> subprocess.CompletedProcess:
    # Nothing from the caller's environment (a CONVSEARCH_API_KEY, say) may change what is tested.
    clean = {name: value for name, value in os.environ.items() if not name.startswith("CONVSEARCH_")}
    return subprocess.run([executable, str(EXAMPLE / "client.js"), dataset, *images], cwd=EXAMPLE, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env={**clean, "CONVSEARCH_GATEWAY": address, **env})


def check_summary(run: subprocess.CompletedProcess, dataset: str) -> dict:
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["dataset"] == dataset
    assert [(r["id"], r["status"]) for r in summary["ingested"]] == [
        ("chelsea", "INGEST_STATUS_STORED"), ("chelsea2", "INGEST_STATUS_STORED"), ("coffee", "INGEST_STATUS_STORED")]
    assert summary["indexed"] == 3
    # By id: the query item is left out; its identical twin comes first.
    assert [hit["id"] for hit in summary["by_id"]] == ["chelsea2", "coffee"]
    assert summary["by_id"][0]["label"] == "cat" and summary["by_id"][1]["label"] == ""
    assert 0 <= summary["search_score"] <= 100  # an optional field, set for a labeled stored query
    # By image: the identical images first, at (almost) no distance.
    assert {hit["id"] for hit in summary["by_image"][:2]} == {"chelsea", "chelsea2"}
    assert summary["by_image"][0]["distance"] < 1e-3
    assert all(hit["distance"] >= 0 for hit in summary["by_id"] + summary["by_image"])
    assert summary["image"]["mime_type"] in ("image/jpeg", "image/png")
    assert max(summary["image"]["width"], summary["image"]["height"]) == 64 and summary["image"]["bytes"] > 0
    created = datetime.datetime.fromisoformat(summary["create_time"])
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 600
    return summary


def test_the_example_runs_against_an_open_gateway(backends, images, tmp_path):
    """With the two .proto files a client needs, and the default configuration: the extractor's
    default model, searched at its last featured layer."""
    for proto in ("convsearch/gateway/v1/gateway.proto", "convsearch/common/v1/common.proto"):
        (tmp_path / proto).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "protos" / proto, tmp_path / proto)
    with gateway(backends) as address:
        run = run_client(node(), address, "node-open", images, CONVSEARCH_PROTOS=str(tmp_path))
        summary = check_summary(run, "node-open")
    assert summary["collection"].startswith("efficientnet_lite0/")


def test_the_example_sends_its_api_key(backends, images, tmp_path):
    executable = node()
    key = new_key()
    keys = tmp_path / "keys"
    keys.write_text(key_line(key, "admin", comment="node example") + "\n")
    with gateway(backends, api_keys=str(keys)) as address:
        refused = run_client(executable, address, "node-keyed", images)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
        assert not refused.stdout
        layer = {"CONVSEARCH_MODEL": "efficientnet_lite0", "CONVSEARCH_LAYER": "_conv_head"}
        summary = check_summary(run_client(executable, address, "node-keyed", images, CONVSEARCH_API_KEY=key, **layer),
                                "node-keyed")
    assert summary["collection"].startswith("efficientnet_lite0/_conv_head/")
