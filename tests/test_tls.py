"""Transport security: TLS and mutual TLS on every service (health and reflection on the same port),
the gateway's TLS to its backends, the client's and CLI's TLS options, refusals, fail-fast on bad
files, and certificate rotation without a restart. Certificates come from a throwaway CA made here."""

import dataclasses
import datetime
import ipaddress
import os
import pathlib

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from convsearch.channels import create_channel
from convsearch.cli import main as cli_main
from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.health import wait_until_serving
from convsearch.tls import ENV_CA, ENV_CERT, ENV_KEY, CertificateFiles, TLSError, channel_credentials
from convsearch_index.config import IndexConfig
from convsearch_index.server import SERVICE_NAME as INDEX_SERVICE
from convsearch_index.server import build_server as build_index

GATEWAY_SERVICE = "convsearch.gateway.v1.GatewayService"
EXTRACTOR_SERVICE = "convsearch.extractor.v1.ExtractorService"
LAST = Configuration("efficientnet_lite0", ("_conv_head",))


# ---- a throwaway PKI -------------------------------------------------------------------------

@dataclasses.dataclass
class Pair:
    cert: str
    key: str


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: pathlib.Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CA:
    """A self-signed CA that issues server and client certificates into `folder`."""

    def __init__(self, folder: pathlib.Path, name: str):
        self.folder, self.name = folder, name
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.pem = _write(folder / f"{name}.pem", self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, file_stem: str, common_name: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
              client: bool = False) -> Pair:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                  else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return Pair(_write(self.folder / f"{file_stem}.crt", certificate.public_bytes(serialization.Encoding.PEM)),
                    _write(self.folder / f"{file_stem}.key", _pem_key(key)))

    def server(self, file_stem: str) -> Pair:
        return self.issue(file_stem, "localhost", dns=("localhost",), ips=("127.0.0.1",))

    def client(self, file_stem: str) -> Pair:
        return self.issue(file_stem, file_stem, client=True)


@pytest.fixture(autouse=True)
def no_tls_environment(monkeypatch):
    """The client's TLS variables are set only where a test sets them."""
    for name in (ENV_CA, ENV_CERT, ENV_KEY):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CA(folder, "ca"), CA(folder, "other-ca")
    return type("PKI", (), dict(folder=folder, ca=ca, other=other, server=ca.server("server"),
                                client=ca.client("client"), rogue=other.client("rogue")))


# ---- helpers -----------------------------------------------------------------------------------

def secure(address: str, ca: str = "", pair: Pair | None = None, server_name: str = "") -> grpc.Channel:
    credentials = channel_credentials(ca, pair.cert if pair else "", pair.key if pair else "")
    return create_channel(address, credentials=credentials, server_name=server_name)


def health(channel: grpc.Channel, service: str = "") -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def refused(channel: grpc.Channel) -> bool:
    """True when no RPC gets through (the handshake fails); the channel is closed."""
    try:
        health(channel)
        return False
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()


def start(build, config, service_name: str, channel_for, timeout_s: float = 60.0):
    """Starts a service and waits, over `channel_for(address)`, until it is SERVING."""
    service, port = build(config)
    service.start()
    address = f"127.0.0.1:{port}"
    channel = channel_for(address)
    try:
        wait_until_serving(channel, service_name, timeout_s=timeout_s)
    except TimeoutError:
        service.stop(0)
        raise
    finally:
        channel.close()
    return service, address


def index_config(data_dir, **overrides) -> IndexConfig:
    settings = dict(host="127.0.0.1", port=0, metrics_port=-1, data_dir=str(data_dir), checkpoint_interval_s=3600.0)
    settings.update(overrides)
    return IndexConfig(**settings)


