"""Our HTTP/2 gRPC client (etcdproxy.h2.channel) against a real etcd: unary calls, statuses as grpcio sees them,
Watch and LeaseKeepAlive streams, 200 calls on one connection, a response larger than the flow-control windows,
deadlines, cancellation seen by etcd, and TLS (client-certificate auth) to an https etcd.

``python -m tests.integration.test_h2_channel`` measures client CPU per unary Range (64 in flight) against
grpc.aio's on a private etcd (a measurement, not a test: it asserts nothing).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc, v3lock_pb2
from etcdproxy.h2.channel import Channel
from etcdproxy.h2.status import StatusCode
from tests.e2e.test_tls import PKI, issue, make_ca, start_tls_etcd
from tests.helpers import EtcdServer, http_get, sum_metric, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T = TypeVar("T")
PUT = "/etcdserverpb.KV/Put"
RANGE = "/etcdserverpb.KV/Range"
TXN = "/etcdserverpb.KV/Txn"
WATCH = "/etcdserverpb.Watch/Watch"
LEASE_GRANT = "/etcdserverpb.Lease/LeaseGrant"
LEASE_KEEPALIVE = "/etcdserverpb.Lease/LeaseKeepAlive"
LOCK = "/v3lockpb.Lock/Lock"


def run(body: Callable[[Channel], Awaitable[T]], endpoint: str, **kwargs: Any) -> T:
    """Connect a Channel to ``endpoint``, run ``body`` with it, close it."""

    async def main() -> T:
        host, port = endpoint.rsplit(":", 1)
        channel = Channel(host, int(port), **kwargs)
        await channel.connect(5)
        try:
            return await body(channel)
        finally:
            await channel.close()

    return asyncio.run(main())


def put_request(key: bytes, value: bytes, lease: int = 0) -> bytes:
    data: bytes = rpc_pb2.PutRequest(key=key, value=value, lease=lease).SerializeToString()
    return data


async def ok(channel: Channel, path: str, request: bytes, **kwargs: Any) -> bytes:
    code, message, payload = await channel.unary(path, request, **kwargs)
    assert (code, message) == (0, "") and isinstance(payload, bytes)
    return payload


def test_put_range_txn(etcd_server: EtcdServer) -> None:
    async def body(ch: Channel) -> None:
        put = rpc_pb2.PutResponse.FromString(await ok(ch, PUT, put_request(b"h2c/a", b"1"), timeout_s=5))
        got = rpc_pb2.RangeResponse.FromString(
            await ok(ch, RANGE, rpc_pb2.RangeRequest(key=b"h2c/a").SerializeToString(), metadata=(("x-y", "z"),))
        )
        assert got.count == 1 and got.kvs[0].value == b"1" and got.kvs[0].mod_revision == put.header.revision
        txn = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(key=b"h2c/a", target=rpc_pb2.Compare.VALUE, value=b"1")],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"h2c/a", value=b"2"))],
        )
        answer = rpc_pb2.TxnResponse.FromString(await ok(ch, TXN, txn.SerializeToString()))
        assert answer.succeeded and answer.header.revision == put.header.revision + 1

    run(body, etcd_server.endpoint)


def test_slow_watch_stream_does_not_block_other_calls(etcd_server: EtcdServer) -> None:
    value = os.urandom(100 * 1024)

    async def body(ch: Channel) -> None:
        call = ch.stream(WATCH)
        create = rpc_pb2.WatchCreateRequest(key=b"h2c/slow/", range_end=b"h2c/slow0")
        call.send(rpc_pb2.WatchRequest(create_request=create).SerializeToString())
        first = await call.recv()
        assert first is not None and rpc_pb2.WatchResponse.FromString(first).created
        # 10 MiB of events the watch does not read: more than its window plus what we buffer unread
        for i in range(100):
            await ok(ch, PUT, put_request(b"h2c/slow/%d" % i, value), timeout_s=10)
        assert call.stream is not None and call.stream.recv_window < 1 << 20  # the watch's window is spent
        # ... and the connection still carries other calls
        got = await ok(ch, RANGE, rpc_pb2.RangeRequest(key=b"h2c/slow/99").SerializeToString(), timeout_s=5)
        assert rpc_pb2.RangeResponse.FromString(got).kvs[0].value == value
        seen = 0
        while seen < 100:
            message = await asyncio.wait_for(call.recv(), 10)
            assert message is not None
            seen += len(rpc_pb2.WatchResponse.FromString(message).events)
        assert seen == 100
        call.cancel()

    run(body, etcd_server.endpoint)


def test_token_and_binary_metadata_reach_etcd(fresh_etcd: EtcdServer) -> None:
    async def body(ch: Channel) -> None:
        await ok(
            ch, "/etcdserverpb.Auth/UserAdd", rpc_pb2.AuthUserAddRequest(name="root", password="pw").SerializeToString()
        )
        grant = rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root").SerializeToString()
        await ok(ch, "/etcdserverpb.Auth/UserGrantRole", grant)
        await ok(ch, "/etcdserverpb.Auth/AuthEnable", rpc_pb2.AuthEnableRequest().SerializeToString())
        auth = rpc_pb2.AuthenticateResponse.FromString(
            await ok(
                ch,
                "/etcdserverpb.Auth/Authenticate",
                rpc_pb2.AuthenticateRequest(name="root", password="pw").SerializeToString(),
            )
        )
        code, message, _ = await ch.unary(PUT, put_request(b"k", b"v"))
        assert (code, message) == (StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty")
        metadata = (("token", auth.token), ("x-trace-bin", b"\x00\x01\xfe"))  # unpadded base64 for grpc-go
        await ok(ch, PUT, put_request(b"k", b"v"), metadata=metadata)
        code, message, _ = await ch.unary(PUT, put_request(b"k", b"v"), metadata=(("token", "bogus"),))
        assert (code, message) == (StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")

    run(body, fresh_etcd.endpoint)


def test_callback_calls_and_streams(etcd_server: EtcdServer) -> None:
    """The coroutine-free API: start_unary with a done callback, streams with on_message/on_end."""

    async def body(ch: Channel) -> None:
        loop = asyncio.get_running_loop()
        await ok(ch, PUT, put_request(b"h2c/cb", b"v"))
        results: list[tuple[int, str, bytes | None, bool]] = []
        all_done = loop.create_future()

        def done(code: int, message: str, payload: bytes | None, unprocessed: bool) -> None:
            results.append((code, message, payload, unprocessed))
            if len(results) == 100:
                all_done.set_result(None)

        request = rpc_pb2.RangeRequest(key=b"h2c/cb").SerializeToString()
        for _ in range(100):
            ch.start_unary(RANGE, request, (), 5.0, done)
        await asyncio.wait_for(all_done, 10)
        assert {(r[0], r[3]) for r in results} == {(0, False)}
        assert {rpc_pb2.RangeResponse.FromString(r[2]).kvs[0].value for r in results if r[2]} == {b"v"}

        events: list[bytes] = []
        created = loop.create_future()
        ended = loop.create_future()

        def on_message(message: bytes) -> None:
            response = rpc_pb2.WatchResponse.FromString(message)
            if response.created:
                created.set_result(None)
            events.extend(e.kv.key for e in response.events)

        call = ch.stream(WATCH, on_message=on_message, on_end=lambda c: ended.set_result((c.code, c.details)))
        create = rpc_pb2.WatchCreateRequest(key=b"h2c/cb/", range_end=b"h2c/cb0")
        call.send(rpc_pb2.WatchRequest(create_request=create).SerializeToString())
        await asyncio.wait_for(created, 5)
        for i in range(3):
            await ok(ch, PUT, put_request(b"h2c/cb/%d" % i, b"x"))
        await asyncio.to_thread(wait_until, lambda: len(events) == 3, 5, "events by callback")
        assert events == [b"h2c/cb/0", b"h2c/cb/1", b"h2c/cb/2"]
        call.cancel()
        assert await asyncio.wait_for(ended, 5) == (StatusCode.CANCELLED, "context canceled")

        # a cancelled callback call, and one on a closed channel (answered at once, never sent)
        cancelled: list[tuple[int, str, bytes | None, bool]] = []
        leases = []
        for _ in range(2):
            grant = await ok(ch, LEASE_GRANT, rpc_pb2.LeaseGrantRequest(TTL=30).SerializeToString())
            leases.append(rpc_pb2.LeaseGrantResponse.FromString(grant).ID)
        held = await ok(ch, LOCK, v3lock_pb2.LockRequest(name=b"h2c-cb-lock", lease=leases[0]).SerializeToString())
        waiting = v3lock_pb2.LockRequest(name=b"h2c-cb-lock", lease=leases[1]).SerializeToString()
        stream = ch.start_unary(LOCK, waiting, (), None, lambda *r: cancelled.append(r))
        await asyncio.sleep(0.1)
        ch.cancel(stream)
        assert cancelled == [(StatusCode.CANCELLED, "context canceled", None, False)]
        unlock = v3lock_pb2.UnlockRequest(key=v3lock_pb2.LockResponse.FromString(held).key)
        await ok(ch, "/v3lockpb.Lock/Unlock", unlock.SerializeToString())
        await ch.close()
        late: list[tuple[int, str, bytes | None, bool]] = []
        ch.start_unary(RANGE, request, (), 1.0, lambda *r: late.append(r))
        assert len(late) == 1 and late[0][0] == StatusCode.UNAVAILABLE and late[0][3] is True

    run(body, etcd_server.endpoint)


ERROR_CASES = [
    (RANGE, rpc_pb2.RangeRequest(key=b"h2c/a", revision=10**9).SerializeToString()),  # OUT_OF_RANGE
    (PUT, rpc_pb2.PutRequest(key=b"").SerializeToString()),  # INVALID_ARGUMENT: key is not provided
    (
        TXN,
        rpc_pb2.TxnRequest(
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"d"))] * 2
        ).SerializeToString(),
    ),
    ("/etcdserverpb.Lease/LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=12345).SerializeToString()),  # NOT_FOUND
    ("/etcdserverpb.KV/Nope", b""),  # UNIMPLEMENTED, trailers-only from grpc-go
    ("/no.Such/Service", b""),
    (RANGE, b"\xff\xff"),  # a request etcd cannot parse
    (PUT, put_request(b"h2c/huge", b"x" * (3 << 20))),  # above grpc-go's receive limit: refused mid-request
]


@pytest.mark.parametrize(("path", "request_bytes"), ERROR_CASES)
def test_error_status_is_what_grpcio_gets(etcd_server: EtcdServer, path: str, request_bytes: bytes) -> None:
    async def body(ch: Channel) -> tuple[int, str, bytes | None]:
        return await ch.unary(path, request_bytes, timeout_s=5)

    code, message, payload = run(body, etcd_server.endpoint)
    with grpc.insecure_channel(etcd_server.endpoint) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(path)(request_bytes, timeout=5)
    error: Any = info.value
    assert (code, message, payload) == (error.code().value[0], error.details(), None)
    assert code != 0


def watch_streams(etcd: EtcdServer) -> float:
    _, text = http_get(etcd.metrics_url)
    return sum_metric(text, "etcd_debugging_mvcc_watch_stream_total", {})


def test_watch_stream_events_and_cancel_seen_by_etcd(etcd_server: EtcdServer) -> None:
    async def body(ch: Channel) -> None:
        before = watch_streams(etcd_server)
        call = ch.stream(WATCH)
        create = rpc_pb2.WatchCreateRequest(key=b"h2c/w/", range_end=b"h2c/w0")
        call.send(rpc_pb2.WatchRequest(create_request=create).SerializeToString())
        first = await call.recv()
        assert first is not None and rpc_pb2.WatchResponse.FromString(first).created
        await asyncio.to_thread(wait_until, lambda: watch_streams(etcd_server) == before + 1, 10, "watch stream")
        for i in range(5):
            await ok(ch, PUT, put_request(b"h2c/w/%d" % i, b"v"))
        seen: list[bytes] = []
        while len(seen) < 5:
            message = await asyncio.wait_for(call.recv(), 5)
            assert message is not None
            seen += [e.kv.key for e in rpc_pb2.WatchResponse.FromString(message).events]
        assert seen == [b"h2c/w/%d" % i for i in range(5)]
        call.cancel()
        assert await call.recv() is None and call.code == StatusCode.CANCELLED
        # etcd saw the RST_STREAM: its watch stream is gone while our connection stays up
        await asyncio.to_thread(wait_until, lambda: watch_streams(etcd_server) == before, 10, "watch stream end")
        assert ch.usable
        await ok(ch, RANGE, rpc_pb2.RangeRequest(key=b"h2c/w/0").SerializeToString())

    run(body, etcd_server.endpoint)


def test_lease_keepalive_stream(etcd_server: EtcdServer) -> None:
    async def body(ch: Channel) -> None:
        grant = rpc_pb2.LeaseGrantResponse.FromString(
            await ok(ch, LEASE_GRANT, rpc_pb2.LeaseGrantRequest(TTL=30).SerializeToString())
        )
        call = ch.stream(LEASE_KEEPALIVE)
        for _ in range(3):
            call.send(rpc_pb2.LeaseKeepAliveRequest(ID=grant.ID).SerializeToString())
            message = await asyncio.wait_for(call.recv(), 5)
            assert message is not None
            answer = rpc_pb2.LeaseKeepAliveResponse.FromString(message)
            assert answer.ID == grant.ID and 28 <= answer.TTL <= 30
        call.half_close()  # etcd ends the stream once our side is closed
        assert await asyncio.wait_for(call.recv(), 5) is None
        assert (call.code, call.details) == (0, "")

    run(body, etcd_server.endpoint)


def test_server_streaming_snapshot(etcd_server: EtcdServer) -> None:
    async def body(ch: Channel) -> None:
        call = ch.stream("/etcdserverpb.Maintenance/Snapshot", timeout_s=30)
        call.send(rpc_pb2.SnapshotRequest().SerializeToString(), end=True)  # request and half-close in one frame
        size, last = 0, None
        while (message := await call.recv()) is not None:
            last = rpc_pb2.SnapshotResponse.FromString(message)
            size += len(last.blob)
        assert (call.code, call.details) == (0, "")
        assert last is not None and last.remaining_bytes == 0 and size > 16 * 1024

    run(body, etcd_server.endpoint)


def test_200_concurrent_calls_on_one_connection(etcd_server: EtcdServer) -> None:
    async def body(ch: Channel) -> None:
        await ok(ch, PUT, put_request(b"h2c/c", b"v" * 100))
        request = rpc_pb2.RangeRequest(key=b"h2c/c", serializable=True).SerializeToString()
        replies = await asyncio.gather(*(ch.unary(RANGE, request, timeout_s=10) for _ in range(200)))
        assert {(code, message) for code, message, _ in replies} == {(0, "")}
        assert {rpc_pb2.RangeResponse.FromString(p).kvs[0].value for _, _, p in replies if p} == {b"v" * 100}
        puts = await asyncio.gather(*(ch.unary(PUT, put_request(b"h2c/c%d" % i, b"x")) for i in range(200)))
        assert all(code == 0 for code, _, _ in puts)
        assert ch.conn.next_stream_id == 803 and not ch.conn.streams  # 401 calls, one connection
        assert ch.conn.decoder.hits > 700  # response and trailer blocks decoded once each

    run(body, etcd_server.endpoint)


def test_large_response_crosses_flow_control_windows(etcd_server: EtcdServer) -> None:
    value = os.urandom(1 << 20)

    async def body(ch: Channel) -> None:
        for i in range(5):  # under etcd's default 1.5 MiB request limit each
            await ok(ch, PUT, put_request(b"h2c/big/%d" % i, value))
        request = rpc_pb2.RangeRequest(key=b"h2c/big/", range_end=b"h2c/big0").SerializeToString()
        for _ in range(3):
            got = rpc_pb2.RangeResponse.FromString(await ok(ch, RANGE, request, timeout_s=10))
            assert got.count == 5 and all(kv.value == value for kv in got.kvs)
        assert ch.conn.settings.stream_window < 5 << 20  # one message larger than a stream window

    run(body, etcd_server.endpoint)


def test_deadline_exceeded(etcd_server: EtcdServer) -> None:
    async def body(ch: Channel) -> None:
        leases = []
        for _ in range(2):
            grant = await ok(ch, LEASE_GRANT, rpc_pb2.LeaseGrantRequest(TTL=30).SerializeToString())
            leases.append(rpc_pb2.LeaseGrantResponse.FromString(grant).ID)
        held = v3lock_pb2.LockResponse.FromString(
            await ok(ch, LOCK, v3lock_pb2.LockRequest(name=b"h2c-lock", lease=leases[0]).SerializeToString())
        )
        started = time.monotonic()
        code, message, payload = await ch.unary(
            LOCK, v3lock_pb2.LockRequest(name=b"h2c-lock", lease=leases[1]).SerializeToString(), timeout_s=0.5
        )
        took = time.monotonic() - started
        assert (code, payload) == (StatusCode.DEADLINE_EXCEEDED, None) and 0.4 < took < 3, (message, took)
        # a stream with a deadline ends the same way
        call = ch.stream(WATCH, timeout_s=0.3)
        create = rpc_pb2.WatchCreateRequest(key=b"h2c/none")
        call.send(rpc_pb2.WatchRequest(create_request=create).SerializeToString())
        while await asyncio.wait_for(call.recv(), 5) is not None:
            pass
        assert call.code == StatusCode.DEADLINE_EXCEEDED
        unlock = v3lock_pb2.UnlockRequest(key=held.key).SerializeToString()
        await ok(ch, "/v3lockpb.Lock/Unlock", unlock)
        assert ch.usable

    run(body, etcd_server.endpoint)


def test_connection_to_nothing_fails_fast() -> None:
    async def main() -> None:
        channel = Channel("127.0.0.1", 1)
        with pytest.raises(OSError):
            await channel.connect(2)
        assert channel.closed.done() and not channel.usable

    asyncio.run(main())


def test_server_gone_ends_calls_unavailable(tmp_path: Path, etcd_bin: str) -> None:
    from tests.helpers import start_etcd

    etcd = start_etcd(tmp_path, name="gone")
    reasons: list[str] = []
    try:

        async def body(ch: Channel) -> None:
            call = ch.stream(WATCH)
            call.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"k")).SerializeToString())
            assert await call.recv() is not None
            etcd.stop()
            assert await asyncio.wait_for(call.recv(), 10) is None
            assert call.code == StatusCode.UNAVAILABLE
            assert await asyncio.wait_for(ch.closed, 5)
            assert not ch.usable

        run(body, etcd.endpoint, on_close=reasons.append)
    finally:
        etcd.stop()
    assert len(reasons) == 1 and reasons[0], reasons


def test_keepalive_pings_keep_a_quiet_connection_and_detect_a_frozen_server(tmp_path: Path, etcd_bin: str) -> None:
    from tests.helpers import start_etcd

    # etcd's default --grpc-keepalive-min-time (5 s) would answer our 0.2 s pings with GOAWAY too_many_pings
    etcd = start_etcd(tmp_path, name="frozen", extra_args=("--grpc-keepalive-min-time=100ms",))
    assert etcd.proc is not None
    reasons: list[str] = []
    try:

        async def body(ch: Channel) -> None:
            call = ch.stream(WATCH)
            call.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"k")).SerializeToString())
            assert await call.recv() is not None
            await asyncio.sleep(1.0)  # quiet: pings every 0.2 s, answered
            assert ch.conn.pings_sent >= 2 and ch.usable and not ch.closed.done()
            assert etcd.proc is not None
            etcd.proc.send_signal(signal.SIGSTOP)  # a silent partition: the socket stays open, nothing answers
            try:
                started = time.monotonic()
                assert await asyncio.wait_for(call.recv(), 5) is None
                took = time.monotonic() - started
            finally:
                etcd.proc.send_signal(signal.SIGCONT)
            assert call.code == StatusCode.UNAVAILABLE and "keepalive" in call.details
            assert 0.3 < took < 2.5, took  # keepalive time + timeout (0.2 + 0.5) plus tick granularity
            assert (await ch.closed).startswith("keepalive ping failed")

        run(body, etcd.endpoint, keepalive_time_s=0.2, keepalive_timeout_s=0.5, on_close=reasons.append)
    finally:
        etcd.stop()
    assert len(reasons) == 1 and reasons[0].startswith("keepalive ping failed")


def test_too_frequent_pings_get_goaway_from_etcd(etcd_server: EtcdServer) -> None:
    """etcd enforces --grpc-keepalive-min-time (5 s): an owner must not ping faster (grpc-go clients then double
    their interval). The reason says so, and the calls end UNAVAILABLE."""

    async def body(ch: Channel) -> None:
        call = ch.stream(WATCH)
        call.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"k")).SerializeToString())
        assert await call.recv() is not None
        reason = await asyncio.wait_for(ch.closed, 10)
        assert reason == "GOAWAY ENHANCE_YOUR_CALM: too_many_pings"
        assert ch.conn.goaway is not None and ch.conn.goaway[1:] == (0xB, "too_many_pings") and ch.too_many_pings
        assert await asyncio.wait_for(call.recv(), 5) is None and call.code == StatusCode.UNAVAILABLE

    run(body, etcd_server.endpoint, keepalive_time_s=0.1, keepalive_timeout_s=1.0)


def test_runs_on_uvloop(etcd_server: EtcdServer) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        host, port = etcd_server.endpoint.rsplit(":", 1)
        channel = Channel(host, int(port))
        await channel.connect(5)
        await ok(channel, PUT, put_request(b"h2c/uv", b"1"))
        replies = await asyncio.gather(*(channel.unary(RANGE, b"\x0a\x06h2c/uv") for _ in range(100)))
        assert {code for code, _, _ in replies} == {0}
        call = channel.stream(WATCH)
        call.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"h2c/uv")).SerializeToString())
        assert await call.recv() is not None
        call.cancel()
        await channel.close()
        assert channel.closed.done()

    uvloop.run(main())


def test_goaway_from_our_own_server_drains_gracefully() -> None:
    """etcd closes without GOAWAY when stopped; our server's two-phase drain exercises it end to end."""
    from etcdproxy.h2.protocol import Server, ServerOptions
    from etcdproxy.h2.rpc import Context, Dispatcher, unary_unary
    from etcdproxy.h2.server import Settings

    async def main() -> None:
        loop = asyncio.get_running_loop()
        release = asyncio.Event()

        async def slow(request: bytes, context: Context) -> bytes:
            await release.wait()
            return request

        async def echo(request: bytes, context: Context) -> bytes:
            return request

        handlers = {"/t.S/Slow": unary_unary(slow), "/t.S/Echo": unary_unary(echo)}
        server = Server(Dispatcher(handlers, loop), ServerOptions(Settings()), loop)
        await server.listen(host="127.0.0.1", port=0)
        port = server.servers[0].sockets[0].getsockname()[1]
        reasons: list[str] = []
        channel = Channel("127.0.0.1", port, on_close=reasons.append)
        await channel.connect(5)
        try:
            held = asyncio.ensure_future(channel.unary("/t.S/Slow", b"held"))
            assert await channel.unary("/t.S/Echo", b"x") == (0, "", b"x")
            server.start_drain()
            assert await asyncio.wait_for(channel.closed, 5) == "GOAWAY NO_ERROR: graceful_stop"
            assert not channel.usable
            code, _, _, unprocessed = await channel.unary_ex("/t.S/Echo", b"late")
            assert (code, unprocessed) == (StatusCode.UNAVAILABLE, True)  # never sent: safe to retry elsewhere
            await asyncio.sleep(1.2)  # the server's final GOAWAY (after our PING ack) names the held call's stream
            assert channel.conn.goaway is not None and channel.conn.goaway[0] == 3
            release.set()
            assert await asyncio.wait_for(held, 5) == (0, "", b"held")
            await asyncio.wait_for(channel._lost.wait(), 5)  # the connection ends with its last stream
            assert reasons == ["GOAWAY NO_ERROR: graceful_stop"]
        finally:
            await channel.close()
            server.close_listeners()
            server.close_all()

    asyncio.run(main())


