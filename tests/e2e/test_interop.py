"""Interop (issue 11): real clients through a ``--workers 2`` proxy in front of a real etcd, each in plaintext
(h2c) and over TLS (``--cert-file/--key-file``, clients trusting the CA).

Clients: grpcio sync and grpc.aio (unary, streams, deadlines, metadata, 0 B to ~3.6 MiB messages,
cancellation), etcd3aio, h2load, nghttp, curl (gRPC over HTTP/2, and HTTP/1.1 to the health and metrics paths
of the gRPC port), and the Go ``etcd grpc-proxy`` on either side of the proxy. etcdctl's commands over TLS are in
test_interop_tls.py (plaintext: test_etcdctl.py).

``ETCDPROXY_TEST_IMPL=go`` runs the same tests against the Go proxy.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc, v3lock_pb2, v3lock_pb2_grpc
from tests.conftest import ProxyLauncher
from tests.helpers import IMPL_GO, LOCALHOST, EtcdServer, ProxyProcess, free_port, stop_process
from tests.interop_helpers import (
    Endpoint,
    Lines,
    Pki,
    etcdctl,
    etcdctl_start,
    grpc_frame,
    grpc_unframe,
    make_pki,
    run_tool,
    start_interop_proxy,
    upstream_tls_args,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

MiB = 1024 * 1024
# A -bin key (binary, base64 on the wire) and an ASCII one on every call of the metadata test.
BIN_MD = ("x-interop-bin", b"\x00\xff\x01binary\r\n")
ASCII_MD = ("x-interop", "plain-value")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("interop-pki"))


@pytest.fixture(params=["h2c", "tls"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def served(proxy: ProxyLauncher, etcd_server: EtcdServer, pki: Pki, mode: str) -> tuple[ProxyProcess, Endpoint]:
    """A proxy in front of the session's etcd, TLS on its listener in ``tls`` mode."""
    return start_interop_proxy(proxy, [etcd_server.endpoint], tls=pki if mode == "tls" else None)


@pytest.fixture
def ep(served: tuple[ProxyProcess, Endpoint]) -> Endpoint:
    return served[1]


@pytest.fixture
def channel(ep: Endpoint) -> Iterator[grpc.Channel]:
    ch = ep.channel()
    yield ch
    ch.close()


def prefix() -> bytes:
    return f"interop/{uuid.uuid4().hex[:8]}/".encode()


def prefix_end(p: bytes) -> bytes:
    return p[:-1] + bytes([p[-1] + 1])


# --------------------------------------------------------------------------- grpcio (sync)


def test_grpcio_unary_put_range_txn_with_metadata(channel: grpc.Channel) -> None:
    kv = rpc_pb2_grpc.KVStub(channel)
    p = prefix()
    md = (BIN_MD, ASCII_MD)
    put, call = kv.Put.with_call(rpc_pb2.PutRequest(key=p + b"a", value=b"1", prev_kv=True), metadata=md, timeout=10)
    assert call.code() == grpc.StatusCode.OK and not put.HasField("prev_kv") and put.header.revision > 0
    kv.Put(rpc_pb2.PutRequest(key=p + b"b", value=b"2"), metadata=md, timeout=10)
    got = kv.Range(rpc_pb2.RangeRequest(key=p, range_end=prefix_end(p)), metadata=md, timeout=10)
    assert [(x.key, x.value) for x in got.kvs] == [(p + b"a", b"1"), (p + b"b", b"2")] and got.count == 2
    compare = rpc_pb2.Compare(key=p + b"a", result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.VALUE, value=b"1")
    txn = rpc_pb2.TxnRequest(
        compare=[compare],
        success=[
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=p + b"a", value=b"10")),
            rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=p + b"a")),
        ],
        failure=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=p + b"a"))],
    )
    first = kv.Txn(txn, metadata=md, timeout=10)
    assert first.succeeded and first.responses[1].response_range.kvs[0].value == b"10"
    second = kv.Txn(txn, metadata=md, timeout=10)  # the compare fails now: the key is deleted
    assert not second.succeeded and second.responses[0].response_delete_range.deleted == 1
    assert kv.Range(rpc_pb2.RangeRequest(key=p + b"a"), timeout=10).count == 0


