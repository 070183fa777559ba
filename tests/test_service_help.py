"""Every service's --help prints every flag with its environment variable, and exits 0."""

import dataclasses

import pytest

from convsearch_extractor.config import ExtractorConfig
from convsearch_extractor.config import load_config as extractor_config
from convsearch_gateway.config import GatewayConfig
from convsearch_gateway.config import load_config as gateway_config
from convsearch_index.config import IndexConfig
from convsearch_index.config import load_config as index_config
from convsearch_web.config import WebConfig
from convsearch_web.config import load_config as web_config


@pytest.mark.parametrize(("load", "cls", "prefix"), [
    (extractor_config, ExtractorConfig, "CONVSEARCH_EXTRACTOR"),
    (index_config, IndexConfig, "CONVSEARCH_INDEX"),
    (gateway_config, GatewayConfig, "CONVSEARCH_GATEWAY"),
    (web_config, WebConfig, "CONVSEARCH_WEB"),
])
def test_help_lists_every_flag(load, cls, prefix, capsys):
    with pytest.raises(SystemExit) as exited:
        load(["--help"])
    assert exited.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside a flag's name
    for field in dataclasses.fields(cls):
        assert f"--{field.name.replace('_', '-')}" in printed.replace("- ", "-")
        assert f"{prefix}_{field.name.upper()}" in printed.replace("_ ", "_")
