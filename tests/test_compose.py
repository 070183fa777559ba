"""The deployment as an operator runs it: docker-compose.yml validates; and (marked `docker`,
run by `make compose-test`) the real stack: images built by scripts/images.sh, `up`, the demo
against it, the extractor scaled to 2 with both replicas serving, the index restarted with its
data intact on the volume, two index followers (docker-compose.replicas.yml) answering the
gateway's searches, a graceful stop, and everything cleaned up."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from convsearch.client import Client
from convsearch.embedding import Configuration

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = "convsearch-compose-test"
GATEWAY = "127.0.0.1:50051"
WEB = "http://127.0.0.1:8080"
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


MTLS_FILES = ["docker-compose.yml", "docker-compose.mtls.yml"]
API_KEYS_FILES = [*MTLS_FILES, "docker-compose.api-keys.yml"]
HEALTH_NAMES = {"gateway": "convsearch.gateway.v1.GatewayService",
                "extractor": "convsearch.extractor.v1.ExtractorService",
                "index": "convsearch.index.v1.IndexService"}
PORTS = {"gateway": 50051, "extractor": 50052, "index": 50053}


def merged_config(files: list[str]) -> dict:
    """`docker-compose -f A -f B ... config` (validated first with -q), parsed."""
    options = [word for name in files for word in ("-f", name)]
    check = subprocess.run(["docker-compose", *options, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    result = subprocess.run(["docker-compose", *options, "config"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _mounts(service: dict) -> dict[str, str]:
    """Bind mounts and volumes by container path: the source and the mode ("ro" or "rw")."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":") if isinstance(volume, str) else (
            volume["source"], volume["target"], "ro" if volume.get("read_only") else "rw")
        found[target] = (source, (mode or ["rw"])[0])
    return found


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by set-up as root")
def test_the_default_stack_stays_plaintext():
    services = merged_config(["docker-compose.yml"])["services"]
    assert set(services) == {"gateway", "extractor", "index", "web"}
    for name, service in services.items():
        assert not [key for key in service["environment"] if "TLS" in key or "API_KEYS" in key], name
        assert "/certs" not in _mounts(service), name
        assert "--tls-ca" not in service["healthcheck"]["test"], name


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by set-up as root")
def test_the_mtls_override_turns_on_mutual_tls_to_the_backends_and_tls_at_the_gateway():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import dev_certs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    merged = merged_config(MTLS_FILES)["services"]
    assert set(merged) == {"gateway", "extractor", "index", "web"}
    # The web page is a client of the gateway: TLS to its API, verified against the CA.
    assert merged["web"]["environment"]["CONVSEARCH_WEB_TLS_CA"] == "/certs/ca.crt"
    assert _mounts(merged["web"])["/certs"] == (str(ROOT / "build" / "certs"), "ro")
    services = {name: service for name, service in merged.items() if name != "web"}
    written = {f"/certs/{stem}{suffix}" for stem in (*dev_certs.SERVER_NAMES, dev_certs.CLIENT)
               for suffix in (".crt", ".key")} | {"/certs/ca.crt"}
    for name, service in services.items():
        env = service["environment"]
        source, mode = _mounts(service)["/certs"]
        assert pathlib.Path(source) == ROOT / "build" / "certs" and mode == "ro", (name, source, mode)
        prefix = f"CONVSEARCH_{name.upper()}_"
        assert env[prefix + "TLS_CERT"] == f"/certs/{name}.crt" and env[prefix + "TLS_KEY"] == f"/certs/{name}.key"
        # The healthcheck speaks TLS, with a certificate of the CA the service trusts.
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "convsearch"], test
        health = test.index("health")
        options = dict(zip(test[2:health:2], test[3:health:2], strict=True))
        assert set(options) == {"--tls-ca", "--tls-cert", "--tls-key"}, test
        assert set(options.values()) <= written, options
        assert options["--tls-ca"] == "/certs/ca.crt"
        assert test[health + 1:] == [f"127.0.0.1:{PORTS[name]}", HEALTH_NAMES[name]], test
        if name != "gateway":  # the backends accept only clients with a certificate of the CA
            assert env[prefix + "TLS_CLIENT_CA"] == "/certs/ca.crt"
            assert options["--tls-cert"] == env[prefix + "TLS_CERT"]
    gateway = services["gateway"]["environment"]
    assert gateway["CONVSEARCH_GATEWAY_BACKEND_TLS_CA"] == "/certs/ca.crt"
    assert gateway["CONVSEARCH_GATEWAY_BACKEND_TLS_CERT"] == "/certs/gateway-client.crt"
    assert gateway["CONVSEARCH_GATEWAY_BACKEND_TLS_KEY"] == "/certs/gateway-client.key"
    assert not gateway.get("CONVSEARCH_GATEWAY_BACKEND_TLS_SERVER_NAME")
    # The backends' certificates name the hosts the gateway dials (their compose service names).
    assert gateway["CONVSEARCH_GATEWAY_EXTRACTOR"] == "dns:///extractor:50052"
    assert gateway["CONVSEARCH_GATEWAY_INDEX"] == "index:50053"
    assert "extractor" in dev_certs.SERVER_NAMES["extractor"] and "index" in dev_certs.SERVER_NAMES["index"]
    # Nothing else changed: same services, ports, volumes and start-up order as the default stack.
    plain = merged_config(["docker-compose.yml"])["services"]
    for name, service in services.items():
        for field in ("image", "ports", "expose", "depends_on", "stop_grace_period", "restart"):
            assert service.get(field) == plain[name].get(field), (name, field)
        assert {k: v for k, v in service["environment"].items() if k in plain[name]["environment"]} == \
            plain[name]["environment"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by set-up as root")
def test_the_api_keys_override_points_the_gateway_at_a_mounted_keys_file():
    services = merged_config(API_KEYS_FILES)["services"]
    env = services["gateway"]["environment"]
    keys = pathlib.PurePosixPath(env["CONVSEARCH_GATEWAY_API_KEYS"])
    source, mode = _mounts(services["gateway"])[str(keys.parent)]  # the folder: a renamed file is seen
    assert pathlib.Path(source) == ROOT / "build" / "api-keys" and mode == "ro"
    assert env["CONVSEARCH_GATEWAY_TLS_CERT"], "keys go over TLS only"
    for name in ("extractor", "index"):
        assert not [key for key in services[name]["environment"] if "API_KEYS" in key]


REPLICAS_FILES = ["docker-compose.yml", "docker-compose.replicas.yml"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by set-up as root")
def test_the_replicas_override_adds_scalable_index_followers_and_points_the_gateway_at_them():
    merged, default = merged_config(REPLICAS_FILES), merged_config(["docker-compose.yml"])
    services, plain = merged["services"], default["services"]
    assert set(services) == set(plain) | {"index-read"} and "index-read" not in plain
    follower, index = services["index-read"], plain["index"]
    # The index's image and settings, following the index by its compose name.
    assert follower["image"] == index["image"]
    assert follower["environment"] == {**index["environment"], "CONVSEARCH_INDEX_FOLLOW": "index:50053"}
    assert follower["environment"]["CONVSEARCH_INDEX_DATA_DIR"] == "/data"
    # Scalable (--scale index-read=N): nothing a second replica would collide on, no named volume
    # (each replica its own copy, made again when recreated), no published port.
    assert not follower.get("volumes") and merged["volumes"] == default["volumes"]
    assert not follower.get("ports") and "container_name" not in follower
    assert set(follower["expose"]) == {str(PORTS["index"]), "9053"}
    # Healthy once its first copy is served; started after the index is healthy.
    assert follower["depends_on"] == {"index": {"condition": "service_healthy"}}
    assert follower["healthcheck"]["test"] == ["CMD", "convsearch", "health", f"127.0.0.1:{PORTS['index']}",
                                               HEALTH_NAMES["index"]]
    assert follower["healthcheck"]["start_period"] not in (None, "0s")
    assert follower["stop_grace_period"] == index["stop_grace_period"]
    # The gateway reads from every replica (round_robin over the name's addresses); nothing else changed.
    gateway = services["gateway"]["environment"]
    assert gateway == {**plain["gateway"]["environment"], "CONVSEARCH_GATEWAY_INDEX_REPLICAS": "dns:///index-read:50053"}
    for name, service in plain.items():
        if name != "gateway":
            assert services[name] == service, name
    assert {k: v for k, v in services["gateway"].items() if k != "environment"} == \
        {k: v for k, v in plain["gateway"].items() if k != "environment"}


def wait_healthy(service: str, count: int = 1, timeout_s: float = 600, files: tuple[str, ...] = ()) -> list[str]:
    """The service's containers once `count` of them are healthy; `files`: -f options of an override."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids = compose(*files, "ps", "-q", service).split()
        states = [subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", i], capture_output=True,
                                 text=True).stdout.strip() for i in ids]
        if len(ids) == count and all(state == "healthy" for state in states):
            return ids
        if time.monotonic() > deadline:
            raise AssertionError(f"{service}: {states} after {timeout_s}s\n"
                                 f"{compose(*files, 'logs', '--tail=50', service)}")
        time.sleep(2)


def metric(container: str, port: int, pattern: str) -> float:
    """A value from a container's /metrics (the services' ports are not published)."""
    script = ("import urllib.request; "
              f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())")
    metrics = subprocess.run(["docker", "exec", container, "python3", "-c", script], capture_output=True,
                             text=True, check=True).stdout
    return float(re.search(pattern, metrics, re.M).group(1))


def images_embedded(container: str) -> float:
    return metric(container, 9052, r"^convsearch_extractor_images_total (\S+)$")


@pytest.fixture(scope="module")
def stack():
    subprocess.run(["bash", "scripts/docker_daemon.sh"], cwd=ROOT, check=True, timeout=120)
    subprocess.run(["bash", "scripts/images.sh"], cwd=ROOT, check=True, timeout=3600)
    compose("down", "-v", "--remove-orphans", check=False)
    try:
        compose("up", "-d")
        wait_healthy("gateway")
        yield
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "60", check=False)
        # The build stages (the extractor's holds every wheel: ~9 GB) would pile up run after run.
        subprocess.run(["docker", "image", "prune", "--force"], capture_output=True, check=False)


@pytest.mark.docker
def test_the_stack_runs_scales_keeps_its_data_and_stops_cleanly(stack):
    demo = subprocess.run([CONVSEARCH, "--gateway", GATEWAY, "demo"], capture_output=True, text=True, timeout=1200)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "best layer: _conv_head" in demo.stdout
    # The web page serves, and lists what the demo stored through the gateway.
    wait_healthy("web")
    page = urllib.request.urlopen(f"{WEB}/", timeout=10).read().decode()
    assert "<html" in page.lower() and "/vendor/plotly.min.js" in page
    listed = json.loads(urllib.request.urlopen(f"{WEB}/api/datasets", timeout=30).read())
    assert "fashion200" in [dataset["name"] for dataset in listed]

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

    # Two followers copy the index; the gateway, recreated with the override, searches through them.
    replicas = tuple(word for name in REPLICAS_FILES for word in ("-f", name))
    compose(*replicas, "up", "-d", "--scale", "extractor=2", "--scale", "index-read=2")
    wait_healthy("index-read", count=2, files=replicas)
    [gateway] = wait_healthy("gateway", files=replicas)
    with Client(GATEWAY) as client:
        for _ in range(5):
            replicated = client.search("fashion200", item_id="bag/t10k-00018", configuration=config, k=15)
            assert [h.id for h in replicated.hits] == [h.id for h in before.hits]
    assert metric(gateway, 9051, r'^convsearch_gateway_index_reads_total\{by="follower"\} (\S+)$') >= 5

    containers = compose(*replicas, "ps", "-q").split()
    compose(*replicas, "stop", "--timeout", "60")
    codes = {c: subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", c], capture_output=True,
                               text=True).stdout.strip() for c in containers}
    assert set(codes.values()) == {"0"}, codes
