"""The Kubernetes manifests in deploy/kubernetes: schema-valid, and right where a reviewer would look.

Every overlay is rendered as kustomize renders it, then each object is validated offline against
Kubernetes' own schemas (kubernetes-validate, strict: an unknown field fails). Rendering uses a
small renderer here that knows only what the manifests use (resources, strategic-merge patches,
whole-object `$patch: delete`, images) and refuses anything else; where a real kustomize is at hand (`kustomize`, or
`kubectl kustomize`, on PATH or named by CONVSEARCH_KUSTOMIZE), the test also renders with it and
checks that both agree, so the renderer cannot drift from kustomize unnoticed.
"""

import copy
import functools
import os
import pathlib
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


class UnsupportedByRenderer(ValueError):
    """A kustomize feature this test's renderer refuses to guess at."""
KUBERNETES_VERSION = "1.37.0"  # the newest that kubernetes-validate 1.37 bundles schemas for
RENDERINGS = ["base", "overlays/cpu", "overlays/gpu", "overlays/mtls", "overlays/primaries"]
# Renderings whose services serve TLS (mutual TLS at the extractor and index): probes are `exec`
# probes running `convsearch health` with TLS options, since native gRPC probes cannot speak TLS.
TLS_RENDERINGS = ["overlays/mtls"]
PLAINTEXT_RENDERINGS = [folder for folder in RENDERINGS if folder not in TLS_RENDERINGS]
# index-read: the index's read-only followers (`convsearch-index --follow`): the index's image,
# flags, ports and health names, in a Deployment of their own.
COMPONENTS = ("gateway", "extractor", "index", "index-read")
SERVICE = {"gateway": "gateway", "extractor": "extractor", "index": "index", "index-read": "index"}
GRPC_PORT = {"gateway": 50051, "extractor": 50052, "index": 50053, "index-read": 50053}
METRICS_PORT = {"gateway": 9051, "extractor": 9052, "index": 9053, "index-read": 9053}
READINESS_NAME = {
    "gateway": "convsearch.gateway.v1.GatewayService",
    "extractor": "convsearch.extractor.v1.ExtractorService",
    "index": "convsearch.index.v1.IndexService",
    "index-read": "convsearch.index.v1.IndexService",
}
# Index primaries per rendering (pods of the StatefulSet); with one, followers read from it.
PRIMARIES = {"overlays/primaries": 3}
FOLLOWER_RENDERINGS = [folder for folder in RENDERINGS if PRIMARIES.get(folder, 1) == 1]
FOLLOWERS_SERVICE = "dns:///convsearch-index-read:50053"
LIVENESS_NAME = "liveness"
STARTUP_MINIMUM_S = {"extractor": 300, "index": 300, "index-read": 600}  # model load, log replay, first copy
CONFIG_MAP = "convsearch-config"
WEB = "convsearch-web"  # the web page: an HTTP client of the gateway, not one of the gRPC components
DEFAULT_GRACE_S = 10.0


# --- rendering ---------------------------------------------------------------------------------

# List fields that a strategic-merge patch merges item by item (by this key) instead of replacing;
# the patchMergeKey of Kubernetes' own types for every list the manifests patch.
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "imagePullSecrets": "name"}
_SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}


