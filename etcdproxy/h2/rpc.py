"""The gRPC call API of our server: method handlers, the servicer context, status codes, and the dispatcher
that runs handlers for a ``ServerConnection``.

Handlers keep grpc.aio's shapes, so servicers read like grpc servicers: a unary behaviour is
``async def f(request: bytes, context) -> bytes``, a server-streaming one an async generator of bytes, a
client-streaming/bidi one takes an async iterator of request bytes. ``context.abort(code, message)`` ends the
call with a status. A unary handler may also have an ``inline`` function, called synchronously when the request
is complete, that answers without a Task when it can (a cache hit) or returns None to fall back to the
behaviour. A unary handler whose answer comes from one callback (a call forwarded to the hub) may have a
``start`` function instead of running its behaviour: ``start(request, context, respond)`` is called synchronously
with the complete request and calls ``respond(code, body_or_message)`` once (now or later: code 0 with the answer
bytes, else a status code with its message); it returns a function that stops the call (the client reset it or its
deadline passed: ``respond`` must then not be called), or None once it has responded.

Costs are per call what the hot path needs and no more: no Task for inline answers or ``start`` handlers, a Task
per call otherwise, a timer only for calls with a deadline; streamed messages go straight into the connection's
write buffer, which the driver writes once per loop turn, so a burst of watch events is one socket write per
connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from etcdproxy.h2 import grpcwire as gw
from etcdproxy.h2.server import ServerConnection, Stream
from etcdproxy.h2.status import StatusCode

log = logging.getLogger(__name__)


class Abort(Exception):
    """Raised by ``Context.abort``: ends the call with this status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


Metadata = tuple[tuple[str, str | bytes], ...]


class Context:
    """The servicer context of one call (the subset of grpc.aio.ServicerContext our servicers use)."""

    __slots__ = ("_code", "deadline", "loop", "metadata", "push")

    def __init__(self, metadata: Metadata, deadline: float | None, loop: asyncio.AbstractEventLoop) -> None:
        self.metadata = metadata
        self.deadline = deadline
        self.loop = loop
        self._code: StatusCode | None = None
        # response-streaming calls: send a response now, from outside the handler's iteration (see Call.push)
        self.push: Callable[[bytes], bool] | None = None

    def invocation_metadata(self) -> Metadata:
        return self.metadata

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - self.loop.time()
        return remaining if remaining > 0 else 0.0

    async def abort(self, code: int, message: str) -> NoReturn:
        self._code = StatusCode(code)
        raise Abort(int(code), message)

    def set_code(self, code: int) -> None:
        self._code = StatusCode(code)

    def code(self) -> StatusCode | None:
        return self._code


Behaviour = Callable[..., Any]
Inline = Callable[[bytes, Context], bytes | None]
Respond = Callable[[int, Any], None]  # (0, answer bytes) or (status code, message)
Stop = Callable[[], None]
Start = Callable[[bytes, Context, Respond], Stop | None]


def _answered(conn: ServerConnection, stream: Stream, inline: Inline, request: bytes, context: Context) -> bool:
    """Try the handler's inline function; True if it answered the call (an answer or an Abort)."""
    try:
        answer = inline(request, context)
    except Abort as abort:
        conn.finish_call(stream, abort.code, abort.message)
        return True
    if answer is None:
        return False
    conn.send_unary(stream, answer)
    return True


@dataclass(frozen=True, slots=True)
class MethodHandler:
    request_streaming: bool
    response_streaming: bool
    behaviour: Behaviour
    inline: Inline | None = None
    # unary only: run the call without a Task (see the module docstring); the behaviour is then not used
    start: Start | None = None


def unary_unary(
    behaviour: Callable[[bytes, Context], Awaitable[bytes]], inline: Inline | None = None, start: Start | None = None
) -> MethodHandler:
    return MethodHandler(False, False, behaviour, inline, start)


def unary_stream(behaviour: Callable[[bytes, Context], AsyncIterator[bytes]]) -> MethodHandler:
    return MethodHandler(False, True, behaviour)


def stream_unary(behaviour: Callable[[AsyncIterator[bytes], Context], Awaitable[bytes]]) -> MethodHandler:
    return MethodHandler(True, False, behaviour)


def stream_stream(behaviour: Callable[[AsyncIterator[bytes], Context], AsyncIterator[bytes]]) -> MethodHandler:
    return MethodHandler(True, True, behaviour)


DEADLINE_MESSAGE = "context deadline exceeded"  # what etcd (grpc-go) answers when a deadline passes


