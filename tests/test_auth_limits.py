"""The gateway's API keys, roles, dataset scopes and limits, in-process: every RPC has a rule;
no key or an unknown key is UNAUTHENTICATED; a role or dataset a key lacks is PERMISSION_DENIED
naming it; a read key cannot make the gateway store without bound (Evaluate needs write, Project
keeps one picture a method); health and reflection stay open; the keys file reloads and fails
closed (missing: every key refused; a bad line: revocations still apply); the request rate, the
streams per key (half the slots by default) and in all are capped, and the rate limiter forgets
one-time callers; idle client streams, and streams whose client stops reading, are ended and
never starve unary calls or health; the client and the CLI send a key."""

import contextlib
import io
import json
import logging
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from convsearch import cli
from convsearch.api_keys import ENV_API_KEY, bearer_token, hash_key, key_line, new_key, parse_keys
from convsearch.channels import create_channel
from convsearch.client import Client
from convsearch.errors import PermissionDenied, Unauthenticated
from convsearch.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from convsearch.grpc_errors import details_of
from convsearch_gateway.auth import (
    DATASET,
    LISTED,
    NO_DATASET,
    OPTIONAL_DATASET,
    RETRY_AFTER_MS,
    RULES,
    UNSCOPED,
    TokenBuckets,
)
from convsearch_gateway.config import GatewayConfig
from tests.conftest import running_backends, running_gateway, serve_gateway

GATEWAY = "convsearch.gateway.v1.GatewayService"
LITE0 = gateway_pb2.Configuration(model="efficientnet_lite0", layers=["_conv_head"])
KEYS = {name: new_key() for name in ("admin", "write", "read", "shoes_read", "shoes_write", "other_read")}


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def keys_text() -> str:
    return "\n".join([
        "# test keys",
        key_line(KEYS["admin"], "admin", comment="operators"),
        key_line(KEYS["write"], "write"),
        key_line(KEYS["read"], "read"),
        key_line(KEYS["shoes_read"], "read", ["shoes"], "shoe dashboards"),
        key_line(KEYS["shoes_write"], "write", ["shoes"]),
        key_line(KEYS["other_read"], "read"),
        "",
    ])