# ---- the three services over TLS ----------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(pki, tmp_path_factory):
    """Index and extractor with mutual TLS; the gateway with TLS, reaching them with its client cert."""
    from convsearch_extractor.config import ExtractorConfig
    from convsearch_extractor.server import build_server as build_extractor
    from convsearch_gateway.config import GatewayConfig
    from convsearch_gateway.server import build_server as build_gateway

    mtls = dict(tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.pem)
    as_client = lambda address: secure(address, pki.ca.pem, pki.client)  # noqa: E731
    services = []
    try:
        index, index_address = start(build_index, index_config(tmp_path_factory.mktemp("index"), **mtls),
                                     INDEX_SERVICE, as_client)
        services.append(index)
        extractor, extractor_address = start(
            build_extractor, ExtractorConfig(host="127.0.0.1", port=0, metrics_port=-1, allow_random_weights=True,
                                             device="cpu", memory_budget_mb=2048, **mtls),
            EXTRACTOR_SERVICE, as_client, timeout_s=180)
        services.append(extractor)
        gateway, gateway_address = start(
            build_gateway, GatewayConfig(host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.2,
                                         extractor=extractor_address, index=index_address,
                                         tls_cert=pki.server.cert, tls_key=pki.server.key,
                                         backend_tls_ca=pki.ca.pem, backend_tls_cert=pki.client.cert,
                                         backend_tls_key=pki.client.key),
            GATEWAY_SERVICE, lambda address: secure(address, pki.ca.pem))
        services.append(gateway)
        yield type("Stack", (), dict(index=index_address, extractor=extractor_address, gateway=gateway_address))
    finally:
        for service in reversed(services):
            service.stop(1.0)


def test_search_end_to_end_over_tls(stack, pki, chelsea_jpeg, coffee_jpeg):
    with Client(stack.gateway, tls_ca=pki.ca.pem) as client:
        client.create_dataset("secure", "over TLS")
        items = [("cat", "cat", chelsea_jpeg), ("cup", "cup", coffee_jpeg), ("cat2", "cat", chelsea_jpeg)]
        assert [r.status for r in client.ingest("secure", items)] == ["stored"] * 3
        progress = list(client.index("secure", [LAST]))
        assert progress[-1].finished and progress[-1].done == 3 and progress[-1].failed == 0
        result = client.search("secure", item_id="cat", configuration=LAST, k=2)
        assert "cat2" in [hit.id for hit in result.hits]  # the same image, through TLS both ways
        assert "secure" in [dataset.name for dataset in client.datasets()]


def test_client_reads_tls_options_from_the_environment(stack, pki, monkeypatch):
    monkeypatch.setenv(ENV_CA, pki.ca.pem)
    with Client(stack.gateway) as client:
        client.datasets()


def test_plaintext_clients_are_refused(stack):
    for address in (stack.gateway, stack.index, stack.extractor):
        assert refused(create_channel(address)), address


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(stack, pki):
    for address in (stack.index, stack.extractor):
        assert refused(secure(address, pki.ca.pem)), f"{address}: no client certificate"
        assert refused(secure(address, pki.ca.pem, pki.rogue)), f"{address}: certificate of another CA"
        channel = secure(address, pki.ca.pem, pki.client)
        assert health(channel) == "SERVING"
        channel.close()


def test_a_server_of_another_ca_is_not_trusted(stack, pki):
    assert refused(secure(stack.gateway, pki.other.pem))


def test_health_and_reflection_over_tls(stack, pki, capsys):
    channel = secure(stack.gateway, pki.ca.pem)
    try:
        assert health(channel, "liveness") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5)
        names = {service.name for service in reply.list_services_response.service}
        assert {GATEWAY_SERVICE, "grpc.health.v1.Health"} <= names
    finally:
        channel.close()
    tls = ["--tls-ca", pki.ca.pem, "--tls-cert", pki.client.cert, "--tls-key", pki.client.key]
    assert cli_main([*tls, "health", stack.index, INDEX_SERVICE]) == 0
    assert cli_main(["--tls-ca", pki.ca.pem, "health", stack.gateway]) == 0
    assert cli_main(["health", stack.gateway, "--timeout", "2"]) == 3  # plaintext against TLS: nothing answers
    assert cli_main(["--tls-ca", str(pki.folder / "missing.pem"), "health", stack.gateway]) == 2
    assert "missing.pem" in capsys.readouterr().err


# ---- rotation, server names, bad files -------------------------------------------------------------

