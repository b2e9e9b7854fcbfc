"""core/cluster.py: the Go proxy's registration value, byte for byte, and what discovery accepts."""

from __future__ import annotations

import json

import pytest

from etcdproxy.core.cluster import go_json_string, parse_registration, proxy_member_list, registration_value
from etcdproxy.etcdpb import rpc_pb2


@pytest.mark.parametrize(
    ("text", "go"),
    [
        ("plain", '"plain"'),
        ('q"b\\', '"q\\"b\\\\"'),
        ("a<b>&c", '"a\\u003cb\\u003e\\u0026c"'),  # Go's HTML-safe escaping
        ("\n\r\t\x01\x1f", '"\\n\\r\\t\\u0001\\u001f"'),
        ("h\u00e9\u2028\u2029", '"h\u00e9\\u2028\\u2029"'),  # UTF-8 kept, line separators escaped
    ],
)
def test_go_json_string(text: str, go: str) -> None:
    assert go_json_string(text) == go
    assert json.loads(go) == text


def test_registration_value_is_the_go_bytes() -> None:
    # as written by etcd grpc-proxy start --advertise-client-url=10.0.0.5:23790 on host "vm"
    expected = b'{"Op":0,"Addr":"10.0.0.5:23790","Metadata":"{\\"name\\":\\"vm\\"}"}'
    assert registration_value("10.0.0.5:23790", "vm") == expected
    assert registration_value("http://h:1/<x>", "a&b") == (
        b'{"Op":0,"Addr":"http://h:1/\\u003cx\\u003e","Metadata":"{\\"name\\":\\"a\\\\u0026b\\"}"}'
    )


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (registration_value("10.0.0.5:23790", "vm"), ("vm", "10.0.0.5:23790")),
        (b'{"Op":0,"Addr":"a:1","Metadata":{"name":"obj"}}', ("obj", "a:1")),  # Metadata as an object
        (b'{"Addr":"a:1","Metadata":"{}"}', ("", "a:1")),  # no name: listed with an empty name, like Go
        (b"{", None),
        (b"[]", None),
        (b'{"Op":1,"Addr":"a:1","Metadata":"{}"}', None),  # a Delete update is not a member
        (b'{"Op":0,"Metadata":"{\\"name\\":\\"x\\"}"}', None),  # no address
        (b'{"Op":0,"Addr":"","Metadata":"{}"}', None),
        (b'{"Op":0,"Addr":"a:1","Metadata":"not json"}', None),  # the Go proxy fails MemberList here
        (b'{"Op":0,"Addr":"a:1"}', None),
        (b'{"Op":0,"Addr":"a:1","Metadata":"{\\"name\\":5}"}', None),
        (b"\xff\xfe", None),
    ],
)
def test_parse_registration(value: bytes, parsed: tuple[str, str] | None) -> None:
    assert parse_registration(value) == parsed


def test_proxy_member_list() -> None:
    response = rpc_pb2.MemberListResponse.FromString(proxy_member_list([("a", "h:1"), ("b", "h:2")]))
    assert [(m.ID, m.name, list(m.clientURLs), m.isLearner) for m in response.members] == [
        (0, "a", ["h:1"], False),
        (0, "b", ["h:2"], False),
    ]
    assert not response.HasField("header")
