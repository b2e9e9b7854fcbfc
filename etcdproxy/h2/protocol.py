"""The asyncio driver of server connections: sockets, TLS, HTTP/1.1 sniffing, timers, one write per turn.

Writes: everything a connection queued while reading is written at the end of ``data_received``; what handlers
queue from tasks is written by one ``call_soon`` per connection per loop turn (the connection's ``wakeup``).
Backpressure: while the socket's buffer is above asyncio's high-water mark, streaming handlers wait
(``write_paused``) and, past ``MAX_BUFFERED_WHILE_PAUSED`` of further output, the connection is closed (a
client that never reads). Reading is paused too, so such a client cannot make us queue more answers.

Timers: one periodic task per server ticks every connection (SETTINGS ack, keepalive pings, drain, the
preface deadline), so a connection costs no timer of its own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from etcdproxy.h2.rpc import Dispatcher
from etcdproxy.h2.server import ServerConnection, Settings

log = logging.getLogger(__name__)

PREFACE_TIMEOUT_S = 10.0
TICK_S = 0.5
MAX_BUFFERED_WHILE_PAUSED = 4 * 1024 * 1024
HTTP1_MAX_HEAD = 16 * 1024
HTTP1_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT ")

# (method, path) -> (status, content type, body)
HttpApp = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]

ACCEPT_ERROR_PAUSE_S = 1.0  # out of file descriptors: stop accepting for a while (as asyncio does)


class Admission(Protocol):
    """Whether this process takes the next connection of a listening socket shared with others
    (etcdproxy.worker.balance.Seat); told about each accept and the open connection count."""

    def may_accept(self, now: float) -> bool: ...
    def on_accept(self) -> None: ...
    def publish(self, open_connections: int) -> None: ...
    def drain(self) -> None: ...


class ServerOptions:
    __slots__ = ("http_app", "keepalive_interval_s", "keepalive_timeout_s", "settings")

    def __init__(
        self,
        settings: Settings,
        keepalive_interval_s: float = 7200.0,
        keepalive_timeout_s: float = 20.0,
        http_app: HttpApp | None = None,
    ) -> None:
        self.settings = settings
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.http_app = http_app


class H2Protocol(asyncio.Protocol):
    __slots__ = (
        "_born",
        "_flush_scheduled",
        "_http1",
        "_reading_paused",
        "conn",
        "loop",
        "server",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.conn: ServerConnection | None = None
        self.transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._reading_paused = False
        self._http1: Http1 | None = None
        self._born = 0.0

    # ---- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        self._born = self.loop.time()
        self.server.protocols.add(self)
        if self.server.admission is not None:
            self.server.admission.publish(self.server.open_connections())
        # accepted during the drain delay: served normally (a load balancer still sends clients here until its
        # health check sees the 503); told to go away when the delay ends (Server.start_drain again)

    def _start_h2(self) -> None:
        self.conn = ServerConnection(self.server.dispatcher, self.server.options.settings, self.loop.time(), self._wake)
        if self.server.drain_everyone:  # a connection that spoke only after the drain delay ended
            self.conn.start_drain(self.loop.time())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            if self._http1 is not None:
                self._http1.feed(data)
                return
            if self.server.options.http_app is not None and data.startswith(HTTP1_METHODS):
                self._http1 = Http1(self)
                self._http1.feed(data)
                return
            self._start_h2()
            conn = self.conn
            assert conn is not None
        conn.receive(data, self.loop.time())
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # close the socket: a half-closed client gets no more answers on HTTP/2

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.protocols.discard(self)
        if self.server.admission is not None:
            self.server.admission.publish(self.server.open_connections())
        if self.conn is not None:
            self.conn.connection_lost()
        if self._http1 is not None:
            self._http1.closed = True

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.write_paused = True
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        conn = self.conn
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()
        if conn is not None:
            conn.write_paused = False
            for stream in list(conn.streams.values()):
                if stream.app is not None:
                    stream.app.unblocked()

    # ---- writing ------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return
        if conn.out:
            if transport.is_closing():
                conn.out.clear()
                return
            if conn.write_paused and transport.get_write_buffer_size() > MAX_BUFFERED_WHILE_PAUSED:
                log.info("closing a connection whose client does not read (%d bytes queued)", conn.out_bytes)
                conn.out.clear()
                transport.abort()
                return
            transport.write(conn.take_output())
        if conn.closed and not transport.is_closing():
            transport.close()

    def tick(self, now: float) -> None:
        conn, transport = self.conn, self.transport
        if transport is None or transport.is_closing():
            return
        if conn is None:
            if self._http1 is None and now - self._born > PREFACE_TIMEOUT_S:
                transport.close()  # never sent anything
            return
        if not conn._preface and now - self._born > PREFACE_TIMEOUT_S:
            conn.closed = True
            transport.close()
            return
        options = self.server.options
        conn.tick(now, options.keepalive_interval_s, options.keepalive_timeout_s)
        self._flush()

    def start_drain(self) -> None:
        if self.conn is not None:
            self.conn.start_drain(self.loop.time())
            self._flush()


class Http1:
    """HTTP/1.1 on the gRPC port (like the Go proxy's cmux): GET/HEAD of the health and metrics paths."""

    __slots__ = ("buffer", "busy", "closed", "protocol")

    def __init__(self, protocol: H2Protocol) -> None:
        self.protocol = protocol
        self.buffer = b""
        self.busy = False
        self.closed = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HTTP1_MAX_HEAD and b"\r\n\r\n" not in self.buffer:
            self._respond_now(431, "text/plain; charset=utf-8", b"Request Header Fields Too Large\n", close=True)
            return
        self._next()

    def _next(self) -> None:
        if self.busy or self.closed:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._respond_now(400, "text/plain; charset=utf-8", b"Bad Request\n", close=True)
            return
        method, target, version = (p.decode("latin-1") for p in parts)
        close = version == "HTTP/1.0"
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"connection":
                close = close or value.strip().lower() == b"close"
            elif lname == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    length = -1
        if length < 0 or length > 65536:
            self._respond_now(400, "text/plain; charset=utf-8", b"Bad Request\n", close=True)
            return
        self.buffer = self.buffer[length:]  # a small body is read and ignored
        self.busy = True
        app = self.protocol.server.options.http_app
        assert app is not None
        task = self.protocol.loop.create_task(app(method, target.split("?", 1)[0]))
        task.add_done_callback(lambda t: self._answered(t, method, close))

    def _answered(self, task: asyncio.Task[tuple[int, str, bytes]], method: str, close: bool) -> None:
        self.busy = False
        if self.closed:
            return
        try:
            status, ctype, body = task.result()
        except Exception:
            log.exception("HTTP/1.1 handler failed")
            status, ctype, body = 500, "text/plain; charset=utf-8", b"Internal Server Error\n"
        self._respond_now(status, ctype, b"" if method == "HEAD" else body, close, len(body))
        self._next()

    def _respond_now(self, status: int, ctype: str, body: bytes, close: bool, length: int | None = None) -> None:
        transport = self.protocol.transport
        if transport is None or transport.is_closing():
            return
        reason = REASONS.get(status, "Status")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
        )
        transport.write(head.encode("latin-1") + body)
        if close:
            self.closed = True
            transport.close()


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Server:
    """Serves gRPC (and the HTTP/1.1 paths) on listening sockets with one dispatcher."""

    def __init__(self, dispatcher: Dispatcher, options: ServerOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.dispatcher = dispatcher
        self.options = options
        self.loop = loop
        self.protocols: set[H2Protocol] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.draining = False
        self.drain_everyone = False  # the drain delay is over: even connections that speak later are told
        self._ticker: asyncio.Task[None] | None = None
        self.admission: Admission | None = None
        # the shared listening socket served by our own accept loop (see listen(admission=...))
        self._shared: tuple[socket.socket, ssl.SSLContext | None] | None = None
        self._accepting = False
        self._resume: asyncio.TimerHandle | None = None
        self.connecting = 0  # accepted, connection_made not yet called

    async def listen(
        self,
        sock: Any = None,
        host: str | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        admission: Admission | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"ssl": ssl_context, "backlog": 4096}
        if ssl_context is not None:
            kwargs["ssl_handshake_timeout"] = PREFACE_TIMEOUT_S
        if sock is not None and admission is not None:
            # asyncio's accept loop takes every queued connection on each wake-up; this one takes one
            # when admission agrees, so processes sharing the socket share its connections
            sock.setblocking(False)
            self.admission = admission
            self._shared = (sock, ssl_context)
            self._start_accepting()
        elif sock is not None:
            self.servers.append(await self.loop.create_server(lambda: H2Protocol(self), sock=sock, **kwargs))
        else:
            self.servers.append(
                await self.loop.create_server(lambda: H2Protocol(self), host, port, reuse_port=reuse_port, **kwargs)
            )
        if self._ticker is None:
            self._ticker = self.loop.create_task(self._tick_loop())

    def _start_accepting(self) -> None:
        self._resume = None
        if self._shared is not None and not self._accepting:
            self._accepting = True
            self.loop.add_reader(self._shared[0].fileno(), self._on_listener_readable)

    def _stop_accepting(self, pause_s: float) -> None:
        if self._accepting and self._shared is not None:
            self._accepting = False
            self.loop.remove_reader(self._shared[0].fileno())
        if self._resume is None and pause_s > 0:
            self._resume = self.loop.call_later(pause_s, self._start_accepting)

    def _on_listener_readable(self) -> None:
        assert self._shared is not None and self.admission is not None
        sock, ssl_context = self._shared
        if not self.admission.may_accept(self.loop.time()):
            # still listening: the socket stays readable while the connection waits, so this runs again next
            # loop turn and takes it once the balance (or the deferral cap) says so. Going deaf for a while
            # instead let a burst of 100 connections land 95/5 when the other worker took all of them while
            # this one was not listening (bench/h2bench watch mode).
            return
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another process took it
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: keep serving who we have
            log.warning("cannot accept a connection: %s; accepting again in %.0f s", exc, ACCEPT_ERROR_PAUSE_S)
            self._stop_accepting(ACCEPT_ERROR_PAUSE_S)
            return
        self.admission.on_accept()
        # counted from the accept, not from connection_made a few loop turns later: in a burst the
        # balance must see every connection this worker took
        self.connecting += 1
        self.admission.publish(len(self.protocols) + self.connecting)
        conn.setblocking(False)
        self.loop.create_task(self._connect(conn, ssl_context))

    def open_connections(self) -> int:
        return len(self.protocols) + self.connecting

    async def _connect(self, conn: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        kwargs: dict[str, Any] = {}
        if ssl_context is not None:
            kwargs = {"ssl": ssl_context, "ssl_handshake_timeout": PREFACE_TIMEOUT_S}
        try:
            await self.loop.connect_accepted_socket(lambda: H2Protocol(self), conn, **kwargs)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.debug("connection dropped before it was set up: %s", exc)
            conn.close()
        finally:
            self.connecting -= 1
            if self.admission is not None:
                self.admission.publish(self.open_connections())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = self.loop.time()
            for protocol in list(self.protocols):
                try:
                    protocol.tick(now)
                except Exception:
                    log.exception("connection timer failed")

    def start_drain(self) -> None:
        """Graceful GOAWAY to every open connection (connections already told are left alone). Called when the
        drain starts, and again when the drain delay ends for the connections accepted meanwhile."""
        if self.draining:
            self.drain_everyone = True
        self.draining = True
        if self.admission is not None:
            self.admission.drain()
        for protocol in list(self.protocols):
            protocol.start_drain()

    def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
        if self._shared is not None:
            self._stop_accepting(0)
            if self._resume is not None:
                self._resume.cancel()
                self._resume = None
            self._shared[0].close()
            self._shared = None

    def active_calls(self) -> int:
        return sum(len(p.conn.streams) for p in self.protocols if p.conn is not None)

    def close_all(self) -> None:
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.abort()
        if self._ticker is not None:
            self._ticker.cancel()
