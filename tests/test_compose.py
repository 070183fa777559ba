"""The deployment as an operator runs it: docker-compose.yml validates; and (marked `docker`,
run by `make compose-test`) the real stack: images built by scripts/images.sh, `up`, the demo
against it, the extractor scaled to 2 with both replicas serving, the index restarted with its
data intact on the volume, a graceful stop, and everything cleaned up."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from convsearch.client import Client
from convsearch.embedding import Configuration

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = "convsearch-compose-test"
GATEWAY = "127.0.0.1:50051"
CONVSEARCH = os.path.join(os.path.dirname(sys.executable), "convsearch")


def compose(*args: str, timeout: float = 600, check: bool = True) -> str:
    result = subprocess.run(["docker-compose", "-p", PROJECT, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by set-up as root")
def test_the_compose_file_validates():
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    config = subprocess.run(["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "dns:///extractor:50052" in config and "index-data:/data" in config.replace(" ", "")


def wait_healthy(service: str, count: int = 1, timeout_s: float = 600) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        ids = compose("ps", "-q", service).split()
        states = [subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", i], capture_output=True,
                                 text=True).stdout.strip() for i in ids]
        if len(ids) == count and all(state == "healthy" for state in states):
            return ids
        if time.monotonic() > deadline:
            raise AssertionError(f"{service}: {states} after {timeout_s}s\n{compose('logs', '--tail=50', service)}")
        time.sleep(2)


def images_embedded(container: str) -> float:
    script = ("import urllib.request; "
              "print(urllib.request.urlopen('http://127.0.0.1:9052/metrics', timeout=5).read().decode())")
    metrics = subprocess.run(["docker", "exec", container, "python3", "-c", script], capture_output=True,
                             text=True, check=True).stdout
    return float(re.search(r"^convsearch_extractor_images_total (\S+)$", metrics, re.M).group(1))


@pytest.fixture(scope="module")
def stack():
    subprocess.run(["bash", "scripts/docker_daemon.sh"], cwd=ROOT, check=True, timeout=120)
    subprocess.run(["bash", "scripts/images.sh"], cwd=ROOT, check=True, timeout=3600)
    compose("down", "-v", check=False)
    try:
        compose("up", "-d")
        wait_healthy("gateway")
        yield
    finally:
        compose("down", "-v", "--timeout", "60", check=False)


@pytest.mark.docker
def test_the_stack_runs_scales_keeps_its_data_and_stops_cleanly(stack):
    demo = subprocess.run([CONVSEARCH, "--gateway", GATEWAY, "demo"], capture_output=True, text=True, timeout=1200)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "best layer: _conv_head" in demo.stdout

    compose("up", "-d", "--scale", "extractor=2", "--no-recreate")
    extractors = wait_healthy("extractor", count=2)
    with Client(GATEWAY) as client:
        query = (ROOT / "datasets/fashion200/bag").glob("*.png").__next__().read_bytes()
        config = Configuration("efficientnet_lite0", ("_conv_head",))
        deadline = time.monotonic() + 180  # connections are recycled every 30 s: the new replica joins
        while min(images_embedded(c) for c in extractors) == 0 and time.monotonic() < deadline:
            for _ in range(20):
                client.search("fashion200", image=query, configuration=config, k=5)
        assert min(images_embedded(c) for c in extractors) > 0, [images_embedded(c) for c in extractors]
        before = client.search("fashion200", item_id="bag/t10k-00018", configuration=config, k=15)
        count = client.dataset("fashion200").item_count

    compose("restart", "index")
    wait_healthy("index")
    wait_healthy("gateway")
    with Client(GATEWAY) as client:
        after = client.search("fashion200", item_id="bag/t10k-00018", configuration=config, k=15)
        assert client.dataset("fashion200").item_count == count == 200
    assert [h.id for h in after.hits] == [h.id for h in before.hits]

    containers = compose("ps", "-q").split()
    compose("stop", "--timeout", "60")
    codes = {c: subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", c], capture_output=True,
                               text=True).stdout.strip() for c in containers}
    assert set(codes.values()) == {"0"}, codes
