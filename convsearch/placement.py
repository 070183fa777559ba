"""Which index primary owns a dataset: rendezvous (highest random weight) hashing of its name.

Each primary is known by the name it is configured with (e.g. a StatefulSet pod's DNS name,
`index-0.index:50053`), never by a resolved IP, so the placement stays the same across
restarts, machines and processes. Every (primary, dataset) pair gets a weight from BLAKE2b; the
dataset belongs to the primary of the highest weight. Adding a primary moves only the datasets
it wins (about 1/P of them); removing one moves only its own. The gateway routes by it and
`convsearch rebalance` moves datasets to it; both must be given the same names.
"""

import hashlib
from collections.abc import Sequence


def parse_primaries(addresses: str) -> list[str]:
    """The primaries of a comma-separated list, in the order given; ValueError for none or a repeat."""
    primaries = [part.strip() for part in addresses.split(",") if part.strip()]
    if not primaries:
        raise ValueError("no index primary given; use host:port, or several comma-separated")
    repeated = sorted({p for p in primaries if primaries.count(p) > 1})
    if repeated:
        raise ValueError(f"index primary {', '.join(repeated)} is given more than once")
    return primaries


def weight(primary: str, dataset: str) -> int:
    """The pair's weight: the same on every machine and Python version (unlike hash())."""
    digest = hashlib.blake2b(f"{primary}\n{dataset}".encode(), digest_size=8).digest()  # neither holds a newline
    return int.from_bytes(digest, "big")


def ranked(dataset: str, primaries: Sequence[str]) -> list[str]:
    """The primaries from the dataset's owner down: where to look for it, in order."""
    return sorted(primaries, key=lambda primary: (weight(primary, dataset), primary), reverse=True)


def owner(dataset: str, primaries: Sequence[str]) -> str:
    """The primary that owns the dataset."""
    return max(primaries, key=lambda primary: (weight(primary, dataset), primary))
