"""A sans-I/O HTTP/2 client connection that issues gRPC calls (RFC 9113, grpc's PROTOCOL-HTTP2).

``ClientConnection.receive(data, now)`` parses bytes from the server and calls each stream's application object
(``StreamApp``: headers, message, end); calls are opened with ``open_unary`` / ``open_stream`` and fed with
``send`` / ``half_close`` / ``cancel``. Everything to write accumulates in ``out`` and is taken with
``take_output()`` by the driver (channel.py), which writes it once per read and once per loop turn. Time enters
only through ``now`` arguments, ``tick`` (keepalive, SETTINGS ack) and ``expire`` (deadlines).

Hot-path choices, as on the server side (DESIGN.md section 6): no per-frame objects; request header blocks are
constant bytes per (path, metadata) built from static-table indexes and literals without indexing, so we keep no
HPACK encoder state; response blocks are decoded through the memo of hpackmemo and their meaning memoized with
it; a unary call whose message fits the windows is one HEADERS + DATA(END_STREAM) join.

Flow control. Send side: per-stream and connection windows; DATA that does not fit waits per stream and is sent
round-robin, one frame per waiting stream per round. Receive side: the connection window is credited on receipt
(so one stream that is not read cannot starve the others); a stream's window only while its application keeps
up (``consumed``), so an unread watch stream holds at most its window plus ``max_unread_per_stream`` bytes.

Error mapping follows grpc-go: HTTP statuses without grpc-status as grpc's http-grpc-status-mapping table,
RST_STREAM codes as grpc-go's http2ErrConvTab, REFUSED_STREAM and streams above a GOAWAY's last id are
``unprocessed`` (the server never saw them: safe to retry elsewhere).
"""

from __future__ import annotations

import heapq
import http
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from etcdproxy.h2 import frames as f
from etcdproxy.h2 import grpcwire as gw
from etcdproxy.h2.hpackmemo import DecodeError, MemoDecoder, OversizedError, header_list_size
from etcdproxy.h2.status import StatusCode

Headers = list[tuple[bytes, bytes]]
Metadata = Sequence[tuple[str, str | bytes]]

OK = 0
CANCELLED = int(StatusCode.CANCELLED)
UNKNOWN = int(StatusCode.UNKNOWN)
DEADLINE_EXCEEDED = int(StatusCode.DEADLINE_EXCEEDED)
RESOURCE_EXHAUSTED = int(StatusCode.RESOURCE_EXHAUSTED)
INTERNAL = int(StatusCode.INTERNAL)
UNAVAILABLE = int(StatusCode.UNAVAILABLE)

