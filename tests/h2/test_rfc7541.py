"""RFC 7541 (HPACK) on the proxy's client port: invalid header blocks are connection errors
COMPRESSION_ERROR (RFC 9113 4.3); valid uses of the dynamic table, Huffman and table size updates work.

Invalid blocks are hand-assembled bytes after a valid prefix, so only the case under test is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import hpack
import pytest

from tests.h2.rawclient import (
    COMPRESSION_ERROR,
    DATA,
    END_STREAM,
    HEADER_TABLE_SIZE,
    H2Client,
    frame_bytes,
    grpc_message,
    grpc_request_headers,
    hpack_literal,
    range_request,
)

pytestmark = pytest.mark.timeout(30)

Connect = Callable[..., H2Client]

_SERVED = "grpc-core decodes it and serves the call (grpc-status 0); no GOAWAY within 3 s"
DEVIATIONS: dict[str, dict[str, str]] = {
    "go": {},
    "grpcio": {
        "test_invalid_header_block[5.2/1 Huffman string with EOS]": _SERVED,
        "test_invalid_header_block[5.2/2 Huffman padding longer than 7 bits]": _SERVED,
    },
}

# A literal field without indexing, new name "x", whose value is the Huffman string given.
_LITERAL_X_HUFFMAN = b"\x00\x01x"


def send_block(c: H2Client, tail: bytes) -> int:
    """A request whose header block is a valid one (encoded without touching the dynamic table)
    followed by ``tail``."""
    sid = c.new_stream_id()
    valid = hpack.Encoder()
    valid.header_table_size = 0  # a fresh encoder that never indexes, so c.encoder stays in sync
    block = bytes(valid.encode(grpc_request_headers(), huffman=False))[1:]  # drop its size update
    c.send(c.headers_frame(sid, block + tail) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
    return sid


def assert_ok(c: H2Client, sid: int) -> None:
    r = c.read_response(sid)
    assert r.status == "200" and r.grpc_status == 0, str(r)


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\xc6", id="2.3.3/1 indexed field beyond both tables (70)"),
        pytest.param(b"\x7f\x07\x01a", id="2.3.3/2 literal with a name index beyond both tables (70)"),
        pytest.param(b"\x80", id="6.1/1 indexed field with index 0"),
        pytest.param(b"\x20", id="4.2/1 table size update at the end of a block"),
        pytest.param(_LITERAL_X_HUFFMAN + b"\x84\xff\xff\xff\xff", id="5.2/1 Huffman string with EOS"),
        pytest.param(_LITERAL_X_HUFFMAN + b"\x82\x1f\xff", id="5.2/2 Huffman padding longer than 7 bits"),
        pytest.param(_LITERAL_X_HUFFMAN + b"\x81\x18", id="5.2/3 Huffman padding not the EOS prefix"),
        pytest.param(b"\x00\x05ab", id="5.2 string shorter than its length"),
        pytest.param(b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f", id="5.1 integer overflow"),
    ],
)
def test_invalid_header_block(h2c: H2Client, tail: bytes) -> None:
    send_block(h2c, tail)
    h2c.expect_connection_error(COMPRESSION_ERROR)


def test_6_3_1_table_size_update_above_the_setting(h2c: H2Client) -> None:
    """A dynamic table size update above SETTINGS_HEADER_TABLE_SIZE (4096 by default): 4097."""
    sid = h2c.new_stream_id()
    block = b"\x3f\xe2\x1f" + h2c.encode(grpc_request_headers())
    h2c.send(h2c.headers_frame(sid, block) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
    h2c.expect_connection_error(COMPRESSION_ERROR)


def test_4_2_table_size_update_at_start_is_valid(h2c: H2Client) -> None:
    """Size updates at the start of a block (even two, RFC 7541 4.2) are fine; later blocks use the new size."""
    assert_ok(h2c, h2c.start_request(body=range_request(), extra=[("x-before", "1")]))
    h2c.encoder.header_table_size = 0
    h2c.encoder.header_table_size = 256  # two updates: 0 then 256 at the start of the next block
    assert_ok(h2c, h2c.start_request(body=range_request(), extra=[("x-after", "2")]))
    assert_ok(h2c, h2c.start_request(body=range_request(), extra=[("x-after", "2")]))


def test_2_3_dynamic_table_reused_across_requests(h2c: H2Client) -> None:
    """The second request refers to the first one's fields by dynamic index only."""
    extra = [("x-custom", "v" * 50), ("user-agent", "h2-tests/1")]
    first = h2c.encode(grpc_request_headers(extra=extra))
    second = h2c.encode(grpc_request_headers(extra=extra))
    assert len(second) < 16 < len(first), (first, second)
    for block in (first, second):
        sid = h2c.new_stream_id()
        h2c.send(h2c.headers_frame(sid, block) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
        assert_ok(h2c, sid)


def test_4_4_eviction(h2c: H2Client) -> None:
    """Fields that overflow the 4096-byte table evict older ones; every request still decodes."""
    for i in range(12):
        assert_ok(h2c, h2c.start_request(body=range_request(), extra=[(f"x-evict-{i}", "e" * 700)]))
    assert_ok(h2c, h2c.start_request(body=range_request(), extra=[("x-evict-0", "e" * 700)]))


@pytest.mark.parametrize("huffman", [True, False])
def test_5_2_string_literals(h2c: H2Client, huffman: bool) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers(extra=[("x-text", "Huffman or not: ~!@#$%^&*()")]), huffman=huffman)
    h2c.send(h2c.headers_frame(sid, block) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
    assert_ok(h2c, sid)


def test_6_2_3_never_indexed_and_not_indexed_literals(h2c: H2Client) -> None:
    headers = [
        *[hpack.NeverIndexedHeaderTuple(k, v) for k, v in grpc_request_headers()],
        hpack.NeverIndexedHeaderTuple("authorization", "secret"),
    ]
    sid = h2c.new_stream_id()
    block = bytes(h2c.encoder.encode(headers))
    h2c.send(h2c.headers_frame(sid, block) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
    assert_ok(h2c, sid)
    # literal without indexing, new name (0x00), hand-made
    sid = h2c.new_stream_id()
    h2c.send(
        h2c.headers_frame(sid, h2c.encode(grpc_request_headers()) + b"\x00\x06x-flat\x03abc")
        + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request()))
    )
    assert_ok(h2c, sid)


