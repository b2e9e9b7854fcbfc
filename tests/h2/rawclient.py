"""A small blocking HTTP/2 client over a raw socket, for conformance and abuse tests.

It frames with ``struct`` and compresses with the ``hpack`` library, and lets a test send anything,
malformed frames included. Reading answers the peer's PINGs and SETTINGS (unless told not to) and
returns every frame, so a test sees exactly what came back. ``expect_connection_error`` and
``expect_stream_error`` apply h2spec's acceptance rule (see /work/notes/h2_contract.md):

* connection error X: GOAWAY carrying X, or the connection closed;
* stream error X: RST_STREAM X on that stream, GOAWAY X, or the connection closed.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import socket
import ssl
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    PRIORITY: "PRIORITY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PUSH_PROMISE: "PUSH_PROMISE",
    PING: "PING",
    GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}

# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD
ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

# settings
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_TIMEOUT = 3.0
RANGE_PATH = "/etcdserverpb.KV/Range"
WATCH_PATH = "/etcdserverpb.Watch/Watch"

Headers = list[tuple[str, str]]


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"0x{code:x}")


class ConnectionClosed(Exception):
    """The peer closed (or reset) the connection."""


@dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def error_code(self) -> int:
        """Error code of a RST_STREAM or GOAWAY."""
        if self.type == RST_STREAM:
            return int(struct.unpack(">I", self.payload[:4])[0])
        if self.type == GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        raise ValueError(f"{self} carries no error code")

    @property
    def last_stream_id(self) -> int:
        return int(struct.unpack(">I", self.payload[:4])[0]) & 0x7FFFFFFF

    @property
    def debug_data(self) -> bytes:
        return self.payload[8:]

    @property
    def settings(self) -> dict[int, int]:
        pairs = (struct.unpack(">HI", self.payload[i : i + 6]) for i in range(0, len(self.payload), 6))
        return {int(k): int(v) for k, v in pairs}

    @property
    def increment(self) -> int:
        return int(struct.unpack(">I", self.payload[:4])[0]) & 0x7FFFFFFF

    def __str__(self) -> str:
        name = FRAME_NAMES.get(self.type, f"type=0x{self.type:x}")
        extra = ""
        if self.type in (RST_STREAM, GOAWAY) and len(self.payload) >= (8 if self.type == GOAWAY else 4):
            extra = f" {error_name(self.error_code)}"
            if self.type == GOAWAY:
                extra += f" last={self.last_stream_id} debug={self.debug_data[:80]!r}"
        elif self.type == SETTINGS and not self.flags & ACK:
            extra = f" {self.settings}"
        elif self.type == WINDOW_UPDATE:
            extra = f" +{self.increment}"
        return f"{name}(stream={self.stream_id} flags=0x{self.flags:x} len={len(self.payload)}{extra})"


def frame_bytes(ftype: int, flags: int, stream_id: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """One serialized frame; ``length`` overrides the header's length field (for malformed frames)."""
    n = len(payload) if length is None else length
    return struct.pack(">BHBBI", (n >> 16) & 0xFF, n & 0xFFFF, ftype, flags, stream_id & 0xFFFFFFFF) + payload


def settings_payload(values: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack(">HI", k, v) for k, v in values)


def grpc_message(body: bytes, compressed: bool = False) -> bytes:
    """A length-prefixed gRPC message."""
    return struct.pack(">BI", 1 if compressed else 0, len(body)) + body


def grpc_messages(data: bytes) -> list[bytes]:
    """Split a response body into its gRPC messages (gzip ones decompressed)."""
    out = []
    i = 0
    while i + 5 <= len(data):
        flag, n = struct.unpack(">BI", data[i : i + 5])
        body = data[i + 5 : i + 5 + n]
        out.append(gzip.decompress(body) if flag else body)
        i += 5 + n
    return out


def grpc_request_headers(
    path: str = RANGE_PATH, authority: str = "localhost", extra: Sequence[tuple[str, str]] = ()
) -> Headers:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