def test_grpcio_token_metadata_reaches_etcd(proxy: ProxyLauncher, fresh_etcd: EtcdServer, pki: Pki, mode: str) -> None:
    """With auth on (a private etcd), only the ``token`` key makes a call pass: it must arrive intact."""
    with grpc.insecure_channel(fresh_etcd.endpoint) as direct:
        auth = rpc_pb2_grpc.AuthStub(direct)
        auth.UserAdd(rpc_pb2.AuthUserAddRequest(name="root", password="rootpw"), timeout=10)
        auth.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
        auth.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=10)
    _, ep = start_interop_proxy(proxy, [fresh_etcd.endpoint], tls=pki if mode == "tls" else None)
    with ep.channel() as ch:
        token = (
            rpc_pb2_grpc.AuthStub(ch)
            .Authenticate(rpc_pb2.AuthenticateRequest(name="root", password="rootpw"), timeout=10)
            .token
        )
        assert token
        kv = rpc_pb2_grpc.KVStub(ch)
        kv.Put(rpc_pb2.PutRequest(key=b"authed", value=b"yes"), metadata=(("token", token), BIN_MD), timeout=10)
        got = kv.Range(rpc_pb2.RangeRequest(key=b"authed"), metadata=(("token", token),), timeout=10)
        assert got.kvs[0].value == b"yes"
        for md, details in (((BIN_MD,), "etcdserver: user name is empty"), ((("token", "bogus"),), "invalid auth")):
            with pytest.raises(grpc.RpcError) as exc:
                kv.Range(rpc_pb2.RangeRequest(key=b"authed"), metadata=md, timeout=10)
            assert details in (exc.value.details() or ""), (md, exc.value)


def test_grpcio_message_sizes(channel: grpc.Channel, etcd_server: EtcdServer) -> None:
    """0 B to 1.4 MiB values (across DATA frame and window boundaries) round-trip; etcd's limits answer the rest."""
    kv = rpc_pb2_grpc.KVStub(channel)
    p = prefix()
    for size in (0, 1, 16379, 16384, 65535, 65536 + 7, MiB, 1400 * 1024):
        value = bytes(i % 251 for i in range(size))
        kv.Put(rpc_pb2.PutRequest(key=p + b"%d" % size, value=value), timeout=20)
        assert kv.Range(rpc_pb2.RangeRequest(key=p + b"%d" % size), timeout=20).kvs[0].value == value, size
    # above etcd's --max-request-bytes (1.5 MiB): etcd's own error, through the proxy
    with pytest.raises(grpc.RpcError) as exc:
        kv.Put(rpc_pb2.PutRequest(key=p + b"big", value=b"x" * (1800 * 1024)), timeout=20)
    assert (exc.value.code(), exc.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: request is too large",
    )
    # 3 MiB: above etcd's gRPC receive limit (1.5 MiB + 512 KiB); the same code as etcd's answer
    with grpc.insecure_channel(etcd_server.endpoint) as direct, pytest.raises(grpc.RpcError) as direct_exc:
        rpc_pb2_grpc.KVStub(direct).Put(rpc_pb2.PutRequest(key=p + b"huge", value=b"y" * (3 * MiB)), timeout=20)
    with pytest.raises(grpc.RpcError) as exc:
        kv.Put(rpc_pb2.PutRequest(key=p + b"huge", value=b"y" * (3 * MiB)), timeout=20)
    assert exc.value.code() == direct_exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (exc.value.details() or "").startswith("grpc: received message larger than max ("), exc.value.details()
    # a ~3.6 MiB response (three 1.2 MiB values): the server side has no 4 MiB send limit
    big = p + b"big/"
    values = [bytes([65 + i]) * (1200 * 1024) for i in range(3)]
    for i, value in enumerate(values):
        kv.Put(rpc_pb2.PutRequest(key=big + b"%d" % i, value=value), timeout=20)
    got = kv.Range(rpc_pb2.RangeRequest(key=big, range_end=prefix_end(big)), timeout=30)
    assert [x.value for x in got.kvs] == values
    assert got.ByteSize() > 3 * 1200 * 1024
    kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=p, range_end=prefix_end(p)), timeout=20)