def _load_all(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _merge_key(field: str, items: list) -> str | None:
    if field == "ports":  # containers' ports merge by containerPort, a Service's by port
        return "containerPort" if any("containerPort" in item for item in items) else "port"
    return _MERGE_KEYS.get(field)


def strategic_merge(target: dict, patch: dict) -> None:
    """Applies a strategic-merge patch to `target` in place (the subset kustomize uses here)."""
    for field, value in patch.items():
        if field.startswith("$"):
            raise UnsupportedByRenderer(f"patch directive {field} is not supported by this renderer")
        if value is None:
            target.pop(field, None)
        elif isinstance(value, dict) and isinstance(target.get(field), dict):
            strategic_merge(target[field], value)
        elif isinstance(value, list) and isinstance(target.get(field), list) and _merge_key(field, value):
            key = _merge_key(field, value)
            for item in value:
                match = [old for old in target[field] if old.get(key) == item.get(key)]
                if match:
                    strategic_merge(match[0], item)
                else:
                    target[field].append(copy.deepcopy(item))
        else:
            target[field] = copy.deepcopy(value)


def _set_images(doc: dict, images: list[dict]) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name, _, tag = container["image"].partition(":")
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def build(directory: pathlib.Path) -> list[dict]:
    """Renders the kustomization in `directory` as `kustomize build` would (the subset used here)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED_KUSTOMIZATION_KEYS
    if unknown:
        raise UnsupportedByRenderer(f"{directory}: this renderer does not know {sorted(unknown)}")
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += build(path) if path.is_dir() else _load_all(path)
    keys = [_key(doc) for doc in docs]
    duplicates = {key for key in keys if keys.count(key) > 1}
    if duplicates:
        raise ValueError(f"{directory}: objects defined twice: {sorted(duplicates)}")
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise UnsupportedByRenderer(f"{directory}: only `patches: - path: FILE` is supported, got {entry}")
        for patch in _load_all(directory / entry["path"]):
            directive = patch.pop("$patch", None)
            if directive not in (None, "delete"):
                raise UnsupportedByRenderer(f"{directory}: only `$patch: delete` of a whole object is supported")
            targets = [doc for doc in docs if _key(doc) == _key(patch) and doc["apiVersion"] == patch["apiVersion"]]
            if len(targets) != 1:
                raise ValueError(f"{directory}: patch {entry['path']} names {_key(patch)}, which is not there")
            if directive == "delete":
                if set(patch) - {"apiVersion", "kind", "metadata"} or set(patch["metadata"]) != {"name"}:
                    raise UnsupportedByRenderer(f"{directory}: a `$patch: delete` names its object and no more")
                docs.remove(targets[0])
            else:
                strategic_merge(targets[0], patch)
    for doc in docs:
        _set_images(doc, kustomization.get("images", []))
    return docs


@functools.cache
def _render_with_renderer(folder: str) -> tuple[dict, ...]:
    return tuple(build(ROOT / folder))


def _kustomize_command() -> list[str] | None:
    """A kustomize (v4 or newer) that runs here: CONVSEARCH_KUSTOMIZE, `kustomize` or `kubectl`."""
    installed = ROOT.parents[1] / ".tools" / "bin" / "kubectl"  # put there by scripts/setup.sh
    for candidate in (os.environ.get("CONVSEARCH_KUSTOMIZE"), str(installed) if installed.exists() else None,
                      shutil.which("kustomize"), shutil.which("kubectl")):
        if not candidate:
            continue
        is_kubectl = "kubectl" in pathlib.Path(candidate).name
        version_cmd = [candidate, "version", "--client"] if is_kubectl else [candidate, "version"]
        try:
            out = subprocess.run(version_cmd, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        found = re.search(r"Kustomize Version: v(\d+)" if is_kubectl else r"v(\d+)\.\d+", out)
        if found and int(found.group(1)) >= 4:
            return [candidate, "kustomize"] if is_kubectl else [candidate, "build"]
    return None


@functools.cache
def _kustomize() -> tuple[str, ...] | None:
    command = _kustomize_command()
    return tuple(command) if command else None


@functools.cache
def _render_with_kustomize(folder: str) -> tuple[dict, ...]:
    command = _kustomize()
    result = subprocess.run([*command, str(ROOT / folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} {folder} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def render(folder: str) -> list[dict]:
    """The objects `kubectl apply -k deploy/kubernetes/<folder>` would create (a fresh copy)."""
    return copy.deepcopy(list(_render_with_renderer(folder)))


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --- helpers for the checks --------------------------------------------------------------------

def workloads(docs: list[dict]) -> dict[str, dict]:
    """The gRPC components' Deployments and StatefulSets by component (app.kubernetes.io/component
    of the pod); the web page's is tested on its own."""
    found = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["name"] != WEB:
            component = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            assert component not in found, f"two workloads for {component}"
            found[component] = doc
    return found


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def only_container(workload: dict) -> dict:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def config(docs: list[dict]) -> dict[str, str]:
    return by_kind(docs, "ConfigMap")[CONFIG_MAP]["data"]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def quantity(value) -> float:
    """A Kubernetes quantity as a number (cores or bytes)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (match.group(2) in units or not match.group(2)), f"unreadable quantity {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


# --- validation --------------------------------------------------------------------------------

def test_overlays_are_cpu_gpu_mtls_and_primaries():
    overlays = {path.parent.name for path in (ROOT / "overlays").glob("*/kustomization.yaml")}
    assert overlays == {"cpu", "gpu", "mtls", "primaries"}
    assert [f"overlays/{name}" for name in sorted(overlays)] == RENDERINGS[1:]


def test_every_base_resource_file_validates():
    kustomization = yaml.safe_load((ROOT / "base" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        for doc in _load_all(ROOT / "base" / resource):
            validate(doc)


@pytest.mark.parametrize("folder", RENDERINGS)
def test_rendering_validates_against_kubernetes_schemas(folder):
    docs = render(folder)
    assert len(docs) >= 10
    for doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{folder}: {doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


@pytest.mark.parametrize("folder", RENDERINGS)
def test_renderer_agrees_with_kustomize(folder):
    if _kustomize() is None:
        pytest.skip("no kustomize v4+ here (kustomize or kubectl on PATH, or CONVSEARCH_KUSTOMIZE)")
    ours = {_key(doc): _unordered(doc) for doc in render(folder)}
    theirs = {_key(doc): _unordered(doc) for doc in _render_with_kustomize(folder)}
    assert sorted(ours) == sorted(theirs)
    for key, doc in ours.items():
        assert doc == theirs[key], f"{folder}: {key} differs from kustomize's rendering"


def _unordered(value, field: str = ""):
    """`value` with merge-keyed lists sorted by key (kustomize may move a patched item first)."""
    if isinstance(value, dict):
        return {k: _unordered(v, k) for k, v in value.items()}
    if isinstance(value, list):
        items = [_unordered(item) for item in value]
        key = _merge_key(field, items) if all(isinstance(item, dict) for item in items) else None
        return sorted(items, key=lambda item: str(item.get(key))) if key else items
    return value


def test_validation_rejects_broken_manifests():
    deployment = by_kind(render("base"), "Deployment")["convsearch-gateway"]
    misspelt = copy.deepcopy(deployment)
    container = only_container(misspelt)
    container["readinesProbe"] = container.pop("readinessProbe")  # an unknown field
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    bad_probe = copy.deepcopy(deployment)
    only_container(bad_probe)["livenessProbe"]["grpc"]["port"] = "grpc"  # grpc probes take a number
    for broken in (misspelt, wrong_type, bad_probe):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken)


def test_renderer_refuses_what_it_cannot_render_faithfully(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "patch.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: patch.yaml}]\n")
    with pytest.raises(ValueError, match="not there"):
        build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nnamePrefix: x-\n")
    with pytest.raises(UnsupportedByRenderer, match="namePrefix"):
        build(tmp_path)
    with pytest.raises(UnsupportedByRenderer):
        strategic_merge({"a": [1]}, {"$patch": "replace"})
    (tmp_path / "patch.yaml").write_text("$patch: replace\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: patch.yaml}]\n")
    with pytest.raises(UnsupportedByRenderer, match="delete"):
        build(tmp_path)
    (tmp_path / "patch.yaml").write_text("$patch: delete\napiVersion: v1\nkind: ConfigMap\n"
                                         "metadata: {name: a}\ndata: {x: y}\n")
    with pytest.raises(UnsupportedByRenderer, match="no more"):
        build(tmp_path)


def test_renderer_deletes_whole_objects_like_kustomize(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n"
                                      "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
    (tmp_path / "patch.yaml").write_text("$patch: delete\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\npatches: [{path: patch.yaml}]\n")
    assert [_key(doc) for doc in build(tmp_path)] == [("ConfigMap", "b")]


def test_strategic_merge_merges_lists_by_key_and_replaces_others():
    target = {"containers": [{"name": "a", "image": "x", "args": ["1"]}], "tolerations": [{"key": "k"}]}
    strategic_merge(target, {"containers": [{"name": "a", "args": ["2"]}, {"name": "b"}],
                             "tolerations": [{"key": "n"}]})
    assert target == {"containers": [{"name": "a", "image": "x", "args": ["2"]}, {"name": "b"}],
                      "tolerations": [{"key": "n"}]}


# --- what a reviewer reads for -----------------------------------------------------------------

@pytest.mark.parametrize("folder", RENDERINGS)
def test_objects_are_the_expected_ones(folder):
    kinds = sorted(_key(doc) for doc in render(folder))
    expected = [("ConfigMap", CONFIG_MAP)]
    for component in COMPONENTS:
        if component == "index-read" and folder not in FOLLOWER_RENDERINGS:
            continue
        name = f"convsearch-{component}"
        expected += [("Service", name), ("NetworkPolicy", name)]
        expected += [("StatefulSet", name)] if component == "index" else [
            ("Deployment", name), ("HorizontalPodAutoscaler", name)]
        if component in ("gateway", "index-read"):  # at least 2 pods: one stays through a drain
            expected.append(("PodDisruptionBudget", name))
    expected += [(kind, WEB) for kind in ("Deployment", "Service", "NetworkPolicy")]  # the web page, a client
    assert kinds == sorted(expected)


@pytest.mark.parametrize("folder", PLAINTEXT_RENDERINGS)
def test_every_container_has_grpc_startup_readiness_and_liveness_probes(folder):
    for component, workload in workloads(render(folder)).items():
        container = only_container(workload)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": GRPC_PORT[component], "metrics": METRICS_PORT[component]}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert not {"exec", "httpGet", "tcpSocket"} & set(probe), f"{component} {kind}: grpc only"
            assert probe["grpc"]["port"] == GRPC_PORT[component], f"{component} {kind}"
        assert container["readinessProbe"]["grpc"]["service"] == READINESS_NAME[component]
        assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_NAME
        startup = container["startupProbe"]
        assert startup["grpc"]["service"] in (READINESS_NAME[component], LIVENESS_NAME)
        if component in STARTUP_MINIMUM_S:  # a model to load, a log to replay, a primary to copy
            assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_MINIMUM_S[component], component


def test_gateway_is_never_restarted_for_its_backends():
    # GatewayService follows the extractor and index: a gateway that restarted whenever they are
    # down would only add to an outage. It gates traffic (readiness), nothing else.
    gateway = only_container(workloads(render("base"))["gateway"])
    assert gateway["readinessProbe"]["grpc"]["service"] == READINESS_NAME["gateway"]
    for kind in ("livenessProbe", "startupProbe"):
        assert gateway[kind]["grpc"]["service"] == LIVENESS_NAME
        assert not gateway[kind]["grpc"]["service"].startswith(READINESS_NAME["gateway"])


@pytest.mark.parametrize("folder", RENDERINGS)
def test_every_container_has_requests_and_limits(folder):
    for component, workload in workloads(render(folder)).items():
        resources = only_container(workload)["resources"]
        for resource in ("cpu", "memory"):
            request, limit = resources["requests"][resource], resources["limits"][resource]
            assert quantity(request) <= quantity(limit), f"{component} {resource}: {request} > {limit}"


@pytest.mark.parametrize("folder", RENDERINGS)
def test_every_container_runs_locked_down_as_non_root(folder):
    for component, workload in workloads(render(folder)).items():
        pod = pod_spec(workload)
        security = {**pod.get("securityContext", {}), **only_container(workload)["securityContext"]}
        assert security["runAsNonRoot"] is True, component
        assert security["runAsUser"] == 10001, component
        assert security["readOnlyRootFilesystem"] is True, component
        assert security["allowPrivilegeEscalation"] is False, component
        assert security["capabilities"]["drop"] == ["ALL"], component
        assert not security["capabilities"].get("add"), component
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, component
        assert pod.get("automountServiceAccountToken") is False, component
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), component


@pytest.mark.parametrize("folder", RENDERINGS)
def test_no_service_links_that_would_read_as_flags(folder):
    # A Service named convsearch-gateway would give every pod CONVSEARCH_GATEWAY_PORT=tcp://...,
    # which the gateway reads as its --port flag and refuses.
    for component, workload in workloads(render(folder)).items():
        assert pod_spec(workload)["enableServiceLinks"] is False, component


@pytest.mark.parametrize("folder", RENDERINGS)
def test_volumes_tmp_everywhere_data_for_the_index_weights_for_the_extractor(folder):
    docs = render(folder)
    for component, workload in workloads(docs).items():
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in only_container(workload)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{component}: /tmp must be an emptyDir"
        if component == "index-read":  # a follower's copy: its own, gone with the pod (copied again)
            assert "emptyDir" in volumes[mounts["/data"]], "a follower's /data is an emptyDir"
            assert volumes[mounts["/data"]]["emptyDir"].get("sizeLimit"), "an unbounded emptyDir can fill the node"
    index = workloads(docs)["index"]
    claims = [t["metadata"]["name"] for t in index["spec"]["volumeClaimTemplates"]]
    assert index["spec"]["replicas"] == PRIMARIES.get(folder, 1)
    assert index["spec"]["serviceName"] == "convsearch-index"
    assert {m["mountPath"]: m["name"] for m in only_container(index)["volumeMounts"]}["/data"] in claims
    assert config(docs)["CONVSEARCH_INDEX_DATA_DIR"] == "/data"
    extractor = workloads(docs)["extractor"]
    mounts = {m["mountPath"]: m for m in only_container(extractor)["volumeMounts"]}
    assert mounts["/weights"]["name"] in {v["name"] for v in pod_spec(extractor)["volumes"]}
    assert config(docs)["CONVSEARCH_EXTRACTOR_WEIGHTS_DIR"] == "/weights"


@pytest.mark.parametrize("folder", RENDERINGS)
def test_termination_grace_outlasts_the_drain(folder):
    docs = render(folder)
    minimum = {"gateway": 30, "extractor": 30, "index": 60, "index-read": 60}
    for component, workload in workloads(docs).items():
        pod = pod_spec(workload)
        grace_s = float(config(docs).get(f"CONVSEARCH_{SERVICE[component].upper()}_GRACE_S", DEFAULT_GRACE_S))
        pre_stop = only_container(workload).get("lifecycle", {}).get("preStop", {})
        pause_s = pre_stop.get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] >= minimum[component], component
        assert pod["terminationGracePeriodSeconds"] > grace_s + pause_s, component


@pytest.mark.parametrize("folder", RENDERINGS)
def test_services_select_their_pods_on_named_ports(folder):
    docs = render(folder)
    found = workloads(docs)
    services = by_kind(docs, "Service")
    for component, workload in found.items():
        service = services[f"convsearch-{component}"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects({"matchLabels": service["spec"]["selector"]}, labels), component
        assert selects(workload["spec"]["selector"], labels), component
        names = {p["name"] for p in only_container(workload)["ports"]}
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == GRPC_PORT[component]
        assert all(p["targetPort"] in names for p in ports.values()), component
        headless = service["spec"].get("clusterIP") == "None"
        assert headless == (component != "gateway"), f"{component}: headless is {headless}"


@pytest.mark.parametrize("folder", RENDERINGS)
def test_autoscalers_target_existing_workloads_by_cpu(folder):
    docs = render(folder)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    followers = {"convsearch-index-read"} if folder in FOLLOWER_RENDERINGS else set()
    assert set(hpas) == {"convsearch-gateway", "convsearch-extractor"} | followers
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        matches = [doc for doc in docs if doc["kind"] == target["kind"]
                   and doc["metadata"]["name"] == target["name"] and doc["apiVersion"] == target["apiVersion"]]
        assert len(matches) == 1, f"{hpa['metadata']['name']} targets {target}, which is not rendered"
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert only_container(matches[0])["resources"]["requests"]["cpu"], "utilisation needs a CPU request"


@pytest.mark.parametrize("component", ["gateway", "index-read"])
def test_disruption_budgets_leave_a_gateway_and_a_follower_up(component):
    docs = render("base")
    budget = by_kind(docs, "PodDisruptionBudget")[f"convsearch-{component}"]
    workload = workloads(docs)[component]
    assert selects(budget["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
    others = [name for name, other in workloads(docs).items() if name != component
              and selects(budget["spec"]["selector"], other["spec"]["template"]["metadata"]["labels"])]
    assert not others, f"{component}'s budget also selects {others}"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[f"convsearch-{component}"]
    assert 1 <= budget["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= workload["spec"]["replicas"]


@pytest.mark.parametrize("folder", RENDERINGS)
def test_network_policies_let_only_the_gateway_reach_the_backends(folder):
    docs = render(folder)
    found = workloads(docs)
    policies = {name: policy for name, policy in by_kind(docs, "NetworkPolicy").items() if name != WEB}
    assert set(policies) == {f"convsearch-{component}" for component in found}
    labels = {component: workload["spec"]["template"]["metadata"]["labels"] for component, workload in found.items()}
    # Who may call each backend's gRPC port: the gateway; at the primary also its followers, which
    # copy and tail it (their pods' label, whether or not this rendering runs any).
    callers = {"extractor": ["gateway"], "index": ["gateway", "index-read"], "index-read": ["gateway"]}
    for component, workload in found.items():
        policy = policies[f"convsearch-{component}"]
        assert selects(policy["spec"]["podSelector"], workload["spec"]["template"]["metadata"]["labels"])
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        rules = {port["port"]: rule for rule in policy["spec"]["ingress"] for port in rule["ports"]}
        assert set(rules) == {GRPC_PORT[component], METRICS_PORT[component]}, component
        grpc_rule, metrics_rule = rules[GRPC_PORT[component]], rules[METRICS_PORT[component]]
        if component == "gateway":
            assert "from" not in grpc_rule  # the API is for any client
        else:
            assert grpc_rule["ports"] == [{"port": GRPC_PORT[component], "protocol": "TCP"}]
            assert len(grpc_rule["from"]) == len(callers[component]), component
            for peer, caller in zip(grpc_rule["from"], callers[component], strict=True):
                assert set(peer) == {"podSelector"}, component
                peer = peer["podSelector"]
                assert peer.get("matchLabels") == {"app.kubernetes.io/name": f"convsearch-{caller}"}, component
                # that caller alone: an empty selector would admit every pod of the namespace
                others = [name for name in found if name != caller and selects(peer, labels[name])]
                assert not others, f"{component}: {peer} admits {others}"
                if caller in found:
                    assert selects(peer, labels[caller]), f"{component}: {peer} misses the {caller} pods"
        assert metrics_rule["from"], f"{component}: metrics open to everyone"
        for peer in metrics_rule["from"]:
            assert peer.get("podSelector", {}).get("matchLabels"), f"{component}: metrics peers need a pod label"
            assert "ipBlock" not in peer


@pytest.mark.parametrize("folder", RENDERINGS)
def test_the_web_page_reaches_the_gateway_and_is_probed_over_http(folder):
    docs = render(folder)
    deployment = by_kind(docs, "Deployment")[WEB]
    spec, container = pod_spec(deployment), only_container(deployment)
    assert spec["enableServiceLinks"] is False  # CONVSEARCH_WEB_PORT=tcp://... would be read as --port
    assert container["image"] == "convsearch/web:0.1.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["CONVSEARCH_WEB_GATEWAY"]["value"] == f"convsearch-gateway:{GRPC_PORT['gateway']}"
    assert env["CONVSEARCH_WEB_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["CONVSEARCH_WEB_ALLOWED_HOSTS"]["value"] == WEB  # its Service's name; localhost is always allowed
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    paths = {kind: container[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert all(container[kind]["httpGet"]["port"] == "http" for kind in paths)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} - {"/etc/convsearch/gateway-ca"} == {"/tmp"}  # uploads
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = by_kind(docs, "Service")[WEB]
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    policy = by_kind(docs, "NetworkPolicy")[WEB]
    assert selects(policy["spec"]["podSelector"], labels)
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    if "mtls" in str(folder):  # TLS to the gateway's API, with the gateway's CA and nothing else of its Secret
        assert env["CONVSEARCH_WEB_TLS_CA"]["value"] == "/etc/convsearch/gateway-ca/ca.crt"
        [volume] = [v for v in spec["volumes"] if v["name"] == "gateway-ca"]
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    else:
        assert "CONVSEARCH_WEB_TLS_CA" not in env


@pytest.mark.parametrize("folder", RENDERINGS)
def test_flags_come_from_the_config_map(folder):
    docs = render(folder)
    data = config(docs)
    services = by_kind(docs, "Service")
    assert all(re.fullmatch(r"CONVSEARCH_(GATEWAY|EXTRACTOR|INDEX)_[A-Z0-9_]+", key) for key in data), sorted(data)
    assert all(isinstance(value, str) for value in data.values())
    assert not [key for key in data if "THREAD" in key], "thread counts come from the CPU limit"
    extractor_address = data["CONVSEARCH_GATEWAY_EXTRACTOR"]
    assert extractor_address == "dns:///convsearch-extractor:50052"
    assert services["convsearch-extractor"]["spec"]["clusterIP"] == "None"
    primaries = [f"convsearch-index-{n}.convsearch-index:50053" for n in range(PRIMARIES.get(folder, 1))]
    assert data["CONVSEARCH_GATEWAY_INDEX"].split(",") == primaries
    if folder in FOLLOWER_RENDERINGS:
        assert data["CONVSEARCH_GATEWAY_INDEX_REPLICAS"] == FOLLOWERS_SERVICE
    else:
        assert not data.get("CONVSEARCH_GATEWAY_INDEX_REPLICAS"), "no followers with several primaries"
    # The primary reads this map too: following, and how, is set on the followers alone.
    assert not [key for key in data if key.startswith("CONVSEARCH_INDEX_FOLLOW")], "a primary must not follow"
    assert data["CONVSEARCH_EXTRACTOR_MAX_CONNECTION_AGE_S"] == "30"
    for component, workload in workloads(docs).items():
        container = only_container(workload)
        assert {"configMapRef": {"name": CONFIG_MAP}} in container["envFrom"], component
        for variable in container.get("env", []):
            if component == "index-read" and variable["name"].startswith("CONVSEARCH_INDEX_FOLLOW"):
                continue  # the followers' own flags: the primary reads the ConfigMap too
            assert not variable["name"].startswith("CONVSEARCH_"), "flags belong in the ConfigMap"
            assert "THREADS" not in variable["name"], "thread counts come from the CPU limit"
        prefix = f"CONVSEARCH_{SERVICE[component].upper()}_"
        assert data[prefix + "LOG_FORMAT"] == "json"
        assert data[prefix + "METRICS_PORT"] == str(METRICS_PORT[component])


@pytest.mark.parametrize("folder", RENDERINGS)
def test_metrics_ports_are_named_and_annotated_for_prometheus(folder):
    for component, workload in workloads(render(folder)).items():
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        ports = {p["name"]: p["containerPort"] for p in only_container(workload)["ports"]}
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(ports["metrics"]) == str(METRICS_PORT[component])
        assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("folder", RENDERINGS)
def test_images(folder):
    for component, workload in workloads(render(folder)).items():
        image = only_container(workload)["image"]
        tag = "0.1.0-cuda" if (component, folder) == ("extractor", "overlays/gpu") else "0.1.0"
        assert image == f"convsearch/{SERVICE[component]}:{tag}"


def test_cpu_overlay_sizes_the_extractor_for_cpu():
    docs = render("overlays/cpu")
    extractor = workloads(docs)["extractor"]
    resources = only_container(extractor)["resources"]
    assert config(docs)["CONVSEARCH_EXTRACTOR_DEVICE"] == "cpu"
    assert quantity(resources["limits"]["cpu"]) >= 2
    assert "nvidia.com/gpu" not in resources["limits"]
    assert not pod_spec(extractor).get("nodeSelector") and not pod_spec(extractor).get("tolerations")


def test_gpu_overlay_puts_the_extractor_on_a_gpu_node():
    docs = render("overlays/gpu")
    extractor = workloads(docs)["extractor"]
    pod = pod_spec(extractor)
    resources = only_container(extractor)["resources"]
    assert config(docs)["CONVSEARCH_EXTRACTOR_DEVICE"] == "cuda"
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert quantity(resources["limits"]["cpu"]) >= 1
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    # the overlay changes the extractor alone
    base = {_key(doc): doc for doc in render("base")}
    changed = {_key(doc) for doc in docs if doc != base[_key(doc)]}
    assert changed == {("Deployment", "convsearch-extractor"), ("ConfigMap", CONFIG_MAP)}


# --- the mtls overlay: mutual TLS between the gateway and its backends, API keys -------------------

def _option(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, f"{flag} once in {command}"
    return command[command.index(flag) + 1]


def secret_file(workload: dict, path: str) -> str:
    """The Secret that `path` is mounted from in the workload's container (read-only, a whole volume:
    no subPath, so Kubernetes' updates of a rotated Secret reach the file)."""
    container = only_container(workload)
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{path} is not under exactly one mount of {container['name']}: {mounts}"
    mount = mounts[0]
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    volume = {v["name"]: v for v in pod_spec(workload)["volumes"]}[mount["name"]]
    assert "secret" in volume, f"{path}: {mount['name']} is not a Secret volume"
    assert volume["secret"].get("optional") is not True, f"{path}: a missing Secret must stop the pod"
    mode = volume["secret"].get("defaultMode", 0o644)
    assert mode & 0o007 == 0, f"{path}: readable by every user ({oct(mode)})"
    assert mode & 0o040, f"{path}: the pod's fsGroup cannot read it ({oct(mode)})"
    assert pod_spec(workload)["securityContext"]["fsGroup"] == 10001
    return volume["secret"]["secretName"]


