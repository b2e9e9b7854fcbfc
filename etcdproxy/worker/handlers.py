"""gRPC handlers of a worker: every etcd method as raw bytes, plus grpc.health.v1.

Requests are parsed once, only to refuse malformed bytes the way etcd does before anything
reaches upstream; the original bytes are what travels to the hub. Responses come back as
etcd's bytes and are returned untouched.

Forwarded unary calls run without a Task or coroutine (rpc's ``start`` handlers, ``_Route``): the request
is checked and sent to the hub in the read path, and the hub's reply is written from the IPC frame reader.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from etcdproxy import metrics
from etcdproxy.core import errors, wire
from etcdproxy.core.methods import METHODS, Method, Shape
from etcdproxy.core.namespace import Namespace, Refused
from etcdproxy.h2 import rpc
from etcdproxy.h2.status import StatusCode
from etcdproxy.ipc.schema import Metadata
from etcdproxy.worker.hubclient import HubClient, StreamState
from etcdproxy.worker.instrument import instrument

log = logging.getLogger(__name__)

# Client metadata that etcd acts on and the proxy therefore forwards: the auth token, and
# require-leader (clientv3's WithRequireLeader sets "hasleader: true").
FORWARDED_METADATA = frozenset({"token", "hasleader"})

HEALTH_SERVICE = "grpc.health.v1.Health"
_SERVING, _NOT_SERVING = b"\x08\x01", b"\x08\x02"


def forwarded_metadata(context: rpc.Context) -> Metadata:
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if k in FORWARDED_METADATA]


async def abort(context: rpc.Context, error: errors.EtcdError) -> None:
    await context.abort(error.code, error.message)


def refuse(stats: metrics.RpcStats, error: errors.EtcdError, respond: rpc.Respond) -> None:
    """Answer a ``start`` call with etcd's error and count it handled with that code."""
    stats.end(metrics.go_code_name(int(error.code)))
    respond(int(error.code), error.message)


def answer_forwarded(stats: metrics.RpcStats, respond: rpc.Respond, code: int, body: bytes | str) -> None:
    """Answer a ``start`` call with the hub's (code, body) (code -1: the worker failed, UNKNOWN) and count it."""
    if code == 0:
        status, name = 0, "OK"
        stats.sent += 1
    elif code < 0:
        status, name = int(StatusCode.UNKNOWN), "Unknown"
    else:
        status = int(errors.CODES[code])
        name = metrics.go_code_name(status)
        body = str(body)
    stats.end(name)
    respond(status, body)