class Requests:
    """The request messages of a client-streaming call, as an async iterator. Ends at the client's half-close."""

    __slots__ = ("call", "ended", "queue", "waiter")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.queue: deque[bytes] = deque()
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> bytes:
        while not self.queue:
            if self.ended:
                raise StopAsyncIteration
            self.waiter = self.call.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.queue.popleft()
        self.call.conn.consumed(self.call.stream, len(message))
        return message

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Call:
    """One call: the application object of a Stream."""

    __slots__ = (
        "conn",
        "context",
        "handler",
        "loop",
        "request",
        "requests",
        "stop",
        "stream",
        "task",
        "timer",
        "writable",
    )

    def __init__(
        self, conn: ServerConnection, stream: Stream, handler: MethodHandler, context: Context, loop: Any
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.handler = handler
        self.context = context
        self.loop = loop
        self.request: bytes | None = None
        self.requests: Requests | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop: Stop | None = None  # of a call run by a ``start`` function, until it responded
        self.timer: asyncio.TimerHandle | None = None
        self.writable: asyncio.Future[None] | None = None

    # called by the connection when blocked DATA of this stream was sent
    def unblocked(self) -> None:
        waiter = self.writable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_writable(self) -> None:
        conn, stream = self.conn, self.stream
        while (not conn.writable(stream) or conn.write_paused) and not stream.finished:
            self.writable = self.loop.create_future()
            try:
                await self.writable
            finally:
                self.writable = None

    def push(self, message: bytes) -> bool:
        """Send one response of a response-streaming call without going through the handler's iterator
        (a watch fan-out writes to 1,000 streams without waking 1,000 Tasks). Only while nothing is
        waiting to be written on the stream: False when blocked (flow control, a paused transport) or
        ended; the handler then yields it as usual, and the iterator's backpressure applies. The caller
        must also hold back while it has responses queued for its iterator, to keep their order."""
        conn, stream = self.conn, self.stream
        if stream.finished or stream.pending is not None or conn.write_paused or stream.id not in conn.streams:
            return False
        conn.send_message(stream, message)
        return True

    def start(self, coro: Any) -> None:
        self.task = self.loop.create_task(coro)
        deadline = self.context.deadline
        if deadline is not None:
            self.timer = self.loop.call_at(deadline, self.expire)

    def expire(self) -> None:
        """The deadline passed: answer DEADLINE_EXCEEDED like etcd and stop the handler."""
        self.timer = None
        self.conn.finish_call(self.stream, StatusCode.DEADLINE_EXCEEDED, DEADLINE_MESSAGE)
        if self.task is not None:
            self.task.cancel()
        self._stop()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._stop()
        self.unblocked()
        if self.requests is not None:
            self.requests.wake()

    def done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _stop(self) -> None:
        stop = self.stop
        if stop is not None:
            self.stop = None
            try:
                stop()
            except Exception:
                log.exception("stopping a call of %s failed", self.handler.start)

    def respond(self, code: int, answer: Any) -> None:
        """The ``respond`` of a ``start`` handler: (0, answer bytes) or (status code, message)."""
        self.stop = None
        timer = self.timer
        if timer is not None:
            timer.cancel()
            self.timer = None
        if code == 0:
            self.conn.send_unary(self.stream, answer)
        else:
            self.conn.finish_call(self.stream, code, answer)


def _unknown(path: str) -> str:
    service, _, _method = path.lstrip("/").rpartition("/")
    if not service:
        return f"malformed method name: {path!r}"
    return f"unknown service {service}"


class Dispatcher:
    """Runs the method handlers for every connection of a server (the ``Application`` of server.py)."""

    def __init__(self, handlers: dict[str, MethodHandler], loop: asyncio.AbstractEventLoop) -> None:
        self.handlers = handlers
        self.services = {path.lstrip("/").rpartition("/")[0] for path in handlers}
        self.loop = loop

    # ---- Application ---------------------------------------------------------------------------------

    # A call without a deadline whose client sends one message (unary, server-streaming) gets its Call only
    # once that message is in, and none at all when an inline function answers it: until then ``stream.app``
    # is None and the handler is found again from ``stream.head`` (a dict lookup costs less than the objects
    # of a call). A deadline counts from the request's headers, so such calls get their Call at once.

    def request(self, conn: ServerConnection, stream: Stream, head: gw.RequestHead) -> None:
        handler = self.handlers.get(head.path)
        if handler is None:
            service, _, method = head.path.lstrip("/").rpartition("/")
            text = f"unknown method {method} for service {service}" if service in self.services else _unknown(head.path)
            conn.finish_call(stream, StatusCode.UNIMPLEMENTED, text)
            return
        if head.timeout_s is not None and not handler.request_streaming:
            self._call(conn, stream, handler, head)
        elif handler.request_streaming:
            call = self._call(conn, stream, handler, head)
            call.requests = Requests(call)
            if handler.response_streaming:
                call.context.push = call.push
                call.start(self._stream(call, handler.behaviour(call.requests, call.context)))
            else:
                call.start(self._unary(call, handler.behaviour(call.requests, call.context)))

    def _call(self, conn: ServerConnection, stream: Stream, handler: MethodHandler, head: gw.RequestHead) -> Call:
        loop = self.loop
        deadline = None if head.timeout_s is None else loop.time() + head.timeout_s
        call = Call(conn, stream, handler, Context(head.metadata, deadline, loop), loop)
        stream.app = call
        return call

    def message(self, conn: ServerConnection, stream: Stream, message: bytes) -> None:
        call: Call | None = stream.app
        if call is None:
            head = stream.head
            assert head is not None
            call = self._call(conn, stream, self.handlers[head.path], head)
        requests = call.requests
        if requests is not None:
            requests.queue.append(message)
            requests.wake()
            return
        conn.consumed(stream, len(message))
        if call.request is not None:
            conn.finish_call(stream, StatusCode.UNIMPLEMENTED, "grpc: received more than one request message")
            return
        call.request = message

    def end(self, conn: ServerConnection, stream: Stream) -> None:
        call: Call | None = stream.app
        if call is None:
            # grpc-go's words for a unary call without its message
            conn.finish_call(stream, StatusCode.INTERNAL, "grpc: error while receiving request: EOF")
            return
        if call.requests is not None:
            call.requests.ended = True
            call.requests.wake()
            return
        if stream.finished:  # answered already (a refused second message): never run the handler after it
            return
        request = call.request
        if request is None:  # a call with a deadline has its Call from the start
            conn.finish_call(stream, StatusCode.INTERNAL, "grpc: error while receiving request: EOF")
            return
        self._run(conn, stream, call, request, True)

    def complete(self, conn: ServerConnection, stream: Stream, message: bytes) -> None:
        """The whole request at once (one message, then the half-close): the hot path of unary calls."""
        call: Call | None = stream.app
        if call is not None:  # a client-streaming call, or a second message
            self.message(conn, stream, message)
            if not stream.finished:
                self.end(conn, stream)
            return
        head = stream.head
        assert head is not None
        handler = self.handlers[head.path]
        inline = handler.inline
        # no deadline (else the Call would exist): a context without one
        if inline is not None and _answered(conn, stream, inline, message, Context(head.metadata, None, self.loop)):
            return
        call = self._call(conn, stream, handler, head)
        call.request = message
        self._run(conn, stream, call, message, False)

    def _run(self, conn: ServerConnection, stream: Stream, call: Call, request: bytes, try_inline: bool) -> None:
        handler = call.handler
        inline = handler.inline if try_inline else None
        if inline is not None and _answered(conn, stream, inline, request, call.context):
            return
        start = handler.start
        if start is not None:
            self._start(call, start, request)
            return
        if handler.response_streaming:
            call.context.push = call.push
            call.start(self._stream(call, handler.behaviour(request, call.context)))
        else:
            call.start(self._unary(call, handler.behaviour(request, call.context)))

    def _start(self, call: Call, start: Start, request: bytes) -> None:
        """Run a call by its ``start`` function: no Task; the timer of its deadline only once it waits."""
        try:
            stop = start(request, call.context, call.respond)
        except Abort as abort:
            call.conn.finish_call(call.stream, abort.code, abort.message)
            return
        except Exception as exc:
            log.exception("handler of %s failed", start)
            call.conn.finish_call(call.stream, StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
            return
        if stop is None or call.stream.finished:  # answered already
            return
        call.stop = stop
        deadline = call.context.deadline
        if deadline is not None:
            call.timer = self.loop.call_at(deadline, call.expire)

    def reset(self, conn: ServerConnection, stream: Stream) -> None:
        call: Call | None = stream.app
        if call is not None:
            call.cancel()

    # ---- running handlers -----------------------------------------------------------------------------

    async def _unary(self, call: Call, pending: Awaitable[bytes]) -> None:
        conn, stream = call.conn, call.stream
        try:
            answer = await pending
        except Abort as abort:
            conn.finish_call(stream, abort.code, abort.message)
        except asyncio.CancelledError:
            pass  # reset by the client, expired (already answered), or the worker is stopping
        except Exception as exc:
            log.exception("handler of %s failed", call.handler.behaviour)
            conn.finish_call(stream, StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
        else:
            conn.send_unary(stream, answer)
        finally:
            call.done()

    async def _stream(self, call: Call, messages: AsyncIterator[bytes]) -> None:
        conn, stream = call.conn, call.stream
        try:
            async for message in messages:
                conn.send_message(stream, message)
                if stream.pending is not None or conn.write_paused:
                    await call.wait_writable()
                if stream.finished:
                    break
        except Abort as abort:
            conn.finish_call(stream, abort.code, abort.message)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.exception("handler of %s failed", call.handler.behaviour)
            conn.finish_call(stream, StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
        else:
            conn.finish_call(stream, StatusCode.OK, "")
        finally:
            call.done()
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except BaseException:  # the handler's own cleanup failing must not leak into the loop
                    log.debug("closing a response stream failed", exc_info=True)
