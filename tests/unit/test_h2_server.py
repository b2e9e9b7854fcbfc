"""The sans-I/O server connection driven with bytes only: framing, stream states, flow control, limits, drain."""

from __future__ import annotations

import gzip
import struct
from typing import Any

import pytest
from hpack import Decoder, Encoder

from etcdproxy.h2 import frames as f
from etcdproxy.h2 import grpcwire as gw
from etcdproxy.h2.server import ServerConnection, Settings, Stream

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


def parse(data: bytes) -> list[Frame]:
    out, pos = [], 0
    while pos < len(data):
        hi, lo, kind, flags, sid = f.HEADER.unpack_from(data, pos)
        n = (hi << 8) | lo
        out.append((kind, flags, sid & 0x7FFFFFFF, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


class App:
    """Records what the connection tells the application; answers unary calls with an echo when asked."""

    def __init__(self, echo: bool = False) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.echo = echo
        self.messages: dict[int, list[bytes]] = {}

    def request(self, conn: ServerConnection, stream: Stream, head: gw.RequestHead) -> None:
        self.events.append(("request", stream.id, head.path, head.timeout_s, head.metadata))

    def message(self, conn: ServerConnection, stream: Stream, message: bytes) -> None:
        self.events.append(("message", stream.id, message))
        self.messages.setdefault(stream.id, []).append(message)
        conn.consumed(stream, len(message))

    def end(self, conn: ServerConnection, stream: Stream) -> None:
        self.events.append(("end", stream.id))
        if self.echo:
            conn.send_unary(stream, b"".join(self.messages.get(stream.id, [])))

    def reset(self, conn: ServerConnection, stream: Stream) -> None:
        self.events.append(("reset", stream.id))


class Client:
    def __init__(self, app: App | None = None, settings: Settings | None = None, handshake: bool = True) -> None:
        self.app = app or App()
        self.now = 1000.0
        self.conn = ServerConnection(self.app, settings or Settings(), self.now, lambda: None)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.received: list[Frame] = []
        if handshake:
            self.send(f.PREFACE + f.settings([]) + f.SETTINGS_ACK)

    def send(self, data: bytes) -> list[Frame]:
        self.conn.receive(data, self.now)
        frames = parse(self.conn.take_output())
        self.received += frames
        return frames

    def headers(
        self,
        sid: int,
        path: str = "/svc/M",
        end_stream: bool = False,
        extra: list[Any] | None = None,
        fields: list[Any] | None = None,
    ) -> bytes:
        fields = fields or [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or []),
        ]
        block = self.encoder.encode(fields)
        end = f.END_STREAM if end_stream else 0
        if len(block) <= 16384:
            return f.frame(f.HEADERS, f.END_HEADERS | end, sid, block)
        pieces = [block[i : i + 16384] for i in range(0, len(block), 16384)]
        out = f.frame(f.HEADERS, end, sid, pieces[0])
        for i, piece in enumerate(pieces[1:], 2):
            out += f.frame(f.CONTINUATION, f.END_HEADERS if i == len(pieces) else 0, sid, piece)
        return out

    def call(self, sid: int, message: bytes, path: str = "/svc/M", extra: list[Any] | None = None) -> list[Frame]:
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        return self.send(self.headers(sid, path, extra=extra) + f.frame(f.DATA, f.END_STREAM, sid, body))

    def goaway(self) -> tuple[int, int, bytes] | None:
        for kind, _, _, payload in self.received:
            if kind == f.GOAWAY:
                last, code = struct.unpack(">LL", payload[:8])
                return last, code, payload[8:]
        return None


def test_handshake_sends_settings_window_and_ack() -> None:
    app = App()
    conn = ServerConnection(app, Settings(), 0.0, lambda: None)
    first = parse(conn.take_output())
    assert [k for k, *_ in first] == [f.SETTINGS, f.WINDOW_UPDATE]
    values = dict(struct.unpack(">HL", first[0][3][i : i + 6]) for i in range(0, len(first[0][3]), 6))
    assert values[f.INITIAL_WINDOW_SIZE] == 1 << 20 and values[f.MAX_HEADER_LIST_SIZE] == 65536
    conn.receive(f.PREFACE[:10], 0.0)  # a preface may arrive in pieces
    conn.receive(f.PREFACE[10:] + f.settings([(f.INITIAL_WINDOW_SIZE, 100)]), 0.0)
    assert parse(conn.take_output()) == [(f.SETTINGS, f.ACK, 0, b"")]
    assert conn.peer_initial_window == 100


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, f.PROTOCOL_ERROR),
        (f.PREFACE + f.ping(b"12345678"), f.PROTOCOL_ERROR),  # the preface must end with SETTINGS
        (f.PREFACE + f.frame(f.SETTINGS, 0, 1, b""), f.PROTOCOL_ERROR),
    ],
)
def test_bad_preface(data: bytes, code: int) -> None:
    c = Client(handshake=False)
    c.send(data)
    assert c.conn.closed and c.goaway() is not None and c.goaway()[1] == code  # type: ignore[index]


