"""Range cache through a real etcd: SPEC 21 scenarios 12-16, 45, 46; read-your-writes across workers;
writes made elsewhere; an abusive reader; the cache switch.

Every proxy here runs ``--workers 2``; readers and writers use separate TCP connections, so they
land on the same or on different workers (several readers make "different" all but certain).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from etcdproxy.etcdpb import auth_pb2, rpc_pb2
from etcdproxy.hub.cache import footprint_limit
from tests.helpers import (
    EtcdServer,
    ProxyProcess,
    Stubs,
    free_port,
    http_get,
    rpc_error,
    sum_metric,
    token_md,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

T = 10  # per-call timeout, seconds
READERS = 4
# Documented bound for writes made elsewhere: the hub's watch latency (milliseconds on one host).
EXTERNAL_BOUND_S = 2.0

Put = rpc_pb2.PutRequest
Range = rpc_pb2.RangeRequest


def stubs_on_own_connection(endpoint: str, n: int) -> Stubs:
    """Stubs on a TCP connection of their own (grpc shares subchannels of identical channels)."""
    channel = grpc.insecure_channel(endpoint, options=[("etcdproxy.test.connection", n)])
    return Stubs(name=f"conn{n}", endpoint=endpoint, channel=channel)


@pytest.fixture
def cached_proxy(proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy(workers=2)


@pytest.fixture
def conns(cached_proxy: ProxyProcess) -> Iterator[list[Stubs]]:
    """READERS + 1 separate connections to the proxy; the last one writes."""
    stubs = [stubs_on_own_connection(cached_proxy.endpoint, i) for i in range(READERS + 1)]
    yield stubs
    for s in stubs:
        s.close()


def prefix() -> bytes:
    return f"c{uuid.uuid4().hex[:8]}/".encode()


def prefix_end(p: bytes) -> bytes:
    return p[:-1] + bytes([p[-1] + 1])


def sread(stubs: Stubs, key: bytes, range_end: bytes = b"", **kw: Any) -> rpc_pb2.RangeResponse:
    return stubs.kv.Range(Range(key=key, range_end=range_end, serializable=True, **kw), timeout=T)


def values(response: rpc_pb2.RangeResponse) -> list[tuple[bytes, bytes]]:
    return [(kv.key, kv.value) for kv in response.kvs]


def etcd_ranges(etcd: EtcdServer) -> float:
    return etcd.metric("grpc_server_handled_total", grpc_method="Range")


def wait_cache_serving(stubs: Stubs, etcd: EtcdServer) -> None:
    """Until a repeated serializable read no longer reaches etcd (both workers have their cache on)."""
    key = prefix() + b"probe"

    def serving() -> bool:
        for _ in range(3):
            sread(stubs, key)
        before = etcd_ranges(etcd)
        for _ in range(10):
            sread(stubs, key)
        return etcd_ranges(etcd) == before

    wait_until(serving, 15, "the range cache to serve hits")


# ---- scenario 12: compaction -----------------------------------------------------------------


def test_compact_current_revision_keeps_reads_working(conns: list[Stubs], etcd_server: EtcdServer) -> None:
    """SPEC 21.12 (TestV3CompactCurrentRev) and 20 C: latest reads stay cacheable after a Compact."""
    reader, writer = conns[0], conns[-1]
    key = prefix() + b"foo"
    for i in range(3):
        writer.kv.Put(Put(key=key, value=b"v%d" % i), timeout=T)
    sread(reader, key)
    revision = reader.kv.Range(Range(key=key), timeout=T).header.revision
    writer.kv.Compact(rpc_pb2.CompactionRequest(revision=revision), timeout=T)
    assert values(reader.kv.Range(Range(key=key), timeout=T)) == [(key, b"v2")]
    assert values(sread(reader, key)) == [(key, b"v2")]
    wait_cache_serving(reader, etcd_server)
    before = etcd_ranges(etcd_server)
    for _ in range(20):
        assert values(sread(reader, key)) == [(key, b"v2")]
    assert etcd_ranges(etcd_server) - before <= 1  # cached again after the compaction (Go: never)
    err = rpc_error(lambda: sread(reader, key, revision=revision - 1))
    assert (err.code, err.details) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "etcdserver: mvcc: required revision has been compacted",
    )


# ---- scenario 13 and read-your-writes across workers ----------------------------------------------


def check_ryw(
    conns: list[Stubs],
    read: Callable[[Stubs], list[tuple[bytes, bytes]]],
    write: Callable[[Stubs, int], None],
    expect: Callable[[int], list[tuple[bytes, bytes]]],
) -> None:
    readers, writer = conns[:-1], conns[-1]
    for r in readers:  # fill every worker's cache
        read(r)
        read(r)
    for i in range(30):
        write(writer, i)
        for r in readers:
            assert read(r) == expect(i), f"write {i}: a serializable read missed the write just acknowledged"


def test_read_your_writes_point_key(conns: list[Stubs]) -> None:
    key = prefix() + b"k"

    def write(w: Stubs, i: int) -> None:
        if i % 3 == 2:
            w.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=key), timeout=T)
        else:
            w.kv.Put(Put(key=key, value=b"v%d" % i), timeout=T)

    check_ryw(conns, lambda r: values(sread(r, key)), write, lambda i: [] if i % 3 == 2 else [(key, b"v%d" % i)])


def test_read_your_writes_prefix(conns: list[Stubs]) -> None:
    p = prefix()

    def write(w: Stubs, i: int) -> None:
        w.kv.Put(Put(key=p + b"%02d" % i, value=b"x"), timeout=T)

    check_ryw(
        conns,
        lambda r: values(sread(r, p, prefix_end(p), keys_only=True)),
        write,
        lambda i: [(p + b"%02d" % j, b"") for j in range(i + 1)],
    )


def test_read_your_writes_from_key_and_whole_keyspace(conns: list[Stubs]) -> None:
    """SPEC 21.46 (#22397): from-key and whole-keyspace reads see later puts and from-key deletes."""
    p = prefix()
    start = p + b"k"

    def write(w: Stubs, i: int) -> None:
        w.kv.Put(Put(key=start + b"%02d" % i, value=b"x"), timeout=T)

    def read(r: Stubs) -> list[tuple[bytes, bytes]]:
        from_key = [kv for kv in values(sread(r, start, b"\x00", keys_only=True)) if kv[0].startswith(p)]
        whole = sread(r, b"\x00", b"\x00", count_only=True).count
        return [*from_key, (b"count", str(whole).encode())]

    base = sread(conns[0], b"\x00", b"\x00", count_only=True).count
    check_ryw(
        conns,
        read,
        write,
        lambda i: [*((start + b"%02d" % j, b"") for j in range(i + 1)), (b"count", str(base + i + 1).encode())],
    )
    # del --from-key invalidates every later key (the Go proxy builds an inverted interval)
    conns[-1].kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=start, range_end=b"\x00"), timeout=T)
    for r in conns[:-1]:
        assert [kv for kv in values(sread(r, start, b"\x00", keys_only=True)) if kv[0].startswith(p)] == []


