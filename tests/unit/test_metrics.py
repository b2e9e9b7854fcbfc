"""Pure parts of metrics and health: code names, the health decision, bodies, --metrics-addr
validation, handler accounting with a fake context, dead-process settlement and the exposition
(on files written in a temp dir; prometheus-client is in single-process mode in this runner)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from etcdproxy import metrics
from etcdproxy.config import Config, ConfigError, check
from etcdproxy.h2 import rpc
from etcdproxy.h2.status import StatusCode
from etcdproxy.health import Health, decide, go_error_text
from etcdproxy.worker.instrument import instrument

# ---- grpc_code label values ------------------------------------------------------------------


GO_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_go_code_name_covers_every_status(code: grpc.StatusCode) -> None:
    assert metrics.go_code_name(code.value[0]) == GO_NAMES[code]


def test_go_code_name_out_of_range() -> None:
    assert metrics.go_code_name(17) == "Code(17)"


# ---- health decision -------------------------------------------------------------------------

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
PERMISSION = grpc.StatusCode.PERMISSION_DENIED.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (0, "", Health(True)),
        # Go: permission denied proves etcd answered
        (PERMISSION, "etcdserver: permission denied", Health(True)),
        # better than Go (SPEC 20.2 L): auth on, no token in the probe
        (INVALID, "etcdserver: user name is empty", Health(True)),
        (UNAUTHENTICATED, "etcdserver: invalid auth token", Health(True)),
        (DEADLINE, "Deadline Exceeded", Health(False, "GET ERROR:context deadline exceeded")),
        (UNAVAILABLE, "etcdserver: no leader", Health(False, "GET ERROR:etcdserver: no leader")),
        (
            UNAVAILABLE,
            "failed to connect to all addresses",
            Health(False, "GET ERROR:rpc error: code = Unavailable desc = failed to connect to all addresses"),
        ),
        (PERMISSION, "etcdserver: permission denied!", Health(False, "GET ERROR:etcdserver: permission denied!")),
    ],
)
def test_health_decision(code: int, details: str, expected: Health) -> None:
    assert decide(code, details) == expected


def test_go_error_text_of_a_timeout_is_gos_context_error() -> None:
    assert go_error_text(DEADLINE, "anything") == "context deadline exceeded"


@pytest.mark.parametrize(
    ("health", "body"),
    [
        (Health(True), b'{"health":"true","reason":""}'),
        (Health(False, "GET ERROR:a<b>&c"), b'{"health":"false","reason":"GET ERROR:a\\u003cb\\u003e\\u0026c"}'),
        (Health(False, 'say "x"'), b'{"health":"false","reason":"say \\"x\\""}'),
    ],
)
def test_health_body_is_gos_json(health: Health, body: bytes) -> None:
    assert health.body() == body


# ---- --metrics-addr --------------------------------------------------------------------------


@pytest.mark.parametrize("addr", ["", "http://127.0.0.1:9000", "http://:9000", "http://[::1]:9000", "http://h:1/"])
def test_metrics_addr_accepted(addr: str) -> None:
    check(Config(metrics_addr=addr))


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("http://[::1", 'cannot parse "http://[::1"'),
        ("http://h:99999", 'cannot parse "http://h:99999"'),
        ("127.0.0.1:9000", 'invalid --metrics-addr "127.0.0.1:9000": want http://host:port or https://host:port'),
        ("http://h", 'invalid --metrics-addr "http://h": want http://host:port or https://host:port'),
        ("unix://x:1", 'invalid --metrics-addr "unix://x:1": want http://host:port or https://host:port'),
        (
            "https://h:1",
            "--metrics-addr https://h:1: https needs the listener's certificate (--cert-file/--key-file or --auto-tls)",
        ),
    ],
)
def test_metrics_addr_refused(addr: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check(Config(metrics_addr=addr))
    assert info.value.messages == [message]


# ---- handler accounting ----------------------------------------------------------------------


class FakeContext:
    def __init__(self, remaining: float | None = None) -> None:
        self._code: StatusCode | None = None
        self.remaining = remaining

    def code(self) -> StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: StatusCode, details: str) -> None:
        self._code = code
        raise RuntimeError("aborted")  # the dispatcher raises rpc.Abort; the type does not matter


def counts(stats: metrics.RpcStats) -> tuple[int, int, int, int, dict[str, int]]:
    return stats.started, stats.received, stats.sent, stats.open, dict(stats.handled)


def fresh_stats(kind: str, method: str) -> metrics.RpcStats:
    stats = metrics.rpc_stats(kind, "test.Service", method)
    stats.__init__(stats.labels)  # type: ignore[misc]  # isolated from other tests
    return stats


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def ok_unary(request: bytes, context: Any) -> bytes:
    return b"r"


async def abort_unary(request: bytes, context: Any) -> bytes:
    await context.abort(StatusCode.NOT_FOUND, "nf")
    return b""


async def raise_unary(request: bytes, context: Any) -> bytes:
    raise ValueError("bug")


async def slow_unary(request: bytes, context: Any) -> bytes:
    await asyncio.sleep(10)
    return b""


@pytest.mark.parametrize(
    ("behaviour", "remaining", "code", "sent"),
    [
        (ok_unary, None, "OK", 1),
        (abort_unary, None, "NotFound", 0),
        (raise_unary, None, "Unknown", 0),
        (slow_unary, 5.0, "Canceled", 0),
        (slow_unary, 0.0, "DeadlineExceeded", 0),
    ],
)
def test_unary_counts_once(behaviour: Any, remaining: float | None, code: str, sent: int) -> None:
    name = f"U{behaviour.__name__}{remaining}"
    handler = instrument("test.Service", name, rpc.unary_unary(behaviour))
    stats = fresh_stats("unary", name)

    async def call() -> None:
        task = asyncio.ensure_future(handler.behaviour(b"q", FakeContext(remaining)))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(call())
    assert counts(stats) == (1, 1, sent, 0, {code: 1})


async def echo_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def requests_of(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def test_bidi_counts_messages_and_ends_once() -> None:
    handler = instrument("test.Service", "B1", rpc.stream_stream(echo_stream))
    stats = fresh_stats("bidi_stream", "B1")

    async def call() -> list[bytes]:
        return [m async for m in handler.behaviour(requests_of(b"a", b"b", b"c"), FakeContext())]

    assert run(call()) == [b"a", b"b", b"c"]
    assert counts(stats) == (1, 3, 3, 0, {"OK": 1})


def test_stream_closed_at_a_yield_is_canceled_and_closes_the_servicer() -> None:
    closed: list[bool] = []

    async def forever(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
        finally:
            closed.append(True)

    handler = instrument("test.Service", "S1", rpc.unary_stream(forever))
    stats = fresh_stats("server_stream", "S1")

    async def call() -> None:
        responses = handler.behaviour(b"q", FakeContext())
        await responses.__anext__()
        await responses.__anext__()
        await responses.aclose()  # grpc gave up on the client

    run(call())
    assert closed == [True]
    assert counts(stats) == (1, 1, 1, 0, {"Canceled": 1})


def test_stream_abort_and_cancel() -> None:
    async def abort_after_one(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"x"
        await context.abort(StatusCode.OUT_OF_RANGE, "compacted")

    async def hang(request: bytes, context: Any) -> AsyncIterator[bytes]:
        await asyncio.sleep(10)
        yield b""

    aborting = instrument("test.Service", "S2", rpc.unary_stream(abort_after_one))
    hanging = instrument("test.Service", "S3", rpc.unary_stream(hang))
    s2, s3 = fresh_stats("server_stream", "S2"), fresh_stats("server_stream", "S3")

    async def drain(gen: AsyncIterator[bytes]) -> None:
        async for _ in gen:
            pass

    async def call() -> None:
        with pytest.raises(RuntimeError):
            await drain(aborting.behaviour(b"q", FakeContext()))
        task = asyncio.ensure_future(drain(hanging.behaviour(b"q", FakeContext())))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(call())
    assert counts(s2) == (1, 1, 1, 0, {"OutOfRange": 1})
    assert counts(s3) == (1, 1, 0, 0, {"Canceled": 1})


# ---- files: settlement and exposition --------------------------------------------------------


def write_value(path: Path, metric: str, sample: str, labels: dict[str, str], value: float, help_text: str) -> None:
    f = MmapedDict(str(path))
    f.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), help_text), value, 0.0)
    f.close()


def test_settle_dead_counts_open_calls_as_unavailable(tmp_path: Path) -> None:
    labels = {"grpc_type": "bidi_stream", "grpc_service": "etcdserverpb.Watch", "grpc_method": "Watch"}
    name = metrics.RPCS_IN_FLIGHT._name
    write_value(tmp_path / "gauge_sum_4001.db", name, name, labels, 3, "help")
    write_value(tmp_path / "gauge_sum_4002.db", name, name, labels, 5, "help")
    child = metrics.HANDLED.labels("bidi_stream", "etcdserverpb.Watch", "Watch", "Unavailable")
    before = child._value.get()
    settled = metrics.settle_dead(str(tmp_path), is_alive=lambda pid: pid == 4002)
    assert settled == 3
    assert child._value.get() == before + 3
    assert sorted(os.listdir(tmp_path)) == ["gauge_sum_4002.db"]  # the live one stays
    assert metrics.settle_dead(str(tmp_path), is_alive=lambda pid: pid == 4002) == 0  # never twice


def test_settle_own_pid_only_touches_our_file(tmp_path: Path) -> None:
    labels = {"grpc_type": "unary", "grpc_service": "etcdserverpb.KV", "grpc_method": "Put"}
    name = metrics.RPCS_IN_FLIGHT._name
    write_value(tmp_path / f"gauge_sum_{os.getpid()}.db", name, name, labels, 1, "help")
    write_value(tmp_path / "gauge_sum_4003.db", name, name, labels, 1, "help")
    assert metrics.settle_dead(str(tmp_path), own_pid=os.getpid()) == 1
    assert os.listdir(tmp_path) == ["gauge_sum_4003.db"]


def test_exposition_uses_gos_names_for_health_counters(tmp_path: Path) -> None:
    write_value(
        tmp_path / "counter_4004.db",
        "etcd_server_health_success",
        "etcd_server_health_success_total",
        {},
        3,
        "The total number of successful health checks",
    )
    write_value(
        tmp_path / "counter_4005.db",
        "grpc_server_started",
        "grpc_server_started_total",
        {"grpc_type": "unary", "grpc_service": "etcdserverpb.KV", "grpc_method": "Range"},
        2,
        "Total number of RPCs started on the server.",
    )
    text = metrics.exposition(str(tmp_path)).decode()
    assert "# TYPE etcd_server_health_success counter\n" in text
    assert "\netcd_server_health_success 3.0\n" in text
    assert "etcd_server_health_success_total" not in text
    assert "# TYPE grpc_server_started_total counter\n" in text
    assert 'grpc_server_started_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 2.0' in text


def test_recent_leases_forget_after_the_window() -> None:
    leases = metrics.RecentLeases()
    leases.seen(1, 0.0)
    leases.seen(2, 30.0)
    assert leases.count(59.0) == 2
    assert leases.count(61.0) == 1
    leases.seen(3, 200.0)  # prunes on its own after a window without scrapes
    assert set(leases.seen_at) == {3}