def eventually(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def backends(tmp_path_factory, chelsea_jpeg, coffee_jpeg):
    """An extractor and an index holding `shoes` (3 items, indexed with lite0 at _conv_head) and an empty `bags`."""
    with running_backends(tmp_path_factory.mktemp("index")) as addresses:
        with running_gateway(*addresses) as (_, channel, _):
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for name in ("shoes", "bags"):
                stub.CreateDataset(gateway_pb2.CreateDatasetRequest(name=name))
            items = [gateway_pb2.Item(id=f"img{n}", label="cat", image=image)
                     for n, image in enumerate([chelsea_jpeg, coffee_jpeg, chelsea_jpeg])]
            assert len(list(stub.Ingest(iter([gateway_pb2.IngestRequest(dataset="shoes", items=items)])))) == 3
            progress = list(stub.IndexDataset(gateway_pb2.IndexDatasetRequest(dataset="shoes",
                                                                               configurations=[LITE0])))
            assert progress[-1].finished and progress[-1].done == 3
        yield addresses


@contextlib.contextmanager
def gateway(backends, **overrides):
    """A gateway over the backends: (service, stub, channel, address)."""
    with running_gateway(*backends, **overrides) as (service, channel, address):
        yield service, gateway_pb2_grpc.GatewayServiceStub(channel), channel, address


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(keys_text())
    return path


@pytest.fixture
def guarded(backends, keys_file):
    with gateway(backends, api_keys=str(keys_file)) as served:
        yield served


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):  # a stream: read it to its end
            list(result)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def failure_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, message, reason) of a call that fails."""
    with pytest.raises(grpc.RpcError) as failed:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    error = failed.value
    return error.code(), error.details(), details_of(rpc_status.from_call(error)).get("reason")


def search_request() -> gateway_pb2.SearchRequest:
    return gateway_pb2.SearchRequest(dataset="shoes", item_id="img0", configuration=LITE0, k=2)


# ---- the rule table and the keys file ----------------------------------------------------------

def test_every_rpc_of_the_gateway_has_a_rule_that_finds_its_dataset():
    service = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
    assert set(RULES) == {method.name for method in service.methods}
    for method in service.methods:
        rule = RULES[method.name]
        assert rule.role in ("read", "write", "admin")
        fields = method.input_type.fields_by_name
        names_dataset = "dataset" in fields or "name" in fields
        if rule.dataset != UNSCOPED:
            assert names_dataset == (rule.dataset in (DATASET, OPTIONAL_DATASET)), method.name
        if rule.dataset == LISTED:
            assert "datasets" in method.output_type.fields_by_name
    assert RULES["DeleteCollection"].role == RULES["DeleteDataset"].role == RULES["CreateDataset"].role == "admin"
    assert {RULES[name].role for name in ("Ingest", "IndexDataset", "DeleteItems")} == {"write"}
    assert RULES["ListModels"].dataset == NO_DATASET
    assert {rule.role for name, rule in RULES.items() if "Snapshot" in name or name == "RestoreDataset"} == {"admin"}


def test_a_keys_file_holds_hashes_roles_and_datasets_and_names_a_bad_line():
    key = new_key()
    line = key_line(key, "write", ["shoes", "bags"], "importer")
    assert key not in line and hash_key(key) in line
    keys = parse_keys(f"# comment\n\n{line}\nsha256:{'a' * 64} admin *\nsha256:{'b' * 64} read\n")
    entry = keys[hash_key(key)]
    assert (entry.role, entry.datasets, entry.comment) == ("write", frozenset({"shoes", "bags"}), "importer")
    assert keys["a" * 64].datasets is None and keys["b" * 64].datasets is None
    assert entry.allows_role("read") and entry.allows_role("write") and not entry.allows_role("admin")
    for bad, says in ((f"{key} read", "keys:2: expected sha256:"), (f"sha256:{'a' * 64} owner", "keys:2: unknown role"),
                      (f"sha256:{'a' * 64}", "keys:2: expected"),
                      (f"sha256:{'a' * 64} read\nsha256:{'a' * 64} read", "keys:3: the same key is listed twice")):
        with pytest.raises(ValueError, match=says) as error:
            parse_keys("# first\n" + bad, "keys")
        assert key not in str(error.value)  # a plaintext key pasted by mistake is not echoed whole
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("x-request-id", "1")]) is None


# ---- authentication and roles ------------------------------------------------------------------

def test_no_key_or_an_unknown_key_is_unauthenticated(guarded):
    _, stub, _, _ = guarded
    for metadata in ((), bearer("cs_not-a-key"), [("authorization", "Basic abc")], bearer("")):
        code, details = code_of(stub.ListDatasets, gateway_pb2.ListDatasetsRequest(), metadata=metadata, timeout=5)
        assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert "API key" in details
    code, _ = code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")]), timeout=5)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(stub.ListDatasets, gateway_pb2.ListDatasetsRequest(), metadata=bearer(KEYS["read"]),
                   timeout=5)[0] == grpc.StatusCode.OK


def test_health_and_reflection_stay_open_without_a_key(guarded):
    _, _, channel, _ = guarded
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=GATEWAY), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {service.name for answer in answers for service in answer.list_services_response.service}
    assert GATEWAY in names


def test_a_read_key_reads_but_cannot_write_or_delete(guarded):
    _, stub, _, _ = guarded
    read = bearer(KEYS["read"])
    assert code_of(stub.Search, search_request(), metadata=read, timeout=30)[0] == grpc.StatusCode.OK
    assert code_of(stub.GetDataset, gateway_pb2.GetDatasetRequest(name="bags"), metadata=read,
                   timeout=5)[0] == grpc.StatusCode.OK
    refused = {
        "write": [(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")])),
                  (stub.IndexDataset, gateway_pb2.IndexDatasetRequest(dataset="shoes", configurations=[LITE0])),
                  (stub.DeleteItems, gateway_pb2.DeleteItemsRequest(dataset="shoes", ids=["img0"])),
                  # Evaluate creates, fills and stores: every model when no configuration is given.
                  (stub.Evaluate, gateway_pb2.EvaluateRequest(dataset="shoes")),
                  (stub.Evaluate, gateway_pb2.EvaluateRequest(dataset="shoes", configurations=[LITE0]))],
        "admin": [(stub.DeleteDataset, gateway_pb2.DeleteDatasetRequest(name="shoes")),
                  (stub.CreateDataset, gateway_pb2.CreateDatasetRequest(name="hats")),
                  (stub.DeleteCollection, gateway_pb2.DeleteCollectionRequest(
                      dataset="shoes", collection="efficientnet_lite0/_conv_head/avg/cosine"))],
    }
    for role, calls in refused.items():
        for call, request in calls:
            code, details = code_of(call, request, metadata=read, timeout=5)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert f"the {role!r} role" in details and "'read'" in details
    assert [d.name for d in stub.ListDatasets(gateway_pb2.ListDatasetsRequest(), metadata=read,
                                              timeout=5).datasets] == ["bags", "shoes"]
    # Compare only reads what Evaluate stored.
    assert code_of(stub.Compare, gateway_pb2.CompareRequest(dataset="shoes"), metadata=read,
                   timeout=30)[0] == grpc.StatusCode.OK


def test_a_write_key_writes_but_cannot_delete_datasets_or_collections(guarded, chelsea_jpeg):
    _, stub, _, _ = guarded
    write = bearer(KEYS["write"])
    item = gateway_pb2.Item(id="extra", label="cat", image=chelsea_jpeg)
    results = list(stub.Ingest(iter([gateway_pb2.IngestRequest(dataset="bags", items=[item])]), metadata=write,
                               timeout=30))
    assert [r.status for r in results] == [gateway_pb2.INGEST_STATUS_STORED]
    assert stub.DeleteItems(gateway_pb2.DeleteItemsRequest(dataset="bags", ids=["extra"]), metadata=write,
                            timeout=5).deleted == 1
    assert code_of(stub.Evaluate, gateway_pb2.EvaluateRequest(dataset="shoes", configurations=[LITE0]),
                   metadata=write, timeout=120)[0] == grpc.StatusCode.OK
    for call, request in ((stub.DeleteDataset, gateway_pb2.DeleteDatasetRequest(name="bags")),
                          (stub.DeleteCollection, gateway_pb2.DeleteCollectionRequest(
                              dataset="shoes", collection="efficientnet_lite0/_conv_head/avg/cosine"))):
        code, details = code_of(call, request, metadata=write, timeout=5)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "the 'admin' role" in details


def test_a_read_key_keeps_at_most_one_projection_a_method(guarded):
    """Project needs only the read role, so what it stores is bounded: the picture at the default
    seed (0), one a method, holding the last max_points asked for; other seeds are never stored."""
    _, stub, _, _ = guarded
    read = bearer(KEYS["read"])

    def cached(seed: int, max_points: int = 3) -> bool:
        return stub.Project(gateway_pb2.ProjectRequest(dataset="shoes", configuration=LITE0, seed=seed,
                                                       max_points=max_points, method=gateway_pb2.PROJECTION_METHOD_PCA),
                            metadata=read, timeout=30).cached

    cached(0)
    assert cached(0)
    for seed in range(1, 21):  # a caller exploring seeds (or an attacker) computes them, but stores none
        assert [cached(seed), cached(seed)] == [False, False]
    assert cached(0)  # the default seed's picture is still there
    assert [cached(0, max_points=4), cached(0, max_points=4)] == [False, True]
    assert not cached(0)  # one slot: the last max_points asked for


def test_a_dataset_scoped_key_touches_only_its_datasets(guarded, chelsea_jpeg):
    _, stub, _, _ = guarded
    shoes_read, shoes_write = bearer(KEYS["shoes_read"]), bearer(KEYS["shoes_write"])
    assert code_of(stub.Search, search_request(), metadata=shoes_read, timeout=30)[0] == grpc.StatusCode.OK
    code, details = code_of(stub.GetDataset, gateway_pb2.GetDatasetRequest(name="bags"), metadata=shoes_read,
                            timeout=5)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'bags'" in details and "shoes" in details
    listed = stub.ListDatasets(gateway_pb2.ListDatasetsRequest(), metadata=shoes_read, timeout=5)
    assert [d.name for d in listed.datasets] == ["shoes"]
    # A stream: its first message's dataset, and every later one that names one.
    item = gateway_pb2.Item(id="img0", label="cat", image=chelsea_jpeg)
    code, details = code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="bags", items=[item])]),
                            metadata=shoes_write, timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'bags'" in details
    code, details = code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes"),
                                               gateway_pb2.IngestRequest(dataset="bags", items=[item])]),
                            metadata=shoes_write, timeout=10)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'bags'" in details
    assert code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes"), gateway_pb2.IngestRequest()]),
                   metadata=shoes_write, timeout=10)[0] == grpc.StatusCode.OK
    # An RPC whose dataset is optional may name none (InspectLayer of an uploaded image).
    code, _ = code_of(stub.InspectLayer, gateway_pb2.InspectLayerRequest(image=b"not an image", layer="x"),
                      metadata=shoes_read, timeout=30)
    assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def test_the_keys_file_reloads_when_it_changes(guarded, keys_file, capsys):
    _, stub, _, address = guarded
    newcomer = new_key()

    def code(key):
        return code_of(stub.ListDatasets, gateway_pb2.ListDatasetsRequest(), metadata=bearer(key), timeout=5)[0]

    assert code(newcomer) == grpc.StatusCode.UNAUTHENTICATED
    keys_file.write_text(keys_text() + key_line(newcomer, "read") + "\n")
    assert code(newcomer) == grpc.StatusCode.OK
    # `convsearch api-key new --append` makes a key whose line admits it at once.
    assert cli.main(["--json", "api-key", "new", "--role", "read", "--datasets", "shoes",
                     "--append", str(keys_file)]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["line"] in keys_file.read_text() and made["key"] not in keys_file.read_text()
    assert code(made["key"]) == grpc.StatusCode.OK
    # A broken file keeps the keys read before that it still lists; a fixed one without the newcomer refuses it.
    keys_file.write_text(keys_text() + key_line(newcomer, "read") + "\nsha256:nothex read\n")
    assert code(newcomer) == grpc.StatusCode.OK
    keys_file.write_text(keys_text())
    assert code(newcomer) == code(made["key"]) == grpc.StatusCode.UNAUTHENTICATED
    assert code(KEYS["read"]) == grpc.StatusCode.OK


def test_a_missing_keys_file_refuses_every_key_until_it_is_back(guarded, keys_file, caplog):
    _, stub, _, _ = guarded
    moved = keys_file.with_name("keys.moved")
    keys_file.rename(moved)  # an operator takes the file away to shut every key out
    with caplog.at_level(logging.ERROR, logger="convsearch.gateway.auth"):
        for key in (KEYS["admin"], KEYS["read"]):
            code, details, reason = failure_of(stub.ListDatasets, gateway_pb2.ListDatasetsRequest(),
                                               metadata=bearer(key), timeout=5)
            assert code == grpc.StatusCode.UNAUTHENTICATED and reason == "API_KEYS_FILE_MISSING"
            assert "API keys file is missing" in details and str(keys_file) not in details
    assert any("cannot be read" in record.getMessage() for record in caplog.records)
    moved.rename(keys_file)
    assert code_of(stub.ListDatasets, gateway_pb2.ListDatasetsRequest(), metadata=bearer(KEYS["read"]),
                   timeout=5)[0] == grpc.StatusCode.OK


def test_a_keys_file_with_a_bad_line_still_revokes_the_keys_it_no_longer_lists(guarded, keys_file, caplog):
    """While a line does not parse, only the keys read before that the file still lists stay, as
    their (good) lines now say; a key new to the file waits until the file parses."""
    _, stub, _, _ = guarded
    newcomer = new_key()

    def code(key, call=stub.ListDatasets, request=None):
        return code_of(call, request or gateway_pb2.ListDatasetsRequest(), metadata=bearer(key), timeout=10)[0]

    lines = [key_line(KEYS["admin"], "admin"),
             "# " + key_line(KEYS["write"], "write"),  # commented out: revoked
             key_line(KEYS["shoes_write"], "read", ["shoes"]),  # downgraded
             key_line(KEYS["shoes_read"], "read", ["shoes"]).replace(" read ", " raed "),  # mistyped: as before
             key_line(newcomer, "read"),
             "sha256:nothex read"]  # and KEYS["read"]'s line removed
    with caplog.at_level(logging.ERROR, logger="convsearch.gateway.auth"):
        keys_file.write_text("\n".join(lines) + "\n")
        assert code(KEYS["read"]) == code(KEYS["write"]) == grpc.StatusCode.UNAUTHENTICATED
        assert code(newcomer) == code(KEYS["other_read"]) == grpc.StatusCode.UNAUTHENTICATED
        assert code(KEYS["admin"]) == code(KEYS["shoes_read"]) == grpc.StatusCode.OK
        assert code(KEYS["shoes_write"], stub.Ingest,
                    iter([gateway_pb2.IngestRequest(dataset="shoes")])) == grpc.StatusCode.PERMISSION_DENIED
    assert any("only the 3 keys read before that it still lists stay" in record.getMessage()
               for record in caplog.records)
    keys_file.write_text(keys_text())
    assert code(KEYS["read"]) == code(KEYS["write"]) == grpc.StatusCode.OK


def test_an_open_gateway_warns_and_a_bad_keys_file_stops_it(backends, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="convsearch.gateway"):
        with gateway(backends) as (service, stub, _, _):
            assert service.guard.keys is None
            assert stub.ListDatasets(gateway_pb2.ListDatasetsRequest(), timeout=5).datasets
    assert any("is open" in record.getMessage() for record in caplog.records)
    bad = tmp_path / "bad-keys"
    bad.write_text(f"sha256:{'a' * 64} read\nsha256:{'b' * 64} superuser\n")
    with pytest.raises(SystemExit, match="bad-keys:2"):
        serve_gateway(*backends, api_keys=str(bad))
    with pytest.raises(SystemExit, match="cannot read"):
        serve_gateway(*backends, api_keys=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="below max_concurrent_rpcs"):
        GatewayConfig(max_concurrent_rpcs=8, max_concurrent_streams=8).validate()
    assert GatewayConfig(max_concurrent_rpcs=64).stream_cap == 32


# ---- limits -----------------------------------------------------------------------------------

def test_token_buckets_refill_at_their_rate():
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0


def test_token_buckets_forget_one_time_callers():
    """200,000 callers that each come once (new client addresses, cheap with IPv6) and are never
    refused: the buckets remembered stay bounded, and a sweep never forgets a caller still limited."""
    now = [0.0]
    buckets = TokenBuckets(rate=1.0, burst=1, clock=lambda: now[0])
    most = 0
    for n in range(200_000):
        now[0] += 0.001
        assert buckets.take(f"ipv6:[2001:db8::{n:x}]") == 0.0
        most = max(most, len(buckets))
    assert most <= TokenBuckets._PRUNE_AT
    assert buckets.take("steady") == 0.0
    for n in range(TokenBuckets._PRUNE_AT):  # at one instant: a sweep among them, and no bucket has refilled
        buckets.take(f"crowd-{n}")
    assert buckets.take("steady") > 0


def test_the_request_rate_per_key_is_limited_with_a_time_to_retry(backends, keys_file):
    with gateway(backends, api_keys=str(keys_file), rate_limit_per_s=0.5, rate_burst=2) as (_, stub, _, _):
        request = gateway_pb2.ListDatasetsRequest()
        for _ in range(2):
            stub.ListDatasets(request, metadata=bearer(KEYS["read"]), timeout=5)
        with pytest.raises(grpc.RpcError) as limited:
            stub.ListDatasets(request, metadata=bearer(KEYS["read"]), timeout=5)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(limited.value.trailing_metadata())
        wait_ms = int(trailing[RETRY_AFTER_MS])
        assert 0 < wait_ms <= 2000 and f"retry in {wait_ms} ms" in limited.value.details()
        assert "x-request-id" in trailing  # the observer's metadata is kept
        # Another key has a bucket of its own; health is never limited.
        stub.ListDatasets(request, metadata=bearer(KEYS["other_read"]), timeout=5)
    with gateway(backends, rate_limit_per_s=0.5, rate_burst=1) as (_, stub, channel, _):  # no keys: per address
        stub.ListDatasets(gateway_pb2.ListDatasetsRequest(), timeout=5)
        assert code_of(stub.ListDatasets, gateway_pb2.ListDatasetsRequest(),
                       timeout=5)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        for _ in range(3):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


class IdleRequests:
    """An Ingest request stream that sends `first` (or nothing) and then idles until released."""

    def __init__(self, release: threading.Event, first: gateway_pb2.IngestRequest | None = None):
        self.release = release
        self.first = first

    def __iter__(self):
        if self.first is not None:
            yield self.first
        self.release.wait(60)


def test_streams_per_key_are_capped(backends, keys_file):
    release = threading.Event()
    with gateway(backends, api_keys=str(keys_file), max_streams_per_key=2) as (service, stub, _, _):
        try:
            held = [stub.Ingest(iter(IdleRequests(release)), metadata=bearer(KEYS["write"])) for _ in range(2)]
            eventually(lambda: service.guard.streams.open == 2)
            code, details = code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")]),
                                    metadata=bearer(KEYS["write"]), timeout=5)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 streams open" in details
            # Another key is not held back; and the key may stream again once one of its streams ends.
            assert code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")]),
                           metadata=bearer(KEYS["admin"]), timeout=5)[0] == grpc.StatusCode.OK
            held[0].cancel()
            eventually(lambda: service.guard.streams.open == 1)
            assert code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")]),
                           metadata=bearer(KEYS["write"]), timeout=5)[0] == grpc.StatusCode.OK
        finally:
            release.set()


def test_idle_streams_are_ended_and_never_starve_unary_calls_or_health(backends):
    """200 idle Ingest streams (half sent nothing, half one message) against a gateway of 64
    workers: at most 32 streams are served (the rest refused at once), a search and a health
    check still answer within a 1 s deadline, and the idle ones end with DEADLINE_EXCEEDED."""
    release = threading.Event()
    idle_s = 4.0
    with gateway(backends, max_concurrent_rpcs=64, stream_idle_timeout_s=idle_s,
                 max_streams_per_key=32) as (service, stub, channel, _):
        assert service.guard.streams.total == 32
        stub.Search(search_request(), timeout=30)  # warm: the collection is loaded
        first = gateway_pb2.IngestRequest(dataset="shoes")
        try:
            calls = [stub.Ingest(iter(IdleRequests(release, first if n % 2 else None))) for n in range(200)]
            # Every stream is either being served (and idling) or already over (refused).
            eventually(lambda: service.guard.streams.open + sum(call.done() for call in calls) == 200)
            assert len(stub.Search(search_request(), timeout=1.0).hits) == 2
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=GATEWAY),
                                                               timeout=1.0)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            codes = [call.code() for call in calls]  # waits for each to end
        finally:
            release.set()
        ended = [call for call, code in zip(calls, codes, strict=True) if code == grpc.StatusCode.DEADLINE_EXCEEDED]
        refused = [call for call, code in zip(calls, codes, strict=True) if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(ended) + len(refused) == 200
        assert len(ended) >= 32
        assert all("idle timeout" in call.details() for call in ended)
        assert all("streams at once" in call.details() for call in refused)
        # Their slots and reader threads are freed: new streams are served.
        eventually(lambda: service.guard.streams.open == 0)
        eventually(lambda: not [t for t in threading.enumerate() if t.name == "stream-reader"])
        assert code_of(stub.Ingest, iter([first]), timeout=5)[0] == grpc.StatusCode.OK


def test_one_key_may_hold_half_the_stream_slots_by_default(backends, keys_file):
    release = threading.Event()
    with gateway(backends, api_keys=str(keys_file), max_concurrent_rpcs=8,
                 max_concurrent_streams=4) as (service, stub, _, _):
        try:
            held = [stub.Ingest(iter(IdleRequests(release)), metadata=bearer(KEYS["write"])) for _ in range(2)]
            eventually(lambda: service.guard.streams.open == 2)
            code, details, reason = failure_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")]),
                                               metadata=bearer(KEYS["write"]), timeout=5)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "TOO_MANY_STREAMS"
            assert "2 streams open" in details
            assert code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")]),
                           metadata=bearer(KEYS["admin"]), timeout=5)[0] == grpc.StatusCode.OK
        finally:
            release.set()
            for call in held:
                call.cancel()


def test_a_stream_whose_client_stops_reading_is_cancelled_and_frees_its_slot(backends, keys_file, caplog):
    """Two Ingest streams that send many items but never read a result: the gateway's sends block
    (flow control), outside the idle timeout's reach. Once a response has waited the idle timeout
    to be sent, the stream is cancelled (the client sees CANCELLED), its slot and worker freed,
    and another key's stream is served."""
    release = threading.Event()
    idle_s = 2.0

    def flood():
        for n in range(40):
            yield gateway_pb2.IngestRequest(dataset="shoes", items=[
                gateway_pb2.Item(id=f"{'x' * 240}-{n}-{i}") for i in range(2000)])  # no image: a failed result each
        release.wait(60)

    with gateway(backends, api_keys=str(keys_file), max_concurrent_rpcs=8, max_concurrent_streams=2,
                 max_streams_per_key=2, stream_idle_timeout_s=idle_s) as (service, stub, _, address):
        channels = [create_channel(address) for _ in range(2)]
        try:
            with caplog.at_level(logging.WARNING, logger="convsearch.gateway.auth"):
                held = [gateway_pb2_grpc.GatewayServiceStub(channel).Ingest(flood(), metadata=bearer(KEYS["write"]))
                        for channel in channels]  # never read
                eventually(lambda: service.guard.streams.open == 2)
                eventually(lambda: service.guard.streams.open == 0, timeout_s=30)
            assert code_of(stub.Ingest, iter([gateway_pb2.IngestRequest(dataset="shoes")]),
                           metadata=bearer(KEYS["admin"]), timeout=5)[0] == grpc.StatusCode.OK
            for call in held:  # a client that reads again gets what was sent, then CANCELLED
                with pytest.raises(grpc.RpcError) as ended:
                    for _ in call:
                        pass
                assert ended.value.code() == grpc.StatusCode.CANCELLED
            assert sum("for the client to read it" in record.getMessage() for record in caplog.records) == 2
        finally:
            release.set()
            for channel in channels:
                channel.close()
        eventually(lambda: not [t for t in threading.enumerate() if t.name in ("stream-reader", "stream-send-watch")])