class Handlers:
    def __init__(self, hub: HubClient, namespace: Namespace | None = None) -> None:
        self.hub = hub
        # --namespace: requests are rewritten (or refused) before the hub, responses after
        self.namespace = namespace
        # Methods served by a dedicated component instead of plain forwarding (path -> handler).
        self.overrides: dict[str, rpc.MethodHandler] = {}

    def method_handlers(self) -> dict[str, rpc.MethodHandler]:
        """Every served path -> its instrumented handler."""
        table = {method.path: (method.service, method.name, self._handler(method)) for method in METHODS}
        table[f"/{HEALTH_SERVICE}/Check"] = (HEALTH_SERVICE, "Check", rpc.unary_unary(self.health_check))
        table[f"/{HEALTH_SERVICE}/Watch"] = (HEALTH_SERVICE, "Watch", rpc.unary_stream(self.health_watch))
        served = {}
        for path, (svc, name, handler) in table.items():
            counted = instrument(svc, name, handler)
            if handler.start is not None:
                # instrument() wraps behaviours only; a _Route start counts its calls in the same RpcStats
                counted = rpc.MethodHandler(False, False, counted.behaviour, counted.inline, handler.start)
            served[path] = counted
        return served

    def _handler(self, method: Method) -> rpc.MethodHandler:
        if method.path in self.overrides:
            return self.overrides[method.path]
        if method.name == "RangeStream":
            return rpc.unary_stream(self._range_stream)
        if method.shape is Shape.UNARY:
            stats = metrics.rpc_stats("unary", method.service, method.name)  # the RpcStats instrument() uses
            return rpc.unary_unary(self._unary_for(method), start=_Route(self.hub, method, self.namespace, stats).start)
        if method.shape is Shape.SERVER_STREAM:
            return rpc.unary_stream(self._server_stream_for(method))
        return rpc.stream_stream(self._bidi_for(method))

    # ---- unary ---------------------------------------------------------------------------

    # The async form of a forwarded unary call; the Dispatcher runs _Route.start instead (same answers).
    def _unary_for(self, method: Method) -> Callable[[bytes, Any], Awaitable[bytes]]:
        request_class = method.request
        hub = self.hub
        namespace = self.namespace

        async def unary(request: bytes, context: rpc.Context) -> bytes:
            _, problem = wire.parse(request_class, request)
            if problem is not None:
                await abort(context, errors.unmarshal_error(problem))
            if namespace is not None:
                request = await self._to_etcd(namespace, method, request, context)
            req_id, future = hub.call(method, request, forwarded_metadata(context), context.time_remaining())
            try:
                code, body = await future
            except asyncio.CancelledError:
                hub.cancel(req_id)
                raise
            if code == 0:
                if namespace is not None:
                    return namespace.response(method.path, body)  # type: ignore[arg-type]
                return body  # type: ignore[return-value]
            await context.abort(errors.CODES[code], str(body))
            raise AssertionError("unreachable")

        return unary

    async def _to_etcd(self, namespace: Namespace, method: Method, request: bytes, context: rpc.Context) -> bytes:
        try:
            return namespace.request(method.path, request)
        except Refused as refused:
            await abort(context, refused.error)
            raise AssertionError("unreachable") from None

    # ---- streams -------------------------------------------------------------------------

    async def _relay(self, req_id: int, state: StreamState, context: rpc.Context) -> AsyncIterator[bytes]:
        """Yield upstream messages until the stream ends, then end the call with its status."""
        hub = self.hub
        while True:
            item = await state.inbox.get()
            if isinstance(item, bytes):
                yield item
                hub.stream_delivered(req_id, state)
                continue
            code, text = item
            if code != 0:
                await context.abort(errors.CODES[code], text)
            return

    def _server_stream_for(self, method: Method) -> Callable[[bytes, Any], AsyncIterator[bytes]]:
        request_class = method.request
        hub = self.hub
        namespace = self.namespace

        async def server_stream(request: bytes, context: rpc.Context) -> AsyncIterator[bytes]:
            _, problem = wire.parse(request_class, request)
            if problem is not None:
                await abort(context, errors.unmarshal_error(problem))
            if namespace is not None:  # Observe is rewritten, Snapshot refused
                request = await self._to_etcd(namespace, method, request, context)
            req_id, state = hub.open_stream(method, forwarded_metadata(context))
            try:
                hub.stream_send(req_id, request)
                async for message in self._relay(req_id, state, context):
                    yield message if namespace is None else namespace.response(method.path, message)
            finally:
                hub.cancel(req_id)

        return server_stream

    def _bidi_for(self, method: Method) -> Callable[[AsyncIterator[bytes], Any], AsyncIterator[bytes]]:
        request_class = method.request
        hub = self.hub

        async def bidi(requests: AsyncIterator[bytes], context: rpc.Context) -> AsyncIterator[bytes]:
            req_id, state = hub.open_stream(method, forwarded_metadata(context))

            async def pump() -> None:
                # Half-close is passed on, never treated as the end of the stream: etcd keeps
                # sending after a client half-closes, and so do we.
                async for request in requests:
                    _, problem = wire.parse(request_class, request)
                    if problem is not None:
                        err = errors.unmarshal_error(problem)
                        hub.end_stream(req_id, err)
                        return
                    hub.stream_send(req_id, request)
                hub.stream_half_close(req_id)

            reader = asyncio.get_running_loop().create_task(pump())
            try:
                async for message in self._relay(req_id, state, context):
                    yield message
            finally:
                reader.cancel()
                hub.cancel(req_id)

        return bidi

    async def _range_stream(self, request: bytes, context: rpc.Context) -> AsyncIterator[bytes]:
        await abort(context, errors.RANGE_STREAM_UNSUPPORTED)
        yield b""  # pragma: no cover - makes this an async generator

    # ---- grpc.health.v1 ------------------------------------------------------------------

    def _health_status(self, request: bytes) -> bytes | None:
        # HealthCheckRequest{string service = 1}: "" is the server as a whole, like etcd.
        if request not in (b"", b"\x0a\x00"):
            return None
        return _SERVING if self.hub.hub_alive else _NOT_SERVING

    async def health_check(self, request: bytes, context: rpc.Context) -> bytes:
        status = self._health_status(request)
        if status is None:
            await context.abort(StatusCode.NOT_FOUND, "unknown service")
        return status  # type: ignore[return-value]

    async def health_watch(self, request: bytes, context: rpc.Context) -> AsyncIterator[bytes]:
        last = None
        while True:
            status = self._health_status(request) or b"\x08\x03"  # SERVICE_UNKNOWN
            if status != last:
                yield status
                last = status
            await asyncio.sleep(1.0)