def test_grpcio_gzip_multiplexing_health_and_unknown_method(channel: grpc.Channel, ep: Endpoint) -> None:
    kv = rpc_pb2_grpc.KVStub(channel)
    p = prefix()
    value = b"compressible " * 20000  # 260 KB: many DATA frames once compressed or not
    # grpc-encoding gzip on the request (and accepted on the response)
    kv.Put(rpc_pb2.PutRequest(key=p + b"gz", value=value), compression=grpc.Compression.Gzip, timeout=20)
    got = kv.Range(rpc_pb2.RangeRequest(key=p + b"gz"), compression=grpc.Compression.Gzip, timeout=20)
    assert got.kvs[0].value == value
    with ep.channel(options=[("grpc.default_compression_algorithm", grpc.Compression.Gzip.value)]) as gz:
        assert rpc_pb2_grpc.KVStub(gz).Range(rpc_pb2.RangeRequest(key=p + b"gz"), timeout=20).kvs[0].value == value
    # 300 concurrent calls on one connection, unary and streams mixed
    futures = [kv.Put.future(rpc_pb2.PutRequest(key=p + b"m%03d" % i, value=b"%d" % i), timeout=30) for i in range(150)]
    futures += [kv.Range.future(rpc_pb2.RangeRequest(key=p + b"gz"), timeout=30) for _ in range(150)]
    for f in futures:
        f.result()
    got = kv.Range(rpc_pb2.RangeRequest(key=p + b"m", range_end=p + b"n", count_only=True), timeout=10)
    assert got.count == 150
    # grpc.health.v1 (empty HealthCheckRequest; HealthCheckResponse status SERVING = field 1, value 1)
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    assert check(b"", timeout=10) == b"\x08\x01"
    for path, details in (
        ("/etcdserverpb.KV/NoSuchMethod", "unknown method NoSuchMethod for service etcdserverpb.KV"),
        ("/no.such.Service/Call", "unknown service no.such.Service"),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            channel.unary_unary(path)(b"", timeout=10)
        assert (exc.value.code(), exc.value.details()) == (grpc.StatusCode.UNIMPLEMENTED, details)
    kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=p, range_end=prefix_end(p)), timeout=10)


def hold_lock(channel: grpc.Channel, name: bytes) -> int:
    """Acquire ``name`` with a fresh 60 s lease; return the lease (revoking it releases the lock)."""
    lease = rpc_pb2_grpc.LeaseStub(channel).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=10).ID
    v3lock_pb2_grpc.LockStub(channel).Lock(v3lock_pb2.LockRequest(name=name, lease=lease), timeout=10)
    return int(lease)


def test_grpcio_deadlines(channel: grpc.Channel) -> None:
    kv = rpc_pb2_grpc.KVStub(channel)
    assert kv.Range(rpc_pb2.RangeRequest(key=b"deadline"), timeout=10).header.revision > 0
    # a call that cannot finish in time: a Lock on a held lock; the deadline ends it, not etcd
    name = prefix() + b"lock"
    holder = hold_lock(channel, name)
    waiter = rpc_pb2_grpc.LeaseStub(channel).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=10).ID
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        v3lock_pb2_grpc.LockStub(channel).Lock(v3lock_pb2.LockRequest(name=name, lease=waiter), timeout=1)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.8 < time.monotonic() - start < 8
    # a stream with a deadline ends with DEADLINE_EXCEEDED, after its events
    watch = rpc_pb2_grpc.WatchStub(channel).Watch(
        iter([rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=name))]), timeout=1.5
    )
    with pytest.raises(grpc.RpcError) as exc:
        for response in watch:
            assert response.created
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    lease = rpc_pb2_grpc.LeaseStub(channel)
    for lease_id in (holder, waiter):
        lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=10)


def test_grpcio_watch_events_and_cancel(channel: grpc.Channel) -> None:
    kv, watch = rpc_pb2_grpc.KVStub(channel), rpc_pb2_grpc.WatchStub(channel)
    p = prefix()
    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=p, range_end=prefix_end(p))))
    call = watch.Watch(iter(requests.get, None), timeout=60)
    first = next(call)
    assert first.created
    for i in range(3):
        kv.Put(rpc_pb2.PutRequest(key=p + b"%d" % i, value=b"v%d" % i), timeout=10)
    kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=p + b"0"), timeout=10)
    events: list[tuple[int, bytes, bytes]] = []
    while len(events) < 4:
        events += [(e.type, e.kv.key, e.kv.value) for e in next(call).events]
    assert events == [(0, p + b"0", b"v0"), (0, p + b"1", b"v1"), (0, p + b"2", b"v2"), (1, p + b"0", b"")]
    # cancel the in-flight stream (RST_STREAM CANCEL); the connection keeps serving
    call.cancel()
    with pytest.raises(grpc.RpcError) as exc:
        next(call)
    assert exc.value.code() == grpc.StatusCode.CANCELLED
    requests.put(None)
    again = watch.Watch(iter([rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=p + b"1"))]))
    assert next(again).created
    kv.Put(rpc_pb2.PutRequest(key=p + b"1", value=b"after"), timeout=10)
    assert next(again).events[0].kv.value == b"after"
    again.cancel()


