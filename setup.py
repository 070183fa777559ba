"""Build hook of the `convsearch` wheel: generates the gRPC code from protos/ into convsearch/
before setuptools looks for packages, so `pip install .` and `pip wheel .` work from a clean
checkout. Metadata and package data are in pyproject.toml; the work is in scripts/build_hooks.py.
"""

import importlib.util
import pathlib

from setuptools import setup

HOOKS = pathlib.Path(__file__).resolve().parent / "scripts" / "build_hooks.py"
spec = importlib.util.spec_from_file_location("convsearch_build_hooks", HOOKS)
hooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hooks)
hooks.generate_root()

setup()
