"""Generates the Python gRPC code and .pyi stubs for the protos under protos/.

Run by set-up (`python scripts/gen_protos.py`) and by the build hooks of the wheels (setup.py at
the repository root and in clients/python): the output lands inside a `convsearch` package (for
example `convsearch/extractor/v1/extractor_pb2.py`), next to a copy of each .proto, and is never
edited by hand or committed.
"""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files(services: tuple[str, ...] | None = None, proto_root: pathlib.Path = PROTO_ROOT) -> list[str]:
    """The .proto paths relative to `proto_root`, e.g. `convsearch/gateway/v1/gateway.proto`;
    only those of `services` (`common`, `gateway`, ...) when given."""
    protos = sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))
    if services is not None:
        unknown = set(services) - {p.parts[1] for p in protos}
        if unknown:
            raise ValueError(f"no protos for {sorted(unknown)} under {proto_root}")
        protos = [p for p in protos if p.parts[1] in services]
    return [str(p) for p in protos]


def generate(out_root: pathlib.Path = ROOT, services: tuple[str, ...] | None = None,
             proto_root: pathlib.Path = PROTO_ROOT) -> list[str]:
    """Compiles the protos of `services` (default: all) into `out_root`/convsearch/... and copies
    each .proto next to its code; returns the generated package names (`convsearch.gateway.v1`, ...).

    Compiled with `-I protos`, so imports read `from convsearch.x.v1 import ...`. A proto that
    imports another (gateway imports common) needs that one in `services` too.
    """
    from grpc_tools import protoc  # imported here: only generation needs grpcio-tools

    out_root = pathlib.Path(out_root)
    protos = proto_files(services, proto_root)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}; see the messages above")
    packages = set()
    for proto in protos:
        shutil.copyfile(proto_root / proto, out_root / proto)
        package_dir = out_root / pathlib.Path(proto).parent
        while package_dir != out_root / "convsearch":
            (package_dir / "__init__.py").touch()
            packages.add(".".join(package_dir.relative_to(out_root).parts))
            package_dir = package_dir.parent
    return sorted(packages)


if __name__ == "__main__":
    try:
        generated = generate()
    except RuntimeError as exc:
        sys.exit(str(exc))
    print(f"generated code for {len(proto_files())} protos into {len(generated)} packages")