# ---- TLS -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("h2-pki")
    ca, other = make_ca(d, "ca"), make_ca(d, "other-ca")
    leaf = issue(ca, d, "leaf", cn="client")
    return PKI(
        ca=ca,
        other_ca=other,
        etcd_server=issue(ca, d, "etcd-server", cn="etcd"),
        proxy_client=issue(ca, d, "proxy-client"),
        named_client=leaf,
        proxy_server=leaf,
        client=leaf,
        stranger=issue(other, d, "stranger", cn="client"),
        expired=leaf,
    )


@pytest.fixture(scope="module")
def tls_etcd(pki: PKI, tmp_path_factory: pytest.TempPathFactory, etcd_bin: str) -> Iterator[EtcdServer]:
    server = start_tls_etcd(tmp_path_factory.mktemp("h2-tls-etcd"), pki, client_cert_auth=True, name="h2tls")
    yield server
    server.stop()


def client_context(pki: PKI, cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    if cert:
        context.load_cert_chain(str(pki.proxy_client.cert), str(pki.proxy_client.key))
    return context


def test_tls_with_client_certificate(tls_etcd: EtcdServer, pki: PKI) -> None:
    async def body(ch: Channel) -> None:
        await ok(ch, PUT, put_request(b"h2c/tls", b"secure"), timeout_s=5)
        got = rpc_pb2.RangeResponse.FromString(
            await ok(ch, RANGE, rpc_pb2.RangeRequest(key=b"h2c/tls").SerializeToString())
        )
        assert got.kvs[0].value == b"secure"
        replies = await asyncio.gather(*(ch.unary(RANGE, b"\x0a\x01x") for _ in range(300)))  # above Go's 250
        assert {code for code, _, _ in replies} == {0}
        call = ch.stream(WATCH)
        call.send(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"h2c/tls")).SerializeToString())
        assert await call.recv() is not None
        call.cancel()
        assert ch.conn._scheme_block == b"\x87"  # :scheme https

    run(body, tls_etcd.endpoint, ssl_context=client_context(pki))


