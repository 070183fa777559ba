"""The CLI and server wiring as a public API: CONVSEARCH_GATEWAY, options before or after the
subcommand, `up` on a busy port, missing files, the datasets listing's JSON, reflection v1 and v1alpha."""

import datetime
import json
import types

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from convsearch import cli, reflection
from convsearch.cli import main, parser
from convsearch.client import Client, Dataset
from convsearch.embedding import Configuration
from convsearch.errors import InvalidArgument

UNREACHABLE = "127.0.0.1:1"
CREATED = datetime.datetime(2026, 11, 30, 4, 5, 6, tzinfo=datetime.UTC)


# ---- 1. CONVSEARCH_GATEWAY ------------------------------------------------------------------

def test_the_gateway_defaults_to_convsearch_gateway(monkeypatch, capsys):
    monkeypatch.setenv("CONVSEARCH_GATEWAY", UNREACHABLE)
    assert parser().parse_args(["datasets"]).gateway == UNREACHABLE
    assert parser().parse_args(["--gateway", "elsewhere:9", "datasets"]).gateway == "elsewhere:9"
    assert main(["datasets"]) == 3
    assert f"the gateway at {UNREACHABLE} is unavailable" in capsys.readouterr().err
    monkeypatch.delenv("CONVSEARCH_GATEWAY")
    assert parser().parse_args(["datasets"]).gateway == "127.0.0.1:50051"


# ---- 2. top-level options after the subcommand ---------------------------------------------

def test_options_go_before_or_after_the_subcommand(capsys):
    def parse(*argv):
        return parser().parse_args(list(argv))

    assert parse("datasets", "--json").json and parse("--json", "datasets").json
    assert not parse("datasets").json
    before = parse("--gateway", "a:1", "--api-key", "k", "--tls-ca", "ca.pem", "--json", "datasets")
    assert (before.gateway, before.api_key, before.tls_ca, before.json) == ("a:1", "k", "ca.pem", True)
    after = parse("search", "--dataset", "d", "--id", "x", "--gateway", "b:2", "--api-key", "k2",
                  "--tls-ca", "ca", "--tls-cert", "c", "--tls-key", "k", "--json")
    assert (after.gateway, after.api_key, after.tls_ca, after.tls_cert, after.tls_key, after.json) == (
        "b:2", "k2", "ca", "c", "k", True)
    assert parse("--gateway", "a:1", "datasets", "--gateway", "b:2").gateway == "b:2"  # the later one wins
    assert parse("snapshot", "list", "--json").json
    assert parse("health", "127.0.0.1:5", "--json", "--tls-ca", "ca").tls_ca == "ca"
    assert parse("up", "--json").json and parse("api-key", "new", "--role", "read", "--json").json
    assert main(["datasets", "--json", "--gateway", UNREACHABLE]) == 3
    assert f"the gateway at {UNREACHABLE} is unavailable" in capsys.readouterr().err


def test_api_key_json_after_the_subcommand(capsys):
    assert main(["api-key", "new", "--role", "read", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"key", "line"}


# ---- 3. `up` with a port that is taken -------------------------------------------------------

@pytest.mark.parametrize("option", ["--port", "--extractor-port", "--index-port"])
def test_up_refuses_a_busy_port_before_starting_anything(option, busy_port, tmp_path, capsys):
    assert main(["up", "--data-dir", str(tmp_path), option, str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert f"port {busy_port}" in err and "already in use" in err and option in err
    assert "starting" not in err and "Traceback" not in err
    assert not (tmp_path / "index").exists()  # nothing was started


def test_up_refuses_one_port_for_two_services(tmp_path, capsys):
    assert main(["up", "--data-dir", str(tmp_path), "--port", "50999", "--index-port", "50999"]) == 2
    assert "more than one service" in capsys.readouterr().err


def test_up_says_why_when_a_service_lost_its_port_after_the_check(capsys):
    class Stack:
        def stop(self):
            return {"gateway": "... cannot listen on 127.0.0.1:50051: address in use or not available\n"}

    args = types.SimpleNamespace(host="127.0.0.1", port=50051, extractor_port=50052, index_port=50053)
    assert cli.up_failed(args, Stack(), ["gateway"]) == 2
    err = capsys.readouterr().err
    assert "port 50051" in err and "--port" in err and "stop that process" in err

    class Crashed:
        def stop(self):
            return {"index": "starting\nValueError: boom\n"}

    assert cli.up_failed(args, Crashed(), ["index"]) == 1
    assert "the index exited" in (err := capsys.readouterr().err) and "ValueError: boom" in err


# ---- 4. files the user names ----------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["search", "--dataset", "d", "--image", "{missing}"],
    ["inspect", "--layer", "layer1", "--out", "{out}", "--image", "{missing}"],
    ["ingest", "{missing}", "--dataset", "d"],
    ["ingest", "{missing}.csv", "--dataset", "d"],
])
def test_a_missing_file_is_bad_usage_named_in_one_line(argv, tmp_path, capsys):
    missing = tmp_path / "no-such-image.png"
    argv = [arg.format(missing=missing, out=tmp_path / "out") for arg in argv]
    assert main(["--gateway", UNREACHABLE, *argv]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and "FileNotFoundError" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_image_that_is_a_folder_is_bad_usage(tmp_path, capsys):
    assert main(["--gateway", UNREACHABLE, "search", "--dataset", "d", "--image", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


# ---- 5. the datasets listing's JSON ---------------------------------------------------------

def test_datasets_json_does_not_claim_an_empty_list_of_collections(capsys):
    client = types.SimpleNamespace(datasets=lambda: [Dataset("fashion200", "Fashion-MNIST", 200, 9, CREATED)])
    assert cli.cmd_datasets(parser().parse_args(["datasets", "--json"]), client) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed == {"name": "fashion200", "description": "Fashion-MNIST", "item_count": 200,
                      "collection_count": 9, "created": "2026-11-30T04:05:06+00:00"}


# ---- 6. reflection v1 and v1alpha -----------------------------------------------------------

def v1alpha_ask(channel, **request):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]),
                                               timeout=5)))


