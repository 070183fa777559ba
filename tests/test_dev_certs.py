"""scripts/dev_certs.py: the throwaway CA and certificates for docker-compose.mtls.yml and the
Kubernetes mtls overlay. The certificates name every host the gateway dials (compose and Kubernetes
names), and they really work: an index serving mutual TLS with them accepts the gateway's client
certificate and its own (the healthcheck's), and refuses a client without one."""

import datetime
import ipaddress
import pathlib
import stat
import subprocess
import sys

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.channels import create_channel
from convsearch.cli import main as cli_main
from convsearch.health import wait_until_serving
from convsearch.tls import ENV_CA, ENV_CERT, ENV_KEY, channel_credentials
from convsearch_index.config import IndexConfig
from convsearch_index.server import SERVICE_NAME as INDEX_SERVICE
from convsearch_index.server import build_server as build_index

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dev_certs.py"
# Every name a client dials a service by: compose service names, Kubernetes Service / pod names,
# and the healthchecks' own address.
HOSTS = {
    "gateway": ["gateway", "convsearch-gateway", "localhost"],
    "extractor": ["extractor", "convsearch-extractor", "localhost"],
    "index": ["index", "convsearch-index-0.convsearch-index", "localhost"],
    "index-read": ["index-read", "convsearch-index-read", "localhost"],
}


@pytest.fixture(autouse=True)
def no_tls_environment(monkeypatch):
    for name in (ENV_CA, ENV_CERT, ENV_KEY):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("certs") / "certs"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--days", "2"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "convsearch-index-tls" in result.stdout  # the kubectl commands for the overlay's Secrets
    assert "convsearch-index-read-tls" in result.stdout
    return out


def load(path: pathlib.Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_writes_the_ca_and_a_certificate_and_key_per_service_but_not_the_ca_key(certs):
    names = sorted(path.name for path in certs.iterdir())
    assert names == sorted(["ca.crt"] + [f"{stem}.{ext}" for stem in ("gateway", "extractor", "index", "index-read",
                                                                               "gateway-client")
                                         for ext in ("crt", "key")])
    for path in certs.iterdir():  # the containers' user (uid 10001) reads them through a bind mount
        assert stat.S_IMODE(path.stat().st_mode) & 0o004, path.name
    ca = load(certs / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    for path in certs.glob("*.crt"):
        certificate = load(path)
        assert certificate.issuer == ca.subject, path.name
        assert certificate.not_valid_after_utc - now < datetime.timedelta(days=3), path.name  # --days 2


def test_server_certificates_name_every_host_they_are_dialled_by(certs):
    for service, hosts in HOSTS.items():
        certificate = load(certs / f"{service}.crt")
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(hosts) <= set(names.get_values_for_type(x509.DNSName)), service
        assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress), service
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        # server auth, and client auth for the healthcheck that presents the service's own certificate
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}, service
    client = load(certs / "gateway-client.crt")
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]


def test_running_it_again_replaces_every_certificate(tmp_path):
    out = tmp_path / "certs"
    for _ in range(2):
        subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True, timeout=60)
        if _ == 0:
            first = {path.name: path.read_bytes() for path in out.iterdir()}
    assert all(first[path.name] != path.read_bytes() for path in out.iterdir())
    assert not list(out.glob(".*"))  # no temporary files left


@pytest.fixture(scope="module")
def index(certs, tmp_path_factory):
    """An index serving mutual TLS with the development certificates, as the mtls compose file runs it."""
    config = IndexConfig(host="127.0.0.1", port=0, metrics_port=-1, data_dir=str(tmp_path_factory.mktemp("index")),
                         checkpoint_interval_s=3600.0, tls_cert=str(certs / "index.crt"),
                         tls_key=str(certs / "index.key"), tls_client_ca=str(certs / "ca.crt"))
    service, port = build_index(config)
    service.start()
    address = f"127.0.0.1:{port}"
    channel = gateway_channel(certs, address, "index")
    try:
        wait_until_serving(channel, INDEX_SERVICE, timeout_s=60)
        yield address
    finally:
        channel.close()
        service.stop(1.0)


def gateway_channel(certs: pathlib.Path, address: str, server_name: str) -> grpc.Channel:
    credentials = channel_credentials(str(certs / "ca.crt"), str(certs / "gateway-client.crt"),
                                      str(certs / "gateway-client.key"))
    return create_channel(address, credentials=credentials, server_name=server_name)


def check(channel: grpc.Channel) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=INDEX_SERVICE),
                                                          timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    finally:
        channel.close()


@pytest.mark.parametrize("server_name", ["index", "convsearch-index-0.convsearch-index"])
def test_the_gateway_reaches_the_index_by_its_compose_and_kubernetes_names(certs, index, server_name):
    assert check(gateway_channel(certs, index, server_name)) == "SERVING"


def test_the_healthcheck_passes_with_the_services_own_certificate(certs, index):
    # exactly what docker-compose.mtls.yml's healthcheck and the overlay's exec probes run
    argv = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "index.crt"), "--tls-key",
            str(certs / "index.key"), "health", index, INDEX_SERVICE]
    assert cli_main(argv) == 0