def test_read_your_writes_txn_nested(conns: list[Stubs]) -> None:
    """SPEC 21.15 and 20 E: nested Txn ops invalidate, in either branch."""
    p = prefix()
    a, b, c = p + b"a", p + b"b", p + b"c"
    readers, writer = conns[:-1], conns[-1]
    for r in readers:
        for k in (a, b, c):
            sread(r, k)
    inner = rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_put=Put(key=b, value=b"nested"))])
    txn = rpc_pb2.TxnRequest(
        compare=[rpc_pb2.Compare(key=a, target=rpc_pb2.Compare.VERSION, result=rpc_pb2.Compare.EQUAL, version=0)],
        success=[rpc_pb2.RequestOp(request_put=Put(key=a, value=b"1")), rpc_pb2.RequestOp(request_txn=inner)],
        failure=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=c))],
    )
    response = writer.kv.Txn(txn, timeout=T)
    assert response.succeeded
    for r in readers:
        assert values(sread(r, a)) == [(a, b"1")]
        assert values(sread(r, b)) == [(b, b"nested")]
    writer.kv.Put(Put(key=c, value=b"c"), timeout=T)
    for r in readers:
        assert values(sread(r, c)) == [(c, b"c")]
    assert not writer.kv.Txn(txn, timeout=T).succeeded  # failure branch deletes c
    for r in readers:
        assert values(sread(r, c)) == []