def range_request(key: bytes = b"h2test/none", **kwargs: object) -> bytes:
    from etcdproxy.etcdpb import rpc_pb2

    return bytes(rpc_pb2.RangeRequest(key=key, **kwargs).SerializeToString())  # type: ignore[arg-type]


def watch_create_request(key: bytes = b"h2test/watch") -> bytes:
    from etcdproxy.etcdpb import rpc_pb2

    req = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key))
    return bytes(req.SerializeToString())


@dataclass
class Response:
    """What came back on one stream."""

    stream_id: int
    headers: Headers = field(default_factory=list)
    trailers: Headers = field(default_factory=list)
    data: bytes = b""
    data_frames: list[int] = field(default_factory=list)  # length of each DATA frame
    reset: int | None = None  # RST_STREAM error code
    goaway: Frame | None = None
    closed: bool = False  # the connection closed before the stream ended
    ended: bool = False  # END_STREAM seen
    header_blocks: int = 0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def trailer(self, name: str) -> str | None:
        """A trailer, or the header of the same name in a trailers-only response."""
        for k, v in self.trailers or (self.headers if self.header_blocks == 1 else []):
            if k == name:
                return v
        return None

    @property
    def status(self) -> str | None:
        return self.header(":status")

    @property
    def grpc_status(self) -> int | None:
        value = self.trailer("grpc-status")
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str:
        return urllib.parse.unquote(self.trailer("grpc-message") or "")

    @property
    def messages(self) -> list[bytes]:
        return grpc_messages(self.data)

    @property
    def trailers_only(self) -> bool:
        return self.header_blocks == 1 and self.ended and not self.data

    def __str__(self) -> str:
        return (
            f"stream {self.stream_id}: headers={self.headers} data={len(self.data)}B in {len(self.data_frames)} frames"
            f" trailers={self.trailers} reset={None if self.reset is None else error_name(self.reset)}"
            f" goaway={self.goaway} closed={self.closed} ended={self.ended}"
        )