class _Route:
    """A forwarded unary method run without a Task (rpc's ``start``), counted in RpcStats like instrument()
    counts a behaviour: started and received at the start, sent with an answer, handled once with its code
    (Canceled or DeadlineExceeded when the call is stopped, by the deadline if no time remains)."""

    __slots__ = ("hub", "method", "namespace", "path", "request_class", "stats")

    def __init__(self, hub: HubClient, method: Method, namespace: Namespace | None, stats: metrics.RpcStats) -> None:
        self.hub = hub
        self.method = method
        self.namespace = namespace
        self.path = method.path
        self.request_class = method.request
        self.stats = stats

    def start(self, request: bytes, context: rpc.Context, respond: rpc.Respond) -> rpc.Stop | None:
        stats = self.stats
        stats.started += 1
        stats.open += 1
        stats.received += 1
        try:
            _, problem = wire.parse(self.request_class, request)
            if problem is not None:
                refuse(self.stats, errors.unmarshal_error(problem), respond)
                return None
            namespace = self.namespace
            if namespace is not None:
                try:
                    request = namespace.request(self.path, request)
                except Refused as refused:
                    refuse(self.stats, refused.error, respond)
                    return None
            call = _Forwarded(self, context, respond)
            call.req_id = self.hub.start_call(
                self.method, request, forwarded_metadata(context), context.time_remaining(), call.reply
            )
        except BaseException:
            stats.end("Unknown")  # the Dispatcher answers UNKNOWN
            raise
        return call.stop


class _Forwarded:
    """One forwarded unary call waiting for the hub: its reply callback and its stop."""

    __slots__ = ("context", "req_id", "respond", "route")

    def __init__(self, route: _Route, context: rpc.Context, respond: rpc.Respond) -> None:
        self.route = route
        self.context = context
        self.respond = respond
        self.req_id = 0

    def reply(self, code: int, body: bytes | str) -> None:
        """The hub's (code, body): the answer (namespace view), or the status etcd answered."""
        route = self.route
        try:
            if code == 0 and route.namespace is not None:
                body = route.namespace.response(route.path, body)  # type: ignore[arg-type]
        except Exception as exc:
            log.exception("answer of %s failed", route.path)
            code, body = -1, f"Unexpected {type(exc).__name__}: {exc}"
        answer_forwarded(route.stats, self.respond, code, body)

    def stop(self) -> None:
        """The client reset the call or its deadline passed (the transport answered it): tell the hub."""
        route = self.route
        route.hub.cancel(self.req_id)
        remaining = self.context.time_remaining()
        route.stats.end("DeadlineExceeded" if remaining is not None and remaining <= 0 else "Canceled")