def test_grpcio_watch_volume_beyond_the_windows(channel: grpc.Channel) -> None:
    """4 MB of events on one watch stream: more than the stream and connection windows, so flow control
    (WINDOW_UPDATE from grpcio, queued DATA on our side) must move them all, in order."""
    kv, watch = rpc_pb2_grpc.KVStub(channel), rpc_pb2_grpc.WatchStub(channel)
    p = prefix()
    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=p, range_end=prefix_end(p))))
    call = watch.Watch(iter(requests.get, None), timeout=60)
    try:
        assert next(call).created
        values = [bytes([97 + i % 26]) * (100 * 1024) for i in range(40)]
        futures = [
            kv.Put.future(rpc_pb2.PutRequest(key=p + b"%02d" % i, value=v), timeout=30) for i, v in enumerate(values)
        ]
        for f in futures:
            f.result()
        seen: dict[bytes, bytes] = {}
        revisions: list[int] = []
        while len(seen) < len(values):
            for e in next(call).events:
                seen[e.kv.key] = e.kv.value
                revisions.append(e.kv.mod_revision)
        assert revisions == sorted(revisions)
        assert seen == {p + b"%02d" % i: v for i, v in enumerate(values)}
    finally:
        call.cancel()
        requests.put(None)
    kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=p, range_end=prefix_end(p)), timeout=10)


def test_grpcio_lease_keepalive_stream(channel: grpc.Channel) -> None:
    lease = rpc_pb2_grpc.LeaseStub(channel)
    granted = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=30), timeout=10)
    requests: queue.Queue[rpc_pb2.LeaseKeepAliveRequest | None] = queue.Queue()
    call = lease.LeaseKeepAlive(iter(requests.get, None), timeout=30)
    for i in range(3):
        requests.put(rpc_pb2.LeaseKeepAliveRequest(ID=granted.ID))
        response = next(call)
        # after the first, the proxy may answer from its --lease-keepalive-window: the TTL left, never more
        assert response.ID == granted.ID and (response.TTL == 30 if i == 0 else 29 <= response.TTL <= 30)
    lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=granted.ID), timeout=10)
    requests.put(rpc_pb2.LeaseKeepAliveRequest(ID=granted.ID))
    assert next(call).TTL == 0  # etcd's answer for a lease that is gone
    requests.put(None)  # half-close: the server ends the stream OK
    assert list(call) == [] and call.code() == grpc.StatusCode.OK


# --------------------------------------------------------------------------- grpc.aio


def test_grpc_aio_client(ep: Endpoint) -> None:
    async def body() -> None:
        async with ep.aio_channel() as ch:
            kv, watch = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.WatchStub(ch)
            lease = rpc_pb2_grpc.LeaseStub(ch)
            p = prefix()
            await kv.Put(rpc_pb2.PutRequest(key=p + b"k", value=b"aio"), metadata=(BIN_MD,), timeout=10)
            got = await kv.Range(rpc_pb2.RangeRequest(key=p + b"k"), metadata=(ASCII_MD,), timeout=10)
            assert got.kvs[0].value == b"aio"
            txn = await kv.Txn(
                rpc_pb2.TxnRequest(
                    compare=[
                        rpc_pb2.Compare(key=p + b"k", target=rpc_pb2.Compare.VALUE, value=b"aio")  # EQUAL
                    ],
                    success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=p + b"k", value=b"txn"))],
                ),
                timeout=10,
            )
            assert txn.succeeded
            large = bytes(range(256)) * 4096  # 1 MiB
            await kv.Put(rpc_pb2.PutRequest(key=p + b"large", value=large), timeout=20)
            assert (await kv.Range(rpc_pb2.RangeRequest(key=p + b"large"), timeout=20)).kvs[0].value == large

            # a watch stream with events, then cancelled in flight
            call = watch.Watch()
            await call.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=p + b"w")))
            assert (await call.read()).created
            await kv.Put(rpc_pb2.PutRequest(key=p + b"w", value=b"1"), timeout=10)
            await kv.Put(rpc_pb2.PutRequest(key=p + b"w", value=b"2"), timeout=10)
            values: list[bytes] = []
            while len(values) < 2:
                values += [e.kv.value for e in (await call.read()).events]
            assert values == [b"1", b"2"]
            assert call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED

            # keepalive stream
            granted = await lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=20), timeout=10)
            ka = lease.LeaseKeepAlive()
            for i in range(2):
                await ka.write(rpc_pb2.LeaseKeepAliveRequest(ID=granted.ID))
                response = await ka.read()
                assert response.ID == granted.ID and (response.TTL == 20 if i == 0 else 19 <= response.TTL <= 20)
            await ka.done_writing()
            assert await ka.read() == grpc.aio.EOF
            assert await ka.code() == grpc.StatusCode.OK
            await lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=granted.ID), timeout=10)

            # a deadline that expires on a stream with nothing to say, and one that does not
            quiet = watch.Watch(timeout=1)
            await quiet.write(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=p + b"quiet")))
            assert (await quiet.read()).created
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await quiet.read()
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (await kv.Range(rpc_pb2.RangeRequest(key=p + b"k"), timeout=30)).kvs[0].value == b"txn"

    asyncio.run(asyncio.wait_for(body(), 60))