@pytest.mark.parametrize("folder", TLS_RENDERINGS)
def test_tls_containers_probe_with_exec_convsearch_health_and_tls_options(folder):
    # Native gRPC probes cannot speak TLS; each probe runs the image's `convsearch health` with the
    # CA, a certificate and its key, against the container's own port, for the same health names.
    for component, workload in workloads(render(folder)).items():
        container = only_container(workload)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert not {"grpc", "httpGet", "tcpSocket"} & set(probe), f"{component} {kind}: exec only under TLS"
            command = probe["exec"]["command"]
            assert all(isinstance(word, str) for word in command), command
            assert command[0] == "convsearch" and "health" in command, command
            health = command.index("health")
            options = command[1:health]
            assert sorted(options[::2]) == ["--tls-ca", "--tls-cert", "--tls-key"], f"{component} {kind}: {options}"
            for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
                secret_file(workload, _option(options, flag))
            arguments = command[health + 1:]
            timeout_s = float(_option(arguments, "--timeout")) if "--timeout" in arguments else 3.0
            positional = [a for i, a in enumerate(arguments)
                          if a != "--timeout" and (i == 0 or arguments[i - 1] != "--timeout")]
            assert positional[0] == f"127.0.0.1:{GRPC_PORT[component]}", f"{component} {kind}: {positional}"
            service = positional[1]
            assert timeout_s < probe["timeoutSeconds"], f"{component} {kind}: the probe's timeout cuts the check"
            expected = {"readinessProbe": (READINESS_NAME[component],), "livenessProbe": (LIVENESS_NAME,),
                        "startupProbe": (READINESS_NAME[component], LIVENESS_NAME)}[kind]
            assert service in expected, f"{component} {kind}: {service}"
        if component == "gateway":  # never restarted for its backends, under TLS too
            assert container["livenessProbe"]["exec"]["command"][-1] == LIVENESS_NAME
            assert container["startupProbe"]["exec"]["command"][-1] == LIVENESS_NAME
        else:
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, component


