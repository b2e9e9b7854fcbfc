"""go-grpc-prometheus style accounting of a worker's gRPC handlers, by wrapping each handler.

``instrument(service, method, handler)`` returns a handler that counts, like the Go proxy's
interceptors: started, messages received and sent, and handled with its grpc_code exactly once
per call, however it ends (returned, aborted, raised, cancelled by the client or its deadline, or
closed by grpc while suspended). Counts go to metrics.RpcStats (plain ints); ``report_loop``
writes them to the multiprocess files every metrics.FLUSH_INTERVAL_S along with the IPC queue
depths of this worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from etcdproxy import metrics
from etcdproxy.worker.hubclient import HubClient

Context = Any  # grpc.aio.ServicerContext


def _ended_code(context: Context) -> str:
    """Code of a call whose handler returned: OK unless it set another one."""
    code = context.code()
    return "OK" if code is None else metrics.go_code_name(code.value[0])


def _failed_code(exc: BaseException, context: Context) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # grpc cancels (or closes) the handler when the client is gone or its deadline passed
        remaining = context.time_remaining()
        return "DeadlineExceeded" if remaining is not None and remaining <= 0 else "Canceled"
    code = context.code()  # set by context.abort(); anything else becomes UNKNOWN in grpc
    return "Unknown" if code is None else metrics.go_code_name(code.value[0])


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
            # aclosing: if grpc closes us at a yield, the servicer's own cleanup runs now, not at GC
            async with contextlib.aclosing(behaviour(request, context)) as responses:  # type: ignore[type-var]
                async for response in responses:
                    yield response
                    stats.sent += 1  # resumed: grpc wrote it
            code = _ended_code(context)
        except BaseException as exc:
            code = _failed_code(exc, context)
            raise
        finally:
            stats.end(code)

    return stream


def instrument(service: str, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.request_streaming and handler.response_streaming:
        stats = metrics.rpc_stats("bidi_stream", service, method)
        return grpc.stream_stream_rpc_method_handler(
            _streaming(stats, handler.stream_stream, True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.response_streaming:
        stats = metrics.rpc_stats("server_stream", service, method)
        return grpc.unary_stream_rpc_method_handler(
            _streaming(stats, handler.unary_stream, False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.request_streaming:  # no etcd method has this shape; counted like the others
        stats = metrics.rpc_stats("client_stream", service, method)
        return grpc.stream_unary_rpc_method_handler(
            _unary(stats, handler.stream_unary, True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    stats = metrics.rpc_stats("unary", service, method)
    return grpc.unary_unary_rpc_method_handler(
        _unary(stats, handler.unary_unary, False),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


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