def test_unary_round_trip_and_memo() -> None:
    c = Client(App(echo=True))
    frames = c.call(1, b"hello", extra=[("grpc-timeout", "5S"), ("token", "t"), ("x-bin", "AAE")])
    assert [k for k, *_ in frames] == [f.HEADERS, f.DATA, f.HEADERS]
    assert frames[1][3] == b"\x00\x00\x00\x00\x05hello"
    assert frames[2][1] & f.END_STREAM and c.decoder.decode(frames[2][3]) == [("grpc-status", "0")]
    assert c.decoder.decode(frames[0][3]) == [(":status", "200"), ("content-type", "application/grpc")]
    request = c.app.events[0]
    assert request[:4] == ("request", 1, "/svc/M", 5.0) and ("x-bin", b"\x00\x01") in request[4]
    for sid in (3, 5):  # the second block is all-indexed: stored, then a hit
        c.call(sid, b"again", extra=[("grpc-timeout", "5S"), ("token", "t"), ("x-bin", "AAE")])
    assert c.conn.decoder.hits == 1
    assert not c.conn.streams


def test_message_split_across_frames_and_gzip() -> None:
    c = Client()
    body = b"\x00" + (10).to_bytes(4, "big") + b"0123456789"
    zipped = gzip.compress(b"compressed!")
    zbody = b"\x01" + len(zipped).to_bytes(4, "big") + zipped
    c.send(c.headers(1, extra=[("grpc-encoding", "gzip")]))
    for i in range(0, len(body)):
        c.send(f.frame(f.DATA, 0, 1, body[i : i + 1]))
    c.send(f.frame(f.DATA, f.END_STREAM, 1, zbody))
    assert c.app.messages[1] == [b"0123456789", b"compressed!"]
    assert c.app.events[-1] == ("end", 1)


def test_unknown_encoding_is_unimplemented() -> None:
    c = Client()
    c.send(
        c.headers(1, extra=[("grpc-encoding", "snappy")]) + f.frame(f.DATA, f.END_STREAM, 1, b"\x01\x00\x00\x00\x01x")
    )
    assert c.received[-1] == (f.RST_STREAM, 0, 1, b"\x00\x00\x00\x00")  # answered before END_STREAM was read
    trailers = c.decoder.decode(c.received[-2][3])
    assert ("grpc-status", "12") in trailers
    assert ("grpc-message", 'grpc: Decompressor is not installed for grpc-encoding "snappy"') in [
        (k, gw.percent_decode(v.encode())) for k, v in trailers
    ]


def test_message_above_the_limit() -> None:
    c = Client(settings=Settings(max_receive_message=10))
    c.send(c.headers(1) + f.frame(f.DATA, 0, 1, b"\x00\x00\x00\x00\x0b"))
    trailers = dict(c.decoder.decode(c.received[-2][3]))  # trailers-only, then RST_STREAM(NO_ERROR)
    assert trailers["grpc-status"] == "8"
    assert gw.percent_decode(trailers["grpc-message"].encode()) == "grpc: received message larger than max (11 vs. 10)"
    assert c.received[-1][:3] == (f.RST_STREAM, 0, 1)


