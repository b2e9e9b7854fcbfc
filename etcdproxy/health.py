"""``/health`` (is etcd reachable?) and ``/proxy/health`` (does a request through the proxy work?).

Semantics of the Go proxy (server/proxy/grpcproxy/health.go): one linearizable
``Get("a")`` with a 1 s timeout; healthy if it succeeds or etcd refuses it with
``etcdserver: permission denied``; else reason ``GET ERROR:<error>``. ``/proxy/health`` does the
same Get through the proxy, then a watch on "a" whose created response must come within 3 s.

Better than Go: with etcd auth on, the probe carries no token and etcd answers
``etcdserver: user name is empty`` (or ``invalid auth token``), so the Go proxy reports unhealthy
forever. Any of these answers comes from etcd's auth layer after etcd received the request, which
is what the check is about: they count as healthy here.

``decide`` is the pure decision; the coroutines do the I/O with grpc.aio (hub process only).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from etcdproxy import metrics
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import aio
from etcdproxy.h2.status import StatusCode
from etcdproxy.upstream import interrupted

RANGE_PATH = "/etcdserverpb.KV/Range"
WATCH_PATH = "/etcdserverpb.Watch/Watch"
GET_TIMEOUT_S = 1.0
WATCH_TIMEOUT_S = 3.0
PROBE_REQUEST = rpc_pb2.RangeRequest(key=b"a").SerializeToString()  # linearizable: serializable unset
WATCH_REQUEST = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"a")).SerializeToString()

# etcd answered, refusing the unauthenticated probe: etcd is up (Go accepts only the first one).
ETCD_ANSWERED = frozenset(
    {
        "etcdserver: permission denied",
        "etcdserver: user name is empty",
        "etcdserver: invalid auth token",
    }
)
NO_PROXY_CONNECTION = "no connection to proxy"
WATCH_TIMEOUT = "WATCH TIMEOUT"
# Reason while the instance stops gracefully (--drain-delay): not etcd's problem, this proxy's.
DRAINING = "proxy draining: stopping"


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: str = ""

    def body(self) -> bytes:
        """etcd's JSON (Go's encoding/json: fields in order, no spaces, HTML characters escaped)."""
        text = json.dumps(
            {"health": "true" if self.healthy else "false", "reason": self.reason},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
            text = text.replace(char, escaped)
        return text.encode()


def go_error_text(code: int, details: str) -> str:
    """How clientv3 prints the error of a failed Get: etcd's own errors by their message, a
    timeout as Go's context error, anything else as a gRPC status."""
    if code == int(StatusCode.DEADLINE_EXCEEDED):
        return "context deadline exceeded"
    if details.startswith("etcdserver: "):
        return details
    return f"rpc error: code = {metrics.go_code_name(code)} desc = {details}"


def decide(code: int, details: str) -> Health:
    """The health of a probe Get that ended with gRPC ``code`` (0 = OK) and ``details``."""
    if code == 0 or details in ETCD_ANSWERED:
        return Health(True)
    return Health(False, "GET ERROR:" + go_error_text(code, details))


def record(health: Health) -> Health:
    """Count one evaluation, as etcd's health handler does."""
    (metrics.HEALTH_SUCCESS if health.healthy else metrics.HEALTH_FAILURES).inc()
    return health


async def probe_get(channel: aio.AioChannel) -> Health:
    call: Any = channel.unary_unary(RANGE_PATH)
    try:
        await call(PROBE_REQUEST, timeout=GET_TIMEOUT_S, wait_for_ready=True)
    except aio.RpcError as exc:
        return decide(int(exc.code()), exc.details() or "")
    except asyncio.CancelledError:
        if not interrupted():
            raise
        return Health(False, "etcd endpoint failover in progress")
    return Health(True)


async def probe_watch(channel: aio.AioChannel) -> Health:
    call: Any = channel.stream_stream(WATCH_PATH)(timeout=WATCH_TIMEOUT_S)
    try:
        await call.write(WATCH_REQUEST)
        response = await call.read()  # the created response, or EOF / an error
    except (aio.RpcError, asyncio.InvalidStateError):
        return Health(False, WATCH_TIMEOUT)
    except asyncio.CancelledError:
        if not interrupted():
            raise
        return Health(False, WATCH_TIMEOUT)
    finally:
        call.cancel()
    if response is aio.EOF:
        return Health(False, WATCH_TIMEOUT)
    return Health(True)


async def check_etcd(channel: aio.AioChannel) -> Health:
    """``/health``: the Get through the hub's upstream channel."""
    return record(await probe_get(channel))


async def check_proxy(channel: aio.AioChannel | None) -> Health:
    """``/proxy/health``: the Get and the watch through the proxy (``channel`` to its advertised URL)."""
    if channel is None:
        return record(Health(False, NO_PROXY_CONNECTION))
    health = await probe_get(channel)
    if health.healthy:
        health = await probe_watch(channel)
    return record(health)