# --------------------------------------------------------------------------- etcd3aio


ETCD3AIO_SCRIPT = """
import asyncio, json, pathlib, sys
import etcd3aio

async def main(endpoint, prefix, ca):
    tls = {"ca_cert": pathlib.Path(ca).read_bytes()} if ca else {}
    out = {}
    async with etcd3aio.Etcd3Client([endpoint], **tls) as client:
        await client.kv.put(prefix + "k", "v1", timeout=10)
        out["get"] = (await client.kv.get(prefix + "k", timeout=10)).kvs[0].value.decode()
        rev = (await client.kv.put(prefix + "start", "0", timeout=10)).header.revision
        watch = client.watch.watch(prefix, etcd3aio.prefix_range_end(prefix), start_revision=rev + 1)
        await client.kv.put(prefix + "k", "v2", timeout=10)
        await client.kv.delete(prefix + "start", timeout=10)
        seen = []
        async with asyncio.timeout(15):
            async for resp in watch:
                seen.extend([e.type, e.kv.key.decode(), e.kv.value.decode()] for e in resp.events)
                if len(seen) >= 2:
                    break
        await watch.aclose()
        out["watch"] = seen
        lease = await client.lease.grant(2, timeout=10)
        await client.kv.put(prefix + "leased", "x", lease=lease.ID, timeout=10)
        # refreshed in the background (every second) for longer than its TTL
        async with client.lease.keep_alive_context(lease.ID, ttl=lease.TTL) as ka:
            await asyncio.sleep(3.2)
            out["alive"] = ka.alive
        out["remaining"] = (await client.lease.time_to_live(lease.ID, timeout=10)).TTL
        out["leased"] = (await client.kv.get(prefix + "leased", timeout=10)).count
        await client.lease.revoke(lease.ID, timeout=10)
        out["gone"] = (await client.lease.time_to_live(lease.ID, timeout=10)).TTL
    return out

print(json.dumps(asyncio.run(main(*sys.argv[1:]))))
"""


def test_etcd3aio_client(ep: Endpoint) -> None:
    """etcd3aio bundles its own etcd protos, which clash with etcdproxy.etcdpb in one descriptor pool: it runs in
    its own interpreter (like tests/e2e/test_streams.py)."""
    p = prefix().decode()
    ca = str(ep.pki.ca) if ep.pki is not None else ""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", ETCD3AIO_SCRIPT, ep.address, p, ca],
        capture_output=True,
        text=True,
        timeout=45,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["get"] == "v1"
    assert out["watch"] == [[0, f"{p}k", "v2"], [1, f"{p}start", ""]]
    assert out["alive"] and out["remaining"] > 0 and out["leased"] == 1, out
    assert out["gone"] == -1


# --------------------------------------------------------------------------- HTTP/2 command-line clients


def range_body(tmp_path: Path, key: bytes) -> Path:
    path = tmp_path / "range.bin"
    path.write_bytes(grpc_frame(rpc_pb2.RangeRequest(key=key)))
    return path


GRPC_HEADERS = ("-H", "content-type: application/grpc", "-H", "te: trailers")