def _install(pair: Pair, cert: pathlib.Path, key: pathlib.Path, bump_s: int) -> None:
    """Replaces the served files the way rotation tools do (write aside, rename), with a later mtime."""
    for source, target in ((pair.cert, cert), (pair.key, key)):
        aside = target.with_suffix(".new")
        aside.write_bytes(pathlib.Path(source).read_bytes())
        stamp = target.stat().st_mtime + bump_s if target.exists() else None
        if stamp is not None:
            os.utime(aside, (stamp, stamp))
        os.replace(aside, target)


def test_client_names_refuse_other_certificates_of_the_ca_but_not_their_health_checks(pki, tmp_path):
    """Mutual TLS checked only the CA: every service's certificate (the extractor's, which parses
    untrusted images) could create and delete datasets at the index."""
    from convsearch.errors import PermissionDenied
    from convsearch.grpc_errors import error_from_call
    from convsearch.index.v1 import index_pb2, index_pb2_grpc

    extractor_pair = pki.ca.issue("extractor", "extractor", dns=("extractor", "localhost"), client=True)
    config = index_config(tmp_path, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.pem,
                          tls_client_names="client, index-read")
    index, address = start(build_index, config, INDEX_SERVICE, lambda a: secure(a, pki.ca.pem, pki.client))
    try:
        allowed = secure(address, pki.ca.pem, pki.client)
        index_pb2_grpc.IndexServiceStub(allowed).CreateDataset(index_pb2.CreateDatasetRequest(name="shoes"), timeout=5)
        other = secure(address, pki.ca.pem, extractor_pair)
        with pytest.raises(grpc.RpcError) as raised:
            index_pb2_grpc.IndexServiceStub(other).DeleteDataset(index_pb2.DeleteDatasetRequest(name="shoes"),
                                                                 timeout=5)
        error = error_from_call(raised.value)
        assert isinstance(error, PermissionDenied) and error.reason == "CLIENT_NOT_ALLOWED"
        assert "extractor" in raised.value.details() and "--tls-client-names" in raised.value.details()
        assert health(other, INDEX_SERVICE) == "SERVING"  # a probe shows the service's own certificate
        listed = index_pb2_grpc.IndexServiceStub(allowed).ListDatasets(index_pb2.ListDatasetsRequest(), timeout=5)
        assert [d.name for d in listed.datasets] == ["shoes"]
        for channel in (allowed, other):
            channel.close()
    finally:
        index.stop(0)
    with pytest.raises(SystemExit):  # names without client certificates to check them against
        from convsearch_index.config import load_config
        load_config(["--tls-client-names", "client"])


