"""A sans-I/O HTTP/2 server connection that serves gRPC (RFC 9113, grpc's PROTOCOL-HTTP2).

``ServerConnection.receive(data)`` parses bytes from the client and calls the application (``Application``) for
new calls, messages, half-closes and resets; the application answers through ``send_*`` methods. Everything
to write accumulates in ``out`` and is taken with ``take_output()`` by the driver (protocol.py), which writes it
once per read and once per loop turn. Time enters only through ``tick(now)`` and the ``now`` arguments, so the
whole state machine runs in tests without sockets or an event loop.

Hot-path choices (DESIGN.md section 6): no per-frame objects (frames are parsed with one struct unpack in a
loop), header blocks memoized (hpackmemo), response header blocks are constant bytes, a unary answer is one
bytes join. Per-connection counters live on the instance, never on the class.

Stream states (RFC 9113 5.1), from the server's side: a stream is in ``streams`` while open or half-closed;
``remote_closed`` is set once the client sent END_STREAM, ``local_closed`` once we did. A stream leaves
``streams`` when both are set or when it is reset; ids of streams we reset are remembered for a while so that
frames the client sent before it saw our RST_STREAM are ignored, as 5.1 requires.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol

from etcdproxy.h2 import frames as f
from etcdproxy.h2 import grpcwire as gw
from etcdproxy.h2.hpackmemo import DecodeError, MemoDecoder, OversizedError


class ConnectionError_(Exception):
    def __init__(self, code: int, debug: str = "") -> None:
        super().__init__(debug)
        self.code = code
        self.debug = debug


class StreamError(Exception):
    def __init__(self, stream_id: int, code: int) -> None:
        super().__init__(stream_id, code)
        self.stream_id = stream_id
        self.code = code


class Settings:
    """Local limits of a connection (advertised in our SETTINGS where the RFC has a setting)."""

    __slots__ = (
        "connection_window",
        "flood_burst",
        "flood_rate",
        "keepalive_min_time_s",
        "max_concurrent_streams",
        "max_header_block",
        "max_header_list_size",
        "max_receive_message",
        "max_unread_per_stream",
        "reset_burst",
        "reset_rate",
        "settings_timeout_s",
        "stream_window",
    )

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 2**31 - 1,
        max_receive_message: int = 4 * 1024 * 1024,
        keepalive_min_time_s: float = 5.0,
    ) -> None:
        self.max_concurrent_streams = min(max_concurrent_streams, 2**31 - 1)
        self.max_receive_message = max_receive_message
        self.keepalive_min_time_s = keepalive_min_time_s
        self.stream_window = 1 << 20
        self.connection_window = 1 << 24
        self.max_header_list_size = 65536
        self.max_header_block = 256 * 1024  # encoded HEADERS + CONTINUATION bytes of one block
        self.max_unread_per_stream = 1 << 20  # received, not yet taken by the application: stop crediting
        self.settings_timeout_s = 10.0
        # frames that carry no request and make us answer or work (SETTINGS, PING, PRIORITY, empty DATA and
        # CONTINUATION, unknown types; not WINDOW_UPDATE or RST_STREAM, which busy clients send all the time):
        # a leaky bucket of this burst, drained at this rate per second
        self.flood_burst = 1000
        self.flood_rate = 1000.0
        # streams the client resets before we finished them (CVE-2023-44487)
        self.reset_burst = 1000
        self.reset_rate = 500.0


class Stream:
    """One request stream. ``app`` is the application's object for the call."""

    __slots__ = (
        "app",
        "content_length",
        "data",
        "encoding",
        "finished",
        "head",
        "headers_sent",
        "id",
        "local_closed",
        "pending",
        "pending_bytes",
        "received",
        "remote_closed",
        "send_window",
        "trailers",
        "uncredited",
        "unread",
    )

    def __init__(self, stream_id: int, send_window: int, head: gw.RequestHead | None = None) -> None:
        self.id = stream_id
        self.app: Any = None
        self.head = head
        self.data: bytes | bytearray = b""  # received bytes not yet split into gRPC messages
        self.encoding = b"identity" if head is None else head.encoding
        self.content_length = None if head is None else head.content_length
        self.received = 0  # DATA payload bytes, for content-length
        self.send_window = send_window
        self.pending: deque[bytes] | None = None  # DATA payloads waiting for flow-control window
        self.pending_bytes = 0
        self.trailers: bytes | None = None  # to send once pending is empty
        self.headers_sent = False
        self.remote_closed = False
        self.local_closed = False
        self.finished = False  # the application ended the call (trailers queued or sent)
        self.uncredited = 0  # bytes received and not yet given back with a stream WINDOW_UPDATE
        self.unread = 0  # bytes of messages given to the application and not yet consumed


