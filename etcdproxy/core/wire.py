"""Minimal protobuf wire-format checks, to answer malformed requests like grpc-go does.

grpc-go reports a request it cannot unmarshal as INTERNAL "grpc: error unmarshalling
request: <reason>"; the reason text comes from Go's protobuf decoder. Python's decoder only
says "Error parsing message", so we scan the wire format ourselves to name the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.message import DecodeError

UNEXPECTED_EOF = "unexpected EOF"
INVALID_WIRE = "proto: cannot parse invalid wire-format data"
INVALID_UTF8 = "string field contains invalid UTF-8"


class WireError(ValueError):
    """Bytes that are not protobuf wire format; the message is the Go decoder's complaint."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            break
    raise WireError(UNEXPECTED_EOF)


def fields(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Top-level fields of a message as (number, wire type, start, end): for length-delimited
    fields [start, end) is the payload, for the others the encoded value. Raises WireError."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire_type, number = key & 7, key >> 3
        if number == 0:
            raise WireError(INVALID_WIRE)
        start = pos
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, start = _varint(data, pos)
            pos = start + length
        else:  # groups (3, 4) are not used by etcd's proto3 messages; 6 and 7 do not exist
            raise WireError(INVALID_WIRE)
        if pos > len(data):
            raise WireError(UNEXPECTED_EOF)
        yield number, wire_type, start, pos


def scan_error(data: bytes) -> str | None:
    """The Go decoder's complaint about ``data`` at the top level, or None if well-formed."""
    try:
        for _ in fields(data):
            pass
    except WireError as exc:
        return str(exc)
    return None


def parse(message_class: Any, data: bytes) -> tuple[Any, str | None]:
    """Decode ``data``; returns (message, None) or (None, Go-style reason)."""
    try:
        return message_class.FromString(data), None
    except DecodeError:
        return None, scan_error(data) or INVALID_UTF8
