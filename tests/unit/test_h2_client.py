"""The sans-I/O client connection driven with bytes only: handshake, calls, statuses, flow control, GOAWAY,
RST_STREAM mapping, keepalive, the concurrency queue, deadlines."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest
from hpack import Decoder, Encoder

from etcdproxy.h2 import frames as f
from etcdproxy.h2 import grpcwire as gw
from etcdproxy.h2.client import ClientConnection, ClientSettings, ClientStream, timeout_field

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


def parse(data: bytes) -> list[Frame]:
    if data.startswith(f.PREFACE):
        data = data[len(f.PREFACE) :]
    out, pos = [], 0
    while pos < len(data):
        hi, lo, kind, flags, sid = f.HEADER.unpack_from(data, pos)
        n = (hi << 8) | lo
        out.append((kind, flags, sid & 0x7FFFFFFF, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


def fields(decoder: Decoder, block: bytes) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in decoder.decode(block)]


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class App:
    """Records what the connection tells a call; consumes messages at once unless told not to."""

    def __init__(self, consume: bool = True) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.consume = consume
        self.conn: ClientConnection | None = None
        self.messages: list[bytes] = []
        self.unblocked_count = 0

    def headers(self, stream: ClientStream, headers: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("headers",))

    def message(self, stream: ClientStream, message: bytes) -> None:
        self.messages.append(message)
        self.events.append(("message", message))
        if self.consume and self.conn is not None:
            self.conn.consumed(stream, len(message))

    def end(self, stream: ClientStream, code: int, message: str, trailers: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("end", code, message, stream.unprocessed))

    def unblocked(self, stream: ClientStream) -> None:
        self.unblocked_count += 1

    @property
    def status(self) -> tuple[Any, ...] | None:
        ends = [e for e in self.events if e[0] == "end"]
        assert len(ends) <= 1, self.events
        return ends[0][1:] if ends else None


class Server:
    """The peer: feeds server bytes to a ClientConnection and parses what it writes."""

    def __init__(
        self,
        server_settings: list[tuple[int, int]] | None = None,
        client_settings: ClientSettings | None = None,
        handshake: bool = True,
    ) -> None:
        self.now = 1000.0
        self.wakeups = 0
        self.conn = ClientConnection("etcd:2379", self.now, self._wake, settings=client_settings)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.first = self.take()
        if handshake:
            self.feed(f.settings(server_settings if server_settings is not None else []) + f.SETTINGS_ACK)

    def _wake(self) -> None:
        self.wakeups += 1

    def take(self) -> list[Frame]:
        return parse(self.conn.take_output())

    def feed(self, data: bytes) -> list[Frame]:
        self.conn.receive(data, self.now)
        return self.take()

    def app(self, consume: bool = True) -> App:
        app = App(consume)
        app.conn = self.conn
        return app

    def unary(self, message: bytes = b"req", path: str = "/etcdserverpb.KV/Range", **kw: Any) -> tuple[App, Any]:
        app = self.app()
        stream = self.conn.open_unary(app, path, kw.pop("metadata", ()), message, self.now, **kw)
        return app, stream

    def headers(self, sid: int, fields: list[tuple[str, str]] | None = None, end: bool = False) -> bytes:
        block = self.encoder.encode(fields or [(":status", "200"), ("content-type", "application/grpc")])
        return f.frame(f.HEADERS, f.END_HEADERS | (f.END_STREAM if end else 0), sid, block)

    def trailers(self, sid: int, code: int = 0, message: str = "") -> bytes:
        fields = [("grpc-status", str(code))] + ([("grpc-message", message)] if message else [])
        return f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, self.encoder.encode(fields))

    def data(self, sid: int, payload: bytes, end: bool = False) -> bytes:
        return f.frame(f.DATA, f.END_STREAM if end else 0, sid, payload)

    def answer(self, sid: int, message: bytes, code: int = 0) -> list[Frame]:
        return self.feed(self.headers(sid) + self.data(sid, grpc_message(message)) + self.trailers(sid, code))


def settings_values(payload: bytes) -> dict[int, int]:
    return dict(struct.unpack(">HL", payload[i : i + 6]) for i in range(0, len(payload), 6))


def goaway_of(frames: list[Frame]) -> tuple[int, int] | None:
    for kind, _, _, payload in frames:
        if kind == f.GOAWAY:
            return struct.unpack(">LL", payload[:8])
    return None


# ---- handshake ---------------------------------------------------------------------------------------------


def test_handshake_preface_settings_window_and_ack() -> None:
    s = Server(handshake=False)
    assert [k for k, *_ in s.first] == [f.SETTINGS, f.WINDOW_UPDATE]
    values = settings_values(s.first[0][3])
    assert values == {f.ENABLE_PUSH: 0, f.INITIAL_WINDOW_SIZE: 4 << 20, f.MAX_HEADER_LIST_SIZE: 1 << 20}
    assert int.from_bytes(s.first[1][3], "big") == (64 << 20) - 65535
    assert not s.conn.ready
    out = s.feed(f.settings([(f.MAX_CONCURRENT_STREAMS, 7), (f.INITIAL_WINDOW_SIZE, 1000), (f.MAX_FRAME_SIZE, 20000)]))
    assert out == [(f.SETTINGS, f.ACK, 0, b"")]
    assert s.conn.ready and s.conn.peer_max_streams == 7 and s.conn.peer_initial_window == 1000
    assert s.conn.peer_max_frame == 20000


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (f.ping(b"12345678"), f.PROTOCOL_ERROR),  # the server preface must be SETTINGS
        (f.settings([]) + f.frame(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\x00\x00\x00\x02"), f.PROTOCOL_ERROR),
        (f.settings([(f.MAX_FRAME_SIZE, 100)]), f.PROTOCOL_ERROR),
        (f.settings([]) + f.frame(f.DATA, 0, 0, b"x"), f.PROTOCOL_ERROR),
        (f.settings([]) + f.frame_head(f.DATA, 0, 1, 20000) + b"x" * 20000, f.FRAME_SIZE_ERROR),
    ],
)
def test_connection_errors_send_goaway(data: bytes, code: int) -> None:
    s = Server(handshake=False)
    app, _ = s.unary()
    s.take()
    frames = s.feed(data)
    assert goaway_of(frames) == (0, code)
    assert s.conn.closed and app.status is not None and app.status[0] == 14


# ---- unary calls -------------------------------------------------------------------------------------------


def test_unary_request_bytes_ids_and_answer() -> None:
    s = Server([(f.MAX_CONCURRENT_STREAMS, 100)])
    metadata = (("token", "abc"), ("trace-bin", b"\x00\x01\x02\x03"), ("te", "x"), (":path", "/evil"))
    app, _stream = s.unary(b"hello", metadata=metadata, deadline=s.now + 5)
    frames = s.take()
    assert [(k, fl, sid) for k, fl, sid, _ in frames] == [(f.HEADERS, f.END_HEADERS, 1), (f.DATA, f.END_STREAM, 1)]
    assert fields(s.decoder, frames[0][3]) == [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/etcdserverpb.KV/Range"),
        (":authority", "etcd:2379"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("token", "abc"),
        ("trace-bin", base64.b64encode(b"\x00\x01\x02\x03").decode().rstrip("=")),  # no padding, like grpc-go
        ("grpc-timeout", "5000000u"),
    ]
    assert frames[1][3] == grpc_message(b"hello")
    s.answer(1, b"world")
    assert app.events == [("headers",), ("message", b"world"), ("end", 0, "", False)]
    assert not s.conn.streams
    app2, stream2 = s.unary()
    assert stream2.id == 3 and [sid for _, _, sid, _ in s.take()] == [3, 3]
    s.answer(3, b"again")
    assert app2.status == (0, "", False)
    app3, _ = s.unary()
    s.answer(5, b"third")
    assert app3.status == (0, "", False)
    assert s.conn.decoder.hits == 2  # the second blocks were all-indexed and stored: the third ones hit


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ([(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "5"), ("grpc-message", "nf")],
         5, "nf"),
        ([(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "11"),
          ("grpc-message", "etcdserver: 100%25 done %E2%9C%93")], 11, "etcdserver: 100% done \u2713"),
        ([(":status", "200"), ("content-type", "application/grpc")], 2, ""),
        ([(":status", "404"), ("content-type", "text/html")], 12,
         "unexpected HTTP status code received from server: 404 (Not Found)"),
        ([(":status", "503")], 14, "unexpected HTTP status code received from server: 503 (Service Unavailable)"),
        ([(":status", "401")], 16, "unexpected HTTP status code received from server: 401 (Unauthorized)"),
        ([(":status", "418")], 2, "unexpected HTTP status code received from server: 418 (I'm a Teapot)"),
        ([(":status", "429"), ("grpc-status", "8"), ("grpc-message", "slow")], 8, "slow"),  # grpc-status wins
        ([(":status", "200"), ("content-type", "text/plain")], 13,
         'transport: received unexpected content-type "text/plain"'),
    ],
)  # fmt: skip
def test_trailers_only_and_http_status_mapping(fields: list[tuple[str, str]], code: int, message: str) -> None:
    s = Server()
    app, _ = s.unary()
    s.take()
    s.feed(s.headers(1, fields, end=True))
    assert app.status == (code, message, False)
    assert "headers" not in [e[0] for e in app.events]


def test_trailers_status_and_missing_status() -> None:
    s = Server()
    app, _ = s.unary()
    s.feed(s.headers(1) + s.trailers(1, 9, "etcdserver: %20x"))
    assert app.status == (9, "etcdserver:  x", False)
    app, _ = s.unary()
    head = s.headers(3)
    block = s.encoder.encode([("x-other", "1")])
    s.feed(head + f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 3, block))
    assert app.status == (2, "transport: trailers without grpc-status", False)
    app, _ = s.unary()
    s.feed(s.headers(5) + s.data(5, grpc_message(b"x"), end=True))
    assert app.status == (13, "server closed the stream without sending trailers", False)


def test_response_messages_split_and_batched() -> None:
    s = Server()
    app = s.app()
    stream = s.conn.open_stream(app, "/etcdserverpb.Watch/Watch", (), s.now)
    s.take()
    body = grpc_message(b"a" * 10) + grpc_message(b"") + grpc_message(b"b" * 3)
    s.feed(s.headers(1))
    for i in range(0, 7, 2):  # a prefix cut in pieces
        s.feed(s.data(1, body[i : i + 2]))
    s.feed(s.data(1, body[8:]))
    padded = f.frame(f.DATA, f.PADDED, 1, b"\x03" + grpc_message(b"pad") + b"\x00\x00\x00")
    big = b"z" * 100_000
    framed = grpc_message(big)
    s.feed(padded + b"".join(s.data(1, framed[i : i + 16384]) for i in range(0, len(framed), 16384)))
    assert app.messages == [b"a" * 10, b"", b"b" * 3, b"pad", big]
    assert stream.data_parts is None
    s.feed(s.trailers(1))
    assert app.status == (0, "", False)


def test_response_headers_in_continuation() -> None:
    s = Server()
    app, _ = s.unary()
    block = s.encoder.encode([(":status", "200"), ("content-type", "application/grpc"), ("x-big", "v" * 40000)])
    frames = f.frame(f.HEADERS, 0, 1, block[:16384]) + f.frame(f.CONTINUATION, 0, 1, block[16384:32768])
    frames += f.frame(f.CONTINUATION, f.END_HEADERS, 1, block[32768:])
    s.feed(frames + s.data(1, grpc_message(b"ok")) + s.trailers(1))
    assert app.status == (0, "", False) and app.messages == [b"ok"]


def test_unary_answer_cardinality_is_the_channels_concern_but_oversized_message_is_refused() -> None:
    s = Server(client_settings=ClientSettings(max_receive_message=10))
    app, _ = s.unary()
    s.take()
    out = s.feed(s.headers(1) + s.data(1, grpc_message(b"x" * 11)))
    assert app.status == (8, "grpc: received message larger than max (11 vs. 10)", False)
    assert (f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big")) in out


def test_large_request_headers_use_continuation() -> None:
    s = Server()
    s.unary(metadata=(("token", "t" * 40000),))
    frames = s.take()
    kinds = [(k, fl) for k, fl, _, _ in frames]
    assert kinds == [(f.HEADERS, 0), (f.CONTINUATION, 0), (f.CONTINUATION, f.END_HEADERS), (f.DATA, f.END_STREAM)]
    block = b"".join(p for k, _, _, p in frames if k != f.DATA)
    assert ("token", "t" * 40000) in fields(s.decoder, block)


# ---- flow control ------------------------------------------------------------------------------------------


def test_send_flow_control_splits_to_max_frame_and_waits_for_window() -> None:
    s = Server([(f.INITIAL_WINDOW_SIZE, 30000)])
    _app, stream = s.unary(b"m" * 40000)
    frames = s.take()
    data = [(fl, len(p)) for k, fl, _, p in frames if k == f.DATA]
    assert data == [(0, 16384), (0, 30000 - 16384)]  # split to MAX_FRAME_SIZE, stopped by the stream window
    out = s.feed(f.window_update(1, 5000))
    assert [(k, fl, len(p)) for k, fl, _, p in out] == [(f.DATA, 0, 5000)]
    out = s.feed(f.window_update(1, 100000))
    assert [(k, fl, len(p)) for k, fl, _, p in out] == [(f.DATA, f.END_STREAM, 40005 - 35000)]
    assert stream.local_closed


def test_send_flow_control_is_fair_between_streams() -> None:
    s = Server([(f.INITIAL_WINDOW_SIZE, 1 << 20)])
    s.conn.send_window = 0  # the connection window is exhausted: everything waits
    apps = [s.app() for _ in range(3)]
    streams = [s.conn.open_stream(a, "/s/S", (), s.now) for a in apps]
    for st in streams:
        for _ in range(3):
            s.conn.send(st, b"x" * 20000)
    s.take()
    out = s.feed(f.window_update(0, 3 * 16384))
    assert [sid for k, _, sid, _ in out if k == f.DATA] == [1, 3, 5]  # one frame each, round-robin
    out = s.feed(f.window_update(0, 1 << 20))
    assert sorted(sid for k, _, sid, _ in out if k == f.DATA) == [1] * 5 + [3] * 5 + [5] * 5
    assert all(a.unblocked_count == 1 for a in apps)
    s.conn.half_close(streams[0])
    assert s.take() == [(f.DATA, f.END_STREAM, 1, b"")]  # half-close: an empty DATA with END_STREAM


def test_half_close_with_pending_data_ends_on_the_last_frame() -> None:
    s = Server([(f.INITIAL_WINDOW_SIZE, 10)])
    app = s.app()
    stream = s.conn.open_stream(app, "/s/S", (), s.now)
    s.conn.send(stream, b"x" * 20)
    s.conn.half_close(stream)
    assert [(k, fl, len(p)) for k, fl, _, p in s.take()][1:] == [(f.DATA, 0, 10)]
    out = s.feed(f.window_update(1, 100))
    assert [(k, fl, len(p)) for k, fl, _, p in out] == [(f.DATA, f.END_STREAM, 15)]
    assert not s.conn.send(stream, b"late")


def test_receive_window_credited_as_the_application_consumes() -> None:
    s = Server(client_settings=ClientSettings(connection_window=6 << 20))
    slow, fast = s.app(consume=False), s.app()
    slow_stream = s.conn.open_stream(slow, "/w/W", (), s.now)
    s.conn.open_stream(fast, "/w/W", (), s.now)
    s.take()
    chunk = grpc_message(b"e" * 16000)
    s.feed(s.headers(1) + s.headers(3))
    updates: list[tuple[int, int]] = []
    while slow_stream.recv_window >= len(chunk):  # the slow stream's whole window, the fast one alongside
        out = s.feed(s.data(1, chunk) + s.data(3, chunk))
        updates += [(sid, int.from_bytes(p, "big")) for k, _, sid, p in out if k == f.WINDOW_UPDATE]
    # the fast stream and the connection were credited as data arrived; the slow stream only until it held
    # max_unread_per_stream unread bytes (2 MiB): then the server must stop
    fast_credit = sum(n for sid, n in updates if sid == 3)
    slow_credit = sum(n for sid, n in updates if sid == 1)
    conn_credit = sum(n for sid, n in updates if sid == 0)
    received = (4 << 20) + slow_credit - slow_stream.recv_window  # per stream: both got the same bytes
    assert fast_credit > received - (1 << 20) and conn_credit > 2 * received - (3 << 20)
    assert 0 < slow_credit <= 2 << 20 and slow_stream.unread == received
    out = s.feed(s.data(1, b"\x00" * (slow_stream.recv_window + 1)))
    assert (f.RST_STREAM, 0, 1, f.FLOW_CONTROL_ERROR.to_bytes(4, "big")) in out
    assert slow.status is not None and slow.status[0] == 13


def test_window_credited_again_once_the_slow_reader_consumes() -> None:
    s = Server()
    slow = s.app(consume=False)
    stream = s.conn.open_stream(slow, "/w/W", (), s.now)
    s.take()
    chunk = grpc_message(b"e" * 16000)
    s.feed(s.headers(1))
    while stream.recv_window >= len(chunk):
        s.feed(s.data(1, chunk))
    s.take()
    before = stream.recv_window
    for message in slow.messages:
        s.conn.consumed(stream, len(message))
    out = s.take()
    assert [(k, sid) for k, _, sid, _ in out] == [(f.WINDOW_UPDATE, 1)]
    assert stream.recv_window > before + (3 << 20)


# ---- errors from the server --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h2_code", "code", "unprocessed"),
    [
        (f.REFUSED_STREAM, 14, True),
        (f.CANCEL, 1, False),
        (f.NO_ERROR, 13, False),
        (f.PROTOCOL_ERROR, 13, False),
        (f.INTERNAL_ERROR, 13, False),
        (f.FLOW_CONTROL_ERROR, 8, False),
        (f.ENHANCE_YOUR_CALM, 8, False),
        (f.INADEQUATE_SECURITY, 7, False),
        (0x99, 2, False),
    ],
)
def test_rst_stream_mapping(h2_code: int, code: int, unprocessed: bool) -> None:
    s = Server()
    app, _ = s.unary()
    s.take()
    out = s.feed(f.rst_stream(1, h2_code))
    assert out == []  # never answered with RST_STREAM
    assert app.status is not None and app.status[0] == code and app.status[2] == unprocessed
    assert app.status[1].startswith("stream terminated by RST_STREAM with error code: ")


def test_goaway_fails_streams_above_last_id_and_refuses_new_ones() -> None:
    s = Server()
    calls = [s.unary() for _ in range(3)]  # streams 1, 3, 5
    s.take()
    s.feed(f.goaway(3, f.NO_ERROR, b"graceful_stop"))
    assert calls[2][0].status == (14, "the connection is draining (GOAWAY NO_ERROR: graceful_stop)", True)
    assert calls[0][0].status is None and calls[1][0].status is None
    assert not s.conn.accepting and not s.conn.closed
    late, _ = s.unary()
    assert late.status is not None and late.status[0] == 14 and late.status[2] is True
    assert s.take() == []
    s.answer(1, b"one")
    s.answer(3, b"three")
    assert calls[0][0].status == (0, "", False) and calls[1][0].status == (0, "", False)
    assert s.conn.closed and s.conn.close_reason.startswith("GOAWAY NO_ERROR")


def test_server_ping_is_acked() -> None:
    s = Server()
    assert s.feed(f.ping(b"abcdefgh")) == [(f.PING, f.ACK, 0, b"abcdefgh")]


# ---- keepalive ---------------------------------------------------------------------------------------------


def test_keepalive_pings_only_while_streams_are_open_and_fails_when_unanswered() -> None:
    s = Server()
    s.conn.tick(s.now + 100, 10.0, 5.0)
    assert s.take() == []  # no call open: no ping (grpc-go's PermitWithoutStream false)
    app, _ = s.unary()
    s.take()
    s.conn.tick(s.now + 5, 10.0, 5.0)
    assert s.take() == []  # not silent long enough
    s.conn.tick(s.now + 10, 10.0, 5.0)
    ping = s.take()
    assert [k for k, *_ in ping] == [f.PING]
    s.now += 11
    s.feed(f.ping(ping[0][3], ack=True))
    s.conn.tick(s.now + 4, 10.0, 5.0)
    assert s.take() == []
    s.conn.tick(s.now + 10, 10.0, 5.0)
    assert [k for k, *_ in s.take()] == [f.PING]
    s.conn.tick(s.now + 14.9, 10.0, 5.0)
    assert not s.conn.closed
    s.conn.tick(s.now + 15, 10.0, 5.0)
    assert goaway_of(s.take()) == (0, f.NO_ERROR)
    assert s.conn.closed
    assert app.status == (14, "connection lost: keepalive ping failed to receive ACK within timeout", False)


def test_any_frame_after_a_ping_counts_as_alive() -> None:
    s = Server()
    s.unary()
    s.take()
    s.conn.tick(s.now + 10, 10.0, 5.0)
    s.now += 12
    s.feed(s.headers(1))  # not the ack, but proof of life (grpc-go watches read activity)
    s.conn.tick(s.now + 4, 10.0, 5.0)
    assert not s.conn.closed


# ---- concurrency, cancel, deadlines ------------------------------------------------------------------------


def test_max_concurrent_streams_queues_calls_in_order() -> None:
    s = Server([(f.MAX_CONCURRENT_STREAMS, 2)])
    calls = [s.unary(str(i).encode()) for i in range(4)]
    assert [sid for k, _, sid, _ in s.take() if k == f.HEADERS] == [1, 3]
    assert [st.id for _, st in calls] == [1, 3, 0, 0] and len(s.conn.waiting) == 2
    out = s.answer(1, b"r")
    assert [(k, sid) for k, _, sid, _ in out] == [(f.HEADERS, 5), (f.DATA, 5)]
    assert out[1][3] == grpc_message(b"2")
    calls[3][1].app.conn = s.conn
    s.conn.cancel(calls[3][1])  # a waiting call cancelled: nothing was sent, it never left
    assert calls[3][0].status == (1, "context canceled", True)
    s.answer(3, b"r")
    s.answer(5, b"r")
    assert s.take() == [] and not s.conn.waiting
    # the server raises its limit: waiting calls start at the next receive
    more = [s.unary() for _ in range(4)]
    assert [sid for k, _, sid, _ in s.take() if k == f.HEADERS] == [7, 9] and len(s.conn.waiting) == 2
    out = s.feed(f.settings([(f.MAX_CONCURRENT_STREAMS, 10)]))
    assert [sid for k, _, sid, _ in out if k == f.HEADERS] == [11, 13] and more[3][1].id == 13


def test_cancel_sends_rst_and_ignores_late_frames() -> None:
    s = Server()
    app = s.app()
    stream = s.conn.open_stream(app, "/etcdserverpb.Watch/Watch", (), s.now)
    s.take()
    s.conn.cancel(stream)
    assert s.take() == [(f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big"))]
    assert app.status == (1, "context canceled", False)
    window = s.conn.recv_window
    out = s.feed(s.headers(1) + s.data(1, grpc_message(b"late")) + s.trailers(1))
    assert out == [] and not s.conn.closed and s.conn.recv_window == window - 9
    frames = s.feed(s.data(7, b"x"))  # a stream we never opened
    assert goaway_of(frames) == (0, f.PROTOCOL_ERROR)


def test_deadlines_expire_sent_and_waiting_calls() -> None:
    s = Server([(f.MAX_CONCURRENT_STREAMS, 1)])
    a, _first = s.unary(deadline=s.now + 1)
    b, _second = s.unary(deadline=s.now + 2)
    c, _ = s.unary(deadline=s.now + 30)
    s.take()
    assert s.now + 1 <= s.conn.next_deadline <= s.now + 1.01  # type: ignore[operator]
    assert s.conn.expire(s.now + 0.5) == s.conn.next_deadline
    nxt = s.conn.expire(s.now + 2.01)
    assert a.status == (4, "context deadline exceeded", False)
    assert b.status == (4, "context deadline exceeded", True)  # it was still waiting: never sent
    assert nxt is not None and s.now + 30 <= nxt <= s.now + 30.01
    out = s.take()
    assert (f.RST_STREAM, 0, 1, f.CANCEL.to_bytes(4, "big")) in out
    s.now += 2
    s.conn.pump_waiting(s.now)
    headers = [p for k, _, sid, p in s.take() if k == f.HEADERS]
    assert ("grpc-timeout", "28000000u") in fields(s.decoder, headers[0])  # what is left of 30 s when it starts
    assert c.status is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, b"0n"), (-1, b"0n"), (1e-9, b"1n"), (0.099999999, b"99999999n"), (0.5, b"500000u"), (5, b"5000000u"),
     (100, b"100000m"), (1e6, b"1000000S"), (1e9, b"16666667M"), (1e11, b"27777778H")],
)  # fmt: skip
def test_encode_timeout_like_grpc_go(seconds: float, text: bytes) -> None:
    assert gw.encode_timeout(seconds) == text
    if seconds > 0:
        assert gw.parse_timeout(text) >= seconds * 0.999999


@pytest.mark.parametrize(
    "seconds", [0.05, 0.1, 0.1000004, 0.3, 1, 4.9999999, 5, 10.123456789, 99.99, 99.9999995, 100, 3600]
)
def test_timeout_field_fast_path_equals_the_general_encoding(seconds: float) -> None:
    assert timeout_field(seconds) == gw.literal(b"grpc-timeout", gw.encode_timeout(seconds))


def test_server_status_at_the_deadline_is_deadline_exceeded() -> None:
    s = Server()
    app, _ = s.unary(deadline=s.now + 1)
    early, _ = s.unary(deadline=s.now + 10)
    s.now += 1
    s.feed(s.headers(1) + s.trailers(1, 2, "context deadline exceeded"))
    assert app.status == (4, "context deadline exceeded", False)
    s.feed(s.headers(3) + s.trailers(3, 2, "boom"))
    assert early.status == (2, "boom", False)  # before its deadline: the server's status as sent
    assert not any(s.conn._buckets.values())  # ended calls are not kept until their deadline


def test_a_sender_that_sends_more_when_unblocked() -> None:
    s = Server([(f.INITIAL_WINDOW_SIZE, 100)])

    class Eager(App):
        def unblocked(self, stream: ClientStream) -> None:
            super().unblocked(stream)
            if self.unblocked_count < 3:
                s.conn.send(stream, b"y" * 150)  # more than the window again: pumped from inside the pump

    apps = [Eager(), Eager()]
    streams = [s.conn.open_stream(a, "/s/S", (), s.now) for a in apps]
    for st in streams:
        assert s.conn.writable(st)
        s.conn.send(st, b"x" * 150)
        assert not s.conn.writable(st)
    s.take()
    for _ in range(10):
        s.feed(f.window_update(1, 100) + f.window_update(3, 100))
    assert all(a.unblocked_count == 3 for a in apps) and all(s.conn.writable(st) for st in streams)


def test_a_waiting_stream_is_writable_and_sends_once_started() -> None:
    s = Server([(f.MAX_CONCURRENT_STREAMS, 1)])
    s.unary()
    app = s.app()
    stream = s.conn.open_stream(app, "/s/S", (), s.now)
    assert stream.id == 0 and s.conn.writable(stream)
    s.conn.send(stream, b"queued")
    s.conn.half_close(stream)
    assert not s.conn.writable(stream)
    s.take()
    out = s.answer(1, b"r")
    assert [(k, fl, sid) for k, fl, sid, _ in out] == [(f.HEADERS, f.END_HEADERS, 3), (f.DATA, f.END_STREAM, 3)]
    assert out[1][3] == grpc_message(b"queued") and s.conn.writable(stream)


def test_settings_ack_timeout() -> None:
    s = Server(handshake=False)
    s.feed(f.settings([]))  # SETTINGS, but never an ACK of ours
    s.conn.tick(s.now + 9, 0.0, 20.0)
    assert not s.conn.closed
    s.conn.tick(s.now + 11, 0.0, 20.0)
    assert s.conn.closed and goaway_of(s.take()) == (0, f.SETTINGS_TIMEOUT)


@pytest.mark.parametrize(
    "frame",
    [
        f.frame(f.PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"),  # advisory: ignored
        f.frame(0x42, 0, 0, b"unknown type"),  # RFC 9113 5.5: ignored
        f.frame(f.WINDOW_UPDATE, 0, 1, (1).to_bytes(4, "big")),
        f.frame(f.SETTINGS, 0, 0, b""),
    ],
)
def test_frames_that_change_nothing_for_the_call(frame: bytes) -> None:
    s = Server()
    app, _ = s.unary()
    s.take()
    s.feed(frame)
    s.answer(1, b"fine")
    assert app.status == (0, "", False) and not s.conn.closed


def test_padded_and_prioritized_response_headers() -> None:
    s = Server()
    app, _ = s.unary()
    block = s.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    payload = b"\x02" + b"\x00\x00\x00\x00\x10" + block + b"\x00\x00"  # pad length, priority fields, padding
    s.feed(f.frame(f.HEADERS, f.END_HEADERS | f.PADDED | f.PRIORITY_FLAG, 1, payload))
    s.feed(s.data(1, grpc_message(b"ok")) + s.trailers(1))
    assert app.status == (0, "", False) and app.messages == [b"ok"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (f.rst_stream(9, f.CANCEL), f.PROTOCOL_ERROR),  # an idle stream
        (f.frame(f.WINDOW_UPDATE, 0, 0, (0).to_bytes(4, "big")), f.PROTOCOL_ERROR),
        (f.frame(f.WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")), f.FLOW_CONTROL_ERROR),
        (f.frame(f.PING, 0, 0, b"short"), f.FRAME_SIZE_ERROR),
        (f.frame(f.SETTINGS, 0, 0, b"12345"), f.FRAME_SIZE_ERROR),
        (f.frame(f.CONTINUATION, f.END_HEADERS, 1, b""), f.PROTOCOL_ERROR),
        (f.frame(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff\xff"), f.COMPRESSION_ERROR),
        (f.goaway(1, 0) + f.goaway(3, 0), f.PROTOCOL_ERROR),  # a GOAWAY may only lower the last stream id
    ],
)
def test_protocol_errors_from_the_server(frame: bytes, code: int) -> None:
    s = Server()
    app, _ = s.unary()
    s.take()
    out = s.feed(frame)
    assert goaway_of(out) == (0, code) and s.conn.closed
    assert app.status is not None and app.status[0] == 14


def test_send_with_end_half_closes_in_the_same_frame() -> None:
    s = Server([(f.INITIAL_WINDOW_SIZE, 10)])
    app = s.app()
    fits = s.conn.open_stream(app, "/s/S", (), s.now)
    s.take()
    assert s.conn.send(fits, b"abc", end=True)
    assert s.take() == [(f.DATA, f.END_STREAM, 1, grpc_message(b"abc"))] and fits.local_closed
    assert not s.conn.send(fits, b"more")
    blocked = s.conn.open_stream(s.app(), "/s/S", (), s.now)
    s.conn.send(blocked, b"x" * 20, end=True)  # beyond the window: END_STREAM on its last frame
    assert [(k, fl, len(p)) for k, fl, _, p in s.take()][1:] == [(f.DATA, 0, 10)]
    assert s.feed(f.window_update(3, 100)) == [(f.DATA, f.END_STREAM, 3, grpc_message(b"x" * 20)[10:])]
