"""Lease service end to end against a real etcd: SPEC 21 scenarios 37-41, directly and through the
proxy, plus the lease hub's promises (issue 5): one upstream keepalive stream for the whole proxy,
expiry TTL after the last keepalive, nothing lost when the hub is killed, require-leader honoured.

Every process a test starts is stopped by pid (fixtures, or ``finally`` blocks here).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2 as pb
from etcdproxy.etcdpb import rpc_pb2_grpc
from tests.helpers import (
    EtcdServer,
    ProxyProcess,
    Stubs,
    http_get,
    rpc_error,
    stop_process,
    sum_metric,
)

pytestmark = pytest.mark.e2e

NOT_FOUND = ("NOT_FOUND", "etcdserver: requested lease not found")
_keys = itertools.count()


def unique_key(tag: str) -> bytes:
    return f"/lease-test/{tag}/{os.getpid()}-{next(_keys)}-{time.monotonic_ns()}".encode()


def one_shot(stubs: Stubs, *lease_ids: int, metadata: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    """python-etcd3 style: send the requests, half-close, read until the stream ends (must be OK)."""
    requests = iter([pb.LeaseKeepAliveRequest(ID=i) for i in lease_ids])
    return list(stubs.lease.LeaseKeepAlive(requests, timeout=10, metadata=metadata))


def keepalive_started(etcd: EtcdServer) -> float:
    """etcd's count of LeaseKeepAlive streams ever started (scraped from its client URL)."""
    _, text = http_get(f"{etcd.client_url}/metrics")
    return sum_metric(text, "grpc_server_started_total", {"grpc_method": "LeaseKeepAlive"})


async def wait_deleted(direct: grpc.aio.Channel, key: bytes) -> None:
    """Return when etcd (watched directly) deletes ``key``."""
    watch = rpc_pb2_grpc.WatchStub(direct).Watch()
    try:
        await watch.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key)))
        assert (await watch.read()).created
        if (await rpc_pb2_grpc.KVStub(direct).Range(pb.RangeRequest(key=key, count_only=True))).count == 0:
            return
        while True:
            response = await watch.read()
            if any(e.type == e.DELETE for e in response.events):
                return
    finally:
        watch.cancel()


@pytest.fixture(params=["direct", "proxy"])
def endpoint(request: pytest.FixtureRequest) -> str:
    if request.param == "direct":
        etcd: EtcdServer = request.getfixturevalue("etcd_server")
        return etcd.endpoint
    proxy: ProxyProcess = request.getfixturevalue("shared_proxy")
    return proxy.endpoint


# ---- scenario 37: unary lease RPCs -----------------------------------------------------------


@pytest.mark.timeout(30)
def test_grant_ttl_leases_revoke(target: Stubs) -> None:
    granted = target.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=30))
    assert (granted.TTL, granted.error) == (30, "")
    key = unique_key("s37")
    target.kv.Put(pb.PutRequest(key=key, value=b"v", lease=granted.ID))
    ttl = target.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=granted.ID, keys=True))
    assert (ttl.ID, ttl.grantedTTL, list(ttl.keys)) == (granted.ID, 30, [key])
    assert 28 <= ttl.TTL <= 30
    assert granted.ID in [lease.ID for lease in target.lease.LeaseLeases(pb.LeaseLeasesRequest()).leases]
    target.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=granted.ID))
    gone = target.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=granted.ID, keys=True))
    assert (gone.ID, gone.TTL, list(gone.keys)) == (granted.ID, -1, [])
    assert gone.header.revision > 0 and gone.header.cluster_id != 0
    assert target.kv.Range(pb.RangeRequest(key=key)).count == 0
    err = rpc_error(lambda: target.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=granted.ID)))
    assert (err.code.name, err.details) == NOT_FOUND
    err = rpc_error(lambda: target.kv.Put(pb.PutRequest(key=key, value=b"v", lease=granted.ID)))
    assert (err.code.name, err.details) == NOT_FOUND


# ---- scenario 38: KeepAliveOnce, one-shot streams --------------------------------------------


@pytest.mark.timeout(30)
def test_keepalive_once(target: Stubs) -> None:
    live = target.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=20)).ID
    dead = target.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=20)).ID
    target.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=dead))
    # one request, half-close, one answer, then the stream ends OK (the Go proxy: CANCELLED)
    (answer,) = one_shot(target, live)
    assert (live, 20) == (answer.ID, answer.TTL)
    assert answer.header.revision > 0
    # revoked and unknown leases: TTL 0 like etcd (the Go proxy: -1)
    assert [(a.ID, a.TTL) for a in one_shot(target, dead)] == [(dead, 0)]
    assert [(a.ID, a.TTL) for a in one_shot(target, 0)] == [(0, 0)]
    # several requests before the half-close: one answer each, then OK
    answers = one_shot(target, live, dead, live)
    assert sorted((a.ID, a.TTL > 0) for a in answers) == sorted([(live, True), (live, True), (dead, False)])
    # half-close without any request: the stream simply ends OK
    assert one_shot(target) == []


