"""The gateway's security layer under attack: a key revoked, downgraded or narrowed while its
stream is open ends that stream at its next message or response (it used to write on for as long
as the stream lasted); a key pasted into the keys file by mistake is not echoed into logs or
errors; and a half-done certificate rotation is logged once, not once per new connection
(anyone who can open a TCP connection could flood the log and make the files be re-read and
re-checked at will)."""

import contextlib
import logging
import pathlib
import queue
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from convsearch.api_keys import key_line, new_key, parse_keys
from convsearch.channels import create_channel
from convsearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from convsearch.grpc_errors import details_of
from convsearch.health import wait_until_serving
from convsearch.tls import channel_credentials
from tests.conftest import running_backends, running_gateway

ROOT = pathlib.Path(__file__).resolve().parents[1]
LITE0 = gateway_pb2.Configuration(model="efficientnet_lite0", layers=["_conv_head"])
KEYS = {name: new_key() for name in ("admin", "write", "other")}
MANY = 40  # items of the dataset `many`: an IndexDataset at batch size 1 over them lasts seconds on a CPU


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def keys_text(write_line: str | None = None) -> str:
    """The keys file: an admin key, a write key for shoes and many (or `write_line` in its place;
    "" leaves it out), and another key."""
    lines = [key_line(KEYS["admin"], "admin"), key_line(KEYS["other"], "write"),
             key_line(KEYS["write"], "write", ["shoes", "many"]) if write_line is None else write_line]
    return "\n".join(lines) + "\n"


