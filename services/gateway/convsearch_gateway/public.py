"""The gateway's edge: the public messages (convsearch.gateway.v1) made from the internal ones.

The public API declares its own Dataset, Collection, Item, ModelInfo, Snapshot... so that the
extractor's and the index's APIs can change without breaking clients. A public message takes the
fields it shares by name with the internal one; a field the public one lacks (a server detail such
as an item's digest) stays behind.
"""

from google.protobuf.message import Message


def convert(source: Message, target: Message) -> Message:
    """Fills `target` from the same-named fields of `source` (messages recursively) and returns it."""
    known = source.DESCRIPTOR.fields_by_name
    for field in target.DESCRIPTOR.fields:
        if field.name not in known:
            continue
        value, into = getattr(source, field.name), getattr(target, field.name)
        if field.message_type is None:
            if field.is_repeated:
                into.extend(value)
            else:
                setattr(target, field.name, value)
        elif field.message_type.GetOptions().map_entry:
            into.update(value)  # the public API's maps have scalar values
        elif field.is_repeated:
            for element in value:
                convert(element, into.add())
        elif source.HasField(field.name):
            if field.message_type.full_name == value.DESCRIPTOR.full_name:
                into.CopyFrom(value)  # a well-known or shared type, e.g. google.protobuf.Timestamp
            else:
                convert(value, into)
    return target


def converted(sources, cls) -> list:
    """Each of `sources` as a new `cls` message."""
    return [convert(source, cls()) for source in sources]
