"""RFC 9113 (HTTP/2) conformance of the proxy's client port, section by section, after h2spec's case list.

Every case drives raw frames through tests/h2/rawclient.py against the shared proxy and judges the answer
with h2spec's rule (connection error X: GOAWAY X or a close; stream error X: RST_STREAM X, GOAWAY X or a
close). "Ignored" means the connection still answers a PING afterwards.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from tests.h2.conftest import deviates
from tests.h2.rawclient import (
    ACK,
    CANCEL,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_FRAME_SIZE,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WATCH_PATH,
    WINDOW_UPDATE,
    H2Client,
    frame_bytes,
    grpc_message,
    grpc_request_headers,
    range_request,
    settings_payload,
    watch_create_request,
)
from tests.helpers import LOCALHOST, ProxyProcess

pytestmark = pytest.mark.timeout(30)

Connect = Callable[..., H2Client]

# Where the reference servers were seen to differ from the contract (grpc-go 1.38 in etcd 3.5.1's
# grpc-proxy; grpc-core 1.85 in grpcio): those cases skip for that server only. Never for ours.
_GO_SILENT = "grpc-go ignores it: nothing within 3 s (no RST_STREAM, no GOAWAY, no close)"
_CORE_SILENT = "grpc-core ignores it: nothing within 3 s (no RST_STREAM, no GOAWAY, no close)"
DEVIATIONS: dict[str, dict[str, str]] = {
    "go": {
        "test_5_1_idle_stream[5.1/1 DATA]": _GO_SILENT,
        "test_5_1_idle_stream[5.1/2 RST_STREAM]": _GO_SILENT,
        "test_5_1_idle_stream[5.1/3 WINDOW_UPDATE]": _GO_SILENT,
        "test_5_1_5_half_closed_remote_data": _GO_SILENT,
        "test_5_1_6_half_closed_remote_headers": "grpc-go answers RST_STREAM PROTOCOL_ERROR, not STREAM_CLOSED",
        "test_5_1_8_closed_after_rst_data": _GO_SILENT,
        "test_5_1_9_closed_after_rst_headers": "grpc-go answers RST_STREAM PROTOCOL_ERROR, not STREAM_CLOSED",
        "test_5_1_11_closed_data": _GO_SILENT,
        "test_5_3_1_headers_depending_on_itself": _GO_SILENT,
        "test_5_3_1_priority_depending_on_itself": _GO_SILENT,
        "test_5_4_1_2_connection_error_sends_goaway": "grpc-go closes without a GOAWAY on a bad PING length",
        "test_6_2_4_headers_invalid_pad_length": "grpc-go answers RST_STREAM PROTOCOL_ERROR (a stream error)",
        "test_6_4_2_rst_on_idle_stream": _GO_SILENT,
        "test_6_5_2_invalid_setting_values[6.5.2/1 ENABLE_PUSH=2]": "grpc-go ACKs the SETTINGS",
        "test_6_5_2_invalid_setting_values[6.5.2/3 MAX_FRAME_SIZE=16383]": "grpc-go ACKs the SETTINGS",
        "test_6_5_2_invalid_setting_values[6.5.2/4 MAX_FRAME_SIZE=2^24]": "grpc-go ACKs the SETTINGS",
        "test_6_9_1_2_connection_window_overflow": _GO_SILENT,
        "test_6_9_1_3_stream_window_overflow": "grpc-go ignores it and finishes the call",
        "test_8_4_push_promise_from_client": "grpc-go ignores it and finishes the call",
    },
    "grpcio": {
        "test_4_1_2_undefined_flags_ignored": "grpc-core closes the connection on a PING with flags 0x16",
        "test_5_1_idle_stream[5.1/1 DATA]": _CORE_SILENT,
        "test_5_1_idle_stream[5.1/2 RST_STREAM]": _CORE_SILENT,
        "test_5_1_idle_stream[5.1/3 WINDOW_UPDATE]": _CORE_SILENT,
        "test_5_1_5_half_closed_remote_data": _CORE_SILENT,
        "test_5_1_6_half_closed_remote_headers": _CORE_SILENT,
        "test_5_1_7_half_closed_remote_continuation": "grpc-core ends the stream with RST_STREAM NO_ERROR",
        "test_5_1_8_closed_after_rst_data": _CORE_SILENT,
        "test_5_1_9_closed_after_rst_headers": _CORE_SILENT,
        "test_5_1_11_closed_data": _CORE_SILENT,
        "test_5_1_12_closed_headers": _CORE_SILENT,
        "test_5_1_1_1_even_stream_id": _CORE_SILENT,
        "test_5_1_1_2_decreasing_stream_id": _CORE_SILENT,
        "test_5_3_1_headers_depending_on_itself": _CORE_SILENT,
        "test_5_3_1_priority_depending_on_itself": _CORE_SILENT,
        "test_5_4_1_2_connection_error_sends_goaway": "grpc-core closes without a GOAWAY on a bad PING length",
        "test_4_2_2_data_over_max_frame_size": "grpc-core (MAX_FRAME_SIZE 4 MiB) ends the call trailers-only, then "
        "RST_STREAM NO_ERROR",
        "test_6_1_1_data_on_stream_0": _CORE_SILENT,
        "test_6_1_2_data_on_half_closed_remote": _CORE_SILENT,
        "test_6_1_3_data_invalid_pad_length": "grpc-core answers RST_STREAM PROTOCOL_ERROR (a stream error)",
        "test_6_1_padded_data_accepted": "grpc-core resets a padded DATA frame with RST_STREAM PROTOCOL_ERROR",
        "test_6_2_3_headers_on_stream_0": _CORE_SILENT,
        "test_6_2_4_headers_invalid_pad_length": _CORE_SILENT,
        "test_6_2_padded_and_priority_headers_accepted": "grpc-core: grpc-status 13 'Invalid HPACK index received'",
        "test_6_3_1_priority_on_stream_0": _CORE_SILENT,
        "test_6_3_2_priority_bad_length": _CORE_SILENT,
        "test_6_4_1_rst_on_stream_0": _CORE_SILENT,
        "test_6_4_2_rst_on_idle_stream": _CORE_SILENT,
        "test_6_7_3_ping_on_a_stream": "grpc-core answers the PING (ACK), no error",
        "test_6_8_1_goaway_on_a_stream": _CORE_SILENT,
        "test_6_9_2_window_update_zero_on_stream": "grpc-core finishes the call and sends RST_STREAM NO_ERROR",
        "test_6_9_1_2_connection_window_overflow": _CORE_SILENT,
        "test_6_9_1_3_stream_window_overflow": "grpc-core ignores it and finishes the call",
        "test_8_4_push_promise_from_client": "grpc-core ignores it and finishes the call",
    },
}


def assert_ok(c: H2Client, sid: int, timeout: float = 5) -> None:
    r = c.read_response(sid, timeout)
    assert r.status == "200" and r.grpc_status == 0, str(r)


def half_closed_remote(c: H2Client) -> int:
    """A Watch stream the client has ended (END_STREAM on its DATA) while the server keeps sending:
    "half-closed (remote)" on the server's side. Returns once the response HEADERS arrived."""
    sid = c.start_request(WATCH_PATH, watch_create_request(), end_stream=True)
    c.read_until(lambda f: f.type == HEADERS and f.stream_id == sid, what="Watch response HEADERS")
    return sid