class Application(Protocol):
    """What a connection calls. ``request`` is a new call with a valid head; ``message`` a complete
    (decompressed) request message; ``end`` the client's half-close; ``reset`` the end of a call the
    application did not finish (client RST_STREAM, connection closed).

    An application may also have ``complete(conn, stream, message)``: called instead of ``message`` then
    ``end`` when one DATA frame holds the whole (uncompressed) request message and ends the stream, the
    common shape of a unary call (no per-message window accounting, ``consumed`` need not be called)."""

    def request(self, conn: ServerConnection, stream: Stream, head: gw.RequestHead) -> None: ...

    def message(self, conn: ServerConnection, stream: Stream, message: bytes) -> None: ...

    def end(self, conn: ServerConnection, stream: Stream) -> None: ...

    def reset(self, conn: ServerConnection, stream: Stream) -> None: ...


_unpack_head = f.HEADER.unpack_from
_HEADERS_END_HEADERS = bytes((f.HEADERS, f.END_HEADERS))
_HEADERS_END_STREAM = bytes((f.HEADERS, f.END_HEADERS | f.END_STREAM))
_RESPONSE_HEADERS_LEN = len(gw.RESPONSE_HEADERS).to_bytes(3, "big")
_RESPONSE_HEAD = _RESPONSE_HEADERS_LEN + _HEADERS_END_HEADERS
_TRAILER_OK_HEAD = len(gw.TRAILER_OK).to_bytes(3, "big") + _HEADERS_END_STREAM
# a whole unary answer is these two packs around the message: HEADERS (constant block) and the DATA frame's
# head with the gRPC message prefix; then the OK trailers (a constant block)
_pack_unary_head = struct.Struct(f">5sL{len(gw.RESPONSE_HEADERS)}sHBHLBL").pack
_pack_trailers_ok = struct.Struct(f">5sL{len(gw.TRAILER_OK)}s").pack
_pack_data_head = struct.Struct(">HBHLBL").pack  # DATA frame head (type 0, no flags) + gRPC message prefix
_HEADERS_FLAGS_MASK = f.END_HEADERS | f.PADDED | f.PRIORITY_FLAG
RECENTLY_RESET = 128
GOAWAY_LINGER_S = 1.0  # an idle connection whose client sent GOAWAY is closed this long after it


def _last_headers(stream_id: int, block: bytes) -> bytes:
    """A HEADERS frame that ends the stream (trailers, or a trailers-only answer)."""
    return f.frame_head(f.HEADERS, f.END_HEADERS | f.END_STREAM, stream_id, len(block)) + block