def test_read_your_writes_lease_revoke(conns: list[Stubs]) -> None:
    key = prefix() + b"leased"
    readers, writer = conns[:-1], conns[-1]
    lease = writer.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    writer.kv.Put(Put(key=key, value=b"v", lease=lease), timeout=T)
    for r in readers:
        assert values(sread(r, key)) == [(key, b"v")]
    writer.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=T)
    for r in readers:
        assert values(sread(r, key)) == []


def test_read_your_writes_with_reads_in_flight_and_unrelated_writes(conns: list[Stubs]) -> None:
    """The hub skips invalidations for workers holding nothing a write touches (hub/cache.py footprints).

    Readers on every connection keep reading the key (serializable and linearizable) while the writer
    alternates writes of it with writes of unrelated keys (skipped), so Ranges are in flight when writes
    end and workers' footprints keep changing; after each acknowledged write of the key, a read on every
    connection sees it.
    """
    p = prefix()
    key = p + b"k"
    readers, writer = conns[:-1], conns[-1]
    writer.kv.Put(Put(key=key, value=b"v-1"), timeout=T)
    stop = threading.Event()
    seen: list[int] = []

    def hammer(r: Stubs) -> int:
        n = 0
        while not stop.is_set():
            sread(r, key)
            if n % 4 == 3:
                r.kv.Range(Range(key=key), timeout=T)
            n += 1
        return n

    with ThreadPoolExecutor(len(readers)) as pool:
        loads = [pool.submit(hammer, r) for r in readers]
        try:
            for i in range(40):
                writer.kv.Put(Put(key=p + b"other%d" % i, value=b"x"), timeout=T)  # touches no reader's cache
                writer.kv.Put(Put(key=key, value=b"v%d" % i), timeout=T)
                for r in readers:
                    assert values(sread(r, key)) == [(key, b"v%d" % i)], f"write {i}: stale read after the ack"
                seen.append(i)
        finally:
            stop.set()
            reads = [f.result(timeout=T) for f in loads]
    assert len(seen) == 40 and all(n > 0 for n in reads)
    for r in readers:  # the unrelated keys are right too (never cached, so never invalidated: still correct)
        assert values(sread(r, p + b"other39")) == [(p + b"other39", b"x")]


def test_worker_flushed_when_its_footprint_overflows(proxy: Callable[..., ProxyProcess]) -> None:
    """The hub tracks at most footprint_limit() intervals per worker, then flushes that worker and forgets
    them; a write right after must not find an old entry the hub no longer knows about."""
    max_entries = 300
    p = proxy(workers=2, extra_args=(f"--cache-max-entries={max_entries}",))
    conns = [stubs_on_own_connection(p.endpoint, i) for i in range(READERS + 1)]
    try:
        readers, writer = conns[:-1], conns[-1]
        base = prefix()
        hot = base + b"hot"
        writer.kv.Put(Put(key=hot, value=b"old"), timeout=T)
        for r in readers:
            assert values(sread(r, hot)) == [(hot, b"old")]
        # one interval (hot) is in reader 0's worker's footprint; the limit-th distinct key overflows it
        limit = footprint_limit(max_entries)
        for i in range(limit):
            sread(readers[0], base + b"d%05d" % i)  # misses: each one recorded by the hub
            if i % 10 == 0 and i < limit - 10:
                assert values(sread(readers[0], hot)) == [(hot, b"old")]  # hits: hot stays in the LRU
        writer.kv.Put(Put(key=hot, value=b"new"), timeout=T)
        for r in readers:
            assert values(sread(r, hot)) == [(hot, b"new")], "a worker kept an entry the hub stopped tracking"
        writer.kv.Put(Put(key=base + b"d%05d" % (limit - 1), value=b"x"), timeout=T)
        assert values(sread(readers[0], base + b"d%05d" % (limit - 1))) == [(base + b"d%05d" % (limit - 1), b"x")]
    finally:
        for c in conns:
            c.close()


# ---- scenario 14-16: answers identical to etcd, also when they come from the cache ----------------