def test_certificates_rotate_without_a_restart(pki, tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(pki.server, cert, key, 0)
    service, address = start(build_index, index_config(tmp_path / "data", tls_cert=str(cert), tls_key=str(key)),
                             INDEX_SERVICE, lambda address: secure(address, pki.ca.pem))
    try:
        before = secure(address, pki.ca.pem)
        assert health(before) == "SERVING"
        _install(pki.other.server("rotated"), cert, key, 5)  # a new certificate, from another CA
        after = secure(address, pki.other.pem)
        assert health(after) == "SERVING"  # a new connection gets the new certificate ...
        assert refused(secure(address, pki.ca.pem))  # ... which the old CA does not vouch for
        assert health(before) == "SERVING"  # the connection made before keeps working
        after.close()
        before.close()
        # Half a rotation (a new certificate, the old key still there) is skipped, not served.
        _install(pki.ca.server("half"), cert, tmp_path / "unused.key", 10)
        assert health_ok(address, pki.other.pem)
    finally:
        service.stop(0.5)


def health_ok(address: str, ca: str) -> bool:
    channel = secure(address, ca)
    try:
        return health(channel) == "SERVING"
    finally:
        channel.close()


def test_certificate_files_reload_only_when_they_change(pki, tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(pki.server, cert, key, 0)
    files = CertificateFiles(str(cert), str(key))
    assert files.fetch() is None
    _install(pki.other.server("next"), cert, key, 5)
    assert files.fetch() is not None and files.reloads == 1
    assert files.fetch() is None


def test_a_rotation_finishing_while_the_files_are_read_never_serves_a_mixed_pair(pki, tmp_path, monkeypatch):
    """The files were read, then their pair checked by path: a key renamed into place in between
    passed the check with the new files while the old key, read before, was served with the new
    certificate, and every handshake failed until the files changed again."""
    import convsearch.tls as tls

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(pki.server, cert, key, 0)
    files = CertificateFiles(str(cert), str(key))
    rotated = pki.ca.server("rotated")
    _install(Pair(rotated.cert, pki.server.key), cert, key, 5)  # half done: the new certificate first
    check_pair = tls._check_pair

    def key_lands_meanwhile(*args):
        _install(Pair(rotated.cert, rotated.key), cert, key, 10)  # ... the new key lands mid-read
        check_pair(*args)

    def served() -> tuple[bytes, bytes]:
        return files._loaded.chain, files._loaded.key

    pairs = {name: (pathlib.Path(pair.cert).read_bytes(), pathlib.Path(pair.key).read_bytes())
             for name, pair in (("old", pki.server), ("new", rotated))}
    monkeypatch.setattr(tls, "_check_pair", key_lands_meanwhile)
    files.fetch()
    assert served() in pairs.values(), "a certificate was served with another one's key"
    monkeypatch.setattr(tls, "_check_pair", check_pair)
    assert files.fetch() is not None and served() == pairs["new"]  # the next connection takes the new pair


def test_backend_server_name_override_for_addresses_by_ip(pki, tmp_path):
    named = pki.ca.issue("named", "index.internal", dns=("index.internal",))
    service, address = start(build_index, index_config(tmp_path / "data", tls_cert=named.cert, tls_key=named.key),
                             INDEX_SERVICE, lambda address: secure(address, pki.ca.pem, server_name="index.internal"))
    try:
        assert refused(secure(address, pki.ca.pem))  # 127.0.0.1 is not a name in the certificate
        channel = secure(address, pki.ca.pem, server_name="index.internal")
        assert health(channel) == "SERVING"
        channel.close()
    finally:
        service.stop(0.5)


def test_bad_files_stop_the_service_at_start_with_a_message(pki, tmp_path):
    missing = str(tmp_path / "missing.crt")
    with pytest.raises(SystemExit, match="missing.crt"):
        build_index(index_config(tmp_path / "a", tls_cert=missing, tls_key=pki.server.key))
    with pytest.raises(SystemExit, match="does not match"):
        build_index(index_config(tmp_path / "b", tls_cert=pki.server.cert, tls_key=pki.client.key))
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    with pytest.raises(SystemExit, match="not PEM"):
        build_index(index_config(tmp_path / "c", tls_cert=pki.server.cert, tls_key=pki.server.key,
                                 tls_client_ca=str(not_pem)))
    with pytest.raises(TLSError, match="does not match"):
        channel_credentials(pki.ca.pem, pki.client.cert, pki.server.key)


def test_tls_options_come_from_flags_and_environment(pki, monkeypatch):
    from convsearch_gateway.config import load_config as gateway_config
    from convsearch_index.config import load_config

    monkeypatch.setenv("CONVSEARCH_INDEX_TLS_CERT", pki.server.cert)
    monkeypatch.setenv("CONVSEARCH_INDEX_TLS_KEY", pki.server.key)
    config = load_config(["--tls-client-ca", pki.ca.pem])
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == (pki.server.cert, pki.server.key, pki.ca.pem)
    monkeypatch.delenv("CONVSEARCH_INDEX_TLS_KEY")
    with pytest.raises(SystemExit):  # a certificate without its key
        load_config([])
    config = gateway_config(["--backend-tls-ca", pki.ca.pem, "--backend-tls-server-name", "index.internal"])
    assert (config.backend_tls_ca, config.backend_tls_server_name) == (pki.ca.pem, "index.internal")
    with pytest.raises(SystemExit):  # a client certificate without the backends' CA
        gateway_config(["--backend-tls-cert", pki.client.cert, "--backend-tls-key", pki.client.key])
