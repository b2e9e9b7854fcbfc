"""Minimal protobuf wire-format checks, to answer malformed requests like grpc-go does.

grpc-go reports a request it cannot unmarshal as INTERNAL "grpc: error unmarshalling
request: <reason>"; the reason text comes from Go's protobuf decoder. Python's decoder only
says "Error parsing message", so we scan the wire format ourselves to name the reason.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

UNEXPECTED_EOF = "unexpected EOF"
INVALID_WIRE = "proto: cannot parse invalid wire-format data"
INVALID_UTF8 = "string field contains invalid UTF-8"


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            return None
    return None


def scan_error(data: bytes) -> str | None:
    """The Go decoder's complaint about ``data`` at the top level, or None if well-formed."""
    pos = 0
    while pos < len(data):
        tag = _varint(data, pos)
        if tag is None:
            return UNEXPECTED_EOF
        key, pos = tag
        wire_type, number = key & 7, key >> 3
        if number == 0:
            return INVALID_WIRE
        if wire_type == 0:
            v = _varint(data, pos)
            if v is None:
                return UNEXPECTED_EOF
            pos = v[1]
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            ln = _varint(data, pos)
            if ln is None:
                return UNEXPECTED_EOF
            pos = ln[1] + ln[0]
        else:  # groups (3, 4) are not used by etcd's proto3 messages; 6 and 7 do not exist
            return INVALID_WIRE
        if pos > len(data):
            return UNEXPECTED_EOF
    return None


def parse(message_class: Any, data: bytes) -> tuple[Any, str | None]:
    """Decode ``data``; returns (message, None) or (None, Go-style reason)."""
    try:
        return message_class.FromString(data), None
    except DecodeError:
        return None, scan_error(data) or INVALID_UTF8
