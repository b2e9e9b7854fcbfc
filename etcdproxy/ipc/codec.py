"""encode(message) -> bytes; decode_frame(frame) -> messages. msgpack, never pickle. Pure.

A ZeroMQ frame carries one or more encoded messages back to back (msgpack is a streaming
format), so a sender can batch everything it produced in one event-loop tick into one frame.
"""

from __future__ import annotations

from dataclasses import fields
from operator import attrgetter
from typing import Any

import msgpack

from etcdproxy.ipc.schema import CLASSES, Kind, Message

# Field order of each class, minus the trailing ``kind`` which travels first.
_FIELDS: dict[Kind, tuple[str, ...]] = {
    kind: tuple(f.name for f in fields(cls) if f.name != "kind") for kind, cls in CLASSES.items()
}


def _one(name: str) -> Any:
    getter = attrgetter(name)
    return lambda message: (getter(message),)


_METADATA_AT: dict[Kind, int] = {k: names.index("metadata") for k, names in _FIELDS.items() if "metadata" in names}


# kind as a plain int -> (class, field count, index of its metadata field or None); no Kind() per message
_DECODERS: dict[int, tuple[type[Message], int, int | None]] = {
    int(kind): (cls, len(_FIELDS[kind]), _METADATA_AT.get(kind)) for kind, cls in CLASSES.items()
}


class CodecError(ValueError):
    """A frame that is not a message of this schema."""


# Per class: the kind's plain int and a getter of its fields in order (always a tuple).
_ENCODERS: dict[type[Message], tuple[int, Any]] = {
    cls: (int(kind), attrgetter(*_FIELDS[kind]) if len(_FIELDS[kind]) > 1 else _one(_FIELDS[kind][0]))
    for kind, cls in CLASSES.items()
}
# One Packer per process (the hub and each worker run one event loop and no other thread encoding):
# msgpack.packb builds a new Packer for every call.
_PACKER = msgpack.Packer(use_bin_type=True)


def encode(message: Message) -> bytes:
    kind, fields_of = _ENCODERS[type(message)]
    data: bytes = _PACKER.pack([kind, *fields_of(message)])
    return data


def decode(data: bytes) -> Message:
    """One message encoded alone."""
    try:
        items: Any = msgpack.unpackb(data, raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"undecodable message: {exc}") from exc
    try:
        return _build(items)
    except CodecError:
        raise
    except Exception as exc:  # e.g. malformed metadata pairs
        raise CodecError(f"malformed message: {exc}") from exc


def decode_frame(frame: bytes) -> list[Message]:
    """Every message of a (possibly batched) frame, in order."""
    # The whole frame is in memory already: let the buffer hold all of it (msgpack's default
    # 100 MiB cap would drop a batch carrying a huge Range response, and every message with it).
    unpacker = msgpack.Unpacker(raw=False, use_list=True, max_buffer_size=max(len(frame), 1))
    try:
        unpacker.feed(frame)
        messages = []
        end = 0  # where the last complete message ended
        for items in unpacker:
            messages.append(_build(items))
            end = unpacker.tell()
        if end != len(frame):  # iteration stops quietly at a cut-off message
            raise CodecError(f"truncated frame: {len(frame) - end} bytes after the last whole message")
        return messages
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"undecodable frame: {exc}") from exc


def _build(items: Any) -> Message:
    if not isinstance(items, list) or not items:
        raise CodecError("frame is not a non-empty array")
    try:
        cls, count, meta_at = _DECODERS[items[0]]
    except (KeyError, TypeError) as exc:
        raise CodecError(f"unknown message kind {items[0]!r}") from exc
    args = items[1:]
    if len(args) != count:
        raise CodecError(f"{Kind(items[0]).name}: expected {count} fields, got {len(args)}")
    if meta_at is not None:  # msgpack has no tuples: metadata pairs come back as lists
        args[meta_at] = [tuple(pair) for pair in args[meta_at]]
    return cls(*args)
