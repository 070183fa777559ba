"""What a new user following the README met: `api-key new --append` into a folder that does not
exist, `compare` before any evaluation, and one layer given to the Python client as a string."""

import pathlib

import pytest

from convsearch.cli import main
from convsearch.client import Client, _configuration
from convsearch.embedding import Configuration
from tests.conftest import running_backends, running_gateway

# ---- api-key new --append FILE whose folder does not exist ----------------------------------

def test_api_key_append_to_an_unwritable_file_is_bad_usage_naming_it(tmp_path, capsys):
    """It was exit 1 with "FileNotFoundError: [Errno 2] No such file or directory: '...'", not
    naming the option."""
    missing = tmp_path / "no" / "such" / "keys.txt"
    assert main(["api-key", "new", "--role", "admin", "--append", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--append {missing}: cannot write to it (No such file or directory)" in err
    assert "Error" not in err and len(err.strip().splitlines()) == 1
    assert main(["api-key", "new", "--role", "read", "--append", str(tmp_path)]) == 2  # a folder
    assert f"--append {tmp_path}: cannot write to it" in capsys.readouterr().err
    assert main(["api-key", "new", "--role", "read", "--append", str(tmp_path / "keys.txt")]) == 0
    assert (tmp_path / "keys.txt").read_text().startswith("sha256:")


# ---- compare before anything was evaluated -------------------------------------------------

@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The address of an in-process gateway over real backends."""
    with running_backends(pathlib.Path(tmp_path_factory.mktemp("data")), default_model="pixels") as backends:
        with running_gateway(*backends) as (_, _, address):
            yield address


def test_compare_before_evaluate_says_to_evaluate(gateway, capsys):
    """It printed only a table header, exit 0, and no word on why it was empty."""
    with Client(gateway) as client:
        client.create_dataset("flat")
    argv = ["--gateway", gateway, "compare", "--dataset", "flat"]
    assert main(argv) == 0
    assert "nothing evaluated in flat yet: run convsearch evaluate --dataset flat" in capsys.readouterr().err
    assert main([*argv, "--json"]) == 0
    assert "nothing evaluated" not in capsys.readouterr().err  # --json: the empty object says it


# ---- one layer as a plain string -------------------------------------------------------------

def test_one_layer_given_as_a_string_is_that_layer():
    """Configuration("efficientnet_lite0", "_conv_head") sent the layers '_', 'c', 'o', ...: the
    gateway answered "has no usable layer '_'" (index) or "uses one layer, not 10" (search)."""
    assert Configuration("efficientnet_lite0", "_conv_head").layers == ("_conv_head",)
    assert Configuration("pixels", ("8x8", "16x16")).layers == ("8x8", "16x16")
    assert list(_configuration(Configuration("efficientnet_lite0", "_conv_head")).layers) == ["_conv_head"]


def test_a_key_for_an_impossible_dataset_name_is_refused(tmp_path, capsys):
    """--datasets Shoes wrote a line for a dataset that cannot exist (names are lowercase): a key
    that could never touch any dataset, without a word."""
    keys = tmp_path / "keys.txt"
    assert main(["api-key", "new", "--role", "read", "--datasets", "shoes,Shoes", "--append", str(keys)]) == 2
    assert "'Shoes' is no dataset name (1-64 of a-z, 0-9, _ and -" in capsys.readouterr().err
    assert not keys.exists()