def failure(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, message, reason) of a failed call."""
    return error.code(), error.details(), details_of(rpc_status.from_call(error)).get("reason")


@pytest.fixture(scope="module")
def backends(tmp_path_factory, chelsea_jpeg):
    """An extractor and an index holding `shoes` (empty) and `many` (MANY items, not indexed)."""
    with running_backends(tmp_path_factory.mktemp("index")) as addresses:
        with running_gateway(*addresses) as (_, channel, _):
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for name in ("shoes", "many"):
                stub.CreateDataset(gateway_pb2.CreateDatasetRequest(name=name))
            items = [gateway_pb2.Item(id=f"img{n}", label=f"l{n % 4}", image=chelsea_jpeg) for n in range(MANY)]
            assert len(list(stub.Ingest(iter([gateway_pb2.IngestRequest(dataset="many", items=items)])))) == MANY
        yield addresses


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(keys_text())
    return path


@contextlib.contextmanager
def gateway(backends, **overrides):
    """A gateway over the backends: (service, stub, address)."""
    with running_gateway(*backends, **overrides) as (service, channel, address):
        yield service, gateway_pb2_grpc.GatewayServiceStub(channel), address


class Feed:
    """A client request stream fed one message at a time by the test; `end()` closes it."""

    def __init__(self):
        self._messages: queue.SimpleQueue = queue.SimpleQueue()

    def send(self, message) -> None:
        self._messages.put(message)

    def end(self) -> None:
        self._messages.put(None)

    def __iter__(self):
        while (message := self._messages.get(timeout=60)) is not None:
            yield message


def stored(stub, item_id: str) -> bool:
    try:
        stub.GetImage(gateway_pb2.GetImageRequest(dataset="shoes", item_id=item_id), metadata=bearer(KEYS["admin"]),
                      timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


# ---- a key changed while its stream is open -------------------------------------------------------

@pytest.mark.parametrize(("new_line", "code", "reason"), [
    ("", grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED"),  # its line removed
    (key_line(KEYS["write"], "read", ["shoes", "many"]), grpc.StatusCode.PERMISSION_DENIED, "ROLE_INSUFFICIENT"),
    (key_line(KEYS["write"], "write", ["many"]), grpc.StatusCode.PERMISSION_DENIED, "DATASET_NOT_ALLOWED"),
], ids=["revoked", "downgraded", "narrowed"])
def test_a_key_changed_while_its_ingest_stream_is_open_cannot_write_through_it(backends, keys_file, chelsea_jpeg,
                                                                                new_line, code, reason):
    """An operator revokes a leaked write key (or takes its write role or a dataset away) while
    the attacker holds an Ingest stream open: the stream's next message is refused and not stored,
    whether it names the dataset or leaves it to the first message."""
    with gateway(backends, api_keys=str(keys_file)) as (_, stub, _):
        for later in ("shoes", ""):
            feed = Feed()
            responses = stub.Ingest(iter(feed), metadata=bearer(KEYS["write"]), timeout=60)
            try:
                first_id, later_id = f"before-{reason}-{later}", f"after-{reason}-{later}"
                feed.send(gateway_pb2.IngestRequest(dataset="shoes", items=[
                    gateway_pb2.Item(id=first_id, image=chelsea_jpeg)]))
                assert next(responses).status == gateway_pb2.INGEST_STATUS_STORED
                keys_file.write_text(keys_text(new_line))
                feed.send(gateway_pb2.IngestRequest(dataset=later, items=[
                    gateway_pb2.Item(id=later_id, image=chelsea_jpeg)]))
                with pytest.raises(grpc.RpcError) as ended:
                    next(responses)  # the later item's result, had it been stored
            finally:
                feed.end()
            assert failure(ended.value)[::2] == (code, reason)
            assert stored(stub, first_id) and not stored(stub, later_id)
            keys_file.write_text(keys_text())


def test_a_key_revoked_while_its_index_dataset_runs_ends_the_run(backends, keys_file):
    """A server stream (IndexDataset, Evaluate) is checked before each response: a key revoked
    meanwhile ends it with UNAUTHENTICATED instead of driving the backends to the end."""
    with gateway(backends, api_keys=str(keys_file)) as (_, stub, _):
        progress = stub.IndexDataset(gateway_pb2.IndexDatasetRequest(dataset="many", configurations=[LITE0],
                                                                     batch_size=1),
                                     metadata=bearer(KEYS["write"]), timeout=120)
        assert not next(progress).finished
        keys_file.write_text(keys_text(""))
        with pytest.raises(grpc.RpcError) as ended:
            for update in progress:
                assert not update.finished, "the run went on to its end with a revoked key"
        code, details, reason = failure(ended.value)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
        assert "revoked" in details and KEYS["write"] not in details


# ---- a key pasted into the keys file --------------------------------------------------------------

def test_a_key_pasted_in_place_of_its_hash_is_not_echoed(backends, keys_file, caplog):
    """`convsearch api-key hash` takes any existing key, so keys may be short; one pasted into the
    keys file instead of its line used to be echoed (its first 16 characters) into the log and
    the start-up error, where whoever reads logs could use it."""
    pasted = "hunter2-the-key"  # a key chosen by hand, 15 characters
    with pytest.raises(ValueError, match="keys:2: expected sha256:") as error:
        parse_keys(f"# keys\n{pasted} write\n", "keys")
    assert pasted[:6] not in str(error.value) and "api-key hash" in str(error.value)
    with pytest.raises(ValueError, match="keys:1: expected sha256:.*'sha256:ABC' \\(3 hex digits\\)"):
        parse_keys("sha256:ABC read\n", "keys")  # a malformed hash is shown: it is no secret
    with gateway(backends, api_keys=str(keys_file)) as (_, stub, _):
        with caplog.at_level(logging.ERROR, logger="convsearch.gateway.auth"):
            keys_file.write_text(keys_text() + f"{pasted} write\n")
            stub.ListDatasets(gateway_pb2.ListDatasetsRequest(), metadata=bearer(KEYS["admin"]), timeout=10)
        logged = [record.getMessage() for record in caplog.records]
        assert any("has an error" in message for message in logged)
        assert not any(pasted[:6] in message for message in logged)


# ---- certificate rotation -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "dev_certs.py"), "--out", str(out)], check=True,
                   capture_output=True)
    return out


def fresh_health(address: str, ca: str) -> str:
    """Health over a new connection of its own (no subchannel shared with other channels)."""
    channel = grpc.secure_channel(address, channel_credentials(ca), options=[
        ("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")])
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    finally:
        channel.close()


@contextlib.contextmanager
def tls_gateway(backends, ca: str, cert: pathlib.Path, key: pathlib.Path):
    """A gateway over the backends serving TLS with these files: its address, once it is SERVING."""
    from convsearch_gateway.config import GatewayConfig
    from convsearch_gateway.server import SERVICE_NAME, build_server

    service, port = build_server(GatewayConfig(host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.2,
                                               extractor=backends[0], index=backends[1], tls_cert=str(cert),
                                               tls_key=str(key)))
    service.start()
    address = f"127.0.0.1:{port}"
    try:
        channel = create_channel(address, credentials=channel_credentials(ca), server_name="localhost")
        wait_until_serving(channel, SERVICE_NAME, timeout_s=30)
        channel.close()
        yield address
    finally:
        service.stop(0.5)


def test_a_half_done_rotation_is_logged_once_not_per_connection(backends, certs, tmp_path, caplog):
    """A new certificate next to the old key is skipped (the old pair is served); the many
    connections made meanwhile, by anyone, neither re-read and re-check the files nor log each."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes((certs / "gateway.crt").read_bytes())
    key.write_bytes((certs / "gateway.key").read_bytes())
    with tls_gateway(backends, str(certs / "ca.crt"), cert, key) as address:
        assert fresh_health(address, str(certs / "ca.crt")) == "SERVING"
        staged = tmp_path / "tls.crt.new"
        staged.write_bytes((certs / "extractor.crt").read_bytes())  # another certificate: its key is not there
        staged.replace(cert)
        with caplog.at_level(logging.WARNING, logger="convsearch.tls"):
            for _ in range(20):
                assert fresh_health(address, str(certs / "ca.crt")) == "SERVING"
        skipped = [r for r in caplog.records if "cannot be used yet" in r.getMessage()]
        assert len(skipped) == 1, f"{len(skipped)} warnings for one half-done rotation"
        key_staged = tmp_path / "tls.key.new"
        key_staged.write_bytes((certs / "extractor.key").read_bytes())
        with caplog.at_level(logging.INFO, logger="convsearch.tls"):
            key_staged.replace(key)  # the rotation finishes: the new certificate's own key
            assert fresh_health(address, str(certs / "ca.crt")) == "SERVING"
        assert any("reloaded" in r.getMessage() for r in caplog.records)