def test_range_options_match_etcd_from_cache(conns: list[Stubs], direct: Stubs) -> None:
    """SPEC 21.14: every Range option; second proxy answer comes from the cache."""
    p = prefix()
    for i in range(5):
        direct.kv.Put(Put(key=p + b"%d" % i, value=b"v" * (5 - i)), timeout=T)
    end = prefix_end(p)
    rev = direct.kv.Range(Range(key=p), timeout=T).header.revision
    cases: list[dict[str, Any]] = [
        {},
        {"limit": 2},
        {"sort_order": Range.DESCEND, "sort_target": Range.VALUE},
        {"sort_order": Range.ASCEND, "sort_target": Range.CREATE},
        {"count_only": True},
        {"keys_only": True},
        {"min_mod_revision": rev - 2},
        {"max_mod_revision": rev - 2},
        {"min_create_revision": rev - 1},
        {"max_create_revision": rev - 3},
        {"revision": rev - 2},
    ]
    reader = conns[0]
    for case in cases:
        want = direct.kv.Range(Range(key=p, range_end=end, **case), timeout=T)
        for _ in range(2):
            got = sread(reader, p, end, **case)
            assert (values(got), got.more, got.count) == (values(want), want.more, want.count), case


def test_put_options_and_missing_lease(conns: list[Stubs]) -> None:
    """SPEC 21.16: ignore_value / ignore_lease / missing lease, seen by cached readers."""
    key = prefix() + b"k"
    readers, writer = conns[:-1], conns[-1]
    writer.kv.Put(Put(key=key, value=b"orig"), timeout=T)
    for r in readers:
        sread(r, key)
    lease = writer.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    writer.kv.Put(Put(key=key, ignore_value=True, lease=lease), timeout=T)
    for r in readers:
        [kv] = sread(r, key).kvs
        assert (kv.value, kv.lease) == (b"orig", lease)
    writer.kv.Put(Put(key=key, value=b"new", ignore_lease=True), timeout=T)
    for r in readers:
        [kv] = sread(r, key).kvs
        assert (kv.value, kv.lease) == (b"new", lease)
    err = rpc_error(lambda: writer.kv.Put(Put(key=key, value=b"x", lease=123456789), timeout=T))
    assert (err.code, err.details) == (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")
    for r in readers:
        assert values(sread(r, key)) == [(key, b"new")]


# ---- writes made elsewhere ---------------------------------------------------------------------


def test_direct_write_visible_within_bound(conns: list[Stubs], direct: Stubs, etcd_server: EtcdServer) -> None:
    key = prefix() + b"ext"
    readers = conns[:-1]
    direct.kv.Put(Put(key=key, value=b"old"), timeout=T)
    wait_cache_serving(readers[0], etcd_server)
    for r in readers:
        assert values(sread(r, key)) == [(key, b"old")]
    worst = 0.0
    for i in range(5):
        direct.kv.Put(Put(key=key, value=b"new%d" % i), timeout=T)
        written = time.monotonic()
        for r in readers:
            wait_until(
                lambda r=r, i=i: values(sread(r, key)) == [(key, b"new%d" % i)],
                EXTERNAL_BOUND_S,
                "direct write visible",
            )
        worst = max(worst, time.monotonic() - written)
    print(f"direct writes visible through the cache after at most {worst * 1000:.1f} ms")


# ---- the abusive client ------------------------------------------------------------------------


def test_abusive_reader_barely_reaches_etcd(conns: list[Stubs], direct: Stubs, etcd_server: EtcdServer) -> None:
    """10,000 serializable Ranges of one key through --workers 2: at most a handful reach etcd."""
    key = prefix() + b"hot"
    direct.kv.Put(Put(key=key, value=b"hot"), timeout=T)
    wait_cache_serving(conns[0], etcd_server)
    readers = conns[:-1]
    before = etcd_ranges(etcd_server)
    request = Range(key=key, serializable=True)

    def burst(r: Stubs) -> None:
        for _ in range(10_000 // READERS // 50):
            futures = [r.kv.Range.future(request, timeout=T) for _ in range(50)]
            for f in futures:
                assert f.result().kvs[0].value == b"hot"

    with ThreadPoolExecutor(READERS) as pool:
        list(pool.map(burst, readers))
    reached = etcd_ranges(etcd_server) - before
    print(f"10,000 serializable Ranges through the proxy: {reached:.0f} reached etcd")
    assert reached <= 5


def test_linearizable_always_reaches_etcd(conns: list[Stubs], etcd_server: EtcdServer) -> None:
    key = prefix() + b"lin"
    before = etcd_ranges(etcd_server)
    for _ in range(20):
        conns[0].kv.Range(Range(key=key), timeout=T)
    assert etcd_ranges(etcd_server) - before >= 20


def test_cache_can_be_turned_off(proxy: Callable[..., ProxyProcess], etcd_server: EtcdServer) -> None:
    p = proxy(workers=2, extra_args=("--cache=false",))
    stubs = stubs_on_own_connection(p.endpoint, 0)
    try:
        key = prefix() + b"off"
        sread(stubs, key)
        before = etcd_ranges(etcd_server)
        for _ in range(20):
            sread(stubs, key)
        assert etcd_ranges(etcd_server) - before >= 20
    finally:
        stubs.close()


# ---- scenario 45: identity -----------------------------------------------------------------------


def test_auth_cached_answer_not_served_to_other_identity(
    fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]
) -> None:
    """SPEC 21.45 (#22065): user A's cached serializable read is not served to user B."""
    p = proxy(etcd=fresh_etcd, workers=2)
    stubs = [stubs_on_own_connection(p.endpoint, i) for i in range(3)]
    try:
        au, kv = stubs[0].auth, stubs[0].kv
        kv.Put(Put(key=b"/secret", value=b"s3cr3t"), timeout=T)
        for name, password in (("root", "rootpw"), ("alice", "a"), ("bob", "b")):
            au.UserAdd(rpc_pb2.AuthUserAddRequest(name=name, password=password), timeout=T)
        au.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="root"), timeout=T)
        au.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"), timeout=T)
        au.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="reader"), timeout=T)
        perm = auth_pb2.Permission(permType=auth_pb2.Permission.READ, key=b"/secret")
        au.RoleGrantPermission(rpc_pb2.AuthRoleGrantPermissionRequest(name="reader", perm=perm), timeout=T)
        au.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="alice", role="reader"), timeout=T)
        au.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T)

        def token(user: str, password: str) -> str:
            return str(au.Authenticate(rpc_pb2.AuthenticateRequest(name=user, password=password), timeout=T).token)

        alice, bob = token("alice", "a"), token("bob", "b")
        request = Range(key=b"/secret", serializable=True)
        # etcd auth is on: the proxy cannot see permission changes made elsewhere, so no hits
        before = etcd_ranges(fresh_etcd)
        for _ in range(10):
            stubs[0].kv.Range(request, metadata=token_md(alice), timeout=T)
        assert etcd_ranges(fresh_etcd) - before >= 10
        for s in stubs:
            for _ in range(3):
                assert s.kv.Range(request, metadata=token_md(alice), timeout=T).kvs[0].value == b"s3cr3t"
        for s in stubs:
            err = rpc_error(lambda s=s: s.kv.Range(request, metadata=token_md(bob), timeout=T))
            assert (err.code, err.details) == (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
            err = rpc_error(lambda s=s: s.kv.Range(request, timeout=T))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT  # etcdserver: user name is empty
        # revoking alice's permission through the proxy flushes her cached answer everywhere
        root = token("root", "rootpw")
        au.RoleRevokePermission(
            rpc_pb2.AuthRoleRevokePermissionRequest(role="reader", key=b"/secret"), metadata=token_md(root), timeout=T
        )
        for s in stubs:
            err = rpc_error(lambda s=s: s.kv.Range(request, metadata=token_md(alice), timeout=T))
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        for s in stubs:
            s.close()


def test_metrics_with_go_names(proxy: Callable[..., ProxyProcess], etcd_server: EtcdServer) -> None:
    """etcd_grpc_proxy_cache_{hits,misses,keys}_total on /proxy/metrics, summed over the workers."""
    url = f"http://127.0.0.1:{free_port()}"
    p = proxy(workers=2, extra_args=(f"--metrics-addr={url}",))
    stubs = stubs_on_own_connection(p.endpoint, 0)
    try:
        wait_cache_serving(stubs, etcd_server)
        key = prefix() + b"m"

        def scrape(name: str) -> float:
            status, text = http_get(f"{url}/proxy/metrics")
            assert status == 200
            return sum_metric(text, name, {})

        hits, misses = scrape("etcd_grpc_proxy_cache_hits_total"), scrape("etcd_grpc_proxy_cache_misses_total")
        for _ in range(50):
            sread(stubs, key)
        wait_until(
            lambda: (
                scrape("etcd_grpc_proxy_cache_hits_total") - hits >= 49
                and scrape("etcd_grpc_proxy_cache_misses_total") - misses >= 1
                and scrape("etcd_grpc_proxy_cache_keys_total") >= 1
            ),
            5,
            "cache metrics",
        )
    finally:
        stubs.close()


def test_shared_linearizable_ranges_stay_linearizable(
    conns: list[Stubs], direct: Stubs, etcd_server: EtcdServer
) -> None:
    """Identical linearizable Ranges may share one upstream request, yet each sees every write
    acknowledged before it was sent (here: direct writes, while other clients hammer the same read)."""
    key = prefix() + b"lin"
    request = Range(key=key)
    stop = False

    def hammer(r: Stubs) -> int:
        calls = 0
        while not stop:
            futures = [r.kv.Range.future(request, timeout=T) for _ in range(20)]
            for f in futures:
                f.result()
            calls += len(futures)
        return calls

    before = etcd_ranges(etcd_server)
    with ThreadPoolExecutor(READERS - 1) as pool:
        running = [pool.submit(hammer, r) for r in conns[1:READERS]]
        try:
            for i in range(50):
                direct.kv.Put(Put(key=key, value=b"v%d" % i), timeout=T)
                assert values(conns[0].kv.Range(request, timeout=T)) == [(key, b"v%d" % i)]
        finally:
            stop = True
        calls = sum(f.result() for f in running) + 50
    reached = etcd_ranges(etcd_server) - before
    print(f"{calls} identical linearizable Ranges, {reached:.0f} reached etcd")
    assert reached <= calls


def test_write_during_hub_restart_is_not_served_stale(
    cached_proxy: ProxyProcess, conns: list[Stubs], direct: Stubs, etcd_server: EtcdServer
) -> None:
    """Invalidations may be lost while the hub is down: workers flush and wait for the new hub's watch."""
    key = prefix() + b"restart"
    readers = conns[:-1]
    direct.kv.Put(Put(key=key, value=b"old"), timeout=T)
    wait_cache_serving(readers[0], etcd_server)
    for r in readers:
        assert values(sread(r, key)) == [(key, b"old")]
    log = cached_proxy.log_path.read_text()
    hub_pid = int(re.findall(r"spawned hub pid (\d+)", log)[-1])
    os.kill(hub_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    direct.kv.Put(Put(key=key, value=b"new"), timeout=T)
    request = Range(key=key, serializable=True)
    seen_new = 0
    while seen_new < len(readers) and time.monotonic() - killed_at < 20:
        seen_new = 0
        for r in readers:
            try:
                got = values(r.kv.Range(request, timeout=1))
            except grpc.RpcError:
                continue  # UNAVAILABLE while no hub is up
            if time.monotonic() - killed_at > 2.0:  # the bound: hub silence (1.5 s) + watch latency
                assert got == [(key, b"new")], "a stale value was served long after the hub died"
            seen_new += got == [(key, b"new")]
    assert seen_new == len(readers)


def test_auth_enabled_elsewhere_stops_hits(fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    """An anonymous cached answer is not served once auth is enabled directly on etcd (probe bound 1 s)."""
    p = proxy(etcd=fresh_etcd, workers=2)
    reader = stubs_on_own_connection(p.endpoint, 0)
    admin = stubs_on_own_connection(fresh_etcd.endpoint, 1)
    try:
        admin.kv.Put(Put(key=b"/public", value=b"v"), timeout=T)
        wait_cache_serving(reader, fresh_etcd)
        assert values(sread(reader, b"/public")) == [(b"/public", b"v")]
        au = admin.auth
        au.UserAdd(rpc_pb2.AuthUserAddRequest(name="root", password="r"), timeout=T)
        au.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="root"), timeout=T)
        au.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"), timeout=T)
        au.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T)
        enabled_at = time.monotonic()

        def refused() -> bool:
            try:
                sread(reader, b"/public")
            except grpc.RpcError as exc:
                assert exc.details() == "etcdserver: user name is empty"
                return True
            return False

        wait_until(refused, 5, "anonymous reads refused like etcd does")
        print(f"auth enabled elsewhere: anonymous hits stopped after {time.monotonic() - enabled_at:.2f} s")
    finally:
        reader.close()
        admin.close()