def finished_stream(c: H2Client) -> int:
    """A unary call run to its end: the stream is "closed"."""
    sid = c.start_request(body=range_request())
    assert_ok(c, sid)
    return sid


# --------------------------------------------------------------------------- 3.5 connection preface


def test_3_5_1_preface_answered_with_settings(connect: Connect) -> None:
    c = connect(handshake=False)
    c.send(PREFACE + frame_bytes(SETTINGS, 0, 0))
    frames = c.read_until(lambda f: f.type == SETTINGS and not f.flags & ACK, what="server SETTINGS")
    assert frames[0].type == SETTINGS, "the server's preface must start with SETTINGS"
    c.read_until(lambda f: f.type == SETTINGS and bool(f.flags & ACK), what="SETTINGS ACK")


def test_3_5_2_invalid_preface(connect: Connect) -> None:
    c = connect(handshake=False)
    c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + frame_bytes(SETTINGS, 0, 0))
    c.expect_connection_error(PROTOCOL_ERROR)


# --------------------------------------------------------------------------- 4.1 frame format


def test_4_1_1_unknown_frame_type_ignored(h2c: H2Client) -> None:
    h2c.send_frame(0x16, 0, 0, b"\x00" * 8)
    h2c.expect_alive()


def test_4_1_2_undefined_flags_ignored(h2c: H2Client) -> None:
    h2c.send_frame(PING, 0x16, 0, b"flagstst")
    h2c.read_until(lambda f: f.type == PING and bool(f.flags & ACK) and f.payload == b"flagstst", what="PING ACK")