def v1_ask(channel, **request):
    call = reflection.v1_stub(channel)
    return next(iter(call(iter([reflection.V1ServerReflectionRequest(**request)]), timeout=5)))


def check_reflection(address: str, service: str) -> None:
    expected = {service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"}
    channel = grpc.insecure_channel(address)
    try:
        for ask in (v1_ask, v1alpha_ask):
            listed = {entry.name for entry in ask(channel, list_services="").list_services_response.service}
            assert listed == expected, ask.__name__
            for name in listed:
                reply = ask(channel, file_containing_symbol=name)
                assert not reply.HasField("error_response"), (ask.__name__, name)
                files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                         for raw in reply.file_descriptor_response.file_descriptor_proto]
                package, _, short = name.rpartition(".")
                assert any(f.package == package and short in {s.name for s in f.service} for f in files), name
        # v1 describes itself under its own file and package
        reply = v1_ask(channel, file_containing_symbol="grpc.reflection.v1.ServerReflection")
        first = descriptor_pb2.FileDescriptorProto.FromString(reply.file_descriptor_response.file_descriptor_proto[0])
        assert (first.name, first.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
        assert v1_ask(channel, file_containing_symbol="no.such.Service").error_response.error_code == \
            grpc.StatusCode.NOT_FOUND.value[0]
    finally:
        channel.close()


def test_gateway_reflection_lists_only_real_services_over_v1_and_v1alpha():
    from grpc_health.v1 import health_pb2

    from convsearch_gateway.config import GatewayConfig
    from convsearch_gateway.server import EXTRACTOR_HEALTH, INDEX_HEALTH, SERVICE_NAME, build_server

    service, port = build_server(GatewayConfig(host="127.0.0.1", port=0, metrics_port=-1, extractor=UNREACHABLE,
                                               index=UNREACHABLE, health_interval_s=0.2))
    service.start()
    try:
        check_reflection(f"127.0.0.1:{port}", SERVICE_NAME)
        for name in (INDEX_HEALTH, EXTRACTOR_HEALTH):  # health-only names keep their health status
            reply = service.health.Check(health_pb2.HealthCheckRequest(service=name), None)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # its backends are down
    finally:
        service.stop(0.5)


def test_index_reflection_over_v1_and_v1alpha(tmp_path):
    from conftest import serve_index

    from convsearch_index.server import SERVICE_NAME

    service, channel, address = serve_index(tmp_path)
    try:
        check_reflection(address, SERVICE_NAME)
    finally:
        channel.close()
        service.stop(0.5)


# ---- 7. distances print as 0.0000, never -0.0000 --------------------------------------------

@pytest.mark.parametrize("distance", [-0.0, -1e-9, 0.0])
def test_a_distance_of_zero_never_prints_as_minus_zero(distance):
    hit = types.SimpleNamespace(id="a", label="cat", distance=distance)
    rows = cli.search_rows(types.SimpleNamespace(hits=[hit], query_label="cat"))
    assert rows[0]["distance"] == "0.0000"


def test_an_unknown_metric_or_pooling_is_a_usage_error_not_a_traceback(capsys):
    """`convsearch evaluate --metrics cosin` and the client's Configuration with an unknown name
    raised KeyError (a traceback, exit 1) instead of naming the choices."""
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "--dataset", "shoes", "--metrics", "cosin"])
    assert exited.value.code == 2 and "invalid choice: 'cosin'" in capsys.readouterr().err
    with Client("127.0.0.1:1") as client:  # refused before any call
        with pytest.raises(InvalidArgument, match="unknown metric 'cosin'; use one of cosine, euclidean"):
            list(client.evaluate("shoes", metrics=["cosin"]))
        with pytest.raises(InvalidArgument, match="unknown pooling 'mean'; use one of avg, max, flatten"):
            client.search("shoes", item_id="a", configuration=Configuration(pooling="mean"))