@pytest.mark.parametrize("serializable", [True, False], ids=["serializable", "linearizable"])
def test_shared_misses_answer_everyone_when_callers_cancel(
    proxy: Callable[..., ProxyProcess], etcd_server: EtcdServer, direct: Stubs, serializable: bool
) -> None:
    """Identical Ranges in flight share one upstream request (serializable misses while no overlapping write
    came in; linearizable ones while the request has not left the worker); callers that reset theirs (the
    sender among them) leave the others answered with the value written just before (through the proxy for
    serializable reads, straight to etcd for linearizable ones), and every call is counted exactly once (OK
    or Canceled) in grpc_server_handled_total."""
    url = f"http://127.0.0.1:{free_port()}"
    p = proxy(workers=2, extra_args=(f"--metrics-addr={url}",))
    labels = {"grpc_type": "unary", "grpc_service": "etcdserverpb.KV", "grpc_method": "Range"}

    def scrape(name: str, **extra: str) -> float:
        status, text = http_get(f"{url}/proxy/metrics")
        assert status == 200
        return sum_metric(text, name, {**labels, **extra})

    writer, reader = stubs_on_own_connection(p.endpoint, 0), stubs_on_own_connection(p.endpoint, 1)
    try:
        wait_cache_serving(reader, etcd_server)
        key = prefix() + b"shared"

        def counts() -> tuple[float, float, float]:
            started = scrape("grpc_server_started_total")
            handled = scrape("grpc_server_handled_total")
            ok_or_canceled = scrape("grpc_server_handled_total", grpc_code="OK") + scrape(
                "grpc_server_handled_total", grpc_code="Canceled"
            )
            return started, handled, ok_or_canceled

        before = counts()
        while True:  # until the probe's calls are flushed (every 0.5 s) and the counts stand still
            time.sleep(1.2)
            now = counts()
            if now == before:
                break
            before = now
        before_deadline = scrape("grpc_server_handled_total", grpc_code="DeadlineExceeded")
        calls = cancelled = answered = expired = 0
        for i in range(40):
            # through the proxy, it drops the cached answer everywhere; straight to etcd, only a linearizable
            # read must see it
            (writer if serializable else direct).kv.Put(Put(key=key, value=b"v%d" % i), timeout=T)
            request = Range(key=key, serializable=serializable)
            # in the other rounds the first one sent has a deadline too short for it to be answered
            futures = [reader.kv.Range.future(request, timeout=T if i % 3 == 0 else 0.001)]
            futures += [reader.kv.Range.future(request, timeout=T) for _ in range(19)]
            calls += len(futures)
            for f in futures[i % 3 :: 3]:  # the first (the sender of the shared request) in a third of the rounds
                f.cancel()
            for n, f in enumerate(futures):
                if f.cancelled():
                    cancelled += 1
                    continue
                if n == 0 and f.exception() is not None:
                    assert f.code() == grpc.StatusCode.DEADLINE_EXCEEDED, f.exception()
                    expired += 1
                    continue
                assert values(f.result()) == [(key, b"v%d" % i)], f"round {i}: a stale or missing answer"
                answered += 1
        assert cancelled > 0 and answered > 0
        print(f"{calls} Ranges: {answered} answered, {cancelled} cancelled, {expired} past their deadline")

        # a call cancelled before it left the client never reaches the proxy: started is at most ``calls``
        def settled() -> bool:
            started, handled, ok_or_canceled = (now - then for now, then in zip(counts(), before, strict=True))
            deadline = scrape("grpc_server_handled_total", grpc_code="DeadlineExceeded") - before_deadline
            return answered <= started <= calls and handled == started and ok_or_canceled + deadline == handled

        wait_until(settled, 10, "every Range that reached the proxy counted once: OK, Canceled or DeadlineExceeded")
    finally:
        writer.close()
        reader.close()
