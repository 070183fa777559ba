"""Frozen service configuration read from command-line flags and environment variables.

Every field of a config dataclass becomes a flag `--field-name` and an environment variable
`<PREFIX>_FIELD_NAME`; a flag beats the environment, which beats the default.
"""

import argparse
import dataclasses
import os
import typing
from collections.abc import Sequence

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(cls: type, prog: str, env_prefix: str, argv: Sequence[str] | None = None,
                 description: str = ""):
    """Builds an instance of the frozen dataclass `cls` from flags and environment variables.

    Each field's `metadata["help"]` is its help text. Exits with a usage message on a bad value.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        env = f"{env_prefix}_{field.name.upper()}"
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        # argparse formats help with %: a literal one ("5%") is doubled.
        help_text = f"{field.metadata.get('help', '')} (env {env}; default {default!r})".replace("%", "%%")
        convert = _parse_bool if kind is bool else kind
        if env in os.environ:
            try:
                default = convert(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"environment variable {env}={os.environ[env]!r}: {exc}")
        if kind is bool:
            parser.add_argument(flag, dest=field.name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, dest=field.name, default=default, type=convert,
                                help=help_text)
    args = parser.parse_args(argv)
    config = cls(**vars(args))
    check = getattr(config, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            parser.error(str(exc))
    return config


def option(default, help_text: str):
    """A dataclass field with a default and help text for `parse_config`."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def check_address(address: str, what: str) -> None:
    """Raises ValueError unless `address` is host:port (or a dns:/// target) with a valid port."""
    if address.startswith("dns:///"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what}: {address!r} is not host:port (a host name or IP address, ':', a port number)")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: {address!r} names port {port}, out of range: ports are 0 to 65535")


def check_port(port: int, what: str, disabled_ok: bool = False) -> None:
    """Raises ValueError unless `port` is 0..65535 (0: pick a free one), or -1 when `disabled_ok`."""
    if not (-1 if disabled_ok else 0) <= port <= 65535:
        raise ValueError(f"{what} must be 0..65535{' or -1 (none)' if disabled_ok else ''}, got {port}")


def check_positive(value: float, what: str) -> None:
    """Raises ValueError unless `value` > 0."""
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {value}")