class H2Client:
    """One HTTP/2 connection. ``connect()`` sends the preface and SETTINGS and waits for the server's."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = (
            tls.wrap_socket(raw, server_hostname=server_hostname or host) if tls is not None else raw
        )
        self.host = host
        self.timeout = timeout
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 1 << 20
        self.decoder.max_header_list_size = 1 << 24
        self.buf = bytearray()
        self.closed = False
        self.send_error: str | None = None
        self.preface_sent = False  # nothing is sent on our own (ACKs) before the test sent a preface
        self.server_settings: dict[int, int] = {}
        self.settings_acked = False
        self.auto_ping_ack = True
        self.auto_settings_ack = True
        self.next_stream_id = 1
        self.send_window = 65535  # connection window the server gave us
        self.stream_send_windows: dict[int, int] = {}
        self.received: list[Frame] = []  # every frame read, in order
        self._header_block: tuple[int, bytearray] | None = None
        self.responses: dict[int, Response] = {}

    # ---------------------------------------------------------------- setup

    def connect(self, settings: Iterable[tuple[int, int]] = (), window: int = 1 << 24) -> H2Client:
        """Preface + SETTINGS (+ a connection WINDOW_UPDATE so big responses are not stalled); read the
        server's SETTINGS and our ACK."""
        out = PREFACE + frame_bytes(SETTINGS, 0, 0, settings_payload(settings))
        if window > 65535:
            out += frame_bytes(WINDOW_UPDATE, 0, 0, struct.pack(">I", window - 65535))
        self.send(out)
        self.read_until(lambda f: bool(self.server_settings) and self.settings_acked, what="server SETTINGS + ACK")
        return self

    def close(self) -> None:
        if not self.closed:
            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_stream_id(self) -> int:
        sid = self.next_stream_id
        self.next_stream_id += 2
        return sid

    # ---------------------------------------------------------------- sending

    def send(self, data: bytes) -> None:
        """Send, tolerating a peer that already closed: the next read reports the close (a peer may
        close while a malformed frame is still being written, which is a valid reaction to it)."""
        self.preface_sent = self.preface_sent or data.startswith(PREFACE)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as exc:
            self.send_error = f"{type(exc).__name__}: {exc}"

    def send_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes = b"", **kw: int | None) -> None:
        self.send(frame_bytes(ftype, flags, stream_id, payload, **kw))

    def encode(self, headers: Sequence[tuple[str, str]], huffman: bool = True) -> bytes:
        return bytes(self.encoder.encode(list(headers), huffman=huffman))

    def headers_frame(
        self,
        stream_id: int,
        headers: Sequence[tuple[str, str]] | bytes,
        *,
        end_stream: bool = False,
        end_headers: bool = True,
        flags: int = 0,
    ) -> bytes:
        block = headers if isinstance(headers, bytes) else self.encode(headers)
        flags |= (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        return frame_bytes(HEADERS, flags, stream_id, block)

    def header_block_frames(
        self, stream_id: int, block: bytes, *, end_stream: bool = False, max_frame: int = 16384
    ) -> bytes:
        """HEADERS + CONTINUATIONs carrying ``block`` in pieces of at most ``max_frame`` bytes."""
        pieces = [block[i : i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
        out = b""
        for i, piece in enumerate(pieces):
            last = END_HEADERS if i == len(pieces) - 1 else 0
            if i == 0:
                out += frame_bytes(HEADERS, last | (END_STREAM if end_stream else 0), stream_id, piece)
            else:
                out += frame_bytes(CONTINUATION, last, stream_id, piece)
        return out

    def send_headers(self, stream_id: int, headers: Sequence[tuple[str, str]] | bytes, **kw: bool | int) -> None:
        self.send(self.headers_frame(stream_id, headers, **kw))  # type: ignore[arg-type]

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False, flags: int = 0) -> None:
        self.send_frame(DATA, flags | (END_STREAM if end_stream else 0), stream_id, data)

    def send_data_flow_controlled(
        self, stream_id: int, data: bytes, *, end_stream: bool = True, timeout: float = 20.0
    ) -> int:
        """Send ``data`` in frames of at most the server's MAX_FRAME_SIZE, never beyond the connection and
        stream windows it granted (waiting for its WINDOW_UPDATEs). Returns the WINDOW_UPDATEs waited for."""
        frame_max = self.server_settings.get(MAX_FRAME_SIZE, 16384)
        stream_window = self.server_settings.get(INITIAL_WINDOW_SIZE, 65535) + self.stream_send_windows.pop(
            stream_id, 0
        )
        waits = 0
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while True:
            stream_window += self.stream_send_windows.pop(stream_id, 0)
            n = min(frame_max, len(view), self.send_window, stream_window)
            if n > 0 or not view:
                last = n == len(view)
                self.send_frame(DATA, END_STREAM if (last and end_stream) else 0, stream_id, bytes(view[:n]))
                view = view[n:]
                self.send_window -= n
                stream_window -= n
                if last:
                    return waits
                continue
            waits += 1
            if self.read_frame(max(0.0, deadline - time.monotonic())) is None:
                raise AssertionError(
                    f"no WINDOW_UPDATE: {len(view)} bytes left, windows conn={self.send_window} stream={stream_window}"
                )

    def send_ping(self, payload: bytes = b"h2tests!", ack: bool = False) -> None:
        self.send_frame(PING, ACK if ack else 0, 0, payload)

    def send_rst(self, stream_id: int, code: int = CANCEL) -> None:
        self.send_frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))

    def send_settings(self, values: Iterable[tuple[int, int]] = ()) -> None:
        self.send_frame(SETTINGS, 0, 0, settings_payload(values))

    def send_window_update(self, stream_id: int, increment: int) -> None:
        self.send_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))

    def send_goaway(self, last_stream_id: int = 0, code: int = NO_ERROR, debug: bytes = b"") -> None:
        self.send_frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)

    def start_request(
        self,
        path: str = RANGE_PATH,
        body: bytes | None = None,
        *,
        extra: Sequence[tuple[str, str]] = (),
        headers: Sequence[tuple[str, str]] | None = None,
        end_stream: bool = True,
        stream_id: int | None = None,
    ) -> int:
        """Send a gRPC request (HEADERS, then one DATA with the length-prefixed ``body``); return its stream id."""
        sid = self.new_stream_id() if stream_id is None else stream_id
        hdrs = list(headers) if headers is not None else grpc_request_headers(path, extra=extra)
        out = self.headers_frame(sid, hdrs, end_stream=end_stream and body is None)
        if body is not None:
            out += frame_bytes(DATA, END_STREAM if end_stream else 0, sid, grpc_message(body))
        self.send(out)
        return sid

    # ---------------------------------------------------------------- reading

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on timeout; ConnectionClosed on EOF/reset."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError) as exc:
            self.closed = True
            raise ConnectionClosed(f"{type(exc).__name__}: {exc}") from exc
        if not chunk:
            self.closed = True
            raise ConnectionClosed("EOF")
        self.buf += chunk
        return True

    def read_frame(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or None after ``timeout``; raises ConnectionClosed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < 9:
            if not self._fill(deadline):
                return None
        n = int.from_bytes(self.buf[:3], "big")
        while len(self.buf) < 9 + n:
            if not self._fill(deadline):
                return None
        ftype, flags, sid = struct.unpack(">BBI", self.buf[3:9])
        frame = Frame(ftype, flags, sid & 0x7FFFFFFF, bytes(self.buf[9 : 9 + n]))
        del self.buf[: 9 + n]
        self._on_frame(frame)
        return frame

    def _on_frame(self, f: Frame) -> None:
        self.received.append(f)
        if f.type == SETTINGS:
            if f.flags & ACK:
                self.settings_acked = True
            else:
                self.server_settings.update(f.settings)
                if self.auto_settings_ack:
                    self._quiet_send(frame_bytes(SETTINGS, ACK, 0))
        elif f.type == PING and not f.flags & ACK and self.auto_ping_ack:
            self._quiet_send(frame_bytes(PING, ACK, 0, f.payload))
        elif f.type == WINDOW_UPDATE:
            if f.stream_id == 0:
                self.send_window += f.increment
            else:
                self.stream_send_windows[f.stream_id] = self.stream_send_windows.get(f.stream_id, 0) + f.increment
        elif f.type in (HEADERS, CONTINUATION, DATA, RST_STREAM) and f.stream_id:
            self._track(f)
        elif f.type == GOAWAY:
            for r in self.responses.values():
                if not r.ended and r.reset is None:
                    r.goaway = f

    def _quiet_send(self, data: bytes) -> None:
        if not self.preface_sent:
            return
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _track(self, f: Frame) -> None:
        r = self.responses.setdefault(f.stream_id, Response(f.stream_id))
        if f.type == RST_STREAM:
            r.reset = f.error_code
            return
        if f.type == DATA:
            body = _unpad(f)
            r.data += body
            r.data_frames.append(len(f.payload))
            if f.flags & END_STREAM:
                r.ended = True
            return
        if f.type == HEADERS:
            block = _unpad(f)
            if f.flags & PRIORITY_FLAG:
                block = block[5:]
            self._header_block = (f.stream_id, bytearray(block))
            r.ended = r.ended or bool(f.flags & END_STREAM)
        elif self._header_block is not None:
            self._header_block[1].extend(f.payload)
        if f.flags & END_HEADERS and self._header_block is not None:
            decoded = self.decoder.decode(bytes(self._header_block[1]), raw=True)
            fields = [(bytes(k).decode("utf-8", "replace"), bytes(v).decode("utf-8", "replace")) for k, v in decoded]
            self._header_block = None
            r.header_blocks += 1
            if r.header_blocks == 1:
                r.headers = fields
            else:
                r.trailers = fields

    def poll(self) -> list[Frame]:
        """Frames already available, without waiting (raises ConnectionClosed)."""
        seen: list[Frame] = []
        while (f := self.read_frame(0.001)) is not None:
            seen.append(f)
        return seen

    def read_until(
        self, done: Callable[[Frame], bool], timeout: float | None = None, what: str = "a frame"
    ) -> list[Frame]:
        """Frames until one satisfies ``done`` (it included); AssertionError on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen: list[Frame] = []
        while True:
            f = self.read_frame(max(0.0, deadline - time.monotonic()))
            if f is None:
                raise AssertionError(f"timed out waiting for {what}; got {[str(x) for x in seen]}")
            seen.append(f)
            if done(f):
                return seen

    def wait_for_data(self, stream_id: int, timeout: float | None = None) -> Response:
        """Read until ``stream_id`` has received some DATA (frames read earlier count too)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not (r := self.responses.get(stream_id)) or not r.data:
            if self.read_frame(max(0.0, deadline - time.monotonic())) is None:
                raise AssertionError(f"timed out waiting for DATA on stream {stream_id}: {r}")
        return r

    def drain(self, timeout: float = 0.2) -> list[Frame]:
        """Whatever arrives within ``timeout`` (stops early on close)."""
        seen: list[Frame] = []
        deadline = time.monotonic() + timeout
        try:
            while (f := self.read_frame(max(0.0, deadline - time.monotonic()))) is not None:
                seen.append(f)
        except ConnectionClosed:
            pass
        return seen

    def ping_roundtrip(self, payload: bytes = b"alive?!!", timeout: float | None = None) -> list[Frame]:
        """Send a PING and wait for its ACK: proof that the connection is still served."""
        self.send_ping(payload)
        return self.read_until(
            lambda f: f.type == PING and bool(f.flags & ACK) and f.payload == payload, timeout, "PING ACK"
        )

    def read_response(self, stream_id: int, timeout: float | None = None) -> Response:
        """Read until the stream ends (END_STREAM, RST_STREAM), the connection goes away, or closes."""
        r = self.responses.setdefault(stream_id, Response(stream_id))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while not (r.ended and self._header_block is None) and r.reset is None and r.goaway is None:
                f = self.read_frame(max(0.0, deadline - time.monotonic()))
                if f is None:
                    raise AssertionError(f"timed out waiting for the end of stream {stream_id}: {r}")
                if f.type == GOAWAY and r.goaway is None:
                    r.goaway = f
                if f.type == DATA and f.stream_id == stream_id and f.payload:
                    # keep the stream window open: responses may be larger than 64 KiB
                    self._quiet_send(frame_bytes(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", len(f.payload))))
        except ConnectionClosed:
            r.closed = True
        return r

    def unary(
        self,
        path: str = RANGE_PATH,
        body: bytes | None = None,
        *,
        extra: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> Response:
        sid = self.start_request(path, range_request() if body is None else body, extra=extra)
        return self.read_response(sid, timeout)

    # ---------------------------------------------------------------- expectations

    def expect_connection_error(self, *codes: int, timeout: float | None = None) -> str:
        """h2spec: GOAWAY with one of ``codes`` or a close passes; another GOAWAY, or nothing, fails.

        Returns what was seen (for messages)."""
        return self._expect_error(None, codes, timeout)

    def expect_stream_error(self, stream_id: int, *codes: int, timeout: float | None = None) -> str:
        """h2spec: RST_STREAM with one of ``codes`` on ``stream_id``, GOAWAY with one, or a close passes."""
        return self._expect_error(stream_id, codes, timeout)

    def _expect_error(self, stream_id: int | None, codes: tuple[int, ...], timeout: float | None) -> str:
        want = "/".join(error_name(c) for c in codes)
        kind = "connection error" if stream_id is None else f"stream error on {stream_id}"
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen: list[str] = []
        # frames already read (e.g. by read_response) count too
        for old in self.received:
            verdict = self._judge(old, stream_id, codes)
            if verdict is not None:
                assert verdict, f"expected {kind} {want}, got {old}"
                return str(old)
        while True:
            try:
                f = self.read_frame(max(0.0, deadline - time.monotonic()))
            except ConnectionClosed as exc:
                return f"closed ({exc})"
            if f is None:
                raise AssertionError(f"expected {kind} {want}; nothing within the timeout, got {seen}")
            seen.append(str(f))
            verdict = self._judge(f, stream_id, codes)
            if verdict is not None:
                assert verdict, f"expected {kind} {want}, got {f} (after {seen[:-1]})"
                return str(f)

    @staticmethod
    def _judge(f: Frame, stream_id: int | None, codes: tuple[int, ...]) -> bool | None:
        if f.type == GOAWAY and len(f.payload) >= 8:
            return f.error_code in codes
        if f.type == RST_STREAM and stream_id is not None and f.stream_id == stream_id and len(f.payload) == 4:
            return f.error_code in codes
        return None

    def expect_goaway(self, *codes: int, timeout: float | None = None) -> Frame:
        """Strict: a GOAWAY (with one of ``codes`` if given) must arrive before the close."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for old in self.received:
            if old.type == GOAWAY:
                assert not codes or old.error_code in codes, f"expected GOAWAY {codes}, got {old}"
                return old
        seen: list[str] = []
        while True:
            try:
                f = self.read_frame(max(0.0, deadline - time.monotonic()))
            except ConnectionClosed as exc:
                raise AssertionError(f"closed without a GOAWAY ({exc}); got {seen}") from exc
            if f is None:
                raise AssertionError(f"no GOAWAY within the timeout; got {seen}")
            seen.append(str(f))
            if f.type == GOAWAY:
                assert not codes or f.error_code in codes, f"expected GOAWAY {codes}, got {f}"
                return f

    def expect_closed(self, timeout: float) -> list[Frame]:
        """The connection must close within ``timeout``; returns the frames read meanwhile."""
        deadline = time.monotonic() + timeout
        seen: list[Frame] = []
        while True:
            try:
                f = self.read_frame(max(0.0, deadline - time.monotonic()))
            except ConnectionClosed:
                return seen
            if f is None:
                raise AssertionError(f"still open after {timeout}s; got {[str(x) for x in seen[-10:]]}")
            seen.append(f)

    def expect_alive(self, timeout: float | None = None) -> None:
        """No error: a PING is still answered (h2spec's check for "ignored")."""
        try:
            frames = self.ping_roundtrip(b"stillok!", timeout)
        except ConnectionClosed as exc:
            raise AssertionError(f"connection closed ({exc}); frames: {[str(f) for f in self.received[-8:]]}") from exc
        bad = [f for f in frames if f.type == GOAWAY or f.type == RST_STREAM]
        assert not bad, [str(f) for f in bad]


def hpack_int(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 5.1 integer with an N-bit prefix (``flags`` are the bits above the prefix)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(s: str) -> bytes:
    """A string literal without Huffman coding (RFC 7541 5.2)."""
    raw = s.encode()
    return hpack_int(len(raw), 7, 0) + raw


def hpack_literal(name: str, value: str, *, index: bool = False) -> bytes:
    """A literal field with a new name: with incremental indexing (6.2.1) or without indexing (6.2.2)."""
    return (b"\x40" if index else b"\x00") + hpack_string(name) + hpack_string(value)


def _unpad(f: Frame) -> bytes:
    if f.flags & PADDED and f.payload:
        pad = f.payload[0]
        return f.payload[1 : len(f.payload) - pad]
    return f.payload


def tls_context(ca_file: str | None = None, alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl._create_unverified_context()
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def bin_header(value: bytes) -> str:
    """A -bin metadata value as gRPC sends it (base64 without padding)."""
    return base64.b64encode(value).decode().rstrip("=")
