"""The deployment artifacts agree with the code they deploy: a review for a first deployment.

Static checks only (nothing is started): every CONVSEARCH_* variable that the Kubernetes
renderings, the compose files and the Dockerfile set is a flag of the service that reads it and
parses with that service's own parser; every probe and healthcheck asks a health name the service
registers, on the port it serves; every `convsearch` command in them parses with the CLI's parser.
And what the READMEs tell a first-time operator to create matches what the manifests read: the
Secrets (and their keys) the pods take values from, and, for cert-manager, certificates that name
the hosts they are dialled by and the client names the backends allow.
"""

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
from unittest import mock

import pytest
import torch
import yaml

from convsearch import cli
from convsearch.serving import LIVENESS
from convsearch_extractor import server as extractor_server
from convsearch_extractor.config import ExtractorConfig
from convsearch_extractor.config import load_config as extractor_config
from convsearch_gateway import server as gateway_server
from convsearch_gateway.config import GatewayConfig
from convsearch_gateway.config import load_config as gateway_config
from convsearch_index import server as index_server
from convsearch_index.config import IndexConfig
from convsearch_index.config import load_config as index_config
from convsearch_web import security as web_security
from convsearch_web.config import WebConfig
from convsearch_web.config import load_config as web_config
from tests.test_kubernetes_manifests import RENDERINGS, config, only_container, render

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S_README = ROOT / "deploy" / "kubernetes" / "README.md"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
IMAGES_SCRIPT = ROOT / "scripts" / "images.sh"

CONFIGS = {"gateway": GatewayConfig, "extractor": ExtractorConfig, "index": IndexConfig, "web": WebConfig}
LOADERS = {"gateway": gateway_config, "extractor": extractor_config, "index": index_config, "web": web_config}
HEALTH_NAMES = {"gateway": gateway_server.SERVICE_NAME, "extractor": extractor_server.SERVICE_NAME,
                "index": index_server.SERVICE_NAME}
COMPOSE_FILES = [["docker-compose.yml"],
                 ["docker-compose.yml", "docker-compose.mtls.yml"],
                 ["docker-compose.yml", "docker-compose.api-keys.yml"],
                 ["docker-compose.yml", "docker-compose.mtls.yml", "docker-compose.api-keys.yml"],
                 ["docker-compose.yml", "docker-compose.replicas.yml"]]


def flag_variables(service: str) -> set[str]:
    """The environment variables `convsearch-<service>` reads as flags."""
    return {f"CONVSEARCH_{service.upper()}_{field.name.upper()}" for field in dataclasses.fields(CONFIGS[service])}


ALL_FLAG_VARIABLES = set().union(*(flag_variables(service) for service in CONFIGS))


def service_of_image(image: str) -> str:
    """`convsearch/index:0.1.0` (or a registry's copy of it) -> index."""
    return image.rsplit("/", 1)[-1].partition(":")[0]


def parse_service_config(service: str, env: dict[str, str]):
    """The service's own parser on exactly `env` (CUDA taken as present: the gpu overlay's nodes have it)."""
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(torch.cuda, "is_available",
                                                                         return_value=True):
        try:
            return LOADERS[service]([])
        except SystemExit as exc:
            raise AssertionError(f"convsearch-{service} refuses this environment ({exc}): "
                                 f"{ {k: v for k, v in env.items() if k.startswith('CONVSEARCH_')} }") from None


def dockerfile_env() -> dict[str, str]:
    """The CONVSEARCH_* variables every image sets (ENV lines of the final stage)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(CONVSEARCH_[A-Z0-9_]+)=(\S+)", line))
    return env


def dockerfile_args() -> set[str]:
    return set(re.findall(r"^ARG ([A-Z0-9_]+)", DOCKERFILE.read_text(), flags=re.M))


def health_command(words: list[str]) -> argparse.Namespace:
    """A `convsearch ... health ADDRESS [NAME]` command, parsed by the CLI's own parser."""
    assert words[0] == "convsearch", words
    try:
        args = cli.parser().parse_args(words[1:])
    except SystemExit:
        raise AssertionError(f"the CLI refuses {shlex.join(words)}") from None
    assert args.command == "health", words
    return args


def readme_yaml_documents(path: pathlib.Path) -> list[dict]:
    """Every YAML document in the ```yaml blocks of a README."""
    docs = []
    for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S):
        docs += [doc for doc in yaml.safe_load_all(block) if isinstance(doc, dict)]
    return docs


def host_of(address: str) -> str:
    """`dns:///convsearch-extractor:50052` -> convsearch-extractor."""
    return address.removeprefix("dns:///").rpartition(":")[0]