@pytest.mark.parametrize("folder", TLS_RENDERINGS)
def test_backends_serve_mutual_tls_and_their_probes_hold_a_certificate_they_accept(folder):
    docs = render(folder)
    data = config(docs)
    for component in ("extractor", "index", "index-read"):
        workload = workloads(docs)[component]
        prefix = f"CONVSEARCH_{SERVICE[component].upper()}_"
        cert, key, client_ca = (data.get(prefix + part) for part in ("TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA"))
        assert cert and key, f"{component}: no TLS certificate"
        assert client_ca, f"{component}: no {prefix}TLS_CLIENT_CA: clients would not need a certificate"
        secrets = {secret_file(workload, path) for path in (cert, key, client_ca)}
        assert secrets == {f"convsearch-{component}-tls"}, secrets
        # The probe verifies the server with the CA and presents a certificate that CA signed.
        command = only_container(workload)["readinessProbe"]["exec"]["command"]
        assert _option(command, "--tls-ca") == client_ca
        assert secret_file(workload, _option(command, "--tls-cert")) == f"convsearch-{component}-tls"


@pytest.mark.parametrize("folder", TLS_RENDERINGS)
def test_followers_reach_the_primary_with_a_client_certificate_it_accepts(folder):
    docs = render(folder)
    data = config(docs)
    found = workloads(docs)
    follower, primary = found["index-read"], found["index"]
    env = {v["name"]: v["value"] for v in only_container(follower)["env"]}
    # The primary's certificate verified against the CA; the follower's own certificate (issued for
    # client auth too, its probes present it) shown to the primary, whose client CA is that CA.
    ca, cert, key = (env.get(f"CONVSEARCH_INDEX_FOLLOW_TLS_{part}") for part in ("CA", "CERT", "KEY"))
    assert ca and cert and key, f"the followers reach the primary in plaintext: {sorted(env)}"
    assert {secret_file(follower, path) for path in (ca, cert, key)} == {"convsearch-index-read-tls"}
    assert cert == data["CONVSEARCH_INDEX_TLS_CERT"] and key == data["CONVSEARCH_INDEX_TLS_KEY"]
    assert ca.endswith("/ca.crt") and data["CONVSEARCH_INDEX_TLS_CLIENT_CA"].endswith("/ca.crt")
    assert secret_file(primary, data["CONVSEARCH_INDEX_TLS_CLIENT_CA"]) == "convsearch-index-tls"
    # by the name the primary's certificate carries (the gateway's address of it), no override
    assert env["CONVSEARCH_INDEX_FOLLOW"] == data["CONVSEARCH_GATEWAY_INDEX"]
    assert not env.get("CONVSEARCH_INDEX_FOLLOW_TLS_SERVER_NAME")


