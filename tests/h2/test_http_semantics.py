"""RFC 9113 section 8 (HTTP message exchange, request header validation) on the proxy's client port.

A malformed request is a stream error PROTOCOL_ERROR (RFC 9113 8.1.1): RST_STREAM on that stream (or
GOAWAY / close, h2spec's rule). The connection must go on serving other streams afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.h2.rawclient import (
    DATA,
    END_STREAM,
    PROTOCOL_ERROR,
    H2Client,
    frame_bytes,
    grpc_message,
    grpc_request_headers,
    range_request,
)

pytestmark = pytest.mark.timeout(30)

Connect = Callable[..., H2Client]

# Observed on the reference servers (they skip there; ours must meet the contract):
_SERVED = "serves the call (grpc-status 0); no RST_STREAM/GOAWAY within 3 s"
_SILENT = "nothing within 3 s (no RST_STREAM, no GOAWAY, no close)"
_TRAILERS_ONLY = "answers trailers-only (a gRPC error status), no RST_STREAM"
_TRAILERS_ONLY_THEN_RST_NO_ERROR = "answers trailers-only, then RST_STREAM NO_ERROR (not PROTOCOL_ERROR)"
DEVIATIONS: dict[str, dict[str, str]] = {
    "go": {
        "test_8_2_1_invalid_field_value[leading space]": _SERVED,
        "test_8_1_2_2_connection_specific[8.1.2.2/1 connection]": _SERVED,
        "test_8_1_2_2_connection_specific[keep-alive]": _SERVED,
        "test_8_1_2_2_connection_specific[proxy-connection]": _SERVED,
        "test_8_1_2_2_connection_specific[transfer-encoding]": _SERVED,
        "test_8_1_2_2_connection_specific[upgrade]": _SERVED,
        "test_8_1_2_2_connection_specific[8.1.2.2/2 te: trailers, deflate]": _SERVED,
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/1 empty :path]": _TRAILERS_ONLY,
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/3 no :scheme]": _SERVED,
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/4 no :path]": _TRAILERS_ONLY,
        "test_8_1_2_6_content_length_mismatch[8.1.2.6/1 one DATA]": _SERVED,
        "test_8_1_2_6_content_length_mismatch[8.1.2.6/2 several DATA]": _SERVED,
    },
    "grpcio": {
        "test_8_1_1_trailers_without_end_stream": _TRAILERS_ONLY_THEN_RST_NO_ERROR,
        "test_8_1_2_1_uppercase_header_name": _TRAILERS_ONLY_THEN_RST_NO_ERROR,
        "test_8_2_1_invalid_field_value[CRLF]": _SERVED,
        "test_8_2_1_invalid_field_value[NUL]": _SERVED,
        "test_8_2_1_invalid_field_value[leading space]": _SERVED,
        "test_8_2_1_invalid_field_name": _TRAILERS_ONLY_THEN_RST_NO_ERROR,
        "test_8_1_2_1_pseudo_headers[8.1.2.1/1 unknown pseudo-header]": _TRAILERS_ONLY_THEN_RST_NO_ERROR,
        "test_8_1_2_1_pseudo_headers[8.1.2.1/2 response pseudo-header]": _SERVED,
        "test_8_1_2_1_pseudo_headers[8.1.2.1/4 pseudo-header after regular]": _SERVED,
        "test_8_1_2_1_3_pseudo_header_in_trailers": _SERVED,
        "test_8_1_2_2_connection_specific[8.1.2.2/1 connection]": _SERVED,
        "test_8_1_2_2_connection_specific[keep-alive]": _SERVED,
        "test_8_1_2_2_connection_specific[proxy-connection]": _SERVED,
        "test_8_1_2_2_connection_specific[transfer-encoding]": _SERVED,
        "test_8_1_2_2_connection_specific[upgrade]": _SERVED,
        "test_8_1_2_2_connection_specific[8.1.2.2/2 te: trailers, deflate]": _TRAILERS_ONLY_THEN_RST_NO_ERROR,
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/1 empty :path]": _TRAILERS_ONLY,
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/2 no :method]": "RST_STREAM INTERNAL_ERROR",
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/3 no :scheme]": "RST_STREAM INTERNAL_ERROR",
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/4 no :path]": "RST_STREAM INTERNAL_ERROR",
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/5 two :method]": _SERVED,
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/6 two :scheme]": _SERVED,
        "test_8_1_2_3_request_pseudo_headers[8.1.2.3/7 two :path]": _SERVED,
        "test_8_1_2_6_content_length_mismatch[8.1.2.6/1 one DATA]": _SERVED,
        "test_8_1_2_6_content_length_mismatch[8.1.2.6/2 several DATA]": _SERVED,
        "test_8_3_1_authority_optional_host_allowed": "RST_STREAM INTERNAL_ERROR for a request without :authority",
    },
}


def send_request(c: H2Client, headers: list[tuple[str, str]], *, content: bytes | None = None) -> int:
    """HEADERS with ``headers``, then one DATA with END_STREAM (so a lenient server answers the call)."""
    sid = c.new_stream_id()
    body = grpc_message(range_request()) if content is None else content
    c.send(c.headers_frame(sid, headers) + frame_bytes(DATA, END_STREAM, sid, body))
    return sid


def expect_malformed(c: H2Client, sid: int) -> None:
    c.expect_stream_error(sid, PROTOCOL_ERROR)
    if not c.closed:  # a stream error leaves the connection usable
        r = c.read_response(send_request(c, grpc_request_headers()))
        assert r.grpc_status == 0 or r.closed or r.goaway is not None, str(r)


def without(name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in grpc_request_headers() if k != name]


def test_8_1_valid_request_baseline(h2c: H2Client) -> None:
    r = h2c.read_response(send_request(h2c, grpc_request_headers()))
    assert r.status == "200" and (r.header("content-type") or "").startswith("application/grpc"), str(r)
    assert r.grpc_status == 0 and len(r.messages) == 1, str(r)


def test_8_1_1_trailers_without_end_stream(h2c: H2Client) -> None:
    """A second HEADERS (trailers) without END_STREAM is malformed."""
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, grpc_request_headers())
        + frame_bytes(DATA, 0, sid, grpc_message(range_request()))
        + h2c.headers_frame(sid, [("x-trailer", "1")])
    )
    expect_malformed(h2c, sid)


def test_8_1_2_1_uppercase_header_name(h2c: H2Client) -> None:
    expect_malformed(h2c, send_request(h2c, [*grpc_request_headers(), ("X-Upper", "1")]))


@pytest.mark.parametrize(
    "value",
    [pytest.param("a\r\nb", id="CRLF"), pytest.param("a\x00b", id="NUL"), pytest.param(" a", id="leading space")],
)
def test_8_2_1_invalid_field_value(h2c: H2Client, value: str) -> None:
    """RFC 9113 8.2.1: CR, LF, NUL anywhere, or leading/trailing whitespace, make a request malformed."""
    expect_malformed(h2c, send_request(h2c, [*grpc_request_headers(), ("x-bad", value)]))


def test_8_2_1_invalid_field_name(h2c: H2Client) -> None:
    expect_malformed(h2c, send_request(h2c, [*grpc_request_headers(), ("x bad", "1")]))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([*grpc_request_headers(), (":foo", "bar")], id="8.1.2.1/1 unknown pseudo-header"),
        pytest.param([*grpc_request_headers(), (":status", "200")], id="8.1.2.1/2 response pseudo-header"),
        pytest.param(
            [("content-type", "application/grpc"), *without("content-type")], id="8.1.2.1/4 pseudo-header after regular"
        ),
    ],
)
def test_8_1_2_1_pseudo_headers(h2c: H2Client, headers: list[tuple[str, str]]) -> None:
    expect_malformed(h2c, send_request(h2c, headers))


def test_8_1_2_1_3_pseudo_header_in_trailers(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, grpc_request_headers())
        + frame_bytes(DATA, 0, sid, grpc_message(range_request()))
        + h2c.headers_frame(sid, [(":method", "POST")], end_stream=True)
    )
    expect_malformed(h2c, sid)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("connection", "keep-alive"), id="8.1.2.2/1 connection"),
        pytest.param(("keep-alive", "timeout=5"), id="keep-alive"),
        pytest.param(("proxy-connection", "keep-alive"), id="proxy-connection"),
        pytest.param(("transfer-encoding", "chunked"), id="transfer-encoding"),
        pytest.param(("upgrade", "h2c"), id="upgrade"),
        pytest.param(("te", "trailers, deflate"), id="8.1.2.2/2 te: trailers, deflate"),
    ],
)
def test_8_1_2_2_connection_specific(h2c: H2Client, extra: tuple[str, str]) -> None:
    headers = [h for h in grpc_request_headers() if h[0] != "te" or extra[0] != "te"]
    expect_malformed(h2c, send_request(h2c, [*headers, extra]))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(k, "" if k == ":path" else v) for k, v in grpc_request_headers()], id="8.1.2.3/1 empty :path"),
        pytest.param(without(":method"), id="8.1.2.3/2 no :method"),
        pytest.param(without(":scheme"), id="8.1.2.3/3 no :scheme"),
        pytest.param(without(":path"), id="8.1.2.3/4 no :path"),
        pytest.param([(":method", "POST"), *grpc_request_headers()], id="8.1.2.3/5 two :method"),
        pytest.param([(":scheme", "http"), *grpc_request_headers()], id="8.1.2.3/6 two :scheme"),
        pytest.param([(":path", "/etcdserverpb.KV/Range"), *grpc_request_headers()], id="8.1.2.3/7 two :path"),
    ],
)
def test_8_1_2_3_request_pseudo_headers(h2c: H2Client, headers: list[tuple[str, str]]) -> None:
    expect_malformed(h2c, send_request(h2c, headers))


@pytest.mark.parametrize(
    "frames", [pytest.param(1, id="8.1.2.6/1 one DATA"), pytest.param(2, id="8.1.2.6/2 several DATA")]
)
def test_8_1_2_6_content_length_mismatch(h2c: H2Client, frames: int) -> None:
    body = grpc_message(range_request())
    sid = h2c.new_stream_id()
    out = h2c.headers_frame(sid, [*grpc_request_headers(), ("content-length", str(len(body) + 1))])
    if frames == 1:
        out += frame_bytes(DATA, END_STREAM, sid, body)
    else:
        out += frame_bytes(DATA, 0, sid, body[:4]) + frame_bytes(DATA, END_STREAM, sid, body[4:])
    h2c.send(out)
    expect_malformed(h2c, sid)


def test_8_1_2_6_matching_content_length_accepted(h2c: H2Client) -> None:
    body = grpc_message(range_request())
    r = h2c.read_response(send_request(h2c, [*grpc_request_headers(), ("content-length", str(len(body)))]))
    assert r.grpc_status == 0, str(r)


def test_8_3_1_authority_optional_host_allowed(h2c: H2Client) -> None:
    """:authority may be left out (grpc clients always send it, but HTTP/2 does not require it)."""
    r = h2c.read_response(send_request(h2c, without(":authority")))
    assert r.grpc_status == 0, str(r)
