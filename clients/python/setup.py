"""Build hook of the `convsearch-client` wheel: copies the client's modules from the repository's
convsearch/ into convsearch/ here and generates the gateway and common protos' code next to them,
before setuptools looks for packages (see scripts/build_hooks.py). Built from an sdist, where the
repository is not around, the package it shipped is used as it is.
"""

import importlib.util
import pathlib

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent
HOOKS = HERE.parent.parent / "scripts" / "build_hooks.py"

if HOOKS.is_file():
    spec = importlib.util.spec_from_file_location("convsearch_build_hooks", HOOKS)
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    hooks.assemble_client(HERE)
elif not (HERE / "convsearch" / "client.py").is_file():
    raise SystemExit(f"neither the repository ({HOOKS} is missing) nor an assembled convsearch/ package in {HERE}")

setup()