@pytest.mark.parametrize("folder", TLS_RENDERINGS)
def test_gateway_serves_tls_and_reaches_its_backends_with_a_client_certificate(folder):
    docs = render(folder)
    data = config(docs)
    gateway = workloads(docs)["gateway"]
    assert {secret_file(gateway, data[f"CONVSEARCH_GATEWAY_TLS_{part}"]) for part in ("CERT", "KEY")} == {
        "convsearch-gateway-tls"}
    backend = {part: data.get(f"CONVSEARCH_GATEWAY_BACKEND_TLS_{part}") for part in ("CA", "CERT", "KEY")}
    assert all(backend.values()), f"the gateway lacks backend TLS settings: {backend}"
    assert {secret_file(gateway, path) for path in backend.values()} == {"convsearch-gateway-client-tls"}
    # The backends trust the CA that signed the gateway's client certificate (same file name in the
    # same cert-manager layout), and the gateway reaches them by names their certificates carry.
    assert backend["CA"].endswith("/ca.crt")
    assert not data.get("CONVSEARCH_GATEWAY_BACKEND_TLS_SERVER_NAME"), "the names are in the addresses"
    assert data["CONVSEARCH_GATEWAY_EXTRACTOR"] == "dns:///convsearch-extractor:50052"
    assert data["CONVSEARCH_GATEWAY_INDEX"] == "convsearch-index-0.convsearch-index:50053"
    assert data["CONVSEARCH_GATEWAY_INDEX_REPLICAS"] == FOLLOWERS_SERVICE  # certificate: convsearch-index-read
    # API keys from a Secret; clients are not asked for certificates (keys authenticate them).
    assert secret_file(gateway, data["CONVSEARCH_GATEWAY_API_KEYS"]) == "convsearch-api-keys"
    assert not data.get("CONVSEARCH_GATEWAY_TLS_CLIENT_CA")