def test_tls_refused_without_client_certificate_or_with_wrong_ca(tls_etcd: EtcdServer, pki: PKI) -> None:
    async def attempt(context: ssl.SSLContext) -> tuple[int, str]:
        host, port = tls_etcd.endpoint.rsplit(":", 1)
        channel = Channel(host, int(port), context)
        try:
            await channel.connect(5)
        except (OSError, ssl.SSLError) as exc:
            return -1, str(exc)
        try:
            code, message, _ = await channel.unary(RANGE, b"\x0a\x01x", timeout_s=5)
            return code, message
        finally:
            await channel.close()

    code, _ = asyncio.run(attempt(client_context(pki, cert=False)))
    assert code in (-1, StatusCode.UNAVAILABLE)  # TLS 1.3: the refusal may come after the handshake
    wrong = ssl.create_default_context(cafile=str(pki.other_ca.path))
    code, message = asyncio.run(attempt(wrong))
    assert code == -1 and "certificate verify failed" in message


# ---- measurement ---------------------------------------------------------------------------------------------


async def _measure(impl: str, endpoint: str, calls: int, in_flight: int) -> dict[str, float]:
    request = rpc_pb2.RangeRequest(key=b"bench", serializable=True).SerializeToString()
    if impl == "etcdproxy.h2-callbacks":
        return await _measure_callbacks(endpoint, request, calls, in_flight)
    if impl == "grpc.aio":
        aio = grpc.aio.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
        await aio.channel_ready()
        stub = aio.unary_unary(RANGE)

        async def call() -> bytes:
            return await stub(request)  # type: ignore[no-any-return]
    else:
        host, port = endpoint.rsplit(":", 1)
        channel = Channel(host, int(port))
        await channel.connect(5)

        async def call() -> bytes:
            code, _, payload = await channel.unary(RANGE, request, timeout_s=10)
            assert code == 0 and payload is not None
            return payload

    left = [0]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call()

    left[0] = 2000  # warm-up
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    left[0] = calls
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    if impl == "grpc.aio":
        await aio.close()
    else:
        await channel.close()
    return {"cpu_us_per_call": cpu / calls * 1e6, "calls_per_s": calls / wall}