def test_a_follower_reaches_the_primary_and_serves_the_gateway_with_its_certificate(certs, index, tmp_path):
    # as the Kubernetes mtls overlay runs index-read: its own certificate for both sides
    own = {"tls_cert": str(certs / "index-read.crt"), "tls_key": str(certs / "index-read.key")}
    ca = str(certs / "ca.crt")
    config = IndexConfig(host="127.0.0.1", port=0, metrics_port=-1, data_dir=str(tmp_path),
                         checkpoint_interval_s=3600.0, tls_client_ca=ca, follow=index, follow_tls_ca=ca,
                         follow_tls_cert=own["tls_cert"], follow_tls_key=own["tls_key"],
                         follow_tls_server_name="index", **own)
    service, port = build_index(config)
    service.start()
    try:
        for server_name in ("index-read", "convsearch-index-read"):
            channel = gateway_channel(certs, f"127.0.0.1:{port}", server_name)
            wait_until_serving(channel, INDEX_SERVICE, timeout_s=60)  # SERVING once it has copied the primary
            assert check(channel) == "SERVING"
    finally:
        service.stop(1.0)


def test_clients_without_a_certificate_of_the_ca_are_refused(certs, index):
    no_certificate = create_channel(index, credentials=channel_credentials(str(certs / "ca.crt")),
                                    server_name="index")
    with pytest.raises(grpc.RpcError) as refused:
        check(no_certificate)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert cli_main(["health", index, INDEX_SERVICE]) == 3  # plaintext: nothing answers


def _run_probe(command: list[str], files: dict[str, pathlib.Path], port: int, address: str) -> int:
    """Runs a probe's `convsearch ...` command here: its files mapped to ours, its address to the index's."""
    assert command[0] == "convsearch"
    argv = [str(files.get(word, word)) for word in command[1:]]
    assert argv.count(f"127.0.0.1:{port}") == 1, argv
    return cli_main([address if word == f"127.0.0.1:{port}" else word for word in argv])


def test_the_compose_healthcheck_and_the_kubernetes_probes_pass_against_a_mutual_tls_index(certs, index, tmp_path):
    # docker-compose.mtls.yml: build/certs is mounted at /certs
    compose = yaml.safe_load((ROOT / "docker-compose.mtls.yml").read_text())
    test = compose["services"]["index"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    files = {f"/certs/{path.name}": path for path in certs.iterdir()}
    assert _run_probe(test[1:], files, 50053, index) == 0
    # overlays/mtls: the Secret convsearch-index-tls (cert-manager's layout) at /etc/convsearch/tls
    patch = yaml.safe_load((ROOT / "deploy/kubernetes/overlays/mtls/index-statefulset.yaml").read_text())
    container = patch["spec"]["template"]["spec"]["containers"][0]
    secret = {"tls.crt": certs / "index.crt", "tls.key": certs / "index.key", "ca.crt": certs / "ca.crt"}
    files = {f"/etc/convsearch/tls/{name}": path for name, path in secret.items()}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _run_probe(container[kind]["exec"]["command"], files, 50053, index) == 0, kind


def test_the_gateway_probes_pass_against_a_tls_gateway(certs, tmp_path):
    # The gateway serving TLS with the development certificates, its backends not there: its
    # `liveness` (startup and liveness probes) answers SERVING all the same.
    from convsearch_gateway.config import GatewayConfig
    from convsearch_gateway.server import build_server as build_gateway

    config = GatewayConfig(host="127.0.0.1", port=0, metrics_port=-1, extractor="127.0.0.1:1", index="127.0.0.1:1",
                           tls_cert=str(certs / "gateway.crt"), tls_key=str(certs / "gateway.key"),
                           backend_tls_ca=str(certs / "ca.crt"), backend_tls_cert=str(certs / "gateway-client.crt"),
                           backend_tls_key=str(certs / "gateway-client.key"))
    service, port = build_gateway(config)
    service.start()
    try:
        address = f"127.0.0.1:{port}"
        patch = yaml.safe_load((ROOT / "deploy/kubernetes/overlays/mtls/gateway-deployment.yaml").read_text())
        container = patch["spec"]["template"]["spec"]["containers"][0]
        files = {"/etc/convsearch/tls/ca.crt": certs / "ca.crt", "/etc/convsearch/tls/tls.crt": certs / "gateway.crt",
                 "/etc/convsearch/tls/tls.key": certs / "gateway.key",
                 "/etc/convsearch/backend-tls/ca.crt": certs / "ca.crt",
                 "/etc/convsearch/backend-tls/tls.crt": certs / "gateway-client.crt",
                 "/etc/convsearch/backend-tls/tls.key": certs / "gateway-client.key"}
        for kind in ("startupProbe", "livenessProbe"):
            assert _run_probe(container[kind]["exec"]["command"], files, 50051, address) == 0, kind
        # readiness waits for the backends to have been up; they are not there: NOT_SERVING (1), not unreachable (3)
        assert _run_probe(container["readinessProbe"]["exec"]["command"], files, 50051, address) == 1
        compose = yaml.safe_load((ROOT / "docker-compose.mtls.yml").read_text())
        test = compose["services"]["gateway"]["healthcheck"]["test"]
        assert _run_probe(test[1:], {f"/certs/{p.name}": p for p in certs.iterdir()}, 50051, address) == 1
    finally:
        service.stop(0)
