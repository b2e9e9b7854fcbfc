"""go-grpc-prometheus style accounting of a worker's gRPC handlers, by wrapping each handler.

``instrument(service, method, handler)`` returns a handler that counts, like the Go proxy's
interceptors: started, messages received and sent, and handled with its grpc_code exactly once
per call, however it ends (returned, aborted, raised, cancelled by the client or its deadline, or
closed by the transport while suspended). Counts go to metrics.RpcStats (plain ints); ``report_loop``
writes them to the multiprocess files every metrics.FLUSH_INTERVAL_S along with the IPC queue
depths of this worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from etcdproxy import metrics
from etcdproxy.h2 import rpc
from etcdproxy.worker.hubclient import HubClient

Context = rpc.Context


def _ended_code(context: Context) -> str:
    """Code of a call whose handler returned: OK unless it set another one."""
    code = context.code()
    return "OK" if code is None else metrics.go_code_name(int(code))


def _failed_code(exc: BaseException, context: Context) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # the transport cancels (or closes) the handler when the client is gone or its deadline passed
        remaining = context.time_remaining()
        return "DeadlineExceeded" if remaining is not None and remaining <= 0 else "Canceled"
    code = context.code()  # set by context.abort(); anything else becomes UNKNOWN in the dispatcher
    return "Unknown" if code is None else metrics.go_code_name(int(code))


class _CountedRequests:
    """A client message iterator that counts what the handler reads."""

    __slots__ = ("_it", "_stats")

    def __init__(self, requests: AsyncIterator[Any], stats: metrics.RpcStats) -> None:
        self._it = requests.__aiter__()
        self._stats = stats

    def __aiter__(self) -> _CountedRequests:
        return self

    async def __anext__(self) -> Any:
        request = await self._it.__anext__()
        self._stats.received += 1
        return request


def _begin(stats: metrics.RpcStats, request: Any, client_streams: bool) -> Any:
    """Count a call as started (and its request as received, or wrap the request stream)."""
    stats.started += 1
    stats.open += 1
    if client_streams:
        return _CountedRequests(request, stats)
    stats.received += 1
    return request


def _unary(stats: metrics.RpcStats, behaviour: Callable[[Any, Context], Awaitable[Any]], client_streams: bool) -> Any:
    async def unary(request: Any, context: Context) -> Any:
        request = _begin(stats, request, client_streams)
        code = "Unknown"
        try:
            response = await behaviour(request, context)
            code = _ended_code(context)
            stats.sent += 1
            return response
        except BaseException as exc:
            code = _failed_code(exc, context)
            raise
        finally:
            stats.end(code)

    return unary


def _streaming(
    stats: metrics.RpcStats, behaviour: Callable[[Any, Context], AsyncIterator[Any]], client_streams: bool
) -> Any:
    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        request = _begin(stats, request, client_streams)
        code = "Unknown"
        try:
            # aclosing: if the transport closes us at a yield, the servicer's own cleanup runs now, not at GC
            async with contextlib.aclosing(behaviour(request, context)) as responses:  # type: ignore[type-var]
                async for response in responses:
                    yield response
                    stats.sent += 1  # resumed: the transport queued it
            code = _ended_code(context)
        except BaseException as exc:
            code = _failed_code(exc, context)
            raise
        finally:
            stats.end(code)

    return stream


def _inline(stats: metrics.RpcStats, inline: rpc.Inline) -> rpc.Inline:
    """Count an inline answer (a cache hit) as a whole call; a None (not answered inline) counts nothing,
    since the call then runs the behaviour, which counts it."""

    def counted(request: bytes, context: rpc.Context) -> bytes | None:
        try:
            answer = inline(request, context)
        except rpc.Abort as abort:
            _begin(stats, request, False)
            stats.end(metrics.go_code_name(abort.code))
            raise
        if answer is not None:
            stats.inline_ok += 1  # started, received, sent and handled OK, counted at flush
        return answer

    return counted


_TYPES = {(True, True): "bidi_stream", (False, True): "server_stream", (True, False): "client_stream"}


def instrument(service: str, method: str, handler: rpc.MethodHandler) -> rpc.MethodHandler:
    kind = _TYPES.get((handler.request_streaming, handler.response_streaming), "unary")
    stats = metrics.rpc_stats(kind, service, method)
    if handler.response_streaming:
        behaviour = _streaming(stats, handler.behaviour, handler.request_streaming)
    else:  # no etcd method is client-streaming only; it would be counted like the others
        behaviour = _unary(stats, handler.behaviour, handler.request_streaming)
    inline = None if handler.inline is None else _inline(stats, handler.inline)
    return rpc.MethodHandler(handler.request_streaming, handler.response_streaming, behaviour, inline)


def queue_depths(hub: HubClient) -> dict[str, int]:
    return {
        "worker_unsent": len(hub._unsent),
        "worker_pending_calls": len(hub.calls),
        "worker_stream_inbox": sum(state.inbox.qsize() for state in hub.streams.values()),
    }


async def report_loop(hub: HubClient) -> None:
    """Every FLUSH_INTERVAL_S: write the buffered RPC counts and this worker's queue depths."""
    children = {name: metrics.IPC_QUEUE_DEPTH.labels(name) for name in queue_depths(hub)}
    last: dict[str, int] = {}
    while True:
        await asyncio.sleep(metrics.FLUSH_INTERVAL_S)
        metrics.flush()
        for name, depth in queue_depths(hub).items():
            if last.get(name) != depth:
                children[name].set(depth)
                last[name] = depth