async def _measure_callbacks(endpoint: str, request: bytes, calls: int, in_flight: int) -> dict[str, float]:
    """``in_flight`` chains of start_unary, each callback starting the next call: no coroutine per call."""
    host, port = endpoint.rsplit(":", 1)
    channel = Channel(host, int(port))
    await channel.connect(5)
    loop = asyncio.get_running_loop()
    to_start, to_finish = [0], [0]
    finished: list[asyncio.Future[None]] = []

    def done(code: int, message: str, payload: bytes | None, unprocessed: bool) -> None:
        assert code == 0 and payload is not None
        to_finish[0] -= 1
        if to_start[0] > 0:
            to_start[0] -= 1
            channel.start_unary(RANGE, request, (), 10.0, done)
        elif to_finish[0] == 0:
            finished[0].set_result(None)

    async def burst(n: int) -> None:
        to_start[0], to_finish[0] = n, n
        finished[:] = [loop.create_future()]
        for _ in range(in_flight):
            to_start[0] -= 1
            channel.start_unary(RANGE, request, (), 10.0, done)
        await finished[0]

    await burst(2000)
    cpu, wall = time.process_time(), time.monotonic()
    await burst(calls)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    await channel.close()
    return {"cpu_us_per_call": cpu / calls * 1e6, "calls_per_s": calls / wall}