# ---- client and CLI ---------------------------------------------------------------------------

def test_the_client_and_the_cli_send_a_key(guarded, monkeypatch, capsys):
    _, _, _, address = guarded
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    with Client(address, api_key=KEYS["read"]) as client:
        assert {d.name for d in client.datasets()} == {"shoes", "bags"}
        with pytest.raises(PermissionDenied, match="'admin' role"):
            client.delete_dataset("shoes")
    with Client(address) as client, pytest.raises(Unauthenticated):
        client.datasets()
    monkeypatch.setenv(ENV_API_KEY, KEYS["shoes_read"])
    with Client(address) as client:
        assert [d.name for d in client.datasets()] == ["shoes"]
        assert client.search("shoes", item_id="img0", k=2,
                             configuration=cli.Configuration("efficientnet_lite0", ("_conv_head",))).hits
    assert cli.main(["--gateway", address, "--json", "--api-key", KEYS["read"], "datasets"]) == 0
    assert {d["name"] for d in json.loads(capsys.readouterr().out)} == {"shoes", "bags"}
    monkeypatch.delenv(ENV_API_KEY)
    assert cli.main(["--gateway", address, "datasets"]) == 1
    assert "API key" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(KEYS["read"] + "\n"))
    assert cli.main(["api-key", "hash", "--role", "read"]) == 0
    assert capsys.readouterr().out.strip() == key_line(KEYS["read"], "read")