def test_h2load_range(ep: Endpoint, channel: grpc.Channel, tmp_path: Path) -> None:
    key = prefix() + b"h2load"
    rpc_pb2_grpc.KVStub(channel).Put(rpc_pb2.PutRequest(key=key, value=b"load"), timeout=10)
    expected = rpc_pb2_grpc.KVStub(channel).Range(rpc_pb2.RangeRequest(key=key), timeout=10)
    n = 2000
    result = run_tool(
        [
            "h2load",
            f"-n{n}",
            "-c4",
            "-m8",
            "-d",
            str(range_body(tmp_path, key)),
            *GRPC_HEADERS,
            "--header=grpc-timeout: 10S",
            f"{ep.url}/etcdserverpb.KV/Range",
        ],
        timeout=60,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert f"requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, 0 errored, 0 timeout" in out, out
    assert f"status codes: {n} 2xx, 0 3xx, 0 4xx, 0 5xx" in out, out
    # every response carried one RangeResponse like the one grpcio got (h2load cannot see grpc-status)
    data = re.search(r"traffic: .*\((\d+)\) data", out)
    assert data is not None, out
    assert int(data.group(1)) == n * len(grpc_frame(expected)), out


def test_h2load_tiny_windows(ep: Endpoint, channel: grpc.Channel, tmp_path: Path) -> None:
    """100 KB responses through a 4 KiB stream window and a 16 KiB connection window: our side must stop at the
    window and resume on each WINDOW_UPDATE, for 10 streams per connection at once."""
    key = prefix() + b"h2load-big"
    rpc_pb2_grpc.KVStub(channel).Put(rpc_pb2.PutRequest(key=key, value=b"w" * 100_000), timeout=10)
    expected = rpc_pb2_grpc.KVStub(channel).Range(rpc_pb2.RangeRequest(key=key), timeout=10)
    n = 200
    result = run_tool(
        [
            "h2load",
            f"-n{n}",
            "-c2",
            "-m10",
            "-w12",
            "-W14",
            "-d",
            str(range_body(tmp_path, key)),
            *GRPC_HEADERS,
            f"{ep.url}/etcdserverpb.KV/Range",
        ],
        timeout=60,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert f"requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, 0 errored, 0 timeout" in out, out
    data = re.search(r"traffic: .*\((\d+)\) data", out)
    assert data is not None and int(data.group(1)) == n * len(grpc_frame(expected)), out


def test_curl_unary_call(ep: Endpoint, channel: grpc.Channel, tmp_path: Path) -> None:
    key = prefix() + b"curl"
    rpc_pb2_grpc.KVStub(channel).Put(rpc_pb2.PutRequest(key=key, value=b"via curl"), timeout=10)
    headers, body = tmp_path / "headers", tmp_path / "body"
    result = run_tool(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            *ep.curl_flags(),
            *GRPC_HEADERS,
            "-H",
            "grpc-timeout: 10S",
            "--data-binary",
            f"@{range_body(tmp_path, key)}",
            "-D",
            str(headers),
            "-o",
            str(body),
            "-w",
            "%{http_version}",
            f"{ep.url}/etcdserverpb.KV/Range",
        ]
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "2"  # HTTP/2: prior knowledge, or ALPN h2 over TLS
    # -D holds the response headers, a blank line, then the trailers
    head, _, tail = headers.read_text().replace("\r\n", "\n").partition("\n\n")
    lines, trailers = head.splitlines(), dict(line.split(": ", 1) for line in tail.splitlines() if ": " in line)
    assert lines[0].strip() == "HTTP/2 200" and "content-type: application/grpc" in lines, lines
    assert trailers.get("grpc-status") == "0" and not trailers.get("grpc-message"), (lines, tail)
    (message,) = grpc_unframe(body.read_bytes())
    response = rpc_pb2.RangeResponse.FromString(message)
    assert [(x.key, x.value) for x in response.kvs] == [(key, b"via curl")]


def test_curl_grpc_timeout_expires_at_the_server(ep: Endpoint, channel: grpc.Channel, tmp_path: Path) -> None:
    """curl enforces no gRPC deadline: the DEADLINE_EXCEEDED in the trailers comes from the server."""
    name = prefix() + b"lock"
    holder = hold_lock(channel, name)
    waiter = rpc_pb2_grpc.LeaseStub(channel).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=10).ID
    body = tmp_path / "lock.bin"
    body.write_bytes(grpc_frame(v3lock_pb2.LockRequest(name=name, lease=waiter)))
    headers = tmp_path / "headers"
    start = time.monotonic()
    result = run_tool(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            *ep.curl_flags(),
            *GRPC_HEADERS,
            "-H",
            "grpc-timeout: 700m",
            "--data-binary",
            f"@{body}",
            "-D",
            str(headers),
            "-o",
            str(tmp_path / "out"),
            f"{ep.url}/v3lockpb.Lock/Lock",
        ]
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr.decode()
    text = headers.read_text()
    assert re.search(r"^grpc-status: 4\r?$", text, re.M), text
    assert 0.5 < elapsed < 10, elapsed
    lease = rpc_pb2_grpc.LeaseStub(channel)
    for lease_id in (holder, waiter):
        lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=10)


