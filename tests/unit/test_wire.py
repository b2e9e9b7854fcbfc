"""Table tests for the protobuf wire-format scanner that names malformed requests like grpc-go."""

from __future__ import annotations

import pytest

from etcdproxy.core import wire
from etcdproxy.etcdpb import rpc_pb2


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"\n\x03foo", None),  # RangeRequest{key: "foo"}
        (b"\xff\xff\xff", wire.UNEXPECTED_EOF),  # a tag varint that never ends
        (b"\n\xff\xff\xff\x0f", wire.UNEXPECTED_EOF),  # a huge length prefix
        (b"\n\x05ab", wire.UNEXPECTED_EOF),  # a truncated field
        (b"\x0b\x01", wire.INVALID_WIRE),  # wire type 3 (group start)
        (b"\x00\x01", wire.INVALID_WIRE),  # field number 0
        (b"\x0d\x01\x02", wire.UNEXPECTED_EOF),  # fixed32 cut short
    ],
)
def test_scan_error(data: bytes, expected: str | None) -> None:
    assert wire.scan_error(data) == expected


def test_parse_reports_the_go_reason_and_decodes_good_bytes() -> None:
    message, problem = wire.parse(rpc_pb2.RangeRequest, b"\n\x03foo")
    assert problem is None and message.key == b"foo"
    assert wire.parse(rpc_pb2.RangeRequest, b"\n\x05ab") == (None, wire.UNEXPECTED_EOF)


def test_fields_yields_payload_spans() -> None:
    data = rpc_pb2.PutRequest(key=b"k", value=b"vv", lease=5).SerializeToString()
    spans = {number: data[start:end] for number, _, start, end in wire.fields(data)}
    assert spans[1] == b"k" and spans[2] == b"vv" and spans[3] == b"\x05"
