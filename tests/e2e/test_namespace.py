"""``--namespace`` end to end: the same test bodies directly, through a proxy, and through namespaced
proxies (with and without the range cache), compared in the client's view; raw etcd checked
under the prefix; sibling-prefix tricks against a direct view; the policy of docs/namespace.md.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from etcdproxy.core.cache import prefix_end
from etcdproxy.etcdpb import rpc_pb2, v3election_pb2, v3lock_pb2
from tests.helpers import EtcdServer, ProxyProcess, Stubs, connect, rpc_error, start_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

T = 10  # seconds per call
RUN = uuid.uuid4().hex[:8].encode()
PARENT = b"/nst-" + RUN + b"/"
NS = PARENT + b"a/"  # siblings of it live under PARENT: "a", "a0", "a.", "b/"...
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Client:
    mode: str
    stubs: Stubs
    raw: bytes  # what etcd prepends to this client's keys ("" unless namespaced)
    base: bytes  # this test's own key prefix, in the client's view


def _ns_proxy(etcd: EtcdServer, tmp: Path, *args: str) -> Iterator[ProxyProcess]:
    proxy = start_proxy([etcd.endpoint], tmp, extra_args=(f"--namespace={NS.decode()}", *args))
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def ns_proxy(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    yield from _ns_proxy(etcd_server, tmp_path_factory.mktemp("ns-proxy"))


@pytest.fixture(scope="module")
def ns_proxy_nocache(etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    yield from _ns_proxy(etcd_server, tmp_path_factory.mktemp("ns-proxy-nocache"), "--cache=false")


@pytest.fixture
def ns(ns_proxy: ProxyProcess) -> Iterator[Stubs]:
    stubs = connect("proxy+namespace", ns_proxy.endpoint)
    yield stubs
    stubs.close()


@pytest.fixture(params=["direct", "proxy", "proxy+namespace", "proxy+namespace+nocache"])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    base = b"t-" + uuid.uuid4().hex[:8].encode() + b"/"
    if request.param in ("direct", "proxy"):
        stubs: Stubs = request.getfixturevalue("direct" if request.param == "direct" else "via_proxy")
        yield Client(request.param, stubs, b"", base)
        return
    fixture = "ns_proxy" if request.param == "proxy+namespace" else "ns_proxy_nocache"
    proxy: ProxyProcess = request.getfixturevalue(fixture)
    stubs = connect(request.param, proxy.endpoint)
    yield Client(request.param, stubs, NS, base)
    stubs.close()


def kvs(items: object) -> list[tuple[bytes, bytes]]:
    return [(kv.key, kv.value) for kv in items]  # type: ignore[attr-defined]


# ---- KV ----------------------------------------------------------------------------------------


def test_kv(client: Client, direct: Stubs) -> None:
    kv, b = client.stubs.kv, client.base
    kv.Put(rpc_pb2.PutRequest(key=b + b"a", value=b"1"), timeout=T)
    put = kv.Put(rpc_pb2.PutRequest(key=b + b"a", value=b"2", prev_kv=True), timeout=T)
    assert (put.prev_kv.key, put.prev_kv.value) == (b + b"a", b"1")
    for name in (b"b", b"c", b"d"):
        kv.Put(rpc_pb2.PutRequest(key=b + name, value=name), timeout=T)
    end = prefix_end(b)
    for serializable in (False, True, True):  # the second serializable read may be a cache hit
        whole = kv.Range(rpc_pb2.RangeRequest(key=b, range_end=end, serializable=serializable), timeout=T)
        assert kvs(whole.kvs) == [(b + b"a", b"2"), (b + b"b", b"b"), (b + b"c", b"c"), (b + b"d", b"d")]
        one = kv.Range(rpc_pb2.RangeRequest(key=b + b"c", serializable=serializable), timeout=T)
        assert kvs(one.kvs) == [(b + b"c", b"c")]
    limited = kv.Range(rpc_pb2.RangeRequest(key=b, range_end=end, limit=2, keys_only=True), timeout=T)
    assert ([k.key for k in limited.kvs], limited.more, limited.count) == ([b + b"a", b + b"b"], True, 4)
    counted = kv.Range(rpc_pb2.RangeRequest(key=b + b"b", range_end=end, count_only=True), timeout=T)
    assert (list(counted.kvs), counted.count) == ([], 3)
    deleted = kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b + b"b", range_end=b + b"d", prev_kv=True), timeout=T)
    assert (deleted.deleted, kvs(deleted.prev_kvs)) == (2, [(b + b"b", b"b"), (b + b"c", b"c")])
    # what etcd holds: the same keys under the namespace prefix
    raw = direct.kv.Range(rpc_pb2.RangeRequest(key=client.raw + b, range_end=prefix_end(client.raw + b)), timeout=T)
    assert kvs(raw.kvs) == [(client.raw + b + b"a", b"2"), (client.raw + b + b"d", b"d")]


def test_txn_nested(client: Client) -> None:
    kv, b = client.stubs.kv, client.base
    kv.Put(rpc_pb2.PutRequest(key=b + b"a", value=b"1"), timeout=T)
    kv.Put(rpc_pb2.PutRequest(key=b + b"c", value=b"3"), timeout=T)
    inner = rpc_pb2.TxnRequest(
        compare=[rpc_pb2.Compare(key=b + b"a", range_end=prefix_end(b), target=rpc_pb2.Compare.VERSION, version=0)],
        success=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b + b"nothing"))],
        failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b, range_end=prefix_end(b)))],
    )
    txn = rpc_pb2.TxnRequest(
        compare=[rpc_pb2.Compare(key=b + b"a", target=rpc_pb2.Compare.VALUE, value=b"1")],
        success=[
            rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b + b"a", value=b"2", prev_kv=True)),
            rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b + b"c", prev_kv=True)),
            rpc_pb2.RequestOp(request_txn=inner),
        ],
    )
    response = client.stubs.kv.Txn(txn, timeout=T)
    assert response.succeeded
    put, delete, nested = response.responses
    assert (put.response_put.prev_kv.key, put.response_put.prev_kv.value) == (b + b"a", b"1")
    assert kvs(delete.response_delete_range.prev_kvs) == [(b + b"c", b"3")]
    assert not nested.response_txn.succeeded
    assert kvs(nested.response_txn.responses[0].response_range.kvs) == [(b + b"a", b"2")]


EMPTY_KEY_CALLS = {
    "range": lambda kv: kv.Range(rpc_pb2.RangeRequest(key=b"", range_end=b"\x00"), timeout=T),
    "put": lambda kv: kv.Put(rpc_pb2.PutRequest(key=b"", value=b"v"), timeout=T),
    "delete": lambda kv: kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b""), timeout=T),
    "txn-put": lambda kv: kv.Txn(
        rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"", value=b"v"))]),
        timeout=T,
    ),
    "txn-compare": lambda kv: kv.Txn(rpc_pb2.TxnRequest(compare=[rpc_pb2.Compare(key=b"")]), timeout=T),
}


@pytest.mark.parametrize("call", sorted(EMPTY_KEY_CALLS))
def test_empty_key_rejected_like_etcd(client: Client, call: str) -> None:
    error = rpc_error(lambda: EMPTY_KEY_CALLS[call](client.stubs.kv))
    assert (error.code, error.details) == (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided")


# ---- Watch and LeaseTimeToLive -----------------------------------------------------------------


def test_watch_events_and_prev_kv(client: Client) -> None:
    kv, b = client.stubs.kv, client.base
    first = kv.Put(rpc_pb2.PutRequest(key=b + b"w", value=b"1"), timeout=T).header.revision
    kv.Put(rpc_pb2.PutRequest(key=b + b"w", value=b"2"), timeout=T)
    kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b + b"w"), timeout=T)
    create = rpc_pb2.WatchCreateRequest(key=b, range_end=prefix_end(b), start_revision=first, prev_kv=True)
    stream = client.stubs.watch.Watch(iter([rpc_pb2.WatchRequest(create_request=create)]), timeout=T)
    events = []
    try:
        for response in stream:
            events.extend(response.events)
            if len(events) >= 3:
                break
    finally:
        stream.cancel()
    got = [(e.type, e.kv.key, e.kv.value, e.prev_kv.key, e.prev_kv.value) for e in events]
    assert got == [
        (0, b + b"w", b"1", b"", b""),
        (0, b + b"w", b"2", b + b"w", b"1"),
        (1, b + b"w", b"", b + b"w", b"2"),
    ]


def test_lease_time_to_live_keys(client: Client, direct: Stubs) -> None:
    lease = client.stubs.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    try:
        for name in (b"x", b"y"):
            client.stubs.kv.Put(rpc_pb2.PutRequest(key=client.base + name, value=b"v", lease=lease), timeout=T)
        # a key outside the namespace on the same lease (for direct/proxy it is just another key)
        outside = PARENT + b"b/" + client.base + b"z"
        direct.kv.Put(rpc_pb2.PutRequest(key=outside, value=b"v", lease=lease), timeout=T)
        ttl = client.stubs.lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lease, keys=True), timeout=T)
        expected = [client.base + b"x", client.base + b"y"] + ([] if client.raw else [outside])
        assert sorted(ttl.keys) == sorted(expected)
    finally:
        direct.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=T)


# ---- sibling prefixes: no leak, checked against a direct view ---------------------------------

SIBLINGS = [PARENT + s for s in (b"a", b"a0", b"a.", b"a0/x", b"b/", b"b/x", b"`")] + [NS]  # NS: the prefix key
TRICKS = [
    (b"\x00", b"\x00"),
    (b"\x01", b"\x00"),
    (b"0", b"\x00"),
    (b"\xff", b"\x00"),
    (b"\x00", b"\xff\xff"),
    (b"k", b"\x00"),
    (b"/", b"0"),
    (b"k", b""),
]


def covers(start: bytes, end: bytes, key: bytes) -> bool:
    if not end:
        return key == start
    if end == b"\x00":
        return key >= start
    return start <= key < end


def namespace_view(direct: Stubs) -> dict[bytes, bytes]:
    """Every key inside NS as a namespaced client should see it (the prefix key itself has no name)."""
    raw = direct.kv.Range(rpc_pb2.RangeRequest(key=NS, range_end=prefix_end(NS)), timeout=T)
    return {kv.key[len(NS) :]: kv.value for kv in raw.kvs if kv.key != NS}


@pytest.fixture
def siblings(direct: Stubs) -> Iterator[int]:
    """Writes siblings and namespace keys directly; yields the revision before them."""
    start = direct.kv.Range(rpc_pb2.RangeRequest(key=b"x"), timeout=T).header.revision
    for key in SIBLINGS:
        direct.kv.Put(rpc_pb2.PutRequest(key=key, value=b"secret:" + key), timeout=T)
    for name in (b"k", b"k2", b"\xff", b"\x00x"):
        direct.kv.Put(rpc_pb2.PutRequest(key=NS + name, value=b"mine"), timeout=T)
    yield start
    direct.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=PARENT, range_end=prefix_end(PARENT)), timeout=T)


@pytest.mark.parametrize(("key", "range_end"), TRICKS)
def test_sibling_ranges_find_no_leak(ns: Stubs, direct: Stubs, siblings: int, key: bytes, range_end: bytes) -> None:
    view = namespace_view(direct)
    want = sorted((k, v) for k, v in view.items() if covers(key, range_end, k))
    for serializable in (False, True):
        got = ns.kv.Range(rpc_pb2.RangeRequest(key=key, range_end=range_end, serializable=serializable), timeout=T)
        assert kvs(got.kvs) == want
        assert not any(b"secret" in v for _, v in kvs(got.kvs))
    txn = ns.kv.Txn(
        rpc_pb2.TxnRequest(
            success=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key, range_end=range_end))]
        ),
        timeout=T,
    )
    assert kvs(txn.responses[0].response_range.kvs) == want
    # a watch over the same range replaying the writes above sees only namespace keys
    create = rpc_pb2.WatchCreateRequest(key=key, range_end=range_end, start_revision=siblings)
    stream = ns.watch.Watch(iter([rpc_pb2.WatchRequest(create_request=create)]), timeout=T)
    seen: list[tuple[bytes, bytes]] = []
    try:
        for response in stream:
            seen.extend((e.kv.key, e.kv.value) for e in response.events)
            if response.events or not want:
                break
    finally:
        stream.cancel()
    assert bool(seen) == bool(want)
    assert not any(value.startswith(b"secret") for _, value in seen)  # a leak carries a sibling's value
    assert all(covers(key, range_end, k) for k, _ in seen)


def test_sibling_delete_leaks_nothing(ns: Stubs, direct: Stubs, siblings: int) -> None:
    deleted = ns.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"\x00", range_end=b"\x00", prev_kv=True), timeout=T)
    assert {kv.key for kv in deleted.prev_kvs} == {b"k", b"k2", b"\xff", b"\x00x"}
    left = direct.kv.Range(rpc_pb2.RangeRequest(key=PARENT, range_end=prefix_end(PARENT)), timeout=T)
    assert sorted(kv.key for kv in left.kvs) == sorted(SIBLINGS)  # every sibling and the prefix key survive


# ---- policy (docs/namespace.md) ----------------------------------------------------------------


REFUSED = {
    "compact": lambda s: s.kv.Compact(rpc_pb2.CompactionRequest(revision=1), timeout=T),
    "hashkv": lambda s: s.maintenance.HashKV(rpc_pb2.HashKVRequest(), timeout=T),
    "hash": lambda s: s.maintenance.Hash(rpc_pb2.HashRequest(), timeout=T),
    "defragment": lambda s: s.maintenance.Defragment(rpc_pb2.DefragmentRequest(), timeout=T),
    "move-leader": lambda s: s.maintenance.MoveLeader(rpc_pb2.MoveLeaderRequest(targetID=1), timeout=T),
    "alarm-deactivate": lambda s: s.maintenance.Alarm(
        rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.DEACTIVATE), timeout=T
    ),
    "snapshot": lambda s: next(iter(s.maintenance.Snapshot(rpc_pb2.SnapshotRequest(), timeout=T))),
    "member-add": lambda s: s.cluster.MemberAdd(rpc_pb2.MemberAddRequest(peerURLs=["http://10.9.9.9:1"]), timeout=T),
    "member-remove": lambda s: s.cluster.MemberRemove(rpc_pb2.MemberRemoveRequest(ID=1), timeout=T),
    "user-list": lambda s: s.auth.UserList(rpc_pb2.AuthUserListRequest(), timeout=T),
    "role-grant": lambda s: s.auth.RoleGrantPermission(rpc_pb2.AuthRoleGrantPermissionRequest(name="r"), timeout=T),
    "auth-enable": lambda s: s.auth.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T),
}


@pytest.mark.parametrize("call", sorted(REFUSED))
def test_policy_refuses(ns: Stubs, call: str) -> None:
    error = rpc_error(lambda: REFUSED[call](ns))
    assert error.code is DENIED
    assert "namespace policy" in error.details and "docs/namespace.md" in error.details


def test_policy_allows_harmless(ns: Stubs, direct: Stubs) -> None:
    assert ns.maintenance.Status(rpc_pb2.StatusRequest(), timeout=T).version
    assert list(ns.maintenance.Alarm(rpc_pb2.AlarmRequest(), timeout=T).alarms) == []
    assert ns.cluster.MemberList(rpc_pb2.MemberListRequest(), timeout=T).members
    assert not ns.auth.AuthStatus(rpc_pb2.AuthStatusRequest(), timeout=T).enabled
    lease = ns.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=30), timeout=T).ID
    listed = ns.lease.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=T)
    assert lease in {item.ID for item in listed.leases}  # IDs only: no keys to leak
    ns.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=T)


def test_lease_revoke_guard(ns: Stubs, direct: Stubs) -> None:
    inside = ns.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    ns.kv.Put(rpc_pb2.PutRequest(key=b"revoke-me", value=b"v", lease=inside), timeout=T)
    ns.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=inside), timeout=T)
    assert not ns.kv.Range(rpc_pb2.RangeRequest(key=b"revoke-me"), timeout=T).kvs
    # someone else's lease holding a key outside the namespace: not revoked, the key stays
    other = direct.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    outside = PARENT + b"b/held"
    try:
        direct.kv.Put(rpc_pb2.PutRequest(key=outside, value=b"v", lease=other), timeout=T)
        error = rpc_error(lambda: ns.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=other), timeout=T))
        assert error.code is DENIED and f"{other:x}" in error.details
        assert direct.kv.Range(rpc_pb2.RangeRequest(key=outside), timeout=T).count == 1
        # unknown lease: etcd's own answer
        missing = rpc_error(lambda: ns.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=other + 12345), timeout=T))
        assert missing.code is grpc.StatusCode.NOT_FOUND
    finally:
        direct.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=other), timeout=T)


def test_election_and_lock_are_namespaced(ns: Stubs, direct: Stubs) -> None:
    lease = ns.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    try:
        leader = ns.election.Campaign(v3election_pb2.CampaignRequest(name=b"e", lease=lease, value=b"me"), timeout=T)
        assert leader.leader.name == b"e" and leader.leader.key == b"e/%x" % lease
        raw = direct.kv.Range(rpc_pb2.RangeRequest(key=NS + b"e/", range_end=prefix_end(NS + b"e/")), timeout=T)
        assert kvs(raw.kvs) == [(NS + b"e/%x" % lease, b"me")]
        # the same name directly is another election: nobody leads it
        assert rpc_error(lambda: direct.election.Leader(v3election_pb2.LeaderRequest(name=b"e"), timeout=T))
        ns.election.Proclaim(v3election_pb2.ProclaimRequest(leader=leader.leader, value=b"again"), timeout=T)
        now = ns.election.Leader(v3election_pb2.LeaderRequest(name=b"e"), timeout=T)
        assert (now.kv.key, now.kv.value) == (b"e/%x" % lease, b"again")
        observe = ns.election.Observe(v3election_pb2.LeaderRequest(name=b"e"), timeout=T)
        try:
            assert next(iter(observe)).kv.key == b"e/%x" % lease
        finally:
            observe.cancel()
        ns.election.Resign(v3election_pb2.ResignRequest(leader=leader.leader), timeout=T)
        assert not direct.kv.Range(rpc_pb2.RangeRequest(key=NS + b"e/%x" % lease), timeout=T).kvs

        locked = ns.lock.Lock(v3lock_pb2.LockRequest(name=b"l", lease=lease), timeout=T)
        assert locked.key == b"l/%x" % lease
        assert direct.kv.Range(rpc_pb2.RangeRequest(key=NS + locked.key), timeout=T).count == 1
        ns.lock.Unlock(v3lock_pb2.UnlockRequest(key=locked.key), timeout=T)
        assert direct.kv.Range(rpc_pb2.RangeRequest(key=NS + locked.key), timeout=T).count == 0
    finally:
        direct.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=T)


# ---- etcdctl (the Go clientv3) through a namespaced proxy --------------------------------------


def test_etcdctl_through_namespace(ns_proxy: ProxyProcess, direct: Stubs, etcdctl_bin: str) -> None:
    def ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [etcdctl_bin, f"--endpoints={ns_proxy.endpoint}", "--dial-timeout=5s", "--command-timeout=10s", *args],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, ETCDCTL_API="3"),
            check=False,
        )
        assert proc.returncode == 0 or not check, proc.stderr
        return proc

    base = "ctl-" + uuid.uuid4().hex[:8] + "/"
    ctl("put", base + "a", "1")
    ctl("put", base + "b", "2")
    assert ctl("get", base, "--prefix").stdout.split() == [base + "a", "1", base + "b", "2"]
    raw = direct.kv.Range(rpc_pb2.RangeRequest(key=NS + base.encode(), range_end=prefix_end(NS + base.encode())))
    assert kvs(raw.kvs) == [(NS + base.encode() + b"a", b"1"), (NS + base.encode() + b"b", b"2")]
    assert ctl("del", base + "a", "--prev-kv").stdout.split() == ["1", base + "a", "1"]
    lease = ctl("lease", "grant", "60").stdout.split()[1]
    ctl("put", base + "l", "v", f"--lease={lease}")
    assert base + "l" in ctl("lease", "timetolive", lease, "--keys").stdout
    ctl("lease", "revoke", lease)
    refused = ctl("compaction", "1", check=False)
    assert refused.returncode != 0 and "namespace policy" in refused.stderr
    assert ctl("endpoint", "status").returncode == 0