# --- Kubernetes -------------------------------------------------------------------------------

def _pods(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(doc, only_container(doc)) for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]


def _container_env(docs: list[dict], container: dict) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        env.update(config(docs) if source.get("configMapRef", {}).get("name") == "convsearch-config" else {})
    env.update({v["name"]: v["value"] for v in container.get("env", []) if "value" in v})
    return env


@pytest.mark.parametrize("folder", RENDERINGS)
def test_kubernetes_variables_are_flags_of_the_service_that_reads_them_and_parse(folder):
    docs = render(folder)
    unknown = sorted(set(config(docs)) - ALL_FLAG_VARIABLES)
    assert not unknown, f"ConfigMap keys no service reads: {unknown}"
    for workload, container in _pods(docs):
        service = service_of_image(container["image"])
        own = [v["name"] for v in container.get("env", []) if v["name"].startswith("CONVSEARCH_")]
        assert set(own) <= flag_variables(service), (workload["metadata"]["name"], sorted(set(own) -
                                                                                      flag_variables(service)))
        parsed = parse_service_config(service, {**dockerfile_env(), **_container_env(docs, container)})
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        main = "http" if service == "web" else "grpc"
        assert ports[main] == parsed.port, f"{workload['metadata']['name']}: serves {parsed.port}"
        if service != "web":
            assert ports["metrics"] == parsed.metrics_port, workload["metadata"]["name"]
            if any(m["mountPath"] == "/data" for m in container.get("volumeMounts", [])):
                assert getattr(parsed, "data_dir", "/data") == "/data"


@pytest.mark.parametrize("folder", RENDERINGS)
def test_kubernetes_probes_ask_names_the_services_register_on_the_port_they_serve(folder):
    docs = render(folder)
    for workload, container in _pods(docs):
        service = service_of_image(container["image"])
        parsed = parse_service_config(service, {**dockerfile_env(), **_container_env(docs, container)})
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            if service == "web":
                assert probe["httpGet"]["path"] in web_security.HEALTH  # answered whatever the Host
                continue
            if "grpc" in probe:
                port, name = probe["grpc"]["port"], probe["grpc"]["service"]
            else:
                args = health_command(probe["exec"]["command"])
                host, _, port = args.address.rpartition(":")
                assert host == "127.0.0.1", args.address
                port, name = int(port), args.service
                assert args.timeout < probe["timeoutSeconds"], f"{kind}: the probe is killed before it answers"
            assert port == parsed.port, f"{workload['metadata']['name']} {kind}: port {port}"
            assert name in (LIVENESS, HEALTH_NAMES[service]), f"{workload['metadata']['name']} {kind}: {name!r}"


# --- compose ----------------------------------------------------------------------------------

def _compose(files: list[str]) -> dict[str, dict]:
    """The services of `docker-compose -f A -f B ...`, merged as compose merges these fields."""
    services: dict[str, dict] = {}
    for name in files:
        for service, spec in yaml.safe_load((ROOT / name).read_text())["services"].items():
            merged = services.setdefault(service, {})
            for field, value in spec.items():
                if field == "environment":
                    merged.setdefault(field, {}).update(value)
                elif field in ("volumes", "expose", "ports"):
                    merged.setdefault(field, []).extend(value)
                else:
                    merged[field] = value
    return services


@pytest.mark.parametrize("files", COMPOSE_FILES, ids="+".join)
def test_compose_variables_are_flags_and_healthchecks_ask_registered_names(files):
    services = _compose(files)
    for name, spec in services.items():
        assert "image" in spec, f"{files}: {name} has no image (an override naming a service that is not there?)"
        service = service_of_image(spec["image"])
        env = {key: re.sub(r"\$\{[^}]*\}", "", str(value)) for key, value in spec.get("environment", {}).items()}
        assert set(env) <= flag_variables(service), (name, sorted(set(env) - flag_variables(service)))
        parsed = parse_service_config(service, {**dockerfile_env(), **env})
        for dependency in spec.get("depends_on", {}):
            assert dependency in services and "healthcheck" in services[dependency], (name, dependency)
        test = spec["healthcheck"]["test"]
        assert test[0] == "CMD"
        if service == "web":
            path = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(test))
            assert int(path.group(1)) == parsed.port and path.group(2) in web_security.HEALTH
            continue
        args = health_command(test[1:])
        assert args.address == f"127.0.0.1:{parsed.port}", (name, args.address)
        assert args.service == HEALTH_NAMES[service], (name, args.service)  # readiness gates depends_on
        if parsed.tls_cert:
            assert args.tls_ca and args.tls_cert and args.tls_key, f"{name}: a TLS service probed in plaintext"
        exposed = {str(port) for port in spec.get("expose", [])} | {
            str(port).rpartition(":")[2] for port in spec.get("ports", [])}
        assert {str(parsed.port), str(parsed.metrics_port)} <= exposed, (name, exposed)