def test_nghttp_unary_call(ep: Endpoint, channel: grpc.Channel, tmp_path: Path) -> None:
    key = prefix() + b"nghttp"
    rpc_pb2_grpc.KVStub(channel).Put(rpc_pb2.PutRequest(key=key, value=b"via nghttp"), timeout=10)
    url = f"{ep.url}/etcdserverpb.KV/Range"
    data = str(range_body(tmp_path, key))
    verbose = run_tool(["nghttp", "-v", "-t", "20", *GRPC_HEADERS, "-d", data, url], timeout=30)
    assert verbose.returncode == 0, verbose.stdout.decode(errors="replace") + verbose.stderr.decode()
    frames = verbose.stdout.decode(errors="replace")
    assert re.search(r"recv \(stream_id=\d+\) :status: 200", frames), frames
    assert re.search(r"recv \(stream_id=\d+\) grpc-status: 0", frames), frames
    if ep.tls:
        assert "The negotiated protocol: h2" in frames, frames
    quiet = run_tool(["nghttp", "-t", "20", *GRPC_HEADERS, "-d", data, url], timeout=30)  # the body alone
    assert quiet.returncode == 0, quiet.stderr.decode()
    (message,) = grpc_unframe(quiet.stdout)
    assert [(x.key, x.value) for x in rpc_pb2.RangeResponse.FromString(message).kvs] == [(key, b"via nghttp")]


# --------------------------------------------------------------------------- HTTP/1.1 on the gRPC port


