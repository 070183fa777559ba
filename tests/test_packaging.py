"""Every wheel built from a clean checkout of this tree (no generated code), installed into fresh
virtual environments: what each wheel holds, a client environment without the services'
dependencies, and the three services run from their wheels answering that client.

The server environment gets torch and torchvision from the project's own environment (a .pth
line after its own site-packages) instead of installing 5.5 GB again; everything else is its own.
"""

import importlib.util
import io
import json
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from convsearch.local import EXTRACTOR, GATEWAY, INDEX
from convsearch.processes import start_service, stop_service

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
DISTS = {  # distribution name as in the wheel's file name -> source folder
    "convsearch": ".",
    "convsearch_client": "clients/python",
    "convsearch_index": "services/index",
    "convsearch_gateway": "services/gateway",
    "convsearch_extractor": "services/extractor",
    "convsearch_web": "services/web",
}
GENERATED = ("common", "extractor", "gateway", "index")
SERVER_ONLY = ("matplotlib", "prometheus_client", "grpc_health", "grpc_reflection", "torch")
# What the client venv runs: the convsearch modules convsearch.client loads, and whether the
# server-side distributions are absent.
CLIENT_PROBE = """
import importlib.util, json, sys
import convsearch.client
loaded = sorted(m for m in sys.modules if m.startswith("convsearch"))
try:
    import convsearch.plots
    plots = "imported"
except ModuleNotFoundError as exc:
    plots = exc.name
print(json.dumps({"file": convsearch.client.__file__, "loaded": loaded, "plots": plots,
                  "present": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]}))
"""
# What the client venv runs against the gateway: ingest the PNGs in a folder, index, search.
CLIENT_SESSION = """
import json, pathlib, sys
from convsearch.client import Client
from convsearch.embedding import Configuration

gateway, folder = sys.argv[1:]
last = Configuration("efficientnet_lite0", ("_conv_head",))
images = {p.stem: p.read_bytes() for p in sorted(pathlib.Path(folder).glob("*.png"))}
with Client(gateway) as client:
    client.create_dataset("wheels", "from the packaging test")
    ingested = [r.status for r in client.ingest("wheels", [(i, i.split("-")[0], b) for i, b in images.items()])]
    progress = list(client.index("wheels", [last]))[-1]
    by_id = client.search("wheels", item_id="red-1", configuration=last, k=3)
    by_image = client.search("wheels", image=images["blue-2"], configuration=last, k=1)
print(json.dumps({"ingested": ingested, "indexed": [progress.done, progress.total, progress.failed],
                  "by_id": [[h.id, h.label] for h in by_id.hits], "query_label": by_id.query_label,
                  "by_image": [[h.id, h.distance] for h in by_image.hits]}))
"""