class ServerConnection:
    """One client connection's HTTP/2 state. Not thread-safe; all calls on one event loop."""

    def __init__(self, app: Application, settings: Settings, now: float, wakeup: Callable[[], None]) -> None:
        self.app = app
        self.settings = settings
        self.wakeup = wakeup  # output was queued outside receive(): the driver schedules a write
        self._complete: Callable[[ServerConnection, Stream, bytes], None] | None = getattr(app, "complete", None)
        self._receiving = False  # inside receive(): the driver writes when it returns, no wakeup needed
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.closed = False  # no more input is processed; the driver closes after writing out
        self.close_reason = ""
        self._buffer = b""
        self._preface = False
        self._got_settings = False
        self.decoder = MemoDecoder(settings.max_header_list_size * 4)
        self._heads: dict[bytes, tuple[list[tuple[bytes, bytes]], gw.RequestHead]] = {}
        self.write_paused = False  # set by the driver while the socket's buffer is full
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        # recently ended stream ids, bounded by clearing (cheaper per call than an LRU; forgetting an id only turns
        # a late frame's STREAM_CLOSED / silent drop into the error for an id below the last one)
        self._reset_ids: set[int] = set()
        self._closed_ids: set[int] = set()
        self._block: bytearray | None = None  # a header block being continued
        self._block_stream = 0
        self._block_flags = 0
        self._block_self_dependent = False
        # flow control
        self.send_window = f.DEFAULT_WINDOW
        self.peer_initial_window = f.DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME
        self.recv_window = settings.connection_window
        self._conn_uncredited = 0
        self._blocked: OrderedDict[int, Stream] = OrderedDict()  # streams with pending DATA, served round-robin
        self._data_frames_sent = 0  # DATA frames we sent: the allowance of WINDOW_UPDATEs a client may send
        self._window_updates = 0
        # limits
        self._settings_sent_at = now
        self._settings_acked = False
        self._flood = 0.0
        self._flood_at = now
        self._resets = 0.0
        self._resets_at = now
        self._ping_strikes = 0
        self._last_ping_at = -1e18
        self._reset_ping_strikes = False
        self._ping_sent: bytes | None = None
        self._ping_sent_at = 0.0
        self.last_activity = now
        # GOAWAY state
        self.goaway_received = False
        self._goaway_received_at = 0.0  # when the client's GOAWAY came (tick() closes an idle connection after it)
        self.draining = False  # we sent a GOAWAY: no new streams above self._goaway_last
        self._goaway_last = f.MAX_STREAM_ID
        self._drain_ping = b""  # the PING of phase one of a graceful shutdown
        self._drain_started = 0.0
        # our SETTINGS first (RFC 9113 3.4), and the connection window raised to ours
        s = settings
        self.out.append(
            f.settings(
                [
                    (f.MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
                    (f.INITIAL_WINDOW_SIZE, s.stream_window),
                    (f.MAX_HEADER_LIST_SIZE, s.max_header_list_size),
                ]
            )
        )
        if s.connection_window > f.DEFAULT_WINDOW:
            self.out.append(f.window_update(0, s.connection_window - f.DEFAULT_WINDOW))
            self.recv_window = s.connection_window

    # ---- output ----------------------------------------------------------------------------------------

    def take_output(self) -> bytes:
        data = b"".join(self.out) if len(self.out) != 1 else self.out[0]
        self.out.clear()
        self.out_bytes = 0
        return data

    def _queue(self, data: bytes) -> None:
        wake = not self.out and not self._receiving
        self.out.append(data)
        self.out_bytes += len(data)
        if wake:
            self.wakeup()

    # ---- input -----------------------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """Process bytes from the client. Protocol errors become GOAWAY (and ``closed``)."""
        if self.closed:
            return
        self.last_activity = now
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        self._receiving = True
        try:
            pos = 0
            if not self._preface:
                if len(data) < 24:
                    if not f.PREFACE.startswith(data):
                        raise ConnectionError_(f.PROTOCOL_ERROR, "invalid connection preface")
                    self._buffer = data
                    return
                if data[:24] != f.PREFACE:
                    raise ConnectionError_(f.PROTOCOL_ERROR, "invalid connection preface")
                self._preface = True
                pos = 24
            self._frames(data, pos, now)
        except ConnectionError_ as exc:
            self.terminate(exc.code, exc.debug)
            return
        finally:
            self._receiving = False
        self._credit_connection()

    def _frames(self, data: bytes, pos: int, now: float) -> None:
        n = len(data)
        max_frame = f.DEFAULT_MAX_FRAME  # we never raise our SETTINGS_MAX_FRAME_SIZE
        while n - pos >= 9:
            hi, lo, kind, flags, stream_id = _unpack_head(data, pos)
            length = (hi << 8) | lo
            if length > max_frame:
                raise ConnectionError_(f.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            end = pos + 9 + length
            if end > n:
                break
            stream_id &= 0x7FFFFFFF
            payload = data[pos + 9 : end]
            pos = end
            if not self._got_settings:
                if kind != f.SETTINGS or flags & f.ACK:
                    raise ConnectionError_(f.PROTOCOL_ERROR, "the client preface must end with SETTINGS")
                self._got_settings = True
            if self._block is not None and kind != f.CONTINUATION:
                raise ConnectionError_(f.PROTOCOL_ERROR, "expected CONTINUATION")
            try:
                if kind == f.DATA:
                    self._data(stream_id, flags, payload, length, now)
                elif kind == f.HEADERS:
                    if flags & _HEADERS_FLAGS_MASK == f.END_HEADERS and stream_id:  # the usual: one whole block
                        self._header_block(stream_id, flags, payload, now, False)
                    else:
                        self._headers(stream_id, flags, payload, now)
                elif kind == f.CONTINUATION:
                    self._continuation(stream_id, flags, payload, now)
                elif kind == f.WINDOW_UPDATE:
                    self._window_update(stream_id, payload, now)
                elif kind == f.PING:
                    self._ping(stream_id, flags, payload, now)
                elif kind == f.SETTINGS:
                    self._settings(stream_id, flags, payload, now)
                elif kind == f.RST_STREAM:
                    self._rst_stream(stream_id, payload, now)
                elif kind == f.PRIORITY:
                    self._priority(stream_id, payload, now)
                elif kind == f.GOAWAY:
                    if stream_id != 0:
                        raise ConnectionError_(f.PROTOCOL_ERROR, "GOAWAY on a stream")
                    if length < 8:
                        raise ConnectionError_(f.FRAME_SIZE_ERROR, "GOAWAY too short")
                    if not self.goaway_received:
                        self.goaway_received = True
                        self._goaway_received_at = now  # idle: tick() closes a little later (frames may follow)
                elif kind == f.PUSH_PROMISE:
                    raise ConnectionError_(f.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                else:
                    self._cheap(now)  # unknown frame types are ignored (RFC 9113 5.5), but counted
            except StreamError as exc:
                self._reset_stream(exc.stream_id, exc.code)
            if self.closed:
                return
        if pos < n:
            self._buffer = data[pos:]

    def _cheap(self, now: float) -> None:
        """Count a frame that costs us work but carries no request (flood protection)."""
        s = self.settings
        level = self._flood - (now - self._flood_at) * s.flood_rate
        self._flood = (level if level > 0 else 0.0) + 1
        self._flood_at = now
        if self._flood > s.flood_burst:
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, "too many control frames")

    @staticmethod
    def _unpad(payload: bytes) -> bytes:
        if not payload:
            raise ConnectionError_(f.PROTOCOL_ERROR, "PADDED frame without pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise ConnectionError_(f.PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - pad]

    # ---- DATA ------------------------------------------------------------------------------------------

    def _data(self, stream_id: int, flags: int, payload: bytes, length: int, now: float) -> None:
        if stream_id == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "DATA on stream 0")
        # every DATA frame counts against the connection window, whatever its stream's state (6.9)
        if length > self.recv_window:
            raise ConnectionError_(f.FLOW_CONTROL_ERROR, "connection flow-control window exceeded")
        self.recv_window -= length
        self._conn_uncredited += length
        if flags & f.PADDED:
            payload = self._unpad(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, "DATA on an idle stream")
            if stream_id in self._reset_ids:
                return  # sent before the client saw our RST_STREAM
            raise StreamError(stream_id, f.STREAM_CLOSED)
        if stream.remote_closed:
            raise StreamError(stream_id, f.STREAM_CLOSED)
        if not payload and not flags & f.END_STREAM:
            self._cheap(now)
        size = len(payload)
        stream.received += size
        # stream flow control: what we advertised is INITIAL_WINDOW_SIZE minus what was not credited back
        stream.uncredited += length
        if stream.uncredited > self.settings.stream_window:
            raise StreamError(stream_id, f.FLOW_CONTROL_ERROR)
        if (
            flags & f.END_STREAM
            and not stream.data
            and size >= 5
            and payload[0] == 0
            and int.from_bytes(payload[1:5], "big") == size - 5
            and (stream.content_length is None or stream.content_length == stream.received)
            and size - 5 <= self.settings.max_receive_message
            and self._complete is not None
        ):
            # the common unary request: exactly one uncompressed message, and the stream ends with it (no
            # _maybe_close after it: an answer closes the stream through _local_end, which checks both sides)
            stream.remote_closed = True
            stream.unread += size - 5  # as _append counts it: an application that calls consumed() stays exact
            self._complete(self, stream, payload[5:])
            return
        if payload:
            self._append(stream, payload)
            if stream_id not in self.streams:
                return  # the application ended it while taking messages
        if flags & f.END_STREAM:
            stream.remote_closed = True
            if stream.content_length is not None and stream.content_length != stream.received:
                raise StreamError(stream_id, f.PROTOCOL_ERROR)
            if stream.data:  # an incomplete gRPC message at the end of the request
                self.finish_call(stream, gw.INTERNAL, "grpc: request ended inside a message")
                return
            self.app.end(self, stream)
            self._maybe_close(stream)
            return
        self._credit_stream(stream)

    def _append(self, stream: Stream, payload: bytes) -> None:
        """Split received bytes into gRPC messages (5-byte prefix: compressed flag, length) for the app."""
        buffered = stream.data
        if buffered:
            # a message spread over many frames: grow one buffer (re-joining bytes would copy O(n^2))
            if type(buffered) is not bytearray:
                buffered = bytearray(buffered)
            buffered += payload
            data: bytes | bytearray = buffered
            n = len(data)
            # the first message's length: more than the bytes here, within the limit (one decode of the prefix)
            if n >= 5 and n - 5 < int.from_bytes(data[1:5], "big") <= self.settings.max_receive_message:
                stream.data = buffered  # the first message is still incomplete: nothing to parse yet
                return
        else:
            data = payload
        pos, n = 0, len(data)
        limit = self.settings.max_receive_message
        while n - pos >= 5:
            size = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if size > limit:
                self.finish_call(stream, gw.RESOURCE_EXHAUSTED, str(gw.MessageTooLarge(size, limit)))
                return
            end = pos + 5 + size
            if end > n:
                break
            compressed = data[pos]
            message = bytes(data[pos + 5 : end])
            pos = end
            if compressed:
                if compressed != 1:
                    self.finish_call(stream, gw.INTERNAL, f"grpc: invalid compressed flag {compressed}")
                    return
                if stream.encoding != b"gzip":
                    if stream.encoding == b"identity":
                        text = "grpc: compressed flag set with identity or empty encoding"
                        self.finish_call(stream, gw.INTERNAL, text)
                    else:
                        name = stream.encoding.decode("latin-1")
                        self.finish_call(stream, 12, f'grpc: Decompressor is not installed for grpc-encoding "{name}"')
                    return
                try:
                    message = gw.gunzip(message, limit)
                except gw.MessageTooLarge as exc:
                    self.finish_call(stream, gw.RESOURCE_EXHAUSTED, str(exc))
                    return
                except Exception as exc:
                    self.finish_call(stream, gw.INTERNAL, f"grpc: failed to decompress the received message: {exc}")
                    return
            stream.unread += size
            self.app.message(self, stream, message)
            if stream.finished or stream.id not in self.streams:
                return
        if pos >= n:
            stream.data = b""
        elif pos:
            stream.data = data[pos:]
        else:
            stream.data = data

    def consumed(self, stream: Stream, size: int) -> None:
        """The application took a message of ``size`` bytes: its window may be credited back."""
        stream.unread -= size
        if stream.uncredited and not stream.remote_closed and stream.id in self.streams:
            before = len(self.out)
            self._credit_stream(stream)
            if len(self.out) != before and before == 0 and not self._receiving:
                self.wakeup()

    def _credit_stream(self, stream: Stream) -> None:
        # credited in batches of half a window, and only while the application keeps up (bounded memory)
        s = self.settings
        if stream.uncredited >= s.stream_window >> 1 and stream.unread < s.max_unread_per_stream:
            self.out.append(f.window_update(stream.id, stream.uncredited))
            stream.uncredited = 0

    def _credit_connection(self) -> None:
        if self._conn_uncredited >= self.settings.connection_window >> 1:
            self.out.append(f.window_update(0, self._conn_uncredited))
            self.recv_window += self._conn_uncredited
            self._conn_uncredited = 0

    # ---- HEADERS and CONTINUATION ------------------------------------------------------------------------

    def _headers(self, stream_id: int, flags: int, payload: bytes, now: float) -> None:
        if stream_id == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & f.PADDED:
            payload = self._unpad(payload)
        self_dependent = False
        if flags & f.PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionError_(f.FRAME_SIZE_ERROR, "HEADERS priority fields cut")
            # a stream depending on itself (5.3.1); the block must still be decoded to keep HPACK in step
            self_dependent = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == stream_id
            payload = payload[5:]
        if flags & f.END_HEADERS:
            self._header_block(stream_id, flags, payload, now, self_dependent)
        else:
            self._block = bytearray(payload)
            self._block_stream = stream_id
            self._block_flags = flags
            self._block_self_dependent = self_dependent

    def _continuation(self, stream_id: int, flags: int, payload: bytes, now: float) -> None:
        block = self._block
        if block is None or stream_id != self._block_stream:
            raise ConnectionError_(f.PROTOCOL_ERROR, "unexpected CONTINUATION")
        if not payload and not flags & f.END_HEADERS:
            self._cheap(now)
        block += payload
        if len(block) > self.settings.max_header_block:
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, "header block too large")
        if flags & f.END_HEADERS:
            self._block = None
            self._header_block(stream_id, self._block_flags, bytes(block), now, self._block_self_dependent)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return self.decoder.decode(block)
        except OversizedError as exc:
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, "header list too large") from exc
        except DecodeError as exc:
            raise ConnectionError_(f.COMPRESSION_ERROR, "invalid header block") from exc

    def _header_block(self, stream_id: int, flags: int, block: bytes, now: float, self_dependent: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client (a second HEADERS)
            headers = self._decode(block)
            if stream.remote_closed:
                raise StreamError(stream_id, f.STREAM_CLOSED)
            if not flags & f.END_STREAM or any(k[:1] == b":" for k, _ in headers):
                raise StreamError(stream_id, f.PROTOCOL_ERROR)
            stream.remote_closed = True
            if stream.data:
                self.finish_call(stream, gw.INTERNAL, "grpc: request ended inside a message")
                return
            self.app.end(self, stream)
            self._maybe_close(stream)
            return
        if stream_id <= self.last_stream_id:
            self._decode(block)
            if stream_id in self._closed_ids or stream_id in self._reset_ids:
                raise ConnectionError_(f.STREAM_CLOSED, "HEADERS on a closed stream")
            raise ConnectionError_(f.PROTOCOL_ERROR, "stream id not above the last one")
        if not stream_id & 1:
            raise ConnectionError_(f.PROTOCOL_ERROR, "even stream id from a client")
        head = self._head(block)
        self.last_stream_id = stream_id
        if self_dependent:
            self._reset_stream(stream_id, f.PROTOCOL_ERROR)
            return
        if self.goaway_received or stream_id > self._goaway_last:
            self._reset_stream(stream_id, f.REFUSED_STREAM)
            return
        if len(self.streams) >= self.settings.max_concurrent_streams:
            self._reset_stream(stream_id, f.REFUSED_STREAM)
            return
        if head.error is not None:
            status, code, message = head.error
            if status == 0:  # malformed (RFC 9113 8.1.1)
                self._reset_stream(stream_id, f.PROTOCOL_ERROR)
                return
            self._queue_headers_only(stream_id, gw.trailers_only(code, message, status), flags & f.END_STREAM == 0)
            return
        stream = Stream(stream_id, self.peer_initial_window, head)
        self.streams[stream_id] = stream
        end_stream = bool(flags & f.END_STREAM)
        if end_stream:
            stream.remote_closed = True
            if head.content_length:
                self.streams.pop(stream_id)
                raise StreamError(stream_id, f.PROTOCOL_ERROR)
        self.app.request(self, stream, head)
        if end_stream and stream.id in self.streams:
            self.app.end(self, stream)
            self._maybe_close(stream)

    def _head(self, block: bytes) -> gw.RequestHead:
        """The decoded and validated head of a request block, memoized with the decode: an entry is used only
        while the decoder's memo still holds the very header list it was made from (same table state)."""
        heads = self._heads
        entry = heads.get(block)
        if entry is not None and self.decoder.memo.get(block) is entry[0]:
            self.decoder.hits += 1
            return entry[1]
        headers = self._decode(block)
        head = gw.request_head(headers, self.settings.max_header_list_size)
        if self.decoder.memo.get(block) is headers:
            if len(heads) > 256:
                heads.clear()
            heads[block] = (headers, head)
        return head

    # ---- control frames --------------------------------------------------------------------------------

    def _window_update(self, stream_id: int, payload: bytes, now: float) -> None:
        if len(payload) != 4:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE size")
        # A client answers our DATA with at most a stream and a connection WINDOW_UPDATE per frame: more than
        # that (plus a burst) is a flood. Counted against our DATA frames, not time, so busy clients never trip it.
        self._window_updates += 1
        if self._window_updates > 2 * self._data_frames_sent + self.settings.flood_burst:
            raise ConnectionError_(f.ENHANCE_YOUR_CALM, "too many WINDOW_UPDATE frames")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ConnectionError_(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise ConnectionError_(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            if self._blocked:
                self._pump()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # closed streams: ignored (clients send these legitimately after our last DATA)
        if increment == 0:
            raise StreamError(stream_id, f.PROTOCOL_ERROR)
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            raise StreamError(stream_id, f.FLOW_CONTROL_ERROR)
        if stream.pending:
            self._pump()

    def _ping(self, stream_id: int, flags: int, payload: bytes, now: float) -> None:
        if stream_id != 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "PING size")
        if flags & f.ACK:
            if payload == self._ping_sent:
                self._ping_sent = None
            else:
                self._cheap(now)  # an ack of nothing we sent: a flood frame like any other
            return
        self._cheap(now)
        self.out.append(f.ping(payload, ack=True))
        # grpc-go's keepalive enforcement (http2_server.go handlePing)
        last, self._last_ping_at = self._last_ping_at, now
        if self._reset_ping_strikes:
            self._reset_ping_strikes = False
            self._ping_strikes = 0
            return
        min_time = self.settings.keepalive_min_time_s if self.streams else 7200.0
        if now - last < min_time:
            self._ping_strikes += 1
            if self._ping_strikes > 2:
                raise ConnectionError_(f.ENHANCE_YOUR_CALM, "too_many_pings")

    def _settings(self, stream_id: int, flags: int, payload: bytes, now: float) -> None:
        if stream_id != 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._settings_acked = True
            return
        if len(payload) % 6:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS size")
        self._cheap(now)
        for i in range(0, len(payload), 6):
            ident, value = f.SETTING.unpack_from(payload, i)
            if ident == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ConnectionError_(f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > f.MAX_WINDOW:
                        raise ConnectionError_(f.FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            elif ident == f.MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_MAX_FRAME:
                    raise ConnectionError_(f.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif ident == f.ENABLE_PUSH and value > 1:
                raise ConnectionError_(f.PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            # HEADER_TABLE_SIZE: our encoder uses no dynamic table, so any size is fine; others are ignored
        self.out.append(f.SETTINGS_ACK)
        if self._blocked:
            self._pump()

    def _rst_stream(self, stream_id: int, payload: bytes, now: float) -> None:
        if stream_id == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionError_(f.FRAME_SIZE_ERROR, "RST_STREAM size")
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionError_(f.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return  # a stream that ended meanwhile: cheap, and sent legitimately
        if not stream.finished:  # reset before we answered: the rapid-reset attack counts these
            s = self.settings
            level = self._resets - (now - self._resets_at) * s.reset_rate
            self._resets = (level if level > 0 else 0.0) + 1
            self._resets_at = now
            if self._resets > s.reset_burst:
                raise ConnectionError_(f.ENHANCE_YOUR_CALM, "too many streams reset by the client")
        else:
            self._cheap(now)
        self._drop(stream, remember=False)
        self._closed(stream_id)
        if self.goaway_received or self.draining:
            self._after_stream_closed()

    def _priority(self, stream_id: int, payload: bytes, now: float) -> None:
        if stream_id == 0:
            raise ConnectionError_(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise StreamError(stream_id, f.FRAME_SIZE_ERROR)
        self._cheap(now)
        if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == stream_id:
            raise StreamError(stream_id, f.PROTOCOL_ERROR)
        # priorities are advisory and deprecated (RFC 9113 5.3): streams are served round-robin

    # ---- streams ending ----------------------------------------------------------------------------------

    def _reset_stream(self, stream_id: int, code: int) -> None:
        self.out.append(f.rst_stream(stream_id, code))
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._drop(stream, remember=True)
        else:
            self._remember_reset(stream_id)

    def _remember_reset(self, stream_id: int) -> None:
        ids = self._reset_ids
        if len(ids) >= RECENTLY_RESET:
            ids.clear()
        ids.add(stream_id)

    def _closed(self, stream_id: int) -> None:
        ids = self._closed_ids
        if len(ids) >= RECENTLY_RESET:
            ids.clear()
        ids.add(stream_id)

    def _drop(self, stream: Stream, remember: bool) -> None:
        """Forget a stream that did not end normally; the application hears of it unless it ended it."""
        if self.streams.pop(stream.id, None) is None:
            return
        self._blocked.pop(stream.id, None)
        stream.pending = None
        if remember:
            self._remember_reset(stream.id)
        if not stream.finished:
            stream.finished = True
            self.app.reset(self, stream)

    def _maybe_close(self, stream: Stream) -> None:
        if stream.remote_closed and stream.local_closed and self.streams.pop(stream.id, None) is not None:
            self._closed(stream.id)
            if self.goaway_received or self.draining:
                self._after_stream_closed()

    def _after_stream_closed(self) -> None:
        # while draining, only after the final GOAWAY: before it, a client may still open a stream
        finished_drain = self.draining and self._goaway_last != f.MAX_STREAM_ID
        if (self.goaway_received or finished_drain) and not self.streams:
            self.closed = True
            self.close_reason = "GOAWAY and no streams left"
            self.wakeup()

    # ---- sending -----------------------------------------------------------------------------------------

    def _queue_headers_only(self, stream_id: int, block: bytes, client_still_sending: bool) -> None:
        self._queue(_last_headers(stream_id, block))
        self._reset_ping_strikes = True
        if client_still_sending:
            # grpc-go: an answer before the request ended is followed by RST_STREAM(NO_ERROR)
            self._queue(f.rst_stream(stream_id, f.NO_ERROR))
            self._remember_reset(stream_id)
        else:
            self._closed(stream_id)

    def send_unary(self, stream: Stream, message: bytes) -> None:
        """Headers, one message and OK trailers: the whole answer of a unary call, in one piece if it fits."""
        if stream.finished:
            return
        stream.finished = True
        size = len(message)
        n = size + 5
        if (
            not stream.headers_sent
            and n <= self.send_window
            and n <= stream.send_window
            and n <= self.peer_max_frame
            and stream.pending is None
        ):
            self.send_window -= n
            stream.send_window -= n
            self._data_frames_sent += 1
            sid = stream.id
            self._queue(
                b"".join(
                    (
                        _pack_unary_head(_RESPONSE_HEAD, sid, gw.RESPONSE_HEADERS, n >> 8, n & 0xFF, 0, sid, 0, size),
                        message,
                        _pack_trailers_ok(_TRAILER_OK_HEAD, sid, gw.TRAILER_OK),
                    )
                )
            )
            self._reset_ping_strikes = True
            if stream.remote_closed:  # the usual case, _local_end and _maybe_close inlined
                stream.local_closed = True
                if self.streams.pop(sid, None) is not None:
                    ids = self._closed_ids  # _closed() inlined
                    if len(ids) >= RECENTLY_RESET:
                        ids.clear()
                    ids.add(sid)
                    if self.goaway_received or self.draining:
                        self._after_stream_closed()
                return
            self._local_end(stream)
            return
        stream.finished = False
        self.send_message(stream, message)
        self.finish_call(stream, 0, "")

    def send_message(self, stream: Stream, message: bytes) -> None:
        """One gRPC message of a streaming answer (response headers first if not sent yet)."""
        if stream.finished or stream.id not in self.streams:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self._queue(_RESPONSE_HEAD + stream.id.to_bytes(4, "big") + gw.RESPONSE_HEADERS)
        self._reset_ping_strikes = True
        size = len(message)
        n = size + 5
        if stream.pending is None and n <= self.send_window and n <= stream.send_window and n <= self.peer_max_frame:
            self.send_window -= n
            stream.send_window -= n
            self._data_frames_sent += 1
            self._queue(_pack_data_head(n >> 8, n & 0xFF, 0, stream.id, 0, size) + message)
            return
        prefix = b"\x00" + size.to_bytes(4, "big")
        if stream.pending is None:
            stream.pending = deque()
        stream.pending.append(prefix + message)
        stream.pending_bytes += n
        self._blocked[stream.id] = stream
        self._pump()

    def finish_call(self, stream: Stream, code: int, message: str) -> None:
        """End a call with a status: trailers (after queued messages) or a trailers-only answer."""
        if stream.finished or stream.id not in self.streams:
            return
        stream.finished = True
        self._reset_ping_strikes = True
        if not stream.headers_sent:
            stream.headers_sent = True
            block = gw.trailers_only(code, message)
            self._queue(_last_headers(stream.id, block))
            self._local_end(stream)
            return
        block = gw.trailers(code, message)
        if stream.pending:
            stream.trailers = block
            return
        self._queue(f.frame_head(f.HEADERS, f.END_HEADERS | f.END_STREAM, stream.id, len(block)) + block)
        self._local_end(stream)

    def _local_end(self, stream: Stream) -> None:
        stream.local_closed = True
        if not stream.remote_closed:
            # grpc-go: the call is over; tell a client still sending to stop, and forget the stream
            self._queue(f.rst_stream(stream.id, f.NO_ERROR))
            self.streams.pop(stream.id, None)
            self._blocked.pop(stream.id, None)
            self._remember_reset(stream.id)
            self._after_stream_closed()
            return
        self._maybe_close(stream)

    def reset(self, stream: Stream, code: int = f.CANCEL) -> None:
        """The application abandons a call (RST_STREAM)."""
        if stream.id in self.streams:
            stream.finished = True
            self._queue(f.rst_stream(stream.id, code))
            self.streams.pop(stream.id, None)
            self._blocked.pop(stream.id, None)
            self._remember_reset(stream.id)
            self._after_stream_closed()

    def writable(self, stream: Stream) -> bool:
        """False while the stream has DATA waiting for window: a streaming writer should wait (``unblocked``)."""
        return stream.pending is None

    def _pump(self) -> None:
        """Send queued DATA as windows allow, one frame per blocked stream per round (fair between streams)."""
        blocked = self._blocked
        while blocked and self.send_window > 0:
            progress = False
            for stream in list(blocked.values()):
                room = min(self.send_window, stream.send_window, self.peer_max_frame)
                pending = stream.pending
                if room <= 0 or not pending:
                    continue
                chunk = pending[0]
                if len(chunk) > room:
                    pending[0] = chunk[room:]
                    chunk = chunk[:room]
                else:
                    pending.popleft()
                k = len(chunk)
                self.send_window -= k
                stream.send_window -= k
                stream.pending_bytes -= k
                self._data_frames_sent += 1
                self._reset_ping_strikes = True  # grpc-go resets the strikes on every DATA frame it writes
                self._queue(f.frame_head(f.DATA, 0, stream.id, k) + chunk)
                progress = True
                if not pending:
                    stream.pending = None
                    del blocked[stream.id]
                    if stream.trailers is not None:
                        block, stream.trailers = stream.trailers, None
                        self._queue(_last_headers(stream.id, block))
                        self._local_end(stream)
                    elif stream.app is not None:
                        unblocked = getattr(stream.app, "unblocked", None)
                        if unblocked is not None:
                            unblocked()
            if not progress:
                break

    # ---- connection-level actions ------------------------------------------------------------------------

    def terminate(self, code: int, debug: str = "") -> None:
        """A connection error: GOAWAY with the last stream we processed, then close."""
        if self.closed:
            return
        self._queue(f.goaway(self.last_stream_id, code, debug.encode()[:256]))
        self.closed = True
        self.close_reason = debug or f"error {code}"
        self.connection_lost()

    def connection_lost(self) -> None:
        """The socket is gone (or we close it): every unfinished call is reset for the application."""
        self.closed = True
        for stream in list(self.streams.values()):
            self._drop(stream, remember=False)

    def start_drain(self, now: float) -> None:
        """Phase one of a graceful shutdown: GOAWAY with the maximum id (clients stop opening streams on
        this connection) and a PING; ``tick`` sends the final GOAWAY once the PING is acked (or after 1 s)."""
        if self.draining or self.closed:
            return
        self.draining = True
        self._queue(f.goaway(f.MAX_STREAM_ID, f.NO_ERROR, b"graceful_stop"))
        self._drain_ping = b"drain\x00\x00\x01"
        self._drain_started = now
        self._queue(f.ping(self._drain_ping))
        self._ping_sent = self._drain_ping

    def tick(self, now: float, keepalive_interval_s: float, keepalive_timeout_s: float) -> None:
        """Timers, called by the driver about once a second: SETTINGS ack timeout, keepalive pings, drain."""
        if self.closed:
            return
        if self.goaway_received and not self.streams and now - self._goaway_received_at >= GOAWAY_LINGER_S:
            self.closed = True  # the client said it is done and nothing is open
            self.close_reason = "GOAWAY from the client"
            self.wakeup()
            return
        if not self._settings_acked and now - self._settings_sent_at > self.settings.settings_timeout_s:
            self.terminate(f.SETTINGS_TIMEOUT, "SETTINGS not acknowledged")
            return
        if self.draining and self._goaway_last == f.MAX_STREAM_ID:
            if self._ping_sent is None or now - self._drain_started > 1.0:
                self._goaway_last = self.last_stream_id
                self._queue(f.goaway(self.last_stream_id, f.NO_ERROR, b"graceful_stop"))
                self._ping_sent = None
                if not self.streams:
                    self.closed = True
                    self.close_reason = "drained"
            return
        if self._ping_sent is not None:
            if keepalive_timeout_s > 0 and now - self._ping_sent_at > keepalive_timeout_s:
                self.terminate(f.NO_ERROR, "keepalive ping not acknowledged")
            return
        if keepalive_interval_s > 0 and now - self.last_activity > keepalive_interval_s:
            self._ping_sent = struct.pack(">d", now)
            self._ping_sent_at = now
            self._queue(f.ping(self._ping_sent))