def test_http1_health_and_metrics_on_the_grpc_port(
    proxy: ProxyLauncher, etcd_server: EtcdServer, pki: Pki, mode: str, tmp_path: Path
) -> None:
    """Like the Go proxy's cmux: a load balancer can health-check the port it balances."""
    metrics = f"http://{LOCALHOST}:{free_port()}"
    extra: tuple[str, ...] = (f"--metrics-addr={metrics}",)
    tls: list[str] = []
    if mode == "tls":
        # mutual TLS: /proxy/health's self probe (like Go's) presents the server certificate and trusts
        # --trusted-ca-file only; without it the probe fails on our private CA and both ports answer 503
        extra += (f"--trusted-ca-file={pki.ca}",)
        tls = ["--cacert", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    _, ep = start_interop_proxy(proxy, [etcd_server.endpoint], tls=pki if mode == "tls" else None, extra_args=extra)

    def get(base: str, path: str, flags: list[str]) -> tuple[int, str, str]:
        out = tmp_path / "body"
        result = run_tool(
            [
                "curl",
                "-sS",
                "--http1.1",
                "--max-time",
                "10",
                *flags,
                "-o",
                str(out),
                "-w",
                "%{http_code}|%{content_type}",
                f"{base}{path}",
            ]
        )
        assert result.returncode == 0, (path, result.stderr.decode())
        code, ctype = result.stdout.decode().split("|", 1)
        return int(code), ctype, out.read_text()

    def families(text: str) -> list[str]:
        return sorted(line for line in text.splitlines() if line.startswith("# TYPE "))

    for path in ("/health", "/proxy/health", "/metrics", "/proxy/metrics"):
        want = get(metrics, path, [])
        got = get(ep.url, path, tls)
        assert got[:2] == want[:2] == (200, want[1]), (path, got[:2], want[:2])
        if path.endswith("health"):
            assert got[2] == want[2] and '"health":"true"' in got[2], (path, got[2], want[2])
            continue
        # values move between two scrapes; the families are the same, once every process of a proxy that just
        # started has written its first counts (CI: 5 families appeared between the two scrapes)
        deadline = time.monotonic() + 10
        while families(got[2]) != families(want[2]) and time.monotonic() < deadline:
            time.sleep(0.5)
            want, got = get(metrics, path, []), get(ep.url, path, tls)
        assert families(got[2]) and families(got[2]) == families(want[2]), path
    assert get(ep.url, "/nope", tls)[0] == 404


# --------------------------------------------------------------------------- the Go grpc-proxy on either side


def watch_put_get(ep: Endpoint, tag: str) -> None:
    """etcdctl put/get and a watch through ``ep``."""
    key = f"interop/{tag}/{uuid.uuid4().hex[:8]}"
    assert etcdctl(ep, "put", key, "v1") == "OK\n"
    assert etcdctl(ep, "get", key) == f"{key}\nv1\n"
    rev = int(re.search(r'"revision":(\d+)', etcdctl(ep, "get", key, "-w", "json")).group(1))  # type: ignore[union-attr]
    watcher = etcdctl_start(ep, "watch", key, f"--rev={rev + 1}")
    try:
        lines = Lines(watcher)
        assert etcdctl(ep, "put", key, "v2") == "OK\n"
        assert etcdctl(ep, "del", key) == "1\n"
        assert lines.take(5, timeout=10) == ["PUT", key, "v2", "DELETE", key]
    finally:
        stop_process(watcher, grace=5)
        for stream in (watcher.stdout, watcher.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("via", ["etcdctl", "go-proxy"])
def test_etcdctl_large_values(
    proxy: ProxyLauncher, served: tuple[ProxyProcess, Endpoint], pki: Pki, mode: str, via: str
) -> None:
    """grpc-go's flow control against ours: 1.4 MiB in (from stdin) and out, h2c and TLS; from etcdctl itself,
    and from the Go grpc-proxy as etcdproxy's client (etcdctl -> Go proxy -> etcdproxy). grpc-go's BDP pings
    during a window-blocked answer must not earn GOAWAY too_many_pings (fixed in 17e659a)."""
    ep = served[1]
    if via == "go-proxy":
        upstream = upstream_tls_args(pki) if mode == "tls" else ()
        _, ep = start_interop_proxy(proxy, [ep.url], impl=IMPL_GO, extra_args=upstream)
    key = f"interop/etcdctl-large/{uuid.uuid4().hex[:8]}"
    value = "".join(chr(97 + i % 26) for i in range(1400 * 1024))
    assert etcdctl(ep, "put", key, stdin=value) == "OK\n"
    assert etcdctl(ep, "get", key, "--print-value-only") == value + "\n"
    assert etcdctl(ep, "del", key) == "1\n"


def test_etcdctl_watch_large_event(ep: Endpoint) -> None:
    key = f"interop/etcdctl-watch-large/{uuid.uuid4().hex[:8]}"
    value = "".join(chr(65 + i % 26) for i in range(1400 * 1024))
    rev = int(re.search(r'"revision":(\d+)', etcdctl(ep, "get", key, "-w", "json")).group(1))  # type: ignore[union-attr]
    watcher = etcdctl_start(ep, "watch", key, f"--rev={rev + 1}")
    try:
        lines = Lines(watcher)
        assert etcdctl(ep, "put", key, stdin=value) == "OK\n"
        assert etcdctl(ep, "put", key, "small") == "OK\n"
        assert lines.take(6, timeout=10) == ["PUT", key, value, "PUT", key, "small"]
    finally:
        stop_process(watcher, grace=5)
        for stream in (watcher.stdout, watcher.stderr):
            if stream is not None:
                stream.close()


def test_go_proxy_as_a_client_of_etcdproxy(proxy: ProxyLauncher, etcd_server: EtcdServer, pki: Pki, mode: str) -> None:
    """etcdctl -> Go grpc-proxy -> etcdproxy (h2c or TLS) -> etcd."""
    ours, ours_ep = start_interop_proxy(proxy, [etcd_server.endpoint], tls=pki if mode == "tls" else None)
    upstream = upstream_tls_args(pki) if mode == "tls" else ()
    _, go_ep = start_interop_proxy(proxy, [ours_ep.url], impl=IMPL_GO, extra_args=upstream)
    watch_put_get(go_ep, "go-over-ours")
    assert ours.alive()


def test_etcdproxy_as_a_client_of_the_go_proxy(
    proxy: ProxyLauncher, etcd_server: EtcdServer, pki: Pki, mode: str
) -> None:
    """etcdctl -> etcdproxy -> Go grpc-proxy (h2c or TLS) -> etcd (the Go proxy numbers upstream watches itself,
    ignoring the ids the hub asks for)."""
    _, go_ep = start_interop_proxy(proxy, [etcd_server.endpoint], impl=IMPL_GO, tls=pki if mode == "tls" else None)
    upstream = upstream_tls_args(pki) if mode == "tls" else ()
    _, ours_ep = start_interop_proxy(proxy, [go_ep.url], extra_args=upstream)
    lease = etcdctl(ours_ep, "lease", "grant", "30").split()[1]
    assert etcdctl(ours_ep, "lease", "keep-alive", "--once", lease) == f"lease {lease} keepalived with TTL(30)\n"
    assert etcdctl(ours_ep, "lease", "revoke", lease) == f"lease {lease} revoked\n"
    watch_put_get(ours_ep, "ours-over-go")
