"""Limits on what an item carries besides its image, shared by the gateway (which fails the one
item) and the index (which refuses the batch): a search answers up to 1,000 items with their
labels and metadata in one message, so no writer can make the readers' answers too large."""

from collections.abc import Mapping

from convsearch.errors import shown

MAX_ID = 256
"""Characters of an item id, and of a label."""
MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 16 << 10
"""UTF-8 bytes of an item's metadata, keys and values together: 1,000 items stay at 16 MiB."""


def item_problem(item_id: str, label: str, metadata: Mapping[str, str]) -> str:
    """Why an item's id, label or metadata cannot be stored; "" when they can."""
    if not item_id or len(item_id) > MAX_ID:
        return f"item id must have 1 to {MAX_ID} characters (got {len(item_id)})"
    if len(label) > MAX_ID:
        return f"label of item {shown(item_id)} has {len(label)} characters; use at most {MAX_ID}"
    if len(metadata) > MAX_METADATA_ENTRIES:
        return (f"metadata of item {shown(item_id)} has {len(metadata)} entries; use at most "
                f"{MAX_METADATA_ENTRIES}")
    size = sum(len(key.encode()) + len(value.encode()) for key, value in metadata.items())
    if size > MAX_METADATA_BYTES:
        return (f"metadata of item {shown(item_id)} is {size} bytes (keys and values, UTF-8); use at most "
                f"{MAX_METADATA_BYTES}: keep large data elsewhere and store its address")
    return ""