ETCD3AIO_REFRESH = """
import asyncio, sys
import grpc
from etcd3aio import Etcd3Client

async def main(endpoint):
    async with Etcd3Client([endpoint]) as client:
        lease = await client.lease.grant(ttl=15)
        for _ in range(3):
            call = client.lease.keep_alive(lease.ID)
            answers = [(r.ID, r.TTL) async for r in call]
            code = await call.code()
            assert code == grpc.StatusCode.OK, code
            assert len(answers) == 1 and answers[0][0] == lease.ID and 13 <= answers[0][1] <= 15, answers
        await client.lease.revoke(lease.ID)
        call = client.lease.keep_alive(lease.ID)
        assert [r.TTL async for r in call] == [0]
    print("refresh ok")

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.timeout(30)
def test_etcd3aio_one_shot_refresh(endpoint: str) -> None:
    """The python-etcd3 ``refresh()`` pattern (request, half-close, read) through etcd3aio.

    Run in a subprocess: etcd3aio's generated protos clash with ours in one descriptor pool.
    """
    result = subprocess.run(
        [sys.executable, "-c", ETCD3AIO_REFRESH, endpoint], capture_output=True, text=True, timeout=25
    )
    assert result.returncode == 0 and result.stdout == "refresh ok\n", result.stderr


# ---- scenario 39: continuous keepalive; revoking one lease affects only it -------------------


@pytest.mark.timeout(40)
def test_continuous_keepalive_and_revoke_one(endpoint: str) -> None:
    async def run() -> None:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = rpc_pb2_grpc.LeaseStub(channel)
            ids = [(await stub.LeaseGrant(pb.LeaseGrantRequest(TTL=3))).ID for _ in range(3)]
            call = stub.LeaseKeepAlive()
            started = time.monotonic()
            while time.monotonic() - started < 5:  # well past the TTL
                for lease_id in ids:
                    await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
                got = sorted([((r := await call.read()).ID, r.TTL) for _ in ids])
                assert [g[0] for g in got] == sorted(ids) and all(ttl >= 2 for _, ttl in got), got
                await asyncio.sleep(0.9)
            for lease_id in ids:
                assert (await stub.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease_id))).TTL > 0
            await stub.LeaseRevoke(pb.LeaseRevokeRequest(ID=ids[0]))
            for lease_id in ids:
                await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
            got_map = {(r := await call.read()).ID: r.TTL for _ in ids}
            assert got_map[ids[0]] == 0 and got_map[ids[1]] > 0 and got_map[ids[2]] > 0
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

    asyncio.run(run())


# ---- scenario 41: expiry TTL after the last keepalive (the Go proxy: up to 2 x TTL) ----------


@pytest.mark.timeout(40)
def test_lease_expires_ttl_after_last_keepalive(endpoint: str, etcd_server: EtcdServer) -> None:
    ttl = 3
    key = unique_key("s41")

    async def run() -> float:
        async with (
            grpc.aio.insecure_channel(endpoint) as channel,
            grpc.aio.insecure_channel(etcd_server.endpoint) as direct,
        ):
            stub = rpc_pb2_grpc.LeaseStub(channel)
            lease_id = (await stub.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl))).ID
            await rpc_pb2_grpc.KVStub(direct).Put(pb.PutRequest(key=key, value=b"v", lease=lease_id))
            call = stub.LeaseKeepAlive()
            last_sent = 0.0
            for _ in range(3):  # 1 s apart: longer than the window, so every one goes upstream
                last_sent = time.monotonic()
                await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
                assert ttl == (await call.read()).TTL
                await asyncio.sleep(1.0)
            await call.done_writing()
            await wait_deleted(direct, key)
            return time.monotonic() - last_sent

    lived = asyncio.run(run())
    assert ttl - 0.1 <= lived <= ttl + 1.0, lived


# ---- etcdctl -----------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_etcdctl_lease_keep_alive(etcdctl_bin: str, shared_proxy: ProxyProcess, via_proxy: Stubs) -> None:
    env = dict(os.environ, ETCDCTL_API="3")
    base = [etcdctl_bin, f"--endpoints={shared_proxy.endpoint}", "--command-timeout=5s"]
    lease_id = via_proxy.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=6)).ID
    once = subprocess.run(
        [*base, "lease", "keep-alive", "--once", f"{lease_id:x}"], env=env, capture_output=True, timeout=15, text=True
    )
    assert once.returncode == 0, once.stderr
    assert re.fullmatch(rf"lease {lease_id:x} keepalived with TTL\((5|6)\)\n", once.stdout), once.stdout
    with subprocess.Popen(
        [*base, "lease", "keep-alive", f"{lease_id:x}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            time.sleep(4.5)  # clientv3 renews every TTL/3 = 2 s
        finally:
            stop_process(proc)
        out = proc.stdout.read() if proc.stdout else ""
    assert len(re.findall(rf"lease {lease_id:x} keepalived with TTL\(\d\)", out)) >= 2, out
    via_proxy.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id))
    gone = subprocess.run(
        [*base, "lease", "keep-alive", "--once", f"{lease_id:x}"], env=env, capture_output=True, timeout=15, text=True
    )
    assert gone.returncode != 0 and "requested lease not found" in gone.stderr, (gone.stdout, gone.stderr)