def _run(*command, timeout: float = 600, cwd=None, **kwargs) -> str:
    # Elsewhere than the repository by default: `python -c` would import its convsearch/ first.
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout,
                            cwd=cwd or tempfile.gettempdir(), **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _build_hooks():
    spec = importlib.util.spec_from_file_location("convsearch_build_hooks", ROOT / "scripts" / "build_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names(wheel: pathlib.Path) -> set[str]:
    return set(zipfile.ZipFile(wheel).namelist())


def _venv(path: pathlib.Path) -> pathlib.Path:
    """A fresh venv without pip of its own (the project's pip installs into it: pip --python)."""
    _run(sys.executable, "-m", "venv", "--without-pip", path)
    return path / "bin" / "python"


def _requires(wheel: pathlib.Path) -> list[str]:
    dist_info = next(n for n in _names(wheel) if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(dist_info).decode()
    return [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Every wheel, built from a copy of the files git lists (tracked, or untracked and not ignored)."""
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout: the clean copy is what `git ls-files` lists")
    checkout = tmp_path_factory.mktemp("checkout")
    listed = _run("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT).split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of it
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_bytes(source.read_bytes())
    assert not (checkout / "convsearch" / "gateway").exists()
    out = tmp_path_factory.mktemp("wheels")
    _run(*PIP, "wheel", "--no-deps", "-w", out, *(checkout / folder for folder in DISTS.values()))
    built = {wheel.name.split("-")[0]: wheel for wheel in out.glob("*.whl")}
    assert sorted(built) == sorted(DISTS)
    return built


@pytest.fixture(scope="module")
def client_python(wheels, tmp_path_factory) -> pathlib.Path:
    python = _venv(tmp_path_factory.mktemp("client") / "venv")
    _run(*PIP, "--python", python, "install", wheels["convsearch_client"])
    return python


@pytest.fixture(scope="module")
def server_python(wheels, tmp_path_factory) -> pathlib.Path:
    """The full package and the three services with their dependencies, but torch and torchvision
    (and the extractor's packages that only name torch) installed without resolving them."""
    python = _venv(tmp_path_factory.mktemp("server") / "venv")
    _run(*PIP, "--python", python, "install", wheels["convsearch"], wheels["convsearch_index"],
         wheels["convsearch_gateway"])
    extractor_needs = [r for r in _requires(wheels["convsearch_extractor"])
                       if not r.startswith(("convsearch", "torch", "torchvision"))]
    _run(*PIP, "--python", python, "install", "--no-deps", wheels["convsearch_extractor"], *extractor_needs)
    # After everything is installed, so pip never took the project's packages for installed ones.
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (pathlib.Path(site) / "zz_project_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(*PIP, "--python", python, "check")
    return python


def test_every_wheel_ships_its_code_stubs_protos_and_type_marker(wheels):
    full = _names(wheels["convsearch"])
    for service in GENERATED:
        stem = f"convsearch/{service}/v1/{service}"
        assert {f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py", f"{stem}.proto"} <= full
    assert {"convsearch/py.typed", "convsearch/cli.py", "convsearch/serving.py", "convsearch/health.py"} <= full
    for dist in ("convsearch_index", "convsearch_gateway", "convsearch_extractor", "convsearch_web"):
        names = _names(wheels[dist])
        assert f"{dist}/py.typed" in names and f"{dist}/server.py" in names
        assert not any(name.startswith("convsearch/") for name in names)
    assert {f"convsearch_web/static/{page}" for page in ("index.html", "app.js", "style.css")} <= _names(
        wheels["convsearch_web"])  # the page, no build step


def test_client_wheel_holds_the_client_modules_and_the_gateway_api_only(wheels):
    names = _names(wheels["convsearch_client"])
    hooks = _build_hooks()
    modules = {name for name in names if name.startswith("convsearch/") and name.count("/") == 1}
    assert modules == {f"convsearch/{m}.py" for m in hooks.CLIENT_MODULES} | {"convsearch/py.typed"}
    for service in hooks.CLIENT_PROTOS:
        stem = f"convsearch/{service}/v1/{service}"
        assert {f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py", f"{stem}.proto"} <= names
    assert not [n for n in names if n.startswith(("convsearch/index/", "convsearch/extractor/"))]
    metadata = _requires(wheels["convsearch_client"])
    assert not [r for r in metadata if r.startswith(("grpcio-health", "grpcio-reflection", "prometheus"))]
    assert [r for r in metadata if r.startswith("matplotlib")] == ['matplotlib>=3.7; extra == "plot"']


def test_client_venv_has_exactly_the_client_closure_and_no_server_dependencies(client_python):
    probe = json.loads(_run(client_python, "-c", CLIENT_PROBE, *SERVER_ONLY))
    assert pathlib.Path(probe["file"]).is_relative_to(client_python.parent.parent)
    assert probe["present"] == [] and probe["plots"] == "matplotlib"  # plots needs the `plot` extra
    generated = {"convsearch.common", "convsearch.gateway"}
    own = {m for m in probe["loaded"] if m.count(".") == 1 and m not in generated}
    # The list the client wheel is built from is exactly what convsearch.client imports (and plots).
    assert own == {f"convsearch.{m}" for m in _build_hooks().CLIENT_MODULES if m not in ("__init__", "plots")}


def test_services_from_their_wheels_serve_the_client_from_its_wheel(server_python, client_python, tmp_path):
    bin_dir = server_python.parent
    probe = _run(server_python, "-c", "import convsearch, torch; print(convsearch.__file__)")
    assert pathlib.Path(probe.strip()).is_relative_to(bin_dir.parent)
    assert "--data-dir" in _run(bin_dir / "convsearch-index", "--help")
    assert "usage" in _run(bin_dir / "convsearch", "--help")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, colour in (("red-1", (220, 30, 30)), ("red-2", (200, 40, 20)), ("blue-1", (30, 40, 210)),
                         ("blue-2", (20, 60, 230))):
        pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (folder / f"{name}.png").write_bytes(buffer.getvalue())
    processes = {}
    try:
        # An absolute command: start_service runs it instead of the project venv's script.
        processes["extractor"], extractor = start_service(
            str(bin_dir / "convsearch-extractor"), "--device", "cpu", service=EXTRACTOR)
        processes["index"], index = start_service(
            str(bin_dir / "convsearch-index"), "--data-dir", str(tmp_path / "index"), service=INDEX)
        processes["gateway"], gateway = start_service(
            str(bin_dir / "convsearch-gateway"), "--extractor", extractor, "--index", index, service=GATEWAY)
        session = json.loads(_run(client_python, "-c", CLIENT_SESSION, gateway, folder, timeout=300))
    finally:
        logs = {name: stop_service(process) for name, process in reversed(processes.items())}
    assert session["ingested"] == ["stored"] * 4 and session["indexed"] == [4, 4, 0]
    assert session["query_label"] == "red"
    assert sorted(hit_id for hit_id, _ in session["by_id"]) == ["blue-1", "blue-2", "red-2"]
    assert session["by_image"][0][0] == "blue-2" and session["by_image"][0][1] < 1e-3
    for name, process in processes.items():
        assert process.returncode == 0, f"{name} did not stop cleanly:\n{logs[name]}"