def test_4_1_3_reserved_bit_ignored(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    out = frame_bytes(HEADERS, END_HEADERS, sid | 0x80000000, h2c.encode(grpc_request_headers()))
    out += frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request()))
    h2c.send(out)
    assert_ok(h2c, sid)


# --------------------------------------------------------------------------- 4.2 frame size


def test_4_2_1_data_of_max_frame_size(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    body = range_request(key=b"k" * (16384 - 5 - 3))  # gRPC prefix, tag, 2-byte varint length
    assert len(grpc_message(body)) == 16384
    h2c.send_headers(sid, grpc_request_headers())
    h2c.send_data(sid, grpc_message(body), end_stream=True)
    assert_ok(h2c, sid)


def test_4_2_2_data_over_max_frame_size(h2c: H2Client) -> None:
    limit = h2c.server_settings.get(MAX_FRAME_SIZE, 16384)
    sid = h2c.new_stream_id()
    h2c.send_headers(sid, grpc_request_headers())
    h2c.send_data(sid, b"\x00" * (limit + 1), end_stream=True)
    h2c.expect_stream_error(sid, FRAME_SIZE_ERROR)


def test_4_2_3_headers_over_max_frame_size(h2c: H2Client) -> None:
    limit = h2c.server_settings.get(MAX_FRAME_SIZE, 16384)
    sid = h2c.new_stream_id()
    pad = [(f"x-pad-{i}", "v" * 1000) for i in range(limit // 1000 + 2)]
    block = h2c.encode([*grpc_request_headers(), *pad], huffman=False)
    assert len(block) > limit
    h2c.send_headers(sid, block, end_stream=True)
    h2c.expect_connection_error(FRAME_SIZE_ERROR)


# --------------------------------------------------------------------------- 4.3 header compression


def test_4_3_1_invalid_header_block(h2c: H2Client) -> None:
    # a literal with a 10-byte name cut after 3 bytes
    h2c.send_headers(h2c.new_stream_id(), b"\x40\x0aabc", end_stream=True)
    h2c.expect_connection_error(0x9)  # COMPRESSION_ERROR


def test_4_3_2_priority_inside_header_block(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    h2c.send(
        frame_bytes(HEADERS, END_STREAM, sid, block[:5])
        + frame_bytes(PRIORITY, 0, sid, struct.pack(">IB", 0, 15))
        + frame_bytes(CONTINUATION, END_HEADERS, sid, block[5:])
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_4_3_3_headers_of_another_stream_inside_header_block(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    other = h2c.new_stream_id()
    h2c.send(
        frame_bytes(HEADERS, END_STREAM, sid, block[:5])
        + frame_bytes(HEADERS, END_STREAM | END_HEADERS, other, block)
        + frame_bytes(CONTINUATION, END_HEADERS, sid, block[5:])
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


# --------------------------------------------------------------------------- 5.1 stream states


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(frame_bytes(DATA, 0, 1, b"\x00" * 5), id="5.1/1 DATA"),
        pytest.param(frame_bytes(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)), id="5.1/2 RST_STREAM"),
        pytest.param(frame_bytes(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)), id="5.1/3 WINDOW_UPDATE"),
        pytest.param(frame_bytes(CONTINUATION, END_HEADERS, 1, b"\x82"), id="5.1/4 CONTINUATION"),
    ],
)
def test_5_1_idle_stream(h2c: H2Client, frame: bytes) -> None:
    h2c.send(frame)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_5_1_5_half_closed_remote_data(h2c: H2Client) -> None:
    sid = half_closed_remote(h2c)
    h2c.send_data(sid, grpc_message(watch_create_request()))
    h2c.expect_stream_error(sid, STREAM_CLOSED)


def test_5_1_6_half_closed_remote_headers(h2c: H2Client) -> None:
    sid = half_closed_remote(h2c)
    h2c.send_headers(sid, [("x-trailer", "1")], end_stream=True)
    h2c.expect_stream_error(sid, STREAM_CLOSED)


def test_5_1_7_half_closed_remote_continuation(h2c: H2Client) -> None:
    sid = half_closed_remote(h2c)
    h2c.send_frame(CONTINUATION, END_HEADERS, sid, h2c.encode([("x-trailer", "1")]))
    h2c.expect_stream_error(sid, STREAM_CLOSED, PROTOCOL_ERROR)


def _reset_stream(c: H2Client) -> int:
    sid = c.start_request(WATCH_PATH, watch_create_request(), end_stream=False)
    c.send_rst(sid, CANCEL)
    return sid


def test_5_1_8_closed_after_rst_data(h2c: H2Client) -> None:
    sid = _reset_stream(h2c)
    h2c.send_data(sid, grpc_message(watch_create_request()))
    h2c.expect_stream_error(sid, STREAM_CLOSED)


def test_5_1_9_closed_after_rst_headers(h2c: H2Client) -> None:
    sid = _reset_stream(h2c)
    h2c.send_headers(sid, [("x-trailer", "1")], end_stream=True)
    h2c.expect_stream_error(sid, STREAM_CLOSED)


def test_5_1_10_closed_after_rst_continuation(h2c: H2Client) -> None:
    sid = _reset_stream(h2c)
    h2c.send_frame(CONTINUATION, END_HEADERS, sid, h2c.encode([("x-trailer", "1")]))
    h2c.expect_stream_error(sid, STREAM_CLOSED, PROTOCOL_ERROR)


def test_5_1_11_closed_data(h2c: H2Client) -> None:
    sid = finished_stream(h2c)
    h2c.send_data(sid, grpc_message(range_request()), end_stream=True)
    h2c.expect_stream_error(sid, STREAM_CLOSED)


def test_5_1_12_closed_headers(h2c: H2Client) -> None:
    sid = finished_stream(h2c)
    h2c.send_headers(sid, grpc_request_headers(), end_stream=True)
    h2c.expect_stream_error(sid, STREAM_CLOSED)


def test_5_1_13_closed_continuation(h2c: H2Client) -> None:
    sid = finished_stream(h2c)
    h2c.send_frame(CONTINUATION, END_HEADERS, sid, h2c.encode([("x-trailer", "1")]))
    h2c.expect_stream_error(sid, STREAM_CLOSED, PROTOCOL_ERROR)


def test_5_1_closed_window_update_and_rst_ignored(h2c: H2Client) -> None:
    """RFC 9113 5.1 "closed": WINDOW_UPDATE and RST_STREAM on a just-closed stream must be ignored."""
    sid = finished_stream(h2c)
    h2c.send_window_update(sid, 10)
    h2c.send_rst(sid, CANCEL)
    h2c.expect_alive()
    assert_ok(h2c, h2c.start_request(body=range_request()))


# --------------------------------------------------------------------------- 5.1.1 stream identifiers


def test_5_1_1_1_even_stream_id(h2c: H2Client) -> None:
    h2c.send_headers(2, grpc_request_headers(), end_stream=True)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_5_1_1_2_decreasing_stream_id(h2c: H2Client) -> None:
    h2c.start_request(body=range_request(), stream_id=5)
    h2c.start_request(body=range_request(), stream_id=3)
    h2c.expect_connection_error(PROTOCOL_ERROR)


# --------------------------------------------------------------------------- 5.1.2 stream concurrency


def test_5_1_2_1_concurrency_limit(proxy: Callable[..., ProxyProcess], transport: str) -> None:
    deviates(transport, go="etcd grpc-proxy has no --max-concurrent-streams flag (grpc-go advertises 2^32-1)")
    p = proxy(extra_args=("--max-concurrent-streams=3",))
    with H2Client(LOCALHOST, p.port) as c:
        c.connect()
        assert c.server_settings.get(0x3) == 3, c.server_settings
        sids = [c.start_request(WATCH_PATH, watch_create_request(), end_stream=False) for _ in range(4)]
        c.expect_stream_error(sids[-1], PROTOCOL_ERROR, REFUSED_STREAM)


# --------------------------------------------------------------------------- 5.3 priority


def test_5_3_1_headers_depending_on_itself(h2c: H2Client, transport: str) -> None:
    sid = h2c.new_stream_id()
    payload = struct.pack(">IB", sid, 15) + h2c.encode(grpc_request_headers())
    h2c.send_frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, sid, payload)
    h2c.expect_stream_error(sid, PROTOCOL_ERROR)


def test_5_3_1_priority_depending_on_itself(h2c: H2Client, transport: str) -> None:
    sid = h2c.new_stream_id()
    h2c.send_frame(PRIORITY, 0, sid, struct.pack(">IB", sid, 15))
    h2c.expect_stream_error(sid, PROTOCOL_ERROR)


# --------------------------------------------------------------------------- 5.4 error handling


def test_5_4_1_1_connection_error_closes(h2c: H2Client) -> None:
    h2c.send_frame(PING, 0, 0, b"\x00" * 6)
    h2c.expect_connection_error(FRAME_SIZE_ERROR)
    h2c.expect_closed(5)


def test_5_4_1_2_connection_error_sends_goaway(h2c: H2Client) -> None:
    """SHOULD send GOAWAY before closing, naming the last stream it processed."""
    assert_ok(h2c, h2c.start_request(body=range_request()))
    h2c.send_frame(PING, 0, 0, b"\x00" * 6)
    goaway = h2c.expect_goaway(FRAME_SIZE_ERROR)
    assert goaway.last_stream_id == 1, str(goaway)


# --------------------------------------------------------------------------- 5.5 extending HTTP/2


def test_5_5_1_unknown_extension_frame_ignored(h2c: H2Client) -> None:
    h2c.send_frame(0xFF, 0xFF, 0, b"unknown")
    h2c.send_frame(0x20, 0, 1, b"on an idle stream")
    h2c.expect_alive()


def test_5_5_2_unknown_frame_inside_header_block(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    h2c.send(
        frame_bytes(HEADERS, END_STREAM, sid, block[:5])
        + frame_bytes(0x20, 0, sid, b"unknown")
        + frame_bytes(CONTINUATION, END_HEADERS, sid, block[5:])
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


# --------------------------------------------------------------------------- 6.1 DATA


def test_6_1_1_data_on_stream_0(h2c: H2Client) -> None:
    h2c.send_frame(DATA, 0, 0, b"\x00" * 5)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_1_2_data_on_half_closed_remote(h2c: H2Client) -> None:
    sid = h2c.start_request(WATCH_PATH, None, end_stream=True)
    h2c.send_data(sid, grpc_message(watch_create_request()))
    h2c.expect_stream_error(sid, STREAM_CLOSED)


def test_6_1_3_data_invalid_pad_length(h2c: H2Client) -> None:
    sid = h2c.start_request(end_stream=False)
    body = grpc_message(range_request())
    h2c.send_frame(DATA, PADDED | END_STREAM, sid, bytes([len(body) + 10]) + body)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_1_padded_data_accepted(h2c: H2Client) -> None:
    sid = h2c.start_request(end_stream=False)
    body = grpc_message(range_request())
    h2c.send_frame(DATA, PADDED | END_STREAM, sid, bytes([20]) + body + b"\x00" * 20)
    assert_ok(h2c, sid)


# --------------------------------------------------------------------------- 6.2 HEADERS


def test_6_2_1_headers_then_priority(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    h2c.send(
        frame_bytes(HEADERS, END_STREAM, sid, h2c.encode(grpc_request_headers()))
        + frame_bytes(PRIORITY, 0, sid, struct.pack(">IB", 0, 15))
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_2_2_headers_to_another_stream_during_block(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    other = h2c.new_stream_id()
    h2c.send(
        frame_bytes(HEADERS, END_STREAM, sid, h2c.encode(grpc_request_headers()))
        + frame_bytes(HEADERS, END_STREAM | END_HEADERS, other, h2c.encode(grpc_request_headers()))
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_2_3_headers_on_stream_0(h2c: H2Client) -> None:
    h2c.send_headers(0, grpc_request_headers(), end_stream=True)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_2_4_headers_invalid_pad_length(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    h2c.send_frame(HEADERS, PADDED | END_HEADERS | END_STREAM, sid, bytes([len(block) + 10]) + block)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_2_padded_and_priority_headers_accepted(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    payload = bytes([7]) + struct.pack(">IB", 0, 200) + block + b"\x00" * 7
    h2c.send_frame(HEADERS, PADDED | PRIORITY_FLAG | END_HEADERS, sid, payload)
    h2c.send_data(sid, grpc_message(range_request()), end_stream=True)
    assert_ok(h2c, sid)


# --------------------------------------------------------------------------- 6.3 PRIORITY


def test_6_3_1_priority_on_stream_0(h2c: H2Client) -> None:
    h2c.send_frame(PRIORITY, 0, 0, struct.pack(">IB", 0, 15))
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_3_2_priority_bad_length(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    h2c.send_frame(PRIORITY, 0, sid, struct.pack(">IBB", 0, 15, 0))
    h2c.expect_stream_error(sid, FRAME_SIZE_ERROR)


def test_6_3_priority_on_idle_stream_ignored(h2c: H2Client) -> None:
    h2c.send_frame(PRIORITY, 0, 9, struct.pack(">IB", 0, 15))
    h2c.expect_alive()
    assert_ok(h2c, h2c.start_request(body=range_request(), stream_id=11))


# --------------------------------------------------------------------------- 6.4 RST_STREAM


def test_6_4_1_rst_on_stream_0(h2c: H2Client) -> None:
    h2c.send_frame(RST_STREAM, 0, 0, struct.pack(">I", CANCEL))
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_4_2_rst_on_idle_stream(h2c: H2Client) -> None:
    h2c.send_frame(RST_STREAM, 0, 7, struct.pack(">I", CANCEL))
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_4_3_rst_bad_length(h2c: H2Client) -> None:
    sid = h2c.start_request(WATCH_PATH, watch_create_request(), end_stream=False)
    h2c.send_frame(RST_STREAM, 0, sid, struct.pack(">IB", CANCEL, 0))
    h2c.expect_connection_error(FRAME_SIZE_ERROR)


# --------------------------------------------------------------------------- 6.5 SETTINGS


def test_6_5_1_settings_ack_with_payload(h2c: H2Client) -> None:
    h2c.send_frame(SETTINGS, ACK, 0, settings_payload([(INITIAL_WINDOW_SIZE, 100)]))
    h2c.expect_connection_error(FRAME_SIZE_ERROR)


def test_6_5_2_settings_on_a_stream(h2c: H2Client) -> None:
    h2c.send_frame(SETTINGS, 0, 1, settings_payload([(INITIAL_WINDOW_SIZE, 100)]))
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_5_3_settings_bad_length(h2c: H2Client) -> None:
    h2c.send_frame(SETTINGS, 0, 0, settings_payload([(INITIAL_WINDOW_SIZE, 100)])[:5])
    h2c.expect_connection_error(FRAME_SIZE_ERROR)


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        pytest.param(0x2, 2, PROTOCOL_ERROR, id="6.5.2/1 ENABLE_PUSH=2"),
        pytest.param(0x4, 1 << 31, FLOW_CONTROL_ERROR, id="6.5.2/2 INITIAL_WINDOW_SIZE=2^31"),
        pytest.param(0x5, 16383, PROTOCOL_ERROR, id="6.5.2/3 MAX_FRAME_SIZE=16383"),
        pytest.param(0x5, 1 << 24, PROTOCOL_ERROR, id="6.5.2/4 MAX_FRAME_SIZE=2^24"),
    ],
)
def test_6_5_2_invalid_setting_values(h2c: H2Client, setting: int, value: int, error: int) -> None:
    h2c.send_settings([(setting, value)])
    h2c.expect_connection_error(error)


def test_6_5_2_5_unknown_setting_ignored(h2c: H2Client) -> None:
    h2c.send_settings([(0xFF, 1)])
    h2c.read_until(lambda f: f.type == SETTINGS and bool(f.flags & ACK), what="SETTINGS ACK")
    h2c.expect_alive()


def test_6_5_3_1_last_value_of_a_setting_wins(connect: Connect) -> None:
    c = connect(settings=[(INITIAL_WINDOW_SIZE, 100), (INITIAL_WINDOW_SIZE, 1)])
    sid = c.start_request(body=range_request())
    frames = c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="first DATA")
    assert len(frames[-1].payload) == 1, str(frames[-1])


def test_6_5_3_2_settings_acked(h2c: H2Client) -> None:
    h2c.settings_acked = False
    h2c.send_settings([(INITIAL_WINDOW_SIZE, 65535)])
    h2c.read_until(lambda f: f.type == SETTINGS and bool(f.flags & ACK), what="SETTINGS ACK")


# --------------------------------------------------------------------------- 6.7 PING


def test_6_7_1_ping_acked_with_same_payload(h2c: H2Client) -> None:
    frames = h2c.ping_roundtrip(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert frames[-1].stream_id == 0


def test_6_7_2_ping_ack_not_answered(h2c: H2Client) -> None:
    h2c.send_ping(b"ackfirst", ack=True)
    frames = h2c.ping_roundtrip(b"realping")
    assert not [f for f in frames if f.type == PING and f.payload == b"ackfirst"], [str(f) for f in frames]


def test_6_7_3_ping_on_a_stream(h2c: H2Client) -> None:
    h2c.send_frame(PING, 0, 1, b"\x00" * 8)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_7_4_ping_bad_length(h2c: H2Client) -> None:
    h2c.send_frame(PING, 0, 0, b"\x00" * 6)
    h2c.expect_connection_error(FRAME_SIZE_ERROR)


# --------------------------------------------------------------------------- 6.8 GOAWAY


def test_6_8_1_goaway_on_a_stream(h2c: H2Client) -> None:
    h2c.send_frame(GOAWAY, 0, 1, struct.pack(">II", 0, 0))
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_8_client_goaway_lets_streams_finish(h2c: H2Client) -> None:
    sid = h2c.start_request(body=range_request())
    h2c.send_goaway(last_stream_id=0)
    r = h2c.read_response(sid)
    assert r.grpc_status == 0 and r.reset is None, str(r)


# --------------------------------------------------------------------------- 6.9 WINDOW_UPDATE


def test_6_9_1_window_update_zero_on_connection(h2c: H2Client) -> None:
    h2c.send_window_update(0, 0)
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_9_2_window_update_zero_on_stream(h2c: H2Client) -> None:
    sid = h2c.start_request(WATCH_PATH, watch_create_request(), end_stream=False)
    h2c.send_window_update(sid, 0)
    h2c.expect_stream_error(sid, PROTOCOL_ERROR)


def test_6_9_3_window_update_bad_length(h2c: H2Client) -> None:
    h2c.send_frame(WINDOW_UPDATE, 0, 0, struct.pack(">IB", 100, 0))
    h2c.expect_connection_error(FRAME_SIZE_ERROR)


def test_6_9_1_1_initial_window_of_one(connect: Connect) -> None:
    c = connect(settings=[(INITIAL_WINDOW_SIZE, 1)])
    sid = c.start_request(body=range_request())
    frames = c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="first DATA")
    assert len(frames[-1].payload) == 1, str(frames[-1])
    more = [f for f in c.drain(0.3) if f.type == DATA and f.payload]
    assert not more, [str(f) for f in more]


def test_6_9_1_2_connection_window_overflow(h2c: H2Client) -> None:
    h2c.send_window_update(0, 0x7FFFFFFF)
    h2c.send_window_update(0, 0x7FFFFFFF)
    h2c.expect_connection_error(FLOW_CONTROL_ERROR)


def test_6_9_1_3_stream_window_overflow(h2c: H2Client) -> None:
    sid = h2c.start_request(WATCH_PATH, watch_create_request(), end_stream=False)
    h2c.send_window_update(sid, 0x7FFFFFFF)
    h2c.send_window_update(sid, 0x7FFFFFFF)
    h2c.expect_stream_error(sid, FLOW_CONTROL_ERROR)


def test_6_9_2_1_initial_window_raised_after_headers(connect: Connect) -> None:
    c = connect(settings=[(INITIAL_WINDOW_SIZE, 0)])
    sid = c.start_request(body=range_request())
    c.read_until(lambda f: f.type == HEADERS and f.stream_id == sid, what="response HEADERS")
    assert not [f for f in c.drain(0.3) if f.type == DATA and f.payload]
    c.send_settings([(INITIAL_WINDOW_SIZE, 1)])
    frames = c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="DATA after the window opened")
    assert len(frames[-1].payload) == 1, str(frames[-1])


def test_6_9_2_2_negative_window(connect: Connect) -> None:
    c = connect(settings=[(INITIAL_WINDOW_SIZE, 3)])
    sid = c.start_request(body=range_request())
    frames = c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="first DATA")
    assert len(frames[-1].payload) == 3, str(frames[-1])
    c.send_settings([(INITIAL_WINDOW_SIZE, 2)])  # window: 2 - 3 = -1
    c.read_until(lambda f: f.type == SETTINGS and bool(f.flags & ACK), what="SETTINGS ACK")
    c.send_window_update(sid, 2)  # window: 1
    frames = c.read_until(lambda f: f.type == DATA and f.stream_id == sid, what="DATA after the update")
    assert len(frames[-1].payload) == 1, str(frames[-1])


def test_6_9_2_3_initial_window_too_large(h2c: H2Client) -> None:
    h2c.send_settings([(INITIAL_WINDOW_SIZE, 1 << 31)])
    h2c.expect_connection_error(FLOW_CONTROL_ERROR)


# --------------------------------------------------------------------------- 6.10 CONTINUATION


def test_6_10_1_headers_in_many_continuations(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode([*grpc_request_headers(), ("x-long", "v" * 300)])
    out = frame_bytes(HEADERS, 0, sid, block[:10])
    rest = block[10:]
    while rest:
        piece, rest = rest[:7], rest[7:]
        out += frame_bytes(CONTINUATION, 0 if rest else END_HEADERS, sid, piece)
    out += frame_bytes(DATA, END_STREAM, sid, grpc_message(range_request()))
    h2c.send(out)
    assert_ok(h2c, sid)


def test_6_10_2_continuation_then_other_frame(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    h2c.send(
        frame_bytes(HEADERS, END_STREAM, sid, block[:5])
        + frame_bytes(CONTINUATION, 0, sid, block[5:8])
        + frame_bytes(DATA, 0, sid, b"\x00" * 5)
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_10_3_continuation_on_stream_0(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    h2c.send(frame_bytes(HEADERS, END_STREAM, sid, block[:5]) + frame_bytes(CONTINUATION, END_HEADERS, 0, block[5:]))
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_10_4_continuation_after_end_headers(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    h2c.send(
        frame_bytes(HEADERS, END_HEADERS, sid, block)
        + frame_bytes(CONTINUATION, END_HEADERS, sid, h2c.encode([("x-more", "1")]))
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_10_5_continuation_after_ended_continuation(h2c: H2Client) -> None:
    sid = h2c.new_stream_id()
    block = h2c.encode(grpc_request_headers())
    h2c.send(
        frame_bytes(HEADERS, 0, sid, block[:5])
        + frame_bytes(CONTINUATION, END_HEADERS, sid, block[5:])
        + frame_bytes(CONTINUATION, END_HEADERS, sid, h2c.encode([("x-more", "1")]))
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


def test_6_10_6_continuation_after_data(h2c: H2Client) -> None:
    sid = h2c.start_request(end_stream=False)
    h2c.send(
        frame_bytes(DATA, 0, sid, grpc_message(range_request()))
        + frame_bytes(CONTINUATION, END_HEADERS, sid, h2c.encode([("x-more", "1")]))
    )
    h2c.expect_connection_error(PROTOCOL_ERROR)


# --------------------------------------------------------------------------- 7 error codes


def test_7_1_unknown_error_code_in_goaway_ignored(h2c: H2Client) -> None:
    h2c.send_goaway(0, 0xFF)
    h2c.ping_roundtrip(b"afterga!")  # the connection is still answered (it may close later, gracefully)


def test_7_2_unknown_error_code_in_rst_ignored(h2c: H2Client) -> None:
    sid = h2c.start_request(WATCH_PATH, watch_create_request(), end_stream=False)
    h2c.send_rst(sid, 0xFF)
    h2c.expect_alive()
    assert_ok(h2c, h2c.start_request(body=range_request()))


# --------------------------------------------------------------------------- 8.2 server push


def test_8_4_push_promise_from_client(h2c: H2Client) -> None:
    sid = h2c.start_request(WATCH_PATH, watch_create_request(), end_stream=False)
    h2c.send_frame(PUSH_PROMISE, END_HEADERS, sid, struct.pack(">I", 2) + h2c.encode(grpc_request_headers()))
    h2c.expect_connection_error(PROTOCOL_ERROR)
