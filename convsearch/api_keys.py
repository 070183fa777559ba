"""API keys of the gateway: making a key, the line of the keys file that admits it, reading that
file, and sending a key on every call of a channel.

The keys file (`convsearch-gateway --api-keys FILE`) holds one key a line; only the key's
SHA-256 is stored, so the file is no secret:

    # sha256:<64 hex digits>  <role>  [<dataset>,<dataset>... | *]  [# comment]
    sha256:b89db310b91daee35146b9fac052b60e572a37c09577f56608a31892359f9344  read           # dashboards
    sha256:163d0a8027490cb93a6e54d34b8bf84b1224d09ce44be6a94cee54ea69a233d1  write  shoes  # shoe importer
    sha256:9b04e8c4151597c60b40bd152bb19e17de7000185883d23341b31ffb8b3002f8  admin  *      # operators

Roles, each allowing what the one before it does: `read` (search, get, list, compare, project,
inspect, list models), `write` (also ingest, index, evaluate, delete items), `admin` (also create
and delete datasets, delete collections, snapshots). Without datasets (or with `*`) a key may touch every
dataset; with a comma-separated list, only those (and ListDatasets shows it only those). Blank
lines and text after `#` are ignored. `convsearch api-key new --role R` makes a key and its line.

Clients send the key itself as `authorization: Bearer <key>` metadata.
"""

import collections
import dataclasses
import hashlib
import re
import secrets
from collections.abc import Iterable

import grpc

from convsearch.naming import DATASET_NAME, DATASET_NAME_RULE

ROLES = ("read", "write", "admin")  # each allows everything the ones before it allow
ENV_API_KEY = "CONVSEARCH_API_KEY"
AUTHORIZATION = "authorization"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HEXISH = re.compile(r"sha256:[0-9a-fA-F]*")  # a digest mistyped, cut or in capitals: no secret to hide


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One line of a keys file: the key's SHA-256 (hex), its role, the datasets it may touch
    (None: every one) and the line's comment."""

    digest: str
    role: str
    datasets: frozenset[str] | None = None
    comment: str = ""

    @property
    def name(self) -> str:
        """How logs and messages name the key without revealing it."""
        return f"key sha256:{self.digest[:12]}" + (f" ({self.comment})" if self.comment else "")

    def allows_role(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def allows_dataset(self, dataset: str) -> bool:
        return self.datasets is None or dataset in self.datasets


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe)."""
    return "cs_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as its line stores it (after `sha256:`)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_line(key: str, role: str, datasets: Iterable[str] = (), comment: str = "") -> str:
    """The keys-file line that admits `key` with `role`, for `datasets` (none: every one)."""
    check_role(role)
    names = sorted(set(datasets))
    for name in names:
        if not DATASET_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is no dataset name ({DATASET_NAME_RULE}), so the key could never touch it")
    line = f"sha256:{hash_key(key)}  {role}  {','.join(names) or '*'}"
    return f"{line}  # {comment}" if comment else line


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")


def parse_keys(text: str, source: str = "keys file") -> dict[str, ApiKey]:
    """The keys of a keys file's text by digest; ValueError naming the line of a bad one."""
    keys: dict[str, ApiKey] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        content, _, comment = raw.partition("#")
        fields = content.split()
        if not fields:
            continue
        where = f"{source}:{number}"
        digest = _DIGEST.fullmatch(fields[0])
        if digest is None:
            raise ValueError(f"{where}: expected sha256:<64 lowercase hex digits> first "
                             f"(`convsearch api-key new` makes a line), got {_unlike_digest(fields[0])}")
        if len(fields) not in (2, 3):
            raise ValueError(f"{where}: expected `sha256:<hex> <role> [dataset,dataset...]`, got {len(fields)} fields")
        try:
            check_role(fields[1])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        datasets = None
        if len(fields) == 3 and fields[2] != "*":
            datasets = frozenset(name for name in fields[2].split(",") if name)
            if not datasets:
                raise ValueError(f"{where}: no dataset named in {fields[2]!r}")
        if digest.group(1) in keys:
            raise ValueError(f"{where}: the same key is listed twice")
        keys[digest.group(1)] = ApiKey(digest.group(1), fields[1], datasets, comment.strip())
    return keys


def _unlike_digest(field: str) -> str:
    """How an error names a first field that is no digest: a malformed digest (sha256: and hex
    digits) as it is, anything else only by its length, since it may be a key pasted in place of
    its line."""
    if _HEXISH.fullmatch(field):
        return f"{field[:80]!r}{'...' if len(field) > 80 else ''} ({len(field) - 7} hex digits)"
    return (f"{len(field)} characters that are not sha256:<hex> (not shown, in case they are a key: a key goes "
            "in no file, its line does: `convsearch api-key hash` prints it)")


def bearer_token(metadata) -> str | None:
    """The key of `authorization: Bearer <key>` metadata; "" when the header is there but
    malformed; None when there is none."""
    for name, value in metadata or ():
        if name == AUTHORIZATION:
            scheme, _, token = str(value).strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    """A call's details with the key added to its metadata."""


class ApiKeyMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """A client interceptor that sends `authorization: Bearer <key>` on every call."""

    def __init__(self, key: str):
        self._header = (AUTHORIZATION, f"Bearer {key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def with_api_key(channel: grpc.Channel, key: str | None) -> grpc.Channel:
    """`channel`, sending `key` on every call (unchanged when `key` is empty or None)."""
    return grpc.intercept_channel(channel, ApiKeyMetadata(key)) if key else channel