@pytest.mark.parametrize("folder", TLS_RENDERINGS)
def test_tls_overlay_changes_only_the_config_and_the_workloads_and_keeps_the_network_policies(folder):
    docs = render(folder)
    plain = {_key(doc): doc for doc in render("overlays/cpu")}
    assert sorted(plain) == sorted(_key(doc) for doc in docs)
    changed = {_key(doc) for doc in docs if doc != plain[_key(doc)]}
    assert changed == {("ConfigMap", CONFIG_MAP), ("Deployment", "convsearch-gateway"),
                       ("Deployment", "convsearch-extractor"), ("StatefulSet", "convsearch-index"),
                       ("Deployment", "convsearch-index-read"), ("Deployment", WEB)}
    for key, doc in ((k, d) for d in docs for k in [_key(d)] if k not in changed):
        assert doc == plain[key]
    # Only TLS settings (and the API keys file) were added to the ConfigMap; nothing was changed.
    data, before = config(docs), config(list(plain.values()))
    assert {k: v for k, v in data.items() if k in before} == before
    assert all("TLS" in key or key == "CONVSEARCH_GATEWAY_API_KEYS" for key in set(data) - set(before))
    for component in COMPONENTS:
        for part in ("TLS_CERT", "TLS_KEY"):
            assert data[f"CONVSEARCH_{SERVICE[component].upper()}_{part}"], f"{component}: no {part}"