def measure(calls: int = 20000, in_flight: int = 64, rounds: int = 3) -> None:
    """Client CPU per unary Range, ours against grpc.aio, interleaved rounds on a private etcd."""
    import tempfile

    from tests.helpers import start_etcd

    with tempfile.TemporaryDirectory() as tmp:
        etcd = start_etcd(Path(tmp), name="measure")
        try:
            with grpc.insecure_channel(etcd.endpoint) as ch:
                rpc_pb2_grpc.KVStub(ch).Put(rpc_pb2.PutRequest(key=b"bench", value=b"v" * 100))
            for _ in range(rounds):
                for impl, loop in (
                    ("etcdproxy.h2", "asyncio"),
                    ("etcdproxy.h2", "uvloop"),
                    ("etcdproxy.h2-callbacks", "asyncio"),
                    ("grpc.aio", "asyncio"),
                ):
                    coro = _measure(impl, etcd.endpoint, calls, in_flight)
                    if loop == "uvloop":
                        import uvloop

                        result = uvloop.run(coro)
                    else:
                        result = asyncio.run(coro)
                    print(f"{impl:22s} {loop:8s} {calls} Ranges, {in_flight} in flight: "
                          f"{result['cpu_us_per_call']:.1f} us CPU/call, {result['calls_per_s']:.0f} calls/s",
                          flush=True)  # fmt: skip
        finally:
            etcd.stop()


if __name__ == "__main__":
    measure(*(int(a) for a in sys.argv[1:]))