# grpc's doc/http-grpc-status-mapping.md: only for responses without grpc-status
HTTP_TO_GRPC = {
    400: INTERNAL,
    401: 16,
    403: 7,
    404: 12,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

# grpc-go's http2ErrConvTab (internal/transport/http_util.go): RST_STREAM code -> grpc code
RST_TO_GRPC = {
    f.NO_ERROR: INTERNAL,
    f.PROTOCOL_ERROR: INTERNAL,
    f.INTERNAL_ERROR: INTERNAL,
    f.FLOW_CONTROL_ERROR: RESOURCE_EXHAUSTED,
    f.SETTINGS_TIMEOUT: INTERNAL,
    f.STREAM_CLOSED: INTERNAL,
    f.FRAME_SIZE_ERROR: INTERNAL,
    f.REFUSED_STREAM: UNAVAILABLE,
    f.CANCEL: CANCELLED,
    f.COMPRESSION_ERROR: INTERNAL,
    f.CONNECT_ERROR: INTERNAL,
    f.ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED,
    f.INADEQUATE_SECURITY: 7,
    f.HTTP_1_1_REQUIRED: INTERNAL,
}
H2_ERROR_NAMES = {
    0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM", 0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM", 0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}  # fmt: skip

# metadata names the transport sets itself (grpc-go's isReservedHeader), never taken from the caller
RESERVED = frozenset(
    ("content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "grpc-message",
     "grpc-status", "grpc-message-type", "grpc-status-details-bin", "host", "connection")
)  # fmt: skip

DEADLINE_MESSAGE = "context deadline exceeded"
CANCEL_MESSAGE = "context canceled"


def h2_error_name(code: int) -> str:
    return H2_ERROR_NAMES.get(code, f"unknown error code 0x{code:x}")


class ClientSettings:
    """Our side of the connection: what we advertise and how much we buffer."""

    __slots__ = (
        "connection_window",
        "max_header_list_size",
        "max_receive_message",
        "max_unread_per_stream",
        "settings_timeout_s",
        "stream_window",
    )

    def __init__(
        self,
        *,
        stream_window: int = 4 << 20,
        connection_window: int = 64 << 20,
        max_header_list_size: int = 1 << 20,
        max_receive_message: int = 2**31 - 1,
    ) -> None:
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_header_list_size = max_header_list_size
        # the hub forwards etcd's answers: etcd's own send limit decides, as with the Go proxy's MaxInt32
        self.max_receive_message = max_receive_message
        self.max_unread_per_stream = stream_window // 2  # then at most this plus a window buffered per stream
        self.settings_timeout_s = 10.0


class StreamApp(Protocol):
    """What a stream tells its application. ``headers``: the response headers (not for trailers-only answers);
    ``message``: one complete response message (call ``ClientConnection.consumed`` once it is taken, so the
    stream's window is credited back); ``end``: the call's status, exactly once, after the last message.
    ``unblocked`` (optional attribute) is called when queued request DATA has all been sent."""

    def headers(self, stream: ClientStream, headers: Headers) -> None: ...

    def message(self, stream: ClientStream, message: bytes) -> None: ...

    def end(self, stream: ClientStream, code: int, message: str, trailers: Headers) -> None: ...


class ClientStream:
    """One call. ``id`` is 0 while it waits for a concurrency slot. ``unprocessed`` after the end: the server
    never processed it (REFUSED_STREAM, above a GOAWAY's last id, never sent), so it is safe to retry."""

    __slots__ = (
        "app",
        "block",
        "bucket",
        "data_have",
        "data_need",
        "data_parts",
        "deadline",
        "encoding",
        "ended",
        "got_headers",
        "id",
        "local_closed",
        "pending",
        "pending_end",
        "pending_offset",
        "recv_window",
        "send_window",
        "uncredited",
        "unprocessed",
        "unread",
    )

    def __init__(self, app: StreamApp, block: bytes, deadline: float | None) -> None:
        self.app = app
        self.id = 0
        self.block = block  # the request header block, without grpc-timeout (added when the stream starts)
        self.deadline = deadline
        self.bucket = 0  # the deadline bucket holding the stream (0: none)
        self.send_window = 0
        self.recv_window = 0  # what the server may still send us on this stream
        self.pending: deque[bytes] | None = None  # framed request messages waiting for window (or for a slot)
        self.pending_offset = 0  # bytes of pending[0] already sent
        self.pending_end = False  # half-close once pending is sent
        self.local_closed = False  # END_STREAM sent (or queued)
        self.got_headers = False
        self.ended = False  # end() was called
        self.unprocessed = False
        self.encoding = b"identity"
        self.data_parts: list[bytes] | None = None  # an incomplete response message
        self.data_have = 0
        self.data_need = 0
        self.uncredited = 0  # received DATA bytes not yet given back with a stream WINDOW_UPDATE
        self.unread = 0  # bytes of messages handed to the application and not yet consumed


class _ConnectionError(Exception):
    def __init__(self, code: int, debug: str) -> None:
        super().__init__(debug)
        self.code = code
        self.debug = debug


_unpack_head = f.HEADER.unpack_from
_HEADERS_END_HEADERS = bytes((f.HEADERS, f.END_HEADERS))
_HEADERS_END_HEADERS_STREAM = bytes((f.HEADERS, f.END_HEADERS | f.END_STREAM))
_DATA_END_STREAM = bytes((f.DATA, f.END_STREAM))
_DATA_NO_FLAGS = bytes((f.DATA, 0))
_TE_TRAILERS = gw.literal(b"te", b"trailers")
MAX_BLOCKS = 1024  # memoized request header blocks (path x metadata)
_TIMEOUT_NAME = b"\x00\x0cgrpc-timeout"  # literal without indexing, literal name


def timeout_field(seconds: float) -> bytes:
    """The grpc-timeout field; the common range (0.1 s to 100 s: microseconds in grpc-go's format) inline."""
    if 0.1 <= seconds < 99.999999:
        value = b"%du" % -(-round(seconds * 1e9) // 1000)
    else:
        value = gw.encode_timeout(seconds)
    return _TIMEOUT_NAME + bytes((len(value),)) + value


MAX_INFOS = 256
DEADLINE_HZ = 100  # deadlines are enforced at 10 ms granularity (never early)


class ResponseInfo:
    """What a response header block means, computed once per distinct block."""

    __slots__ = ("code", "encoding", "http_error", "message")

    def __init__(self, headers: Headers, trailers: bool) -> None:
        status: bytes | None = None
        content_type: bytes | None = None
        code: bytes | None = None
        message = b""
        self.encoding = b"identity"
        for name, value in headers:
            if name == b":status":
                status = value
            elif name == b"grpc-status":
                code = value
            elif name == b"grpc-message":
                message = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-encoding":
                self.encoding = value
        self.message = gw.percent_decode(message) if message else ""
        self.code: int | None = None
        if code is not None:
            try:
                self.code = int(code)
            except ValueError:
                self.code, self.message = UNKNOWN, f"transport: malformed grpc-status: {code.decode('latin-1')!r}"
        # (code, message) when the headers are not a gRPC answer; grpc-status wins over HTTP when present
        self.http_error: tuple[int, str] | None = None
        if trailers:
            return
        if status != b"200":
            if self.code is not None and status is not None:
                return
            text = status.decode("latin-1") if status is not None else ""
            if not text.isdigit():
                self.http_error = (INTERNAL, "malformed header: missing HTTP status")
                return
            number = int(text)
            try:
                phrase = http.HTTPStatus(number).phrase
            except ValueError:
                phrase = "Unknown"
            text = f"unexpected HTTP status code received from server: {number} ({phrase})"
            self.http_error = (HTTP_TO_GRPC.get(number, UNKNOWN), text)
        elif (
            content_type is None
            or not (
                content_type == b"application/grpc" or content_type[:17] in (b"application/grpc+", b"application/grpc;")
            )
        ) and self.code is None:
            shown = (content_type or b"").decode("latin-1")
            self.http_error = (INTERNAL, f'transport: received unexpected content-type "{shown}"')


class ClientConnection:
    """One HTTP/2 connection's client state. Not thread-safe; all calls on one event loop."""

    def __init__(
        self, authority: str, now: float, wakeup: Callable[[], None], *, tls: bool = False,
        settings: ClientSettings | None = None,
    ) -> None:  # fmt: skip
        self.settings = s = settings or ClientSettings()
        self.authority = authority.encode("latin-1")
        self.wakeup = wakeup  # output was queued outside receive(): the driver schedules a write
        self.out: list[bytes] = []
        self.closed = False  # the connection is finished: the driver closes the socket after writing out
        self.close_reason = ""
        self.goaway: tuple[int, int, str] | None = None  # (last stream id, code, debug) from the server
        self.ready = False  # the server's SETTINGS arrived
        self.accepting = True  # new streams can be opened (no GOAWAY, not closed, stream ids left)
        self._scheme_block = b"\x87" if tls else b"\x86"  # static 7 / 6: :scheme https / http
        self._blocks: dict[tuple[str, tuple[tuple[str, str | bytes], ...]], bytes] = {}
        self._path_blocks: dict[str, bytes] = {}
        self._buffer = b""
        self.decoder = MemoDecoder(s.max_header_list_size * 4)
        self._infos: dict[bytes, tuple[Headers, ResponseInfo]] = {}
        self._trailer_infos: dict[bytes, tuple[Headers, ResponseInfo]] = {}
        self._cont: bytearray | None = None  # a header block being continued
        self._cont_stream = 0
        self._cont_flags = 0
        self.streams: dict[int, ClientStream] = {}
        self.waiting: deque[ClientStream] = deque()  # opened, waiting for a concurrency slot
        self.next_stream_id = 1
        self.peer_max_streams = 100  # until the server's SETTINGS say (grpc-go assumes the same)
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.peer_max_header_list = 2**32 - 1
        self.send_window = f.DEFAULT_WINDOW
        self.recv_window = s.connection_window
        self._conn_uncredited = 0
        self._blocked: OrderedDict[int, ClientStream] = OrderedDict()  # streams with DATA waiting for window
        # deadlines in buckets of DEADLINE_TICK: a stream leaves its bucket when it ends, so finished calls are
        # not kept alive until their deadline (a heap of them cost +3 us per call, mostly in the GC)
        self._buckets: dict[int, set[ClientStream]] = {}
        self._bucket_keys: list[int] = []  # a heap
        self._settings_sent_at = now
        self._settings_acked = False
        self.last_activity = now  # last time a frame arrived
        self._ping_sent: bytes | None = None
        self._ping_sent_at = 0.0
        self._ping_count = 0
        self.pings_sent = 0
        self.out.append(
            f.PREFACE
            + f.settings(
                [
                    (f.ENABLE_PUSH, 0),
                    (f.INITIAL_WINDOW_SIZE, s.stream_window),
                    (f.MAX_HEADER_LIST_SIZE, s.max_header_list_size),
                ]
            )
        )
        if s.connection_window > f.DEFAULT_WINDOW:
            self.out.append(f.window_update(0, s.connection_window - f.DEFAULT_WINDOW))

    # ---- output ----------------------------------------------------------------------------------------

    def take_output(self) -> bytes:
        data = b"".join(self.out) if len(self.out) != 1 else self.out[0]
        self.out.clear()
        return data

    def _queue(self, data: bytes) -> None:
        if not self.out:
            self.wakeup()
        self.out.append(data)

    # ---- opening calls -----------------------------------------------------------------------------------

    def request_block(self, path: str, metadata: Metadata = ()) -> bytes:
        """The request header block for ``path`` and ``metadata`` (memoized: constant bytes, no encoder state).
        :method POST (static 3), :scheme, :path and :authority as literals with static names (4, 1),
        content-type (static name 31), te, then the metadata."""
        if not metadata:
            block = self._path_blocks.get(path)
            if block is None:
                if len(self._path_blocks) >= MAX_BLOCKS:
                    self._path_blocks.clear()
                block = self._path_blocks[path] = self._build_block(path, ())
            return block
        key = (path, tuple(metadata))
        block = self._blocks.get(key)
        if block is None:
            if len(self._blocks) >= MAX_BLOCKS:
                self._blocks.clear()
            block = self._blocks[key] = self._build_block(path, metadata)
        return block

    def _build_block(self, path: str, metadata: Metadata) -> bytes:
        parts = [
            b"\x83",
            self._scheme_block,
            gw.literal_indexed_name(4, path.encode("latin-1")),
            gw.literal_indexed_name(1, self.authority),
            gw.CONTENT_TYPE_GRPC,
            _TE_TRAILERS,
        ]
        for name, value in metadata:
            lname = name.lower()
            if lname[:1] == ":" or lname in RESERVED:
                continue
            parts.append(gw.metadata_field(lname, value))
        return b"".join(parts)

    def open_unary(
        self, app: StreamApp, path: str, metadata: Metadata, message: bytes, now: float,
        deadline: float | None = None,
    ) -> ClientStream:  # fmt: skip
        """A call with one request message and END_STREAM: one HEADERS + DATA write when it fits."""
        stream = ClientStream(app, self.request_block(path, metadata), deadline)
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        if deadline is not None:
            self._add_deadline(stream)
        if self.waiting or len(self.streams) >= self.peer_max_streams or not self.accepting:
            stream.pending = deque((framed,))
            stream.pending_end = True
            self._wait_or_refuse(stream)
            return stream
        n = len(framed)
        if n <= self.send_window and n <= self.peer_initial_window and n <= self.peer_max_frame:
            block = stream.block
            if deadline is not None:
                block += timeout_field(deadline - now)
            if len(block) <= self.peer_max_frame:
                sid = self._assign(stream)
                self.send_window -= n
                stream.send_window -= n
                stream.local_closed = True
                sidb = sid.to_bytes(4, "big")
                self._queue(
                    b"".join(
                        (
                            len(block).to_bytes(3, "big"),
                            _HEADERS_END_HEADERS,
                            sidb,
                            block,
                            n.to_bytes(3, "big"),
                            _DATA_END_STREAM,
                            sidb,
                            framed,
                        )
                    )
                )
                return stream
        stream.pending = deque((framed,))
        stream.pending_end = True
        self._start(stream, now)
        return stream

    def open_stream(
        self, app: StreamApp, path: str, metadata: Metadata, now: float, deadline: float | None = None
    ) -> ClientStream:
        """A streaming call: HEADERS now (or when a slot frees), messages with ``send``, ``half_close``."""
        stream = ClientStream(app, self.request_block(path, metadata), deadline)
        if deadline is not None:
            self._add_deadline(stream)
        if not self.accepting or self.waiting or len(self.streams) >= self.peer_max_streams:
            self._wait_or_refuse(stream)
        else:
            self._start(stream, now)
        return stream

    def _wait_or_refuse(self, stream: ClientStream) -> None:
        if self.accepting:
            self.waiting.append(stream)
            return
        stream.unprocessed = True
        reason = self.close_reason or "the connection is draining"
        self._end(stream, UNAVAILABLE, reason, [])

    def _assign(self, stream: ClientStream) -> int:
        sid = self.next_stream_id
        self.next_stream_id += 2
        if self.next_stream_id > f.MAX_STREAM_ID:
            self.accepting = False  # ids exhausted: the owner needs a new connection
            self.close_reason = self.close_reason or "stream ids exhausted"
        stream.id = sid
        stream.send_window = self.peer_initial_window
        stream.recv_window = self.settings.stream_window
        self.streams[sid] = stream
        return sid

    def _start(self, stream: ClientStream, now: float) -> None:
        """Send the HEADERS of a stream that got a slot, then whatever it queued meanwhile."""
        block = stream.block
        if stream.deadline is not None:
            left = stream.deadline - now
            if left <= 0:
                stream.unprocessed = True
                self._end(stream, DEADLINE_EXCEEDED, DEADLINE_MESSAGE, [])
                return
            block += timeout_field(left)
        sid = self._assign(stream)
        only_end = stream.pending_end and not stream.pending
        flags = f.END_STREAM if only_end else 0
        if only_end:
            stream.pending_end = False
            stream.local_closed = True
        max_frame = self.peer_max_frame
        if len(block) <= max_frame:
            self._queue(f.frame_head(f.HEADERS, flags | f.END_HEADERS, sid, len(block)) + block)
        else:
            pieces = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
            self._queue(f.frame(f.HEADERS, flags, sid, pieces[0]))
            for i, piece in enumerate(pieces[1:], 2):
                self._queue(f.frame(f.CONTINUATION, f.END_HEADERS if i == len(pieces) else 0, sid, piece))
        if stream.pending:
            self._blocked[sid] = stream
            self._pump()

    def _start_waiting(self, now: float) -> None:
        waiting = self.waiting
        while waiting and len(self.streams) < self.peer_max_streams and self.accepting:
            stream = waiting.popleft()
            if not stream.ended:
                self._start(stream, now)

    # ---- sending on a stream ----------------------------------------------------------------------------

    def send(self, stream: ClientStream, message: bytes, end: bool = False) -> bool:
        """Queue one request message (``end``: and half-close, in the same DATA frame when it fits). False when
        the stream can no longer send (ended or half-closed)."""
        if stream.ended or stream.local_closed or stream.pending_end:
            return False
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        n = len(framed)
        if (
            stream.id
            and stream.pending is None
            and n <= self.send_window
            and n <= stream.send_window
            and n <= self.peer_max_frame
        ):
            self.send_window -= n
            stream.send_window -= n
            if end:
                stream.local_closed = True
            head = _DATA_END_STREAM if end else _DATA_NO_FLAGS
            self._queue(n.to_bytes(3, "big") + head + stream.id.to_bytes(4, "big") + framed)
            return True
        if stream.pending is None:
            stream.pending = deque()
        stream.pending.append(framed)
        if end:
            stream.pending_end = True
        if stream.id:
            self._blocked[stream.id] = stream
            self._pump()
        return True

    def half_close(self, stream: ClientStream) -> None:
        """No more request messages (an empty DATA with END_STREAM once queued DATA has left)."""
        if stream.ended or stream.local_closed or stream.pending_end:
            return
        if stream.pending or not stream.id:
            stream.pending_end = True
            return
        stream.local_closed = True
        self._queue(f.frame_head(f.DATA, f.END_STREAM, stream.id, 0))

    def writable(self, stream: ClientStream) -> bool:
        """False while request DATA waits (for window, or for a slot): a streaming sender should wait for
        ``unblocked``, called once it has all left."""
        return stream.pending is None

    def cancel(self, stream: ClientStream, code: int = CANCELLED, message: str = CANCEL_MESSAGE) -> None:
        """The caller abandons the call: RST_STREAM(CANCEL) if it was sent, and ``end`` with ``code``."""
        if stream.ended:
            return
        if stream.id and stream.id in self.streams and not self.closed:
            self._queue(f.rst_stream(stream.id, f.CANCEL))
        elif not stream.id:
            stream.unprocessed = True
        self._end(stream, code, message, [])

    def _pump(self) -> None:
        """Send waiting DATA as windows allow, one frame per waiting stream per round (fair between streams)."""
        blocked = self._blocked
        while blocked:
            progress = False
            for stream in list(blocked.values()):
                pending = stream.pending
                if not pending or blocked.get(stream.id) is not stream:
                    continue  # drained meanwhile (an ``unblocked`` callback sent more and pumped)
                chunk = pending[0]
                offset = stream.pending_offset
                room = min(self.send_window, stream.send_window, self.peer_max_frame)
                left = len(chunk) - offset
                if room <= 0 and left:
                    continue
                if left > room:
                    piece = chunk[offset : offset + room]
                    stream.pending_offset = offset + room
                else:
                    piece = chunk[offset:] if offset else chunk
                    stream.pending_offset = 0
                    pending.popleft()
                k = len(piece)
                self.send_window -= k
                stream.send_window -= k
                flags = 0
                if not pending:
                    stream.pending = None
                    del blocked[stream.id]
                    if stream.pending_end:
                        stream.pending_end = False
                        stream.local_closed = True
                        flags = f.END_STREAM
                self._queue(f.frame_head(f.DATA, flags, stream.id, k) + piece)
                progress = True
                if stream.pending is None and not flags:
                    unblocked = getattr(stream.app, "unblocked", None)
                    if unblocked is not None:
                        unblocked(stream)
            if not progress or self.send_window <= 0:
                break

    # ---- receiving -----------------------------------------------------------------------------------------

    def consumed(self, stream: ClientStream, size: int) -> None:
        """The application took a message of ``size`` bytes: the stream's window may be credited back."""
        stream.unread -= size + 5
        if stream.uncredited and not stream.ended:
            self._credit_stream(stream)

    def _credit_stream(self, stream: ClientStream) -> None:
        # batched (a quarter window, like grpc-go), and only while the application keeps up (bounded memory)
        s = self.settings
        if stream.uncredited >= s.stream_window >> 2 and stream.unread < s.max_unread_per_stream:
            self._queue(f.window_update(stream.id, stream.uncredited))
            stream.recv_window += stream.uncredited
            stream.uncredited = 0

    def receive(self, data: bytes, now: float) -> None:
        """Process bytes from the server. Protocol errors close the connection (GOAWAY)."""
        if self.closed:
            return
        self.last_activity = now
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        try:
            self._frames(data, now)
        except _ConnectionError as exc:
            self.terminate(exc.code, exc.debug)
            return
        if self._conn_uncredited >= self.settings.connection_window >> 1:
            self.out.append(f.window_update(0, self._conn_uncredited))
            self.recv_window += self._conn_uncredited
            self._conn_uncredited = 0
        if self.waiting and len(self.streams) < self.peer_max_streams:
            self._start_waiting(now)
        if self.goaway is not None and not self.streams:
            self._finish("GOAWAY received and no streams left")

    def _frames(self, data: bytes, now: float) -> None:
        n = len(data)
        pos = 0
        streams = self.streams
        while n - pos >= 9:
            hi, lo, kind, flags, stream_id = _unpack_head(data, pos)
            length = (hi << 8) | lo
            if length > f.DEFAULT_MAX_FRAME:  # we never raise our SETTINGS_MAX_FRAME_SIZE
                raise _ConnectionError(f.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            end = pos + 9 + length
            if end > n:
                break
            stream_id &= 0x7FFFFFFF
            payload = data[pos + 9 : end]
            pos = end
            if self._cont is not None or not self.ready:
                if not self.ready and kind != f.SETTINGS:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "the server preface must start with SETTINGS")
                if self._cont is not None and kind != f.CONTINUATION:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "expected CONTINUATION")
            if kind == f.DATA:
                self._data(stream_id, flags, payload, length)
            elif kind == f.HEADERS:
                if stream_id == 0:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "HEADERS on stream 0")
                if flags & f.PADDED:
                    payload = self._unpad(payload)
                if flags & f.PRIORITY_FLAG:
                    payload = payload[5:]
                if flags & f.END_HEADERS:
                    self._header_block(stream_id, flags, payload)
                else:
                    self._cont = bytearray(payload)
                    self._cont_stream = stream_id
                    self._cont_flags = flags
            elif kind == f.CONTINUATION:
                block = self._cont
                if block is None or stream_id != self._cont_stream:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "unexpected CONTINUATION")
                block += payload
                if len(block) > self.settings.max_header_list_size * 4:
                    raise _ConnectionError(f.ENHANCE_YOUR_CALM, "header block too large")
                if flags & f.END_HEADERS:
                    self._cont = None
                    self._header_block(stream_id, self._cont_flags, bytes(block))
            elif kind == f.WINDOW_UPDATE:
                self._window_update(stream_id, payload)
            elif kind == f.RST_STREAM:
                if stream_id == 0:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
                if length != 4:
                    raise _ConnectionError(f.FRAME_SIZE_ERROR, "RST_STREAM size")
                stream = streams.get(stream_id)
                if stream is None:
                    self._check_known(stream_id)
                    continue
                self._rst_stream(stream, int.from_bytes(payload, "big"))
            elif kind == f.PING:
                if stream_id != 0:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise _ConnectionError(f.FRAME_SIZE_ERROR, "PING size")
                if flags & f.ACK:
                    if payload == self._ping_sent:
                        self._ping_sent = None
                else:
                    self.out.append(f.ping(payload, ack=True))
            elif kind == f.SETTINGS:
                self._settings(stream_id, flags, payload, now)
            elif kind == f.GOAWAY:
                if stream_id != 0:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise _ConnectionError(f.FRAME_SIZE_ERROR, "GOAWAY size")
                last, code = struct.unpack_from(">LL", payload)
                self._goaway(last & 0x7FFFFFFF, code, payload[8:].decode("utf-8", "replace"))
            elif kind == f.PUSH_PROMISE:
                raise _ConnectionError(f.PROTOCOL_ERROR, "PUSH_PROMISE although push is disabled")
            # PRIORITY and unknown types: ignored (RFC 9113 5.3.2, 5.5)
            if self.closed:
                return
        if pos < n:
            self._buffer = data[pos:]

    @staticmethod
    def _unpad(payload: bytes) -> bytes:
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(f.PROTOCOL_ERROR, "bad padding")
        return payload[1 : len(payload) - payload[0]]

    def _check_known(self, stream_id: int) -> None:
        """A frame for a stream we do not hold: fine if we opened it once (it ended), else a protocol error."""
        if not stream_id & 1 or stream_id >= self.next_stream_id:
            raise _ConnectionError(f.PROTOCOL_ERROR, f"frame on idle stream {stream_id}")

    def _data(self, stream_id: int, flags: int, payload: bytes, length: int) -> None:
        if stream_id == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self.recv_window:
            raise _ConnectionError(f.FLOW_CONTROL_ERROR, "connection flow-control window exceeded")
        self.recv_window -= length
        self._conn_uncredited += length  # the connection window is credited on receipt
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id)
            return  # a stream we ended (cancelled, deadline): its DATA was in flight
        if flags & f.PADDED:
            payload = self._unpad(payload)
        if length > stream.recv_window:
            self._reset(stream, f.FLOW_CONTROL_ERROR, INTERNAL, "transport: stream flow-control window exceeded")
            return
        stream.recv_window -= length
        stream.uncredited += length
        if not stream.got_headers:
            self._reset(stream, f.PROTOCOL_ERROR, INTERNAL, "transport: received DATA before response headers")
            return
        if payload:
            self._append(stream, payload)
            if stream.ended:
                return
        if flags & f.END_STREAM:
            # grpc-go: "server closed the stream without sending trailers"
            self._close_remote(stream, INTERNAL, "server closed the stream without sending trailers", [])
            return
        if stream.uncredited >= self.settings.stream_window >> 2:
            self._credit_stream(stream)

    def _append(self, stream: ClientStream, payload: bytes) -> None:
        """Split response bytes into gRPC messages (5-byte prefix) without quadratic copying of big ones."""
        parts = stream.data_parts
        if parts is not None:
            parts.append(payload)
            stream.data_have += len(payload)
            if stream.data_have < stream.data_need:
                return
            data = b"".join(parts)
            stream.data_parts = None
        else:
            data = payload
        pos, n = 0, len(data)
        app = stream.app
        while n - pos >= 5:
            size = int.from_bytes(data[pos + 1 : pos + 5], "big")
            end = pos + 5 + size
            if size > self.settings.max_receive_message:
                limit = self.settings.max_receive_message
                text = f"grpc: received message larger than max ({size} vs. {limit})"
                self._reset(stream, f.CANCEL, RESOURCE_EXHAUSTED, text)
                return
            if end > n:
                break
            flag = data[pos]
            message = data[pos + 5 : end]
            pos = end
            if flag:
                message = self._decompress(stream, flag, message)
                if stream.ended:
                    return
            stream.unread += size + 5
            app.message(stream, message)
            if stream.ended:
                return
        if pos < n:
            rest = data[pos:] if pos else data
            stream.data_parts = [rest]
            stream.data_have = len(rest)
            stream.data_need = 5 + int.from_bytes(rest[1:5], "big") if len(rest) >= 5 else 5

    def _decompress(self, stream: ClientStream, flag: int, message: bytes) -> bytes:
        if flag != 1:
            self._reset(stream, f.CANCEL, INTERNAL, f"grpc: invalid compressed flag {flag}")
            return b""
        if stream.encoding != b"gzip":
            name = stream.encoding.decode("latin-1")
            self._reset(stream, f.CANCEL, INTERNAL, f'grpc: Decompressor is not installed for grpc-encoding "{name}"')
            return b""
        try:
            return gw.gunzip(message, self.settings.max_receive_message)
        except gw.MessageTooLarge as exc:
            self._reset(stream, f.CANCEL, RESOURCE_EXHAUSTED, str(exc))
        except Exception as exc:
            self._reset(stream, f.CANCEL, INTERNAL, f"grpc: failed to decompress the received message: {exc}")
        return b""

    def _decode(self, block: bytes) -> Headers:
        try:
            return self.decoder.decode(block)
        except OversizedError as exc:
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, "header list too large") from exc
        except DecodeError as exc:
            raise _ConnectionError(f.COMPRESSION_ERROR, "invalid header block") from exc

    def _info(self, block: bytes, trailers: bool) -> tuple[Headers, ResponseInfo]:
        """Decode and interpret a response block; the interpretation is memoized with the decode (valid while
        the decoder's memo holds the very list it was made from: the same table state)."""
        infos = self._trailer_infos if trailers else self._infos
        entry = infos.get(block)
        if entry is not None and self.decoder.memo.get(block) is entry[0]:
            self.decoder.hits += 1
            return entry
        headers = self._decode(block)
        entry = (headers, ResponseInfo(headers, trailers))
        if self.decoder.memo.get(block) is headers:
            if len(infos) >= MAX_INFOS:
                infos.clear()
            infos[block] = entry
        return entry

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self._decode(block)  # keeps the HPACK table in step
            self._check_known(stream_id)
            return
        end_stream = bool(flags & f.END_STREAM)
        if not stream.got_headers:
            headers, info = self._info(block, trailers=False)
            if not end_stream and len(block) > 64 and header_list_size(headers) > self.settings.max_header_list_size:
                self._reset(stream, f.PROTOCOL_ERROR, INTERNAL, "transport: header list larger than advertised")
                return
            stream.got_headers = True
            if info.http_error is not None:
                code, message = info.http_error
                if end_stream:
                    self._close_remote(stream, code, message, headers)
                else:
                    self._reset(stream, f.CANCEL, code, message)
                return
            if end_stream:  # trailers-only
                code = info.code if info.code is not None else UNKNOWN
                self._close_remote(stream, code, info.message, headers)
                return
            stream.encoding = info.encoding
            stream.app.headers(stream, headers)
            return
        if not end_stream:
            self._decode(block)
            self._reset(stream, f.PROTOCOL_ERROR, INTERNAL, "transport: trailers without END_STREAM")
            return
        headers, info = self._info(block, trailers=True)
        if stream.data_parts is not None:
            self._close_remote(stream, INTERNAL, "grpc: response ended inside a message", headers)
            return
        if info.code is None:
            self._close_remote(stream, UNKNOWN, "transport: trailers without grpc-status", headers)
            return
        self._close_remote(stream, info.code, info.message, headers)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise _ConnectionError(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise _ConnectionError(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            if self._blocked:
                self._pump()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id)
            return
        if increment == 0:
            self._reset(stream, f.PROTOCOL_ERROR, INTERNAL, "transport: WINDOW_UPDATE of 0")
            return
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            self._reset(stream, f.FLOW_CONTROL_ERROR, INTERNAL, "transport: stream window above 2^31-1")
            return
        if stream.pending and stream_id in self._blocked:
            self._pump()

    def _settings(self, stream_id: int, flags: int, payload: bytes, now: float) -> None:
        if stream_id != 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise _ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self.ready:
                raise _ConnectionError(f.PROTOCOL_ERROR, "the server preface must start with SETTINGS")
            self._settings_acked = True
            return
        if len(payload) % 6:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, "SETTINGS size")
        self.ready = True
        for i in range(0, len(payload), 6):
            ident, value = f.SETTING.unpack_from(payload, i)
            if ident == f.MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif ident == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise _ConnectionError(f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > f.MAX_WINDOW:
                        raise _ConnectionError(f.FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            elif ident == f.MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_MAX_FRAME:
                    raise _ConnectionError(f.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == f.MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = value
            elif ident == f.ENABLE_PUSH and value > 1:
                raise _ConnectionError(f.PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            # HEADER_TABLE_SIZE: our blocks use no dynamic table, so any size is fine
        self.out.append(f.SETTINGS_ACK)
        if self._blocked:
            self._pump()

    def _goaway(self, last: int, code: int, debug: str) -> None:
        if self.goaway is not None and last > self.goaway[0]:
            raise _ConnectionError(f.PROTOCOL_ERROR, "GOAWAY with a higher last stream id")
        self.goaway = (last, code, debug)
        self.accepting = False
        reason = f"GOAWAY {h2_error_name(code)}" + (f": {debug}" if debug else "")
        self.close_reason = reason
        # the server will not process streams above ``last``: they fail as never processed (safe to retry)
        for stream in [s for sid, s in self.streams.items() if sid > last]:
            stream.unprocessed = True
            self._end(stream, UNAVAILABLE, f"the connection is draining ({reason})", [])
        waiting, self.waiting = self.waiting, deque()
        for stream in waiting:
            if not stream.ended:
                stream.unprocessed = True
                self._end(stream, UNAVAILABLE, f"the connection is draining ({reason})", [])

    def _rst_stream(self, stream: ClientStream, code: int) -> None:
        grpc_code = RST_TO_GRPC.get(code, UNKNOWN)
        if code == f.REFUSED_STREAM:
            stream.unprocessed = True
        if grpc_code == CANCELLED and self._past_deadline(stream):
            grpc_code = DEADLINE_EXCEEDED  # grpc-go: a CANCEL after our deadline is the deadline
        message = f"stream terminated by RST_STREAM with error code: {h2_error_name(code)}"
        self._end(stream, grpc_code, message, [])  # never answer RST_STREAM with RST_STREAM (RFC 9113 5.4.2)

    # ---- streams ending ----------------------------------------------------------------------------------

    def _end(self, stream: ClientStream, code: int, message: str, trailers: Headers) -> None:
        """Forget a stream and tell its application, once."""
        if stream.ended:
            return
        stream.ended = True
        if stream.bucket:
            bucket = self._buckets.get(stream.bucket)
            if bucket is not None:
                bucket.discard(stream)
        if stream.id:
            if self.streams.pop(stream.id, None) is not None and self.waiting:
                self.wakeup()  # a slot freed: the driver's flush starts waiting streams
            if stream.pending is not None:
                self._blocked.pop(stream.id, None)
        stream.pending = None
        stream.app.end(stream, code, message, trailers)
        if self.goaway is not None and not self.streams and not self.closed:
            self._finish("GOAWAY received and no streams left")

    def _close_remote(self, stream: ClientStream, code: int, message: str, trailers: Headers) -> None:
        """The server ended the stream with END_STREAM. A request still being sent is reset with NO_ERROR, as
        grpc-go does: the status is known, the rest of the request is not wanted."""
        if not stream.local_closed and stream.id and not self.closed:
            self._queue(f.rst_stream(stream.id, f.NO_ERROR))
        if code and code in (CANCELLED, UNKNOWN) and self._past_deadline(stream):
            # etcd's grpc-go answers a handler's expired context as UNKNOWN "context deadline exceeded"; its
            # timer and ours fire together, and a grpc client reports its own deadline: so do we
            code, message = DEADLINE_EXCEEDED, DEADLINE_MESSAGE
        self._end(stream, code, message, trailers)

    def _past_deadline(self, stream: ClientStream) -> bool:
        # 5 ms: the server's timer may fire just before ours (event-loop timers are late by up to a tick)
        return stream.deadline is not None and self.last_activity >= stream.deadline - 0.005

    def _reset(self, stream: ClientStream, h2_code: int, code: int, message: str) -> None:
        """We end a stream the server got wrong: RST_STREAM to the server, ``code`` to the application."""
        if stream.id and not self.closed:
            self._queue(f.rst_stream(stream.id, h2_code))
        self._end(stream, code, message, [])

    def pump_waiting(self, now: float) -> None:
        """Start streams that wait for a slot (the driver calls this after output was queued by an end)."""
        if self.waiting and len(self.streams) < self.peer_max_streams:
            self._start_waiting(now)

    # ---- deadlines ---------------------------------------------------------------------------------------

    def _add_deadline(self, stream: ClientStream) -> None:
        assert stream.deadline is not None
        key = int(stream.deadline * DEADLINE_HZ) + 1  # the bucket's time is at or after the deadline
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._bucket_keys, key)
        bucket.add(stream)
        stream.bucket = key

    @staticmethod
    def due_time(deadline: float) -> float:
        """When ``expire`` will end a call with this deadline (the driver arms its one timer for it)."""
        return (int(deadline * DEADLINE_HZ) + 1) / DEADLINE_HZ

    @property
    def next_deadline(self) -> float | None:
        keys, buckets = self._bucket_keys, self._buckets
        while keys and not buckets.get(keys[0]):
            buckets.pop(heapq.heappop(keys), None)
        return keys[0] / DEADLINE_HZ if keys else None

    def expire(self, now: float) -> float | None:
        """End calls whose deadline passed (RST_STREAM CANCEL, DEADLINE_EXCEEDED); -> the next due time."""
        keys, buckets = self._bucket_keys, self._buckets
        while keys and keys[0] / DEADLINE_HZ <= now:
            bucket = buckets.pop(heapq.heappop(keys), None)
            for stream in list(bucket or ()):
                if not stream.ended:
                    self.cancel(stream, DEADLINE_EXCEEDED, DEADLINE_MESSAGE)
        return self.next_deadline

    # ---- connection-level ----------------------------------------------------------------------------------

    def tick(self, now: float, keepalive_time: float, keepalive_timeout: float) -> None:
        """Timers, called by the driver periodically: the SETTINGS ack timeout and keepalive pings (grpc-go's
        client keepalive: a ping after ``keepalive_time`` without any frame received while calls are open;
        the connection fails if nothing arrives within ``keepalive_timeout`` of it)."""
        if self.closed:
            return
        if not self._settings_acked and now - self._settings_sent_at > self.settings.settings_timeout_s:
            self.terminate(f.SETTINGS_TIMEOUT, "SETTINGS not acknowledged")
            return
        if self._ping_sent is not None and self.last_activity > self._ping_sent_at:
            self._ping_sent = None  # any frame since the ping proves the connection alive (as grpc-go)
        if self._ping_sent is not None:
            if now - self._ping_sent_at >= keepalive_timeout:
                self.terminate(f.NO_ERROR, "keepalive ping failed to receive ACK within timeout")
            return
        if keepalive_time > 0 and self.streams and now - self.last_activity >= keepalive_time:
            self._ping_count += 1
            self.pings_sent += 1
            self._ping_sent = b"ka" + self._ping_count.to_bytes(6, "big")
            self._ping_sent_at = now
            self._queue(f.ping(self._ping_sent))

    def terminate(self, code: int, debug: str) -> None:
        """A connection error on our side: GOAWAY, then every call fails UNAVAILABLE."""
        if self.closed:
            return
        self._queue(f.goaway(0, code, debug.encode()[:256]))
        self.connection_lost(debug)

    def _finish(self, reason: str) -> None:
        self.closed = True
        self.accepting = False
        if not self.close_reason:
            self.close_reason = reason
        self.wakeup()

    def close(self, reason: str = "closed by the client") -> None:
        """Graceful close from our side: GOAWAY(NO_ERROR) and fail what is still open."""
        self.terminate(f.NO_ERROR, reason)

    def connection_lost(self, reason: str) -> None:
        """The socket is gone (or we give up on it): every call ends UNAVAILABLE; waiting ones never left."""
        if not self.close_reason:
            self.close_reason = reason
        self.closed = True
        self.accepting = False
        message = f"connection lost: {reason}"
        for stream in list(self.streams.values()):
            self._end(stream, UNAVAILABLE, message, [])
        waiting, self.waiting = self.waiting, deque()
        for stream in waiting:
            if not stream.ended:
                stream.unprocessed = True
                self._end(stream, UNAVAILABLE, message, [])
        self.wakeup()

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self.streams),
            "waiting": len(self.waiting),
            "send_window": self.send_window,
            "recv_window": self.recv_window,
            "memo_hits": self.decoder.hits,
            "pings_sent": self.pings_sent,
        }