# --- index followers and primaries -------------------------------------------------------------

def _pod_names(statefulset: dict) -> list[str]:
    """The stable DNS names (in the namespace) of a StatefulSet's pods, in order, with the gRPC port."""
    name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    return [f"{name}-{n}.{service}:{GRPC_PORT['index']}" for n in range(statefulset["spec"]["replicas"])]


@pytest.mark.parametrize("folder", FOLLOWER_RENDERINGS)
def test_followers_follow_pod_0_and_the_gateway_reads_through_their_headless_service(folder):
    docs = render(folder)
    data = config(docs)
    found = workloads(docs)
    follower, primary = found["index-read"], found["index"]
    assert follower["kind"] == "Deployment"
    env = {v["name"]: v.get("value") for v in only_container(follower)["env"]}
    assert env["CONVSEARCH_INDEX_FOLLOW"] == _pod_names(primary)[0] == data["CONVSEARCH_GATEWAY_INDEX"]
    assert primary["spec"]["replicas"] == 1, "followers follow one primary"
    # the followers' headless Service, selecting them and not the primary (nor the reverse)
    services = by_kind(docs, "Service")
    read_service = services["convsearch-index-read"]
    assert data["CONVSEARCH_GATEWAY_INDEX_REPLICAS"] == f"dns:///convsearch-index-read:{GRPC_PORT['index-read']}"
    assert read_service["spec"]["clusterIP"] == "None"
    labels = {c: w["spec"]["template"]["metadata"]["labels"] for c, w in found.items()}
    assert [c for c in found if selects({"matchLabels": read_service["spec"]["selector"]}, labels[c])] == ["index-read"]
    index_service = services["convsearch-index"]
    assert [c for c in found if selects({"matchLabels": index_service["spec"]["selector"]}, labels[c])] == ["index"]
    # the primary's image and data dir, the follower's own (ephemeral) copy
    assert only_container(follower)["image"] == only_container(primary)["image"]
    assert "volumeClaimTemplates" not in follower["spec"]
    # scaled on CPU, never below the disruption budget
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["convsearch-index-read"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "convsearch-index-read"}
    assert hpa["spec"]["minReplicas"] >= 2