def test_dockerfile_sets_only_flags_and_takes_the_build_arguments_images_sh_passes():
    assert set(dockerfile_env()) <= ALL_FLAG_VARIABLES
    passed = set(re.findall(r"--build-arg ([A-Z0-9_]+)=", IMAGES_SCRIPT.read_text()))
    assert passed == dockerfile_args(), (sorted(passed), sorted(dockerfile_args()))


def test_the_readme_names_as_build_arguments_only_args_of_the_dockerfile():
    # README.md once listed TORCH_VARIANT among the "Build arguments": it is an environment
    # variable of scripts/images.sh (it picks the extractor's torch wheels), and a
    # `docker build --build-arg TORCH_VARIANT=cpu` changes nothing.
    text = " ".join((ROOT / "README.md").read_text().split())
    for clause in re.findall(r"[Bb]uild arguments?: (.*?\.)(?: [A-Z]|$)", text):
        named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", clause))
        assert named <= dockerfile_args(), f"README.md calls {sorted(named - dockerfile_args())} build arguments"
    script = IMAGES_SCRIPT.read_text()
    for variable in ("BASE_IMAGE", "TORCH_VARIANT", "TAG"):
        assert re.search(rf"^{variable}=\$\{{{variable}:-", script, flags=re.M), f"images.sh does not read {variable}"


# --- what the READMEs tell an operator to create ----------------------------------------------

def _created_secrets(text: str) -> dict[str, set[str]]:
    """`kubectl ... create secret generic NAME --from-file=[KEY=]PATH --from-literal=KEY=VALUE`: the
    keys each command puts in its Secret."""
    text = re.sub(r"\\\n\s*", " ", text)
    created: dict[str, set[str]] = {}
    for name, options in re.findall(r"create secret generic ([a-z0-9-]+)((?: +--[a-z-]+=\S+)*)", text):
        keys = created.setdefault(name, set())
        for kind, value in re.findall(r"--(from-file|from-literal)=(\S+)", options):
            key, sep, path = value.partition("=")
            keys.add(key if sep or kind == "from-literal" else pathlib.PurePosixPath(value).name)
    return created


@pytest.mark.parametrize("folder", RENDERINGS)
def test_every_secret_value_a_pod_reads_is_created_by_the_readme(folder):
    # A secretKeyRef marked optional still starts the pod without it: the web page then calls a
    # gateway that asks for API keys with none, and every call it makes answers 401, while its
    # readiness (the gateway's health, which needs no key) says all is well.
    docs = render(folder)
    created = _created_secrets(K8S_README.read_text())
    needs_keys = bool(config(docs).get("CONVSEARCH_GATEWAY_API_KEYS"))
    for workload, container in _pods(docs):
        for variable in container.get("env", []):
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if not ref or (ref.get("optional") and not needs_keys):
                continue
            assert ref["key"] in created.get(ref["name"], set()), (
                f"{workload['metadata']['name']} reads {variable['name']} from Secret {ref['name']} key "
                f"{ref['key']!r}, which deploy/kubernetes/README.md never creates")
    if needs_keys:
        keys_file = pathlib.PurePosixPath(config(docs)["CONVSEARCH_GATEWAY_API_KEYS"])
        assert keys_file.name in created["convsearch-api-keys"]


def _certificates() -> dict[str, dict]:
    return {doc["spec"]["secretName"]: doc["spec"] for doc in readme_yaml_documents(K8S_README)
            if doc.get("kind") == "Certificate"}


def _names(spec: dict) -> set[str]:
    return set(spec.get("dnsNames", [])) | ({spec["commonName"]} if spec.get("commonName") else set())


def _tls_secrets(docs: list[dict]) -> dict[str, str]:
    """The Secret behind each mounted TLS file path, per workload: {workload/path: secret}."""
    found = {}
    for workload, container in _pods(docs):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        for mount in container.get("volumeMounts", []):
            secret = volumes.get(mount["name"], {}).get("secret", {}).get("secretName")  # a claim: none
            if secret:
                found[f"{workload['metadata']['name']}:{mount['mountPath']}"] = secret
    return found


