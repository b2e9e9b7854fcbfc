"""The asyncio driver of a ``ClientConnection`` and the small call API the hub uses towards etcd.

One ``Channel`` is one HTTP/2 connection (h2c, or TLS with ALPN ``h2``); every unary call and stream is
multiplexed on it. It never reconnects: when the connection breaks (reset, GOAWAY, keepalive timeout, our own
close) ``closed`` resolves with the reason and ``on_close(reason)`` is called once; the owner makes a new Channel.
Calls that had not reached the server end ``UNAVAILABLE`` with ``unprocessed`` set, so the owner may retry them.

Costs per call, as on the server side: no Task per call (a unary call is one future, or one callback with
``start_unary``), one socket write per loop turn for everything queued in it (``_wake`` schedules one
``call_soon``), one timer per connection for all deadlines (re-armed only when an earlier deadline arrives) and one
periodic tick for keepalive. Works with uvloop (its transports are not ``asyncio.Transport`` instances: only their
methods are used).

Use (construct inside a running loop)::

    channel = Channel(host, port, ssl_context=None, keepalive_time_s=10, keepalive_timeout_s=5, on_close=cb)
    await channel.connect(3.0)                      # OSError / TimeoutError / ssl.SSLError
    code, message, payload = await channel.unary("/etcdserverpb.KV/Range", request, metadata, timeout_s)
    code, message, payload, unprocessed = await channel.unary_ex(...)        # unprocessed: safe to retry
    stream = channel.start_unary(path, request, metadata, timeout_s, done)  # done(code, message, payload, unproc.)
    call = channel.stream("/etcdserverpb.Watch/Watch", metadata)            # or on_message=..., on_end=...
    call.send(request); call.half_close(); message = await call.recv()      # None at the end: call.code/.details
    call.cancel(); await channel.close()

Keepalive: pings go out only while calls are open and the connection was silent for ``keepalive_time_s`` (grpc-go's
client policy). etcd enforces ``--grpc-keepalive-min-time`` (5 s by default): faster pings on a quiet connection
earn a GOAWAY ``too_many_pings`` after three; grpc-go clients then double their interval (``too_many_pings``).
TLS: the context gets ALPN ``h2``; for ``--insecure-skip-tls-verify`` pass one with ``check_hostname = False``
and ``verify_mode = ssl.CERT_NONE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

from etcdproxy.h2.client import (
    CANCEL_MESSAGE,
    CANCELLED,
    OK,
    UNAVAILABLE,
    ClientConnection,
    ClientSettings,
    ClientStream,
    Headers,
    Metadata,
)

log = logging.getLogger(__name__)
ENHANCE_YOUR_CALM = 0xB

Reply = tuple[int, str, bytes | None]


class _Unary:
    """The application object of a unary call: one message, then the status (to a future)."""

    __slots__ = ("future", "payload", "unprocessed")

    def __init__(self, future: asyncio.Future[Reply]) -> None:
        self.future = future
        self.payload: bytes | None = None
        self.unprocessed = False

    def headers(self, stream: ClientStream, headers: Headers) -> None:
        pass

    def message(self, stream: ClientStream, message: bytes) -> None:
        if self.payload is not None:
            # grpc-go's words for a unary response with two messages
            self.payload = None
            stream.app = _Discard(self)
            self._resolve(13, "cardinality violation: expected <EOF> for non server-streaming RPCs, but received "
                              "another message", None)  # fmt: skip
            return
        self.payload = message

    def end(self, stream: ClientStream, code: int, message: str, trailers: Headers) -> None:
        self.unprocessed = stream.unprocessed
        if code == OK:
            if self.payload is None:
                self._resolve(13, "cardinality violation: received no response message from non-server-streaming RPC",
                              None)  # fmt: skip
                return
            self._resolve(OK, message, self.payload)
            return
        self._resolve(code, message, None)

    def _resolve(self, code: int, message: str, payload: bytes | None) -> None:
        if not self.future.done():
            self.future.set_result((code, message, payload))


class _UnaryCallback(_Unary):
    """A unary call answered through a callback instead of a future (no await, no Task wake-up)."""

    __slots__ = ("done", "finished")

    def __init__(self, done: Callable[[int, str, bytes | None, bool], None]) -> None:
        self.done = done
        self.finished = False
        self.payload = None
        self.unprocessed = False

    def _resolve(self, code: int, message: str, payload: bytes | None) -> None:
        if not self.finished:
            self.finished = True
            try:
                self.done(code, message, payload, self.unprocessed)
            except Exception:
                log.exception("unary callback failed")


class _Discard:
    """Takes what a call already answered still receives."""

    __slots__ = ("unary",)

    def __init__(self, unary: _Unary) -> None:
        self.unary = unary

    def headers(self, stream: ClientStream, headers: Headers) -> None:
        pass

    def message(self, stream: ClientStream, message: bytes) -> None:
        pass

    def end(self, stream: ClientStream, code: int, message: str, trailers: Headers) -> None:
        self.unary.unprocessed = stream.unprocessed


class StreamCall:
    """A streaming call (server-, client- or bidi-streaming). ``send`` queues a request message (flow control
    is the connection's; ``await wait_writable()`` to follow it), ``half_close`` ends the request side,
    ``await recv()`` returns the next response message or None after the last; then ``code``/``details``."""

    __slots__ = (
        "_channel",
        "_end_waiter",
        "_messages",
        "_waiter",
        "_writable_waiter",
        "code",
        "details",
        "initial_metadata",
        "on_end",
        "on_message",
        "stream",
        "trailers",
        "unprocessed",
    )

    def __init__(
        self,
        channel: Channel,
        on_message: Callable[[bytes], None] | None = None,
        on_end: Callable[[StreamCall], None] | None = None,
    ) -> None:
        self._channel = channel
        # callback mode: each message goes to on_message as it arrives (and counts as consumed), no recv()
        self.on_message = on_message
        self.on_end = on_end
        self._messages: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._writable_waiter: asyncio.Future[None] | None = None
        self._end_waiter: asyncio.Future[None] | None = None
        self.code: int | None = None  # set at the end
        self.details = ""
        self.trailers: Headers = []
        self.initial_metadata: Headers = []
        self.unprocessed = False
        self.stream: ClientStream | None = None

    # ---- StreamApp ---------------------------------------------------------------------------------------

    def headers(self, stream: ClientStream, headers: Headers) -> None:
        self.initial_metadata = headers

    def message(self, stream: ClientStream, message: bytes) -> None:
        on_message = self.on_message
        if on_message is not None:
            self._channel.conn.consumed(stream, len(message))
            on_message(message)
            return
        self._messages.append(message)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def end(self, stream: ClientStream, code: int, message: str, trailers: Headers) -> None:
        self.code = code
        self.details = message
        self.trailers = trailers
        self.unprocessed = stream.unprocessed
        for waiter in (self._waiter, self._writable_waiter, self._end_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._waiter = self._writable_waiter = None
        if self.on_end is not None:
            try:
                self.on_end(self)
            except Exception:
                log.exception("stream end callback failed")

    def unblocked(self, stream: ClientStream) -> None:
        waiter = self._writable_waiter
        if waiter is not None:
            self._writable_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ---- the caller's side -------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.code is not None

    def send(self, message: bytes, end: bool = False) -> bool:
        """Queue one request message (``end``: the last one, half-closing with it); False if the call can no
        longer send."""
        stream = self.stream
        if stream is None:
            return False
        return self._channel.conn.send(stream, message, end)

    @property
    def writable(self) -> bool:
        stream = self.stream
        return stream is not None and not stream.ended and self._channel.conn.writable(stream)

    async def wait_writable(self) -> None:
        """Until queued request DATA has left (or the call ended)."""
        while self.stream is not None and not self.ended and not self._channel.conn.writable(self.stream):
            if self._writable_waiter is None or self._writable_waiter.done():
                self._writable_waiter = self._channel.loop.create_future()
            await self._writable_waiter

    def half_close(self) -> None:
        if self.stream is not None:
            self._channel.conn.half_close(self.stream)

    async def recv(self) -> bytes | None:
        """The next response message, or None once the call ended (then ``code``/``details``)."""
        messages = self._messages
        while not messages:
            if self.code is not None:
                return None
            if self._waiter is None or self._waiter.done():
                self._waiter = self._channel.loop.create_future()
            await self._waiter
        message = messages.popleft()
        stream = self.stream
        if stream is not None:
            self._channel.conn.consumed(stream, len(message))
        return message

    def cancel(self, message: str = CANCEL_MESSAGE) -> None:
        """RST_STREAM(CANCEL); the call ends CANCELLED (messages already received can still be read)."""
        if self.stream is not None:
            self._channel.conn.cancel(self.stream, CANCELLED, message)

    async def wait_end(self) -> int:
        """Until the call ended (messages not read are kept); -> the code."""
        if self.code is None:
            if self._end_waiter is None:
                self._end_waiter = self._channel.loop.create_future()
            await self._end_waiter
        assert self.code is not None
        return self.code


class _Protocol(asyncio.Protocol):
    __slots__ = ("channel",)

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.channel._transport = transport
        self.channel._flush()

    def data_received(self, data: bytes) -> None:
        ch = self.channel
        ch.conn.receive(data, ch.loop.time())
        if not ch._ready.done() and ch.conn.ready:
            ch._ready.set_result(None)
        ch._flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        ch = self.channel
        reason = f"connection reset: {exc}" if exc is not None else "connection closed by the server"
        ch.conn.connection_lost(reason)
        ch._transport = None
        if not ch._ready.done():
            ch._ready.set_exception(ConnectionResetError(reason))
            ch._ready.exception()  # connect() may have given up already: no "never retrieved" report
        ch._signal_closed(ch.conn.close_reason or reason)
        ch._lost.set()

    def pause_writing(self) -> None:
        self.channel._write_paused = True

    def resume_writing(self) -> None:
        self.channel._write_paused = False


class Channel:
    """One HTTP/2 connection to a gRPC server, for many concurrent calls."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        authority: str | None = None,
        *,
        server_hostname: str | None = None,
        keepalive_time_s: float = 0.0,
        keepalive_timeout_s: float = 20.0,
        settings: ClientSettings | None = None,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])  # Go's TLS servers speak HTTP/2 only after ALPN h2
        self.server_hostname = server_hostname
        self.authority = authority or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.keepalive_time_s = keepalive_time_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.settings = settings
        self.on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.conn = ClientConnection(
            self.authority, self.loop.time(), self._wake, tls=ssl_context is not None, settings=settings
        )
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self._ready: asyncio.Future[None] = self.loop.create_future()
        self._lost = asyncio.Event()
        self._transport: Any = None
        self._flush_scheduled = False
        self._write_paused = False
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        self._tick_timer: asyncio.TimerHandle | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def connect(self, timeout_s: float) -> None:
        """TCP (and TLS) connect and wait for the server's SETTINGS. Raises OSError/TimeoutError/ssl errors."""
        loop = self.loop
        kwargs: dict[str, Any] = {}
        if self.ssl_context is not None:
            kwargs = {"ssl": self.ssl_context, "server_hostname": self.server_hostname or self.host}
            kwargs["ssl_handshake_timeout"] = max(timeout_s, 0.1)
        try:
            async with asyncio.timeout(timeout_s):
                await loop.create_connection(lambda: _Protocol(self), self.host, self.port, **kwargs)
                if self.ssl_context is not None:
                    ssl_object = self._transport.get_extra_info("ssl_object") if self._transport else None
                    chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
                    if chosen != "h2":
                        raise ConnectionError(f"the server did not negotiate HTTP/2 over TLS (ALPN {chosen!r})")
                await asyncio.shield(self._ready)
        except BaseException:
            self._abort("connect failed")
            raise
        self._schedule_tick()

    def _abort(self, reason: str) -> None:
        self.conn.connection_lost(reason)
        if self._transport is not None:
            self._transport.abort()
        self._signal_closed(reason)
        self._cancel_timers()

    async def close(self, wait_s: float = 1.0) -> None:
        """GOAWAY(NO_ERROR), fail open calls, close the socket and wait (briefly) until it is gone."""
        self.conn.close()
        self._flush()
        if self._transport is not None:
            self._transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), wait_s)
            if self._transport is not None:
                self._transport.abort()
        self._signal_closed(self.conn.close_reason or "closed")
        self._cancel_timers()

    def _cancel_timers(self) -> None:
        for timer in (self._deadline_timer, self._tick_timer):
            if timer is not None:
                timer.cancel()
        self._deadline_timer = self._tick_timer = None

    def _signal_closed(self, reason: str) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        if self.on_close is not None:
            try:
                self.on_close(reason)
            except Exception:
                log.exception("on_close callback failed")

    @property
    def usable(self) -> bool:
        """New calls can be made on this connection."""
        return self.conn.accepting and self._transport is not None

    @property
    def too_many_pings(self) -> bool:
        """The server ended the connection for pinging too often: the next one should ping half as often."""
        goaway = self.conn.goaway
        return goaway is not None and goaway[1] == ENHANCE_YOUR_CALM and goaway[2] == "too_many_pings"

    # ---- writing ---------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn = self.conn
        if conn.waiting:
            conn.pump_waiting(self.loop.time())
        transport = self._transport
        if transport is None:
            if conn.closed:
                conn.out.clear()
            return  # not connected yet: the output (the preface first) waits for connection_made
        if conn.out:
            transport.write(conn.take_output())
        if not conn.accepting and not self.closed.done():
            self._signal_closed(conn.close_reason or "closed")
        if conn.closed:
            self._cancel_timers()
            if not transport.is_closing():
                transport.close()

    # ---- timers ----------------------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        kt, kto = self.keepalive_time_s, self.keepalive_timeout_s
        period = 1.0 if kt <= 0 else max(0.05, min(1.0, kt / 4, kto / 4))
        self._tick_timer = self.loop.call_later(period, self._on_tick)

    def _on_tick(self) -> None:
        self._tick_timer = None
        if self.conn.closed:
            return
        self.conn.tick(self.loop.time(), self.keepalive_time_s, self.keepalive_timeout_s)
        self._flush()
        if not self.conn.closed:
            self._schedule_tick()

    def _arm_deadline(self, due: float) -> None:
        if self._deadline_timer is not None:
            if due >= self._deadline_at:
                return
            self._deadline_timer.cancel()
        self._deadline_at = due
        self._deadline_timer = self.loop.call_at(due, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        following = self.conn.expire(self.loop.time())
        self._flush()
        if following is not None:
            self._arm_deadline(following)

    # ---- calls -----------------------------------------------------------------------------------------

    def _start_unary(
        self, path: str, payload: bytes, metadata: Metadata, timeout_s: float | None
    ) -> tuple[_Unary, ClientStream]:
        loop = self.loop
        app = _Unary(loop.create_future())
        now = loop.time()
        deadline = None if timeout_s is None else now + timeout_s
        stream = self.conn.open_unary(app, path, metadata, payload, now, deadline)
        if deadline is not None and not stream.ended:
            self._arm_deadline(self.conn.due_time(deadline))
        return app, stream

    async def unary(self, path: str, payload: bytes, metadata: Metadata = (), timeout_s: float | None = None) -> Reply:
        """One unary call -> (grpc code, message, response payload or None)."""
        app, stream = self._start_unary(path, payload, metadata, timeout_s)
        try:
            return await app.future
        except asyncio.CancelledError:
            self.conn.cancel(stream)
            raise

    async def unary_ex(
        self, path: str, payload: bytes, metadata: Metadata = (), timeout_s: float | None = None
    ) -> tuple[int, str, bytes | None, bool]:
        """Like ``unary``, plus whether the server never processed the call (safe to retry elsewhere)."""
        app, stream = self._start_unary(path, payload, metadata, timeout_s)
        try:
            code, message, reply = await app.future
        except asyncio.CancelledError:
            self.conn.cancel(stream)
            raise
        return code, message, reply, app.unprocessed

    def start_unary(
        self,
        path: str,
        payload: bytes,
        metadata: Metadata,
        timeout_s: float | None,
        done: Callable[[int, str, bytes | None, bool], None],
    ) -> ClientStream:
        """A unary call without a coroutine: ``done(code, message, payload or None, unprocessed)`` is called
        once, from the event loop (possibly before this returns, e.g. on a closed channel). The returned
        stream can be given to ``cancel``. For callers that issue many calls per loop turn (the hub)."""
        now = self.loop.time()
        deadline = None if timeout_s is None else now + timeout_s
        stream = self.conn.open_unary(_UnaryCallback(done), path, metadata, payload, now, deadline)
        if deadline is not None and not stream.ended:
            self._arm_deadline(self.conn.due_time(deadline))
        return stream

    def cancel(self, stream: ClientStream) -> None:
        """Cancel a call started with ``start_unary`` (RST_STREAM CANCEL; its callback gets CANCELLED)."""
        self.conn.cancel(stream)

    def stream(
        self,
        path: str,
        metadata: Metadata = (),
        timeout_s: float | None = None,
        on_message: Callable[[bytes], None] | None = None,
        on_end: Callable[[StreamCall], None] | None = None,
    ) -> StreamCall:
        """Open a streaming call (HEADERS leave with this loop turn's write). With ``on_message``, messages are
        handed over as they arrive instead of through ``recv``; ``on_end(call)`` follows the last one."""
        call = StreamCall(self, on_message, on_end)
        now = self.loop.time()
        deadline = None if timeout_s is None else now + timeout_s
        call.stream = self.conn.open_stream(call, path, metadata, now, deadline)
        if deadline is not None and not call.stream.ended:
            self._arm_deadline(self.conn.due_time(deadline))
        return call


__all__ = ["UNAVAILABLE", "Channel", "ClientSettings", "Reply", "StreamCall"]
