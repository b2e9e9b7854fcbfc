"""A grpc.aio-shaped channel over our own HTTP/2 client (``channel.Channel``), for code written against grpc.aio.

The hub's upstream code (failover, watch, lease, cache, cluster, health) was written against grpc.aio: this keeps
its shape (``unary_unary(path)(request, timeout=, metadata=, wait_for_ready=)``, ``stream_stream(path)(...)`` with
``read()``/``write()``/``done_writing()``/``code()``, ``get_state()``/``wait_for_state_change()``, an ``RpcError``
with ``code()``/``details()``, ``EOF``) so that code keeps its meaning while grpcio leaves the process.

Connectivity follows grpc's subchannel: IDLE until something wants a connection, CONNECTING, READY, and after a
break IDLE again (TRANSIENT_FAILURE when an attempt failed), reconnecting with backoff while wanted. Differences
from grpc.aio that callers rely on are deliberate: ``close()`` ends every open call with
``RpcError(CANCELLED, "Channel closed!")`` (grpc.aio raised CancelledError in the caller, which needed
``Task.cancelling()`` to tell apart from a real cancellation).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from etcdproxy.h2.channel import Channel, StreamCall
from etcdproxy.h2.client import ClientSettings
from etcdproxy.h2.status import StatusCode

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]


class ChannelConnectivity(enum.Enum):
    IDLE = 0
    CONNECTING = 1
    READY = 2
    TRANSIENT_FAILURE = 3
    SHUTDOWN = 4


class _Eof:
    def __repr__(self) -> str:
        return "EOF"


EOF: Any = _Eof()


class RpcError(Exception):
    """A call ended with a status other than OK (grpc.aio's AioRpcError, same accessors)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(code, details)
        self._code = StatusCode(code)
        self._details = details

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


CLOSED = (int(StatusCode.CANCELLED), "Channel closed!")


class AioChannel:
    """One endpoint; one HTTP/2 connection at a time, re-established while wanted."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        keepalive_time_s: float = 0.0,
        keepalive_timeout_s: float = 20.0,
        connect_timeout_s: float = 3.0,
        backoff_s: tuple[float, float] = (0.1, 2.0),
        max_send_bytes: int = 0,
        settings: ClientSettings | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.keepalive_time_s = keepalive_time_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_s = backoff_s
        self.max_send_bytes = max_send_bytes
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.state = ChannelConnectivity.IDLE
        self.channel: Channel | None = None  # the live connection while READY
        self.last_error = ""  # why the last attempt or connection failed (for logs)
        self._changed = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None
        self._calls: set[Any] = set()  # open facade calls, ended by close()

    # ---- connectivity -------------------------------------------------------------------------------------

    def _set_state(self, state: ChannelConnectivity) -> None:
        if state is not self.state:
            self.state = state
            self._changed.set()
            self._changed = asyncio.Event()

    def get_state(self, try_to_connect: bool = False) -> ChannelConnectivity:
        if try_to_connect:
            self._want()
        return self.state

    async def wait_for_state_change(self, last: ChannelConnectivity) -> None:
        while self.state is last:
            await self._changed.wait()

    def _want(self) -> None:
        if self._connector is None and self.state is not ChannelConnectivity.SHUTDOWN:
            self._connector = self.loop.create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        backoff = self.backoff_s[0]
        while self.state is not ChannelConnectivity.SHUTDOWN:
            self._set_state(ChannelConnectivity.CONNECTING)
            channel = Channel(
                self.host,
                self.port,
                self.ssl_context,
                server_hostname=self.server_hostname,
                keepalive_time_s=self.keepalive_time_s,
                keepalive_timeout_s=self.keepalive_timeout_s,
                settings=self.settings,
            )
            try:
                await channel.connect(self.connect_timeout_s)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
                self.last_error = _reason(exc, self.connect_timeout_s)
                self._set_state(ChannelConnectivity.TRANSIENT_FAILURE)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_s[1])
                continue
            backoff = self.backoff_s[0]
            self.channel = channel
            self._set_state(ChannelConnectivity.READY)
            self.last_error = await channel.closed
            self.channel = None
            if channel.too_many_pings and self.keepalive_time_s > 0:
                # etcd's GOAWAY for pings under its --grpc-keepalive-min-time: like grpc-go, ping half as often
                self.keepalive_time_s *= 2
                log.warning("etcd said too_many_pings; keepalive pings every %.1f s from now", self.keepalive_time_s)
            if self.state is ChannelConnectivity.SHUTDOWN:
                return
            self._set_state(ChannelConnectivity.IDLE)
            await asyncio.sleep(0)  # watchers see IDLE before the next CONNECTING

    async def ready(self, wait: bool, deadline: float | None) -> Channel:
        """The live connection; with ``wait`` (grpc's wait_for_ready) until READY, else fail fast once an attempt
        failed. Raises RpcError UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED (closed)."""
        while True:
            channel = self.channel
            if channel is not None and self.state is ChannelConnectivity.READY and channel.usable:
                return channel
            state = self.get_state(try_to_connect=True)
            if state is ChannelConnectivity.SHUTDOWN:
                raise RpcError(*CLOSED)
            if state is ChannelConnectivity.TRANSIENT_FAILURE and not wait:
                raise RpcError(int(StatusCode.UNAVAILABLE), self.last_error or "connection failed")
            timeout = None if deadline is None else deadline - self.loop.time()
            if timeout is not None and timeout <= 0:
                raise RpcError(int(StatusCode.DEADLINE_EXCEEDED), "context deadline exceeded")
            try:
                await asyncio.wait_for(self.wait_for_state_change(state), timeout)
            except TimeoutError:
                raise RpcError(int(StatusCode.DEADLINE_EXCEEDED), "context deadline exceeded") from None

    async def close(self, grace: float | None = None) -> None:
        self._set_state(ChannelConnectivity.SHUTDOWN)
        if self._connector is not None:
            self._connector.cancel()
        for call in list(self._calls):
            call._closed()
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close(grace or 0.0)

    # ---- calls ----------------------------------------------------------------------------------------------

    def _check_size(self, payload: bytes) -> None:
        if self.max_send_bytes and len(payload) > self.max_send_bytes:
            text = f"grpc: trying to send message larger than max ({len(payload)} vs. {self.max_send_bytes})"
            raise RpcError(int(StatusCode.RESOURCE_EXHAUSTED), text)

    async def unary(
        self, path: str, payload: bytes, metadata: Metadata = (), timeout_s: float | None = None, wait: bool = False
    ) -> tuple[int, str, bytes | None, bool]:
        """The fast path: (code, message, response, unprocessed), never raising for a status."""
        try:
            self._check_size(payload)
            deadline = None if timeout_s is None else self.loop.time() + timeout_s
            channel = self.channel
            if channel is None or not channel.usable or self.state is not ChannelConnectivity.READY:
                channel = await self.ready(wait, deadline)
            remaining = None if deadline is None else max(deadline - self.loop.time(), 0.0)
        except RpcError as exc:
            return int(exc.code()), exc.details(), None, exc.code() is StatusCode.UNAVAILABLE
        # close() closes the live connection, which ends this call with a status: no Task needed to cancel it
        return await channel.unary_ex(path, payload, metadata, remaining)

    def unary_unary(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
    ) -> Callable[..., Any]:
        async def call(
            request: Any,
            timeout: float | None = None,  # noqa: ASYNC109 - grpc.aio's signature
            metadata: Metadata | None = None,
            wait_for_ready: bool | None = None,
        ) -> Any:
            payload = request_serializer(request) if request_serializer is not None else request
            code, message, response, _ = await self.unary(path, payload, metadata or (), timeout, bool(wait_for_ready))
            if code != 0:
                raise RpcError(code, message)
            body = response or b""
            return response_deserializer(body) if response_deserializer is not None else body

        return call

    def stream_stream(self, path: str) -> Callable[..., StreamStreamCall]:
        def open_call(
            metadata: Metadata | None = None, timeout: float | None = None, wait_for_ready: bool | None = None
        ) -> StreamStreamCall:
            return StreamStreamCall(self, path, metadata or (), timeout, bool(wait_for_ready), None)

        return open_call

    def unary_stream(self, path: str) -> Callable[..., StreamStreamCall]:
        def open_call(
            request: bytes,
            metadata: Metadata | None = None,
            timeout: float | None = None,
            wait_for_ready: bool | None = None,
        ) -> StreamStreamCall:
            return StreamStreamCall(self, path, metadata or (), timeout, bool(wait_for_ready), request)

        return open_call


class StreamStreamCall:
    """A streaming call started once the channel is ready (grpc.aio's StreamStreamCall / UnaryStreamCall)."""

    def __init__(
        self,
        owner: AioChannel,
        path: str,
        metadata: Metadata,
        timeout: float | None,
        wait: bool,
        request: bytes | None,
    ) -> None:
        self._owner = owner
        self._path = path
        self._metadata = metadata
        self._deadline = None if timeout is None else owner.loop.time() + timeout
        self._wait = wait
        self._request = request
        self._call: StreamCall | None = None
        self._end: tuple[int, str] | None = None  # our own end (closed, cancelled, never started)
        self._pending: list[bytes | None] = []  # writes before the call started; None = done_writing
        self._starter: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        owner._calls.add(self)
        self._starter = owner.loop.create_task(self._start())

    async def _start(self) -> None:
        owner = self._owner
        try:
            channel = await owner.ready(self._wait, self._deadline)
            timeout = None if self._deadline is None else max(self._deadline - owner.loop.time(), 0.0)
            if self._end is not None:
                return
            call = channel.stream(self._path, self._metadata, timeout)
            self._call = call
            if self._request is not None:
                owner._check_size(self._request)
                call.send(self._request)
                call.half_close()
            for item in self._pending:
                if item is None:
                    call.half_close()
                else:
                    call.send(item)
            self._pending.clear()
        except RpcError as exc:
            self._finish(int(exc.code()), exc.details())
        except asyncio.CancelledError:
            if self._end is None:
                self._finish(*CLOSED)
        finally:
            self._started.set()

    def _finish(self, code: int, details: str) -> None:
        if self._end is None and (self._call is None or not self._call.ended):
            self._end = (code, details)
        self._owner._calls.discard(self)

    def _closed(self) -> None:
        """The channel was closed: the call ends CANCELLED at once."""
        if self._call is not None and not self._call.ended:
            self._call.cancel("Channel closed!")
        self._end = self._end or CLOSED
        if self._call is not None and self._call.code is not None and self._call.code != int(StatusCode.CANCELLED):
            self._end = None  # it had ended on its own before: keep its status
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()
        self._started.set()
        self._owner._calls.discard(self)

    def _status(self) -> tuple[int, str]:
        if self._end is not None:
            return self._end
        call = self._call
        assert call is not None and call.code is not None
        return call.code, call.details

    async def read(self) -> Any:
        await self._started.wait()
        call = self._call
        if call is None or self._end is not None:
            if self._end is not None and self._end[0] != 0:
                raise RpcError(*self._end)
            return EOF
        message = await call.recv()
        if message is not None:
            return message
        code, details = self._status()
        self._owner._calls.discard(self)
        if code != 0:
            raise RpcError(code, details)
        return EOF

    def __aiter__(self) -> StreamStreamCall:
        return self

    async def __anext__(self) -> bytes:
        message = await self.read()
        if message is EOF:
            raise StopAsyncIteration
        return message  # type: ignore[no-any-return]

    async def write(self, message: bytes) -> None:
        self._owner._check_size(message)
        if self._end is not None:
            raise RpcError(*self._end)
        call = self._call
        if call is None:
            self._pending.append(message)
            return
        if not call.send(message):
            raise RpcError(*self._status()) if call.ended else RpcError(*CLOSED)
        if not call.writable:
            await call.wait_writable()

    async def done_writing(self) -> None:
        call = self._call
        if call is None:
            self._pending.append(None)
        else:
            call.half_close()

    def cancel(self) -> bool:
        if self._end is not None or (self._call is not None and self._call.ended):
            return False
        if self._call is not None:
            self._call.cancel()
        else:
            self._end = (int(StatusCode.CANCELLED), "Locally cancelled by application!")
            if self._starter is not None:
                self._starter.cancel()
        self._owner._calls.discard(self)
        return True

    def done(self) -> bool:
        return self._end is not None or (self._call is not None and self._call.ended)

    async def code(self) -> StatusCode:
        await self._wait_end()
        return StatusCode(self._status()[0])

    async def details(self) -> str:
        await self._wait_end()
        return self._status()[1]

    async def _wait_end(self) -> None:
        await self._started.wait()
        if self._end is None and self._call is not None:
            await self._call.wait_end()


def _reason(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"connection timed out after {timeout_s:.1f} s"
    if isinstance(exc, OSError) and exc.errno:
        return f"connect: {os.strerror(exc.errno).lower()}"  # Go's words: "connect: connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connect: {exc.strerror.lower()}"
    return str(exc) or type(exc).__name__