def _secret_of(docs: list[dict], workload: str, path: str) -> str:
    for key, secret in _tls_secrets(docs).items():
        name, _, mount = key.partition(":")
        if name == workload and path.startswith(mount + "/"):
            return secret
    raise AssertionError(f"{workload}: {path} is on no Secret")


def test_cert_manager_client_certificates_carry_the_names_the_backends_allow():
    # The README once said the gateway's client certificate takes "no names": the extractor and the
    # index allow only CONVSEARCH_*_TLS_CLIENT_NAMES (gateway-client), matched against a client
    # certificate's common name and DNS names, so every call of the gateway would be refused
    # (PERMISSION_DENIED CLIENT_NOT_ALLOWED) and cert-manager refuses a Certificate without names.
    docs = render("overlays/mtls")
    data = config(docs)
    certificates = _certificates()
    env = {w["metadata"]["name"]: _container_env(docs, c) for w, c in _pods(docs)}
    clients = {  # client certificate -> the backends' allowed names it must match
        _secret_of(docs, "convsearch-gateway", data["CONVSEARCH_GATEWAY_BACKEND_TLS_CERT"]): [
            "CONVSEARCH_EXTRACTOR_TLS_CLIENT_NAMES", "CONVSEARCH_INDEX_TLS_CLIENT_NAMES"],
        _secret_of(docs, "convsearch-index-read", env["convsearch-index-read"]["CONVSEARCH_INDEX_FOLLOW_TLS_CERT"]): [
            "CONVSEARCH_INDEX_TLS_CLIENT_NAMES"],
    }
    for secret, allowed_by in clients.items():
        assert secret in certificates, f"deploy/kubernetes/README.md gives no Certificate for {secret}"
        spec = certificates[secret]
        assert "client auth" in spec.get("usages", []), secret
        for variable in allowed_by:
            allowed = {name.strip() for name in data[variable].split(",")}
            assert _names(spec) & allowed, f"{secret} names {sorted(_names(spec))}; {variable} allows {sorted(allowed)}"


def test_cert_manager_server_certificates_name_the_hosts_they_are_dialled_by():
    docs = render("overlays/mtls")
    data = config(docs)
    certificates = _certificates()
    env = {w["metadata"]["name"]: _container_env(docs, c) for w, c in _pods(docs)}
    dialled = {  # server certificate Secret -> the hosts its clients dial
        _secret_of(docs, "convsearch-extractor", data["CONVSEARCH_EXTRACTOR_TLS_CERT"]): [
            host_of(data["CONVSEARCH_GATEWAY_EXTRACTOR"])],
        _secret_of(docs, "convsearch-index", data["CONVSEARCH_INDEX_TLS_CERT"]): [
            host_of(data["CONVSEARCH_GATEWAY_INDEX"]),
            host_of(env["convsearch-index-read"]["CONVSEARCH_INDEX_FOLLOW"])],
        _secret_of(docs, "convsearch-index-read", data["CONVSEARCH_INDEX_TLS_CERT"]): [
            host_of(data["CONVSEARCH_GATEWAY_INDEX_REPLICAS"])],
        _secret_of(docs, "convsearch-gateway", data["CONVSEARCH_GATEWAY_TLS_CERT"]): [
            host_of(env["convsearch-web"]["CONVSEARCH_WEB_GATEWAY"])],
    }
    for secret, hosts in dialled.items():
        assert secret in certificates, f"deploy/kubernetes/README.md gives no Certificate for {secret}"
        spec = certificates[secret]
        assert set(hosts) <= set(spec.get("dnsNames", [])), f"{secret} must name {hosts}: {spec.get('dnsNames')}"
        assert "127.0.0.1" in spec.get("ipAddresses", []), f"{secret}: the exec probes dial 127.0.0.1"
        assert "server auth" in spec.get("usages", ["server auth"]), secret
    # a probe presents its Secret's certificate as a client: it needs client auth
    for workload, container in _pods(docs):
        probe = container["livenessProbe"]
        if "exec" in probe:
            args = health_command(probe["exec"]["command"])
            secret = _secret_of(docs, workload["metadata"]["name"], args.tls_cert)
            assert "client auth" in certificates[secret].get("usages", []), (workload["metadata"]["name"], secret)


def test_every_tls_secret_the_mtls_overlay_mounts_has_a_certificate_in_the_readme():
    docs = render("overlays/mtls")
    mounted = set(_tls_secrets(docs).values()) - {"convsearch-api-keys"}
    assert mounted - set(_certificates()) == set(), "no cert-manager Certificate given for these Secrets"
    assert "convsearch-api-keys" in set(_tls_secrets(docs).values())  # created by the README's commands
