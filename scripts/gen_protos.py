"""Generates the Python gRPC code and .pyi stubs for every proto under protos/.

Run by set-up; the output lands inside the shared `convsearch` package (for example
`convsearch/extractor/v1/extractor_pb2.py`) and is never edited by hand or committed.
"""

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate() -> None:
    """Compiles all protos with `-I protos` so imports read `from convsearch.x.v1 import ...`."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed; see the messages above")
    for proto in protos:
        package_dir = ROOT / pathlib.Path(proto).parent
        while package_dir != ROOT / "convsearch":
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    print(f"generated code for {len(protos)} protos")


if __name__ == "__main__":
    generate()
