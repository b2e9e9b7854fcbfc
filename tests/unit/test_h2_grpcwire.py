"""Request header validation of grpcwire against the RFC 9113 8.2.1 / RFC 9110 5.1 rules written out byte by byte."""

from __future__ import annotations

import pytest

from etcdproxy.h2 import grpcwire as gw

DELIMITERS = b'(),/:;<=>?@[\\]{}"'


def reference_name(name: bytes) -> bool:
    # a token (visible ASCII, no delimiter), lowercase only
    return bool(name) and all(0x21 <= b <= 0x7E and b not in DELIMITERS and not 0x41 <= b <= 0x5A for b in name)


def reference_value(value: bytes) -> bool:
    if any(b in (0x00, 0x0D, 0x0A) for b in value):
        return False
    return not value or (value[0] not in (0x20, 0x09) and value[-1] not in (0x20, 0x09))


CASES = (
    [b""]
    + [bytes((a,)) for a in range(256)]
    + [bytes((a, b)) for a in range(0, 256, 7) for b in range(256)]
    + [bytes((a, 0x61, b)) for a in range(256) for b in range(0, 256, 11)]
)


def test_name_and_value_checks_match_the_rules_byte_by_byte() -> None:
    for case in CASES:
        assert gw._valid_name(case) == reference_name(case), case
        assert gw._valid_name(case) == reference_name(case), case  # the second answer comes from the cache
        assert gw._valid_value(case) == reference_value(case), case


@pytest.mark.parametrize(
    ("name", "value", "ok"),
    [
        (b"x-custom", b"a b", True),
        (b"X-Custom", b"v", False),
        (b"x custom", b"v", False),
        (b"x-custom", b" v", False),
        (b"x-custom", b"v\t", False),
        (b"x-custom", b"a\x00b", False),
        (b"x-custom", b"", True),
    ],
)
def test_request_head_refuses_malformed_fields(name: bytes, value: bytes, ok: bool) -> None:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/s/M"),
        (b"content-type", b"application/grpc"),
        (name, value),
    ]
    head = gw.request_head(headers, 65536)
    assert (head.error is None) == ok
    if not ok:
        assert head.error == gw.MALFORMED