def test_primaries_overlay_runs_three_primaries_named_in_order_and_no_followers():
    docs = render("overlays/primaries")
    data = config(docs)
    primary = workloads(docs)["index"]
    assert primary["kind"] == "StatefulSet" and primary["spec"]["replicas"] == 3
    # every pod, by its stable name, in pod order: placement hashes over the names as written
    assert data["CONVSEARCH_GATEWAY_INDEX"].split(",") == _pod_names(primary) == [
        "convsearch-index-0.convsearch-index:50053", "convsearch-index-1.convsearch-index:50053",
        "convsearch-index-2.convsearch-index:50053"]
    assert primary["spec"]["volumeClaimTemplates"], "each primary its own volume"
    # no followers: they follow one primary, and the gateway refuses replicas with several primaries
    assert not data.get("CONVSEARCH_GATEWAY_INDEX_REPLICAS")
    assert "index-read" not in workloads(docs)
    assert not [_key(doc) for doc in docs if "index-read" in doc["metadata"]["name"]]
    # otherwise the cpu overlay: only the index, the gateway's settings and the followers differ
    cpu = {_key(doc): doc for doc in render("overlays/cpu")}
    ours = {_key(doc): doc for doc in docs}
    assert set(cpu) - set(ours) == {key for key in cpu if key[1] == "convsearch-index-read"}
    assert set(ours) <= set(cpu)
    changed = {key for key, doc in ours.items() if doc != cpu[key]}
    assert changed == {("ConfigMap", CONFIG_MAP), ("StatefulSet", "convsearch-index")}
    before = config(list(cpu.values()))
    assert {k for k in set(data) | set(before) if data.get(k) != before.get(k)} == {
        "CONVSEARCH_GATEWAY_INDEX", "CONVSEARCH_GATEWAY_INDEX_REPLICAS"}
