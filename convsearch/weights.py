"""Weights fingerprints: which weights made a collection's vectors, so that vectors of different
weights are never mixed in a collection or compared with each other.

A fingerprint is "sha256:" and the first 16 hex digits of the SHA-256 of the weights file,
RANDOM for random weights, or NONE for a model that has no weights (the `pixels` baseline: its
vectors are the image itself, always the same). Collections made before fingerprints were kept
have UNKNOWN.
"""

import hashlib
import pathlib

RANDOM = "random"
NONE = "none"
UNKNOWN = ""
_CHUNK = 1 << 20


def fingerprint(path: pathlib.Path) -> str:
    """The fingerprint of a weights file (reads all of it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def is_pretrained(weights: str) -> bool:
    """True when the vectors mean something: the fingerprint of a weights file, or NONE (a model
    without weights, such as the `pixels` baseline); False for random or unknown weights."""
    return weights not in (RANDOM, UNKNOWN)


def is_baseline(weights: str) -> bool:
    """True for vectors of a model without weights (the `pixels` baseline), which the scores of
    the other models are read against."""
    return weights == NONE


def describe(weights: str) -> str:
    """The fingerprint as a person reads it in a message."""
    if weights == NONE:
        return "none (a model without weights)"
    return weights or "unknown (recorded before weights were fingerprinted)"
