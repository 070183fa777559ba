"""What the wheels' build hooks do, in one place: setup.py at the repository root and in
clients/python load this file by its path (it is not a package) and call one function each.

- `convsearch` (root): `generate_root()` writes the gRPC code of every proto into convsearch/.
- `convsearch-client` (clients/python): `assemble_client()` copies only the client's modules
  (CLIENT_MODULES, the import closure of convsearch.client, checked by tests/test_packaging.py)
  into clients/python/convsearch/ and generates the gateway and common protos there.
"""

import importlib.util
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "convsearch"

CLIENT_MODULES = (
    "__init__", "api_keys", "channels", "client", "config", "embedding", "enums", "errors", "grpc_errors",
    "inspection", "naming", "plots", "tls",
)
"""convsearch.client and every module it imports, with plots (usable with the `plot` extra)."""

CLIENT_PROTOS = ("common", "gateway")
"""The APIs a client speaks: the gateway's, and the common types it uses."""

TYPED_MARKER = "py.typed"


def _gen_protos():
    spec = importlib.util.spec_from_file_location("convsearch_gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_root() -> list[str]:
    """Generates every proto's code (and copies the .proto files) into the repository's convsearch/."""
    return _gen_protos().generate(ROOT)


def assemble_client(target: pathlib.Path) -> list[str]:
    """Makes `target`/convsearch afresh: the client modules, py.typed, and the gateway and common
    protos' code with their .proto files. Returns the package names it holds."""
    package = pathlib.Path(target) / "convsearch"
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir(parents=True)
    for name in (*(f"{module}.py" for module in CLIENT_MODULES), TYPED_MARKER):
        shutil.copyfile(SOURCE / name, package / name)
    return ["convsearch", *_gen_protos().generate(target, CLIENT_PROTOS)]