@pytest.mark.parametrize(
    ("frame_bytes", "code"),
    [
        (f.frame(f.DATA, 0, 1, b"x"), f.PROTOCOL_ERROR),  # idle stream
        (f.frame(f.DATA, 0, 0, b"x"), f.PROTOCOL_ERROR),
        (f.frame(f.HEADERS, f.END_HEADERS, 0, b"\x82"), f.PROTOCOL_ERROR),
        (f.frame(f.HEADERS, f.END_HEADERS, 2, b"\x82"), f.PROTOCOL_ERROR),  # even id
        (f.rst_stream(0, 0), f.PROTOCOL_ERROR),
        (f.rst_stream(5, 0), f.PROTOCOL_ERROR),  # idle
        (f.frame(f.RST_STREAM, 0, 1, b"\x00\x00\x00"), f.FRAME_SIZE_ERROR),
        (f.frame(f.PING, 0, 1, b"12345678"), f.PROTOCOL_ERROR),
        (f.frame(f.PING, 0, 0, b"1234567"), f.FRAME_SIZE_ERROR),
        (f.frame(f.SETTINGS, f.ACK, 0, b"\x00" * 6), f.FRAME_SIZE_ERROR),
        (f.frame(f.SETTINGS, 0, 0, b"\x00" * 5), f.FRAME_SIZE_ERROR),
        (f.settings([(f.ENABLE_PUSH, 2)]), f.PROTOCOL_ERROR),
        (f.settings([(f.INITIAL_WINDOW_SIZE, 2**31)]), f.FLOW_CONTROL_ERROR),
        (f.settings([(f.MAX_FRAME_SIZE, 100)]), f.PROTOCOL_ERROR),
        (f.window_update(0, 0), f.PROTOCOL_ERROR),
        (f.window_update(0, 2**31 - 1), f.FLOW_CONTROL_ERROR),
        (f.frame(f.WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"), f.FRAME_SIZE_ERROR),
        (f.frame(f.CONTINUATION, f.END_HEADERS, 1, b"\x82"), f.PROTOCOL_ERROR),
        (f.frame(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\x00\x00\x00\x02\x82"), f.PROTOCOL_ERROR),
        (f.frame(f.PRIORITY, 0, 0, b"\x00" * 5), f.PROTOCOL_ERROR),
        (f.frame(f.GOAWAY, 0, 1, b"\x00" * 8), f.PROTOCOL_ERROR),
        (f.frame(f.DATA, f.PADDED, 1, b"\x05x"), f.PROTOCOL_ERROR),
        (f.HEADER.pack(16385 >> 8, 16385 & 0xFF, f.DATA, 0, 1) + b"x" * 16385, f.FRAME_SIZE_ERROR),
        (f.frame(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\x0f"), f.COMPRESSION_ERROR),
    ],
)
def test_connection_errors(frame_bytes: bytes, code: int) -> None:
    c = Client()
    c.send(frame_bytes)
    goaway = c.goaway()
    assert goaway is not None and goaway[1] == code and c.conn.closed


def test_stream_states() -> None:
    c = Client()
    c.send(c.headers(1, end_stream=True))  # half-closed (remote)
    c.send(f.frame(f.DATA, 0, 1, b"x"))
    assert c.received[-1] == (f.RST_STREAM, 0, 1, f.STREAM_CLOSED.to_bytes(4, "big"))
    c.send(c.headers(5))
    c.send(c.headers(3))  # lower than the last id
    assert c.goaway()[1] == f.PROTOCOL_ERROR  # type: ignore[index]


def test_trailers_must_end_the_stream_and_carry_no_pseudo_headers() -> None:
    c = Client()
    c.send(c.headers(1))
    c.send(f.frame(f.HEADERS, f.END_HEADERS, 1, c.encoder.encode([("x", "y")])))
    assert c.received[-1] == (f.RST_STREAM, 0, 1, f.PROTOCOL_ERROR.to_bytes(4, "big"))
    assert ("reset", 1) in c.app.events


@pytest.mark.parametrize(
    "fields",
    [
        [(":method", "POST"), (":scheme", "http"), (":path", "/a/b"), ("Content-Type", "application/grpc")],
        [(":method", "POST"), (":scheme", "http"), (":path", "/a/b"), ("connection", "close")],
        [(":method", "POST"), (":scheme", "http"), (":path", "/a/b"), ("te", "gzip")],
        [(":method", "POST"), ("x", "y"), (":scheme", "http"), (":path", "/a/b")],
        [(":method", "POST"), (":scheme", "http"), (":path", "")],
        [(":method", "POST"), (":scheme", "http")],
        [(":method", "POST"), (":method", "POST"), (":scheme", "http"), (":path", "/a/b")],
        [(":method", "POST"), (":scheme", "http"), (":path", "/a/b"), (":status", "200")],
        [(":method", "POST"), (":scheme", "http"), (":path", "/a/b"), ("x", "bad\r\nvalue")],
    ],
)
def test_malformed_requests_get_rst_protocol_error(fields: list[tuple[str, str]]) -> None:
    c = Client()
    c.send(c.headers(1, fields=fields, end_stream=True))
    assert c.received[-1] == (f.RST_STREAM, 0, 1, f.PROTOCOL_ERROR.to_bytes(4, "big"))
    assert not c.app.events and not c.conn.closed


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ([(":method", "GET"), (":scheme", "http"), (":path", "/a/b"), ("content-type", "application/grpc")], 405, 13),
        ([(":method", "POST"), (":scheme", "http"), (":path", "/a/b"), ("content-type", "text/plain")], 415, 3),
        (
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/a/b"),
                ("content-type", "application/grpc"),
                ("grpc-timeout", "1X"),
            ],
            200,
            13,
        ),
        (
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/a/b"),
                ("content-type", "application/grpc"),
                ("x-big", "v" * 70000),
            ],
            200,
            8,
        ),
    ],
)
def test_trailers_only_refusals(fields: list[tuple[str, str]], status: int, code: int) -> None:
    c = Client()
    c.send(c.headers(1, fields=fields, end_stream=True))
    kind, flags, sid, block = c.received[-1]
    assert kind == f.HEADERS and flags & f.END_STREAM and sid == 1
    answer = dict(c.decoder.decode(block))
    assert answer[":status"] == str(status) and answer["grpc-status"] == str(code)


def test_flow_control_splits_queues_and_serves_streams_fairly() -> None:
    c = Client(App())
    c.send(f.settings([(f.INITIAL_WINDOW_SIZE, 10)]))
    for sid in (1, 3):
        c.send(c.headers(sid) + f.frame(f.DATA, f.END_STREAM, sid, b"\x00\x00\x00\x00\x00"))
    streams = c.conn.streams
    c.conn.send_message(streams[1], b"a" * 20)
    c.conn.send_message(streams[3], b"b" * 20)
    c.conn.finish_call(streams[1], 0, "")
    data = [fr for fr in parse(c.conn.take_output()) if fr[0] == f.DATA]
    assert [(sid, len(p)) for _, _, sid, p in data] == [(1, 10), (3, 10)]  # stream windows of 10
    sent = c.send(f.window_update(1, 100) + f.window_update(3, 100))
    assert [(k, sid) for k, _, sid, _ in sent if k in (f.DATA, f.HEADERS)] == [
        (f.DATA, 1),
        (f.HEADERS, 1),
        (f.DATA, 3),  # stream 1's trailers follow its last DATA
    ]
    assert sum(len(p) for k, _, sid, p in data + sent if k == f.DATA and sid == 1) == 25


def test_receive_window_is_credited_in_batches() -> None:
    c = Client()
    c.send(c.headers(1))
    chunk = b"\x00" + (16000 - 5).to_bytes(4, "big") + b"x" * (16000 - 5)
    for _ in range(40):
        c.send(f.frame(f.DATA, 0, 1, chunk))
    updates = [(sid, int.from_bytes(p, "big")) for k, _, sid, p in c.received if k == f.WINDOW_UPDATE]
    assert updates and all(sid == 1 for sid, _ in updates[1:]) and updates[1][1] >= (1 << 19)


def test_ping_is_acked_and_too_many_pings_ends_the_connection() -> None:
    c = Client()
    assert c.send(f.ping(b"abcdefgh")) == [(f.PING, f.ACK, 0, b"abcdefgh")]
    for _ in range(3):
        c.send(f.ping(b"abcdefgh"))
    goaway = c.goaway()
    assert goaway is not None and goaway[1] == f.ENHANCE_YOUR_CALM and goaway[2] == b"too_many_pings"


def test_pings_after_min_time_with_a_stream_are_fine() -> None:
    c = Client(settings=Settings(keepalive_min_time_s=1.0))
    c.send(c.headers(1))
    for _ in range(10):
        c.now += 1.5
        c.send(f.ping(b"abcdefgh"))
    assert c.goaway() is None


@pytest.mark.parametrize(
    "flood",
    [
        f.settings([]),
        f.frame(f.PRIORITY, 0, 1, b"\x00\x00\x00\x03\x10"),
        f.frame(f.DATA, 0, 1, b""),
        f.frame(0x20, 0, 0, b"unknown"),
        f.ping(b"12345678", ack=True),  # acks of pings we never sent
        f.window_update(0, 1),  # far more WINDOW_UPDATEs than our DATA frames could explain
    ],
)
def test_floods_are_refused(flood: bytes) -> None:
    c = Client()
    c.send(c.headers(1))
    c.send(flood * 1100)
    goaway = c.goaway()
    assert goaway is not None and goaway[1] == f.ENHANCE_YOUR_CALM


def test_rapid_reset() -> None:
    c = Client()
    data = b"".join(c.headers(sid) + f.rst_stream(sid, f.CANCEL) for sid in range(1, 2 * 1100, 2))
    c.send(data)
    goaway = c.goaway()
    assert goaway is not None and goaway[1] == f.ENHANCE_YOUR_CALM
    assert len([e for e in c.app.events if e[0] == "reset"]) > 900


def test_continuation_flood() -> None:
    c = Client()
    c.send(f.frame(f.HEADERS, 0, 1, c.encoder.encode([(":method", "POST")])))
    c.send(f.frame(f.CONTINUATION, 0, 1, b"\x00\x01a\x01b" * 2000) * 30)
    goaway = c.goaway()
    assert goaway is not None and goaway[1] == f.ENHANCE_YOUR_CALM


def test_too_many_streams_are_refused() -> None:
    c = Client(settings=Settings(max_concurrent_streams=2))
    for sid in (1, 3, 5):
        c.send(c.headers(sid))
    assert c.received[-1] == (f.RST_STREAM, 0, 5, f.REFUSED_STREAM.to_bytes(4, "big"))


def test_settings_ack_timeout() -> None:
    c = Client(handshake=False)
    c.send(f.PREFACE + f.settings([]))
    c.conn.tick(c.now + 11, 0, 0)
    assert parse(c.conn.take_output())[-1][0] == f.GOAWAY and c.conn.closed


def test_keepalive_ping_and_timeout() -> None:
    c = Client()
    c.conn.tick(c.now + 3, 2.0, 1.0)
    assert parse(c.conn.take_output())[0][0] == f.PING
    c.conn.tick(c.now + 5, 2.0, 1.0)
    assert c.conn.closed


def test_graceful_drain_two_phases() -> None:
    c = Client(App())
    c.send(c.headers(1))
    c.conn.start_drain(c.now)
    first = parse(c.conn.take_output())
    assert first[0][0] == f.GOAWAY and struct.unpack(">L", first[0][3][:4])[0] == 2**31 - 1
    ping = first[1]
    c.send(c.headers(3))  # raced the GOAWAY: still served
    c.send(f.ping(ping[3], ack=True))
    c.conn.tick(c.now, 0, 0)
    final = parse(c.conn.take_output())
    assert final[0][0] == f.GOAWAY and struct.unpack(">L", final[0][3][:4])[0] == 3
    assert not c.conn.closed
    for sid in (1, 3):
        c.send(f.frame(f.DATA, f.END_STREAM, sid, b""))
        c.conn.finish_call(c.conn.streams[sid], 0, "")
    assert c.conn.closed


def test_client_reset_reaches_the_application() -> None:
    c = Client()
    c.send(c.headers(1))
    c.send(f.rst_stream(1, f.CANCEL))
    assert c.app.events[-1] == ("reset", 1) and not c.conn.streams
    c.send(f.frame(f.WINDOW_UPDATE, 0, 1, (5).to_bytes(4, "big")))  # on a closed stream: ignored
    assert not c.conn.closed


def test_window_updates_answering_our_data_are_no_flood() -> None:
    c = Client(App(echo=True))
    for sid in range(1, 2 * 1200, 2):  # 1,200 answers, each acknowledged with two WINDOW_UPDATEs
        c.call(sid, b"x")
        c.send(f.window_update(0, 10) + f.window_update(sid, 10))
    assert c.goaway() is None


def test_client_goaway_closes_once_the_last_stream_ends() -> None:
    c = Client()
    c.send(c.headers(1))
    c.send(f.goaway(1, f.NO_ERROR))
    assert not c.conn.closed
    c.send(f.rst_stream(1, f.CANCEL))
    assert c.conn.closed
    idle = Client()
    idle.send(f.goaway(0, 0xFF))  # an unknown error code changes nothing (RFC 9113 7)
    assert idle.send(f.ping(b"afterga!")) == [(f.PING, f.ACK, 0, b"afterga!")]
    idle.conn.tick(idle.now + 0.5, 0, 0)
    assert not idle.conn.closed
    idle.conn.tick(idle.now + 1.0, 0, 0)
    assert idle.conn.closed


def test_ping_strikes_reset_by_data_sent_as_the_window_opens() -> None:
    """grpc-go clients send a BDP ping with their WINDOW_UPDATEs while a big answer crosses the windows: DATA frames
    we write in between reset the strikes, as grpc-go's server does."""
    c = Client(App())
    c.send(f.settings([(f.INITIAL_WINDOW_SIZE, 100)]))
    c.send(c.headers(1) + f.frame(f.DATA, f.END_STREAM, 1, b"\x00\x00\x00\x00\x00"))
    c.conn.send_message(c.conn.streams[1], b"x" * 5000)
    c.conn.take_output()
    for _ in range(20):
        c.send(f.window_update(1, 100) + f.window_update(0, 100) + f.ping(b"bdp-ping"))
    assert c.goaway() is None