def test_server_honours_header_table_size_0(connect: Connect) -> None:
    """With SETTINGS_HEADER_TABLE_SIZE 0 from us, the server's blocks must decode with an empty table."""
    c = connect(settings=[(HEADER_TABLE_SIZE, 0)])
    c.decoder.header_table_size = 0
    c.decoder.max_allowed_table_size = 0
    for _ in range(3):
        r = c.unary()
        assert r.grpc_status == 0, str(r)


def test_refused_header_block_still_updates_the_table(h2c: H2Client) -> None:
    """RFC 9113 4.3 / 10.5.1: a header list refused for its size must still be decoded, so the dynamic
    table stays in sync. 80 KB of fields (over 65,536, under 4x: a stream error only) end with a field
    inserted into the dynamic table; the next request names it by index 62 and must be served."""
    request = [(k, v) for k, v in grpc_request_headers()]
    first = b"".join(hpack_literal(k, v) for k, v in request)
    first += b"".join(hpack_literal(f"x-big-{i}", "h" * 4000) for i in range(20))
    first += hpack_literal("x-late", "marker", index=True)  # dynamic index 62
    sid = h2c.new_stream_id()
    h2c.send(h2c.header_block_frames(sid, first) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
    r = h2c.read_response(sid)
    assert (r.ended or r.reset is not None) and not r.closed and r.goaway is None, str(r)  # refused, or served
    second = b"".join(hpack_literal(k, v) for k, v in request) + b"\xbe"
    sid = h2c.new_stream_id()
    h2c.send(h2c.header_block_frames(sid, second) + frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request())))
    r = h2c.read_response(sid)
    assert r.grpc_status == 0 and not r.closed and r.goaway is None, str(r)
