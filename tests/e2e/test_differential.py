"""Every unary method of every service: etcd directly and through the proxy answer the same.

Two styles:
* scenario tests run one request sequence against etcd, then the same sequence through the
  proxy on a disjoint key prefix, and compare the normalized answers (``tests.helpers.Normalizer``:
  revisions relative to the start of the run, lease ids by order of appearance, raft term dropped);
* ``target`` tests run one body against ``direct`` and ``proxy`` with the exact expected answer,
  which pins status codes and messages (the Go proxy turns many of them into UNKNOWN).

Anything that would disturb the shared etcd (auth, membership changes) runs on a private one.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from etcdproxy.core import namespace
from etcdproxy.core.methods import METHODS, Shape
from etcdproxy.etcdpb import auth_pb2, rpc_pb2, v3election_pb2, v3lock_pb2
from tests.helpers import (
    EtcdServer,
    Normalizer,
    ProxyProcess,
    Stubs,
    connect,
    direct_and_proxied,
    free_port,
    outcome,
    rpc_error,
    token_md,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

Scenario = Callable[[Stubs, bytes], list[tuple[str, Any]]]
T = 10  # per-call timeout, seconds


def current_revision(stubs: Stubs) -> int:
    return int(stubs.kv.Range(rpc_pb2.RangeRequest(key=b"\0"), timeout=T).header.revision)


def run_both(direct: Stubs, proxied: Stubs, scenario: Scenario) -> None:
    """Run ``scenario`` on etcd, then through the proxy on another prefix; answers must match."""
    run = uuid.uuid4().hex[:8]
    expected = scenario(direct, f"d{run}/".encode())
    got = scenario(proxied, f"p{run}/".encode())
    assert [step for step, _ in got] == [step for step, _ in expected]
    for (step, want), (_, have) in zip(expected, got, strict=True):
        assert have == want, f"step {step!r}: proxy answered differently from etcd"


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


# --------------------------------------------------------------------------- KV


def kv_scenario(s: Stubs, p: bytes) -> list[tuple[str, Any]]:
    norm = Normalizer(prefix=p, base_revision=current_revision(s))
    kv = s.kv
    out: list[tuple[str, Any]] = []

    def step(name: str, fn: Callable[[], Any]) -> None:
        out.append((name, outcome(norm, fn)))

    rr = rpc_pb2.RangeRequest
    for i, k in enumerate([b"a", b"b", b"c", b"d", b"e"]):
        step(f"put {k!r}", lambda k=k, i=i: kv.Put(rpc_pb2.PutRequest(key=p + k, value=b"v%d" % i), timeout=T))
    step("put overwrite prev_kv", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"a", value=b"A", prev_kv=True), timeout=T))
    step("range one", lambda: kv.Range(rr(key=p + b"a"), timeout=T))
    step("range missing", lambda: kv.Range(rr(key=p + b"zz"), timeout=T))
    step("range prefix", lambda: kv.Range(rr(key=p, range_end=prefix_end(p)), timeout=T))
    step("range from key b", lambda: kv.Range(rr(key=p + b"b", range_end=prefix_end(p)), timeout=T))
    step("range limit+more", lambda: kv.Range(rr(key=p, range_end=prefix_end(p), limit=2), timeout=T))
    step(
        "range sort value desc",
        lambda: kv.Range(
            rr(key=p, range_end=prefix_end(p), sort_order=rr.DESCEND, sort_target=rr.VALUE),
            timeout=T,
        ),
    )
    step(
        "range sort key asc",
        lambda: kv.Range(rr(key=p, range_end=prefix_end(p), sort_order=rr.ASCEND, sort_target=rr.KEY), timeout=T),
    )
    step(
        "range sort mod desc",
        lambda: kv.Range(rr(key=p, range_end=prefix_end(p), sort_order=rr.DESCEND, sort_target=rr.MOD), timeout=T),
    )
    step("range count_only", lambda: kv.Range(rr(key=p, range_end=prefix_end(p), count_only=True), timeout=T))
    step("range keys_only", lambda: kv.Range(rr(key=p, range_end=prefix_end(p), keys_only=True), timeout=T))
    step("range serializable", lambda: kv.Range(rr(key=p + b"a", serializable=True), timeout=T))
    base = norm.base_revision
    step("range at revision", lambda: kv.Range(rr(key=p + b"a", revision=base + 1), timeout=T))
    step(
        "range min/max mod revision",
        lambda: kv.Range(
            rr(key=p, range_end=prefix_end(p), min_mod_revision=base + 2, max_mod_revision=base + 4), timeout=T
        ),
    )
    step(
        "range min/max create revision",
        lambda: kv.Range(
            rr(key=p, range_end=prefix_end(p), min_create_revision=base + 3, max_create_revision=base + 5), timeout=T
        ),
    )
    step("range future revision", lambda: kv.Range(rr(key=p + b"a", revision=base + 10_000), timeout=T))
    step("put ignore_value on missing key", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"n", ignore_value=True)))
    step("put ignore_value", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"a", ignore_value=True, prev_kv=True)))
    step("put ignore_lease", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"a", value=b"x", ignore_lease=True)))
    step("put missing lease", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"a", value=b"x", lease=0x7EADBEEF1)))
    step("put empty value", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"empty"), timeout=T))

    cmp = rpc_pb2.Compare
    op = rpc_pb2.RequestOp
    step(
        "txn success branch",
        lambda: kv.Txn(
            rpc_pb2.TxnRequest(
                compare=[cmp(key=p + b"b", target=cmp.VALUE, result=cmp.EQUAL, value=b"v1")],
                success=[
                    op(request_put=rpc_pb2.PutRequest(key=p + b"t1", value=b"1", prev_kv=True)),
                    op(request_range=rr(key=p, range_end=prefix_end(p), count_only=True)),
                    op(request_delete_range=rpc_pb2.DeleteRangeRequest(key=p + b"c", prev_kv=True)),
                ],
                failure=[op(request_put=rpc_pb2.PutRequest(key=p + b"t2", value=b"2"))],
            ),
            timeout=T,
        ),
    )
    step(
        "txn failure branch, range compare, nested txn",
        lambda: kv.Txn(
            rpc_pb2.TxnRequest(
                compare=[
                    cmp(key=p + b"a", range_end=prefix_end(p), target=cmp.VERSION, result=cmp.GREATER, version=5),
                ],
                success=[op(request_put=rpc_pb2.PutRequest(key=p + b"t3", value=b"3"))],
                failure=[
                    op(
                        request_txn=rpc_pb2.TxnRequest(
                            compare=[cmp(key=p + b"t1", target=cmp.CREATE, result=cmp.GREATER, create_revision=0)],
                            success=[op(request_range=rr(key=p + b"t1"))],
                        )
                    ),
                    op(request_put=rpc_pb2.PutRequest(key=p + b"t4", value=b"4")),
                ],
            ),
            timeout=T,
        ),
    )
    step(
        "txn duplicate key",
        lambda: kv.Txn(
            rpc_pb2.TxnRequest(success=[op(request_put=rpc_pb2.PutRequest(key=p + b"dup")) for _ in range(2)]),
            timeout=T,
        ),
    )
    step(
        "txn invalid range in compare",
        lambda: kv.Txn(rpc_pb2.TxnRequest(compare=[cmp(key=b"", target=cmp.VALUE, value=b"x")]), timeout=T),
    )
    step("delete one prev_kv", lambda: kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=p + b"d", prev_kv=True)))
    step("delete missing", lambda: kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=p + b"zz"), timeout=T))
    step("delete range", lambda: kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=p + b"t", range_end=p + b"u")))
    step("range after deletes", lambda: kv.Range(rr(key=p, range_end=prefix_end(p)), timeout=T))
    step("range after deletes serializable", lambda: kv.Range(rr(key=p, range_end=prefix_end(p), serializable=True)))
    return out


def test_kv_sequence_matches(direct: Stubs, via_proxy: Stubs) -> None:
    run_both(direct, via_proxy, kv_scenario)


def test_compact_matches(fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    """Compact, then read below the compacted revision: same answer, OUT_OF_RANGE included.

    On a private etcd: compacting the shared one would break later tests that read or watch
    old revisions.
    """

    def scenario(s: Stubs, p: bytes) -> list[tuple[str, Any]]:
        norm = Normalizer(prefix=p, base_revision=current_revision(s))
        out: list[tuple[str, Any]] = []
        for i in range(3):
            s.kv.Put(rpc_pb2.PutRequest(key=p + b"k", value=b"%d" % i), timeout=T)
        rev = current_revision(s)
        out.append(("range before", outcome(norm, lambda: s.kv.Range(rpc_pb2.RangeRequest(key=p + b"k"), timeout=T))))
        out.append(("compact", outcome(norm, lambda: s.kv.Compact(rpc_pb2.CompactionRequest(revision=rev)))))
        out.append(
            (
                "compact physical again",
                outcome(norm, lambda: s.kv.Compact(rpc_pb2.CompactionRequest(revision=rev, physical=True))),
            )
        )
        out.append(
            ("compact future", outcome(norm, lambda: s.kv.Compact(rpc_pb2.CompactionRequest(revision=rev + 99))))
        )
        for serializable in (False, True):
            out.append(
                (
                    f"range current serializable={serializable}",
                    outcome(
                        norm, lambda ser=serializable: s.kv.Range(rpc_pb2.RangeRequest(key=p + b"k", serializable=ser))
                    ),
                )
            )
            out.append(
                (
                    f"range compacted serializable={serializable}",
                    outcome(
                        norm,
                        lambda ser=serializable: s.kv.Range(
                            rpc_pb2.RangeRequest(key=p + b"k", revision=rev - 1, serializable=ser), timeout=T
                        ),
                    ),
                )
            )
        return out

    with direct_and_proxied(fresh_etcd, proxy(etcd=fresh_etcd)) as (direct, proxied):
        run_both(direct, proxied, scenario)


TOO_MANY_OPS = rpc_pb2.TxnRequest(
    success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"many/%d" % i)) for i in range(129)]
)

# (name, call, expected code, expected message): identical for etcd and through the proxy.
ERRORS: list[tuple[str, Callable[[Stubs], Any], grpc.StatusCode, str]] = [
    (
        "range empty key",
        lambda s: s.kv.Range(rpc_pb2.RangeRequest(), timeout=T),
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: key is not provided",
    ),
    (
        "put empty key",
        lambda s: s.kv.Put(rpc_pb2.PutRequest(value=b"x"), timeout=T),
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: key is not provided",
    ),
    (
        "delete empty key",
        lambda s: s.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(), timeout=T),
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: key is not provided",
    ),
    (
        "txn with 129 ops",
        lambda s: s.kv.Txn(TOO_MANY_OPS, timeout=T),
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: too many operations in txn request",
    ),
    (
        "txn with an empty RequestOp",
        lambda s: s.kv.Txn(rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp()]), timeout=T),
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: key not found",
    ),
    (
        "range future revision",
        lambda s: s.kv.Range(rpc_pb2.RangeRequest(key=b"x", revision=1 << 40), timeout=T),
        grpc.StatusCode.OUT_OF_RANGE,
        "etcdserver: mvcc: required revision is a future revision",
    ),
    (
        "put with a lease that does not exist",
        lambda s: s.kv.Put(rpc_pb2.PutRequest(key=b"x", lease=0x5EED), timeout=T),
        grpc.StatusCode.NOT_FOUND,
        "etcdserver: requested lease not found",
    ),
    (
        "revoke a lease that does not exist",
        lambda s: s.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=0x5EED), timeout=T),
        grpc.StatusCode.NOT_FOUND,
        "etcdserver: requested lease not found",
    ),
    (
        "move leader to an unknown member",
        lambda s: s.maintenance.MoveLeader(rpc_pb2.MoveLeaderRequest(targetID=12345), timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
        "etcdserver: bad leader transferee",
    ),
    (
        "promote an unknown member",
        lambda s: s.cluster.MemberPromote(rpc_pb2.MemberPromoteRequest(ID=12345), timeout=T),
        grpc.StatusCode.NOT_FOUND,
        "etcdserver: member not found",
    ),
    (
        "remove an unknown member",
        lambda s: s.cluster.MemberRemove(rpc_pb2.MemberRemoveRequest(ID=12345), timeout=T),
        grpc.StatusCode.NOT_FOUND,
        "etcdserver: member not found",
    ),
    (
        "update an unknown member",
        lambda s: s.cluster.MemberUpdate(
            rpc_pb2.MemberUpdateRequest(ID=12345, peerURLs=["http://127.0.0.1:1"]), timeout=T
        ),
        grpc.StatusCode.NOT_FOUND,
        "etcdserver: member not found",
    ),
    (
        "downgrade to an invalid version",
        lambda s: s.maintenance.Downgrade(
            rpc_pb2.DowngradeRequest(action=rpc_pb2.DowngradeRequest.VALIDATE, version="3.5")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: invalid downgrade target version",
    ),
    (
        "cancel a downgrade that is not running",
        lambda s: s.maintenance.Downgrade(rpc_pb2.DowngradeRequest(action=rpc_pb2.DowngradeRequest.CANCEL), timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
        "etcdserver: no inflight downgrade job",
    ),
    (
        "get a user that does not exist",
        lambda s: s.auth.UserGet(rpc_pb2.AuthUserGetRequest(name="nobody"), timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
        "etcdserver: user name not found",
    ),
    (
        "enable auth without a root user",
        lambda s: s.auth.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
        "etcdserver: root user does not exist",
    ),
    (
        "leader of an election nobody campaigns in",
        lambda s: s.election.Leader(v3election_pb2.LeaderRequest(name=b"no-such-election"), timeout=T),
        grpc.StatusCode.UNKNOWN,
        "election: no leader",
    ),
]


@pytest.mark.parametrize("call, code, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_keeps_code_and_message(
    target: Stubs, call: Callable[[Stubs], Any], code: grpc.StatusCode, message: str
) -> None:
    err = rpc_error(lambda: call(target))
    if target.name == "ns-proxy" and err.code is grpc.StatusCode.PERMISSION_DENIED:
        # cluster-wide methods are refused under --namespace: only those the policy names
        refused = err.details.removeprefix("etcdproxy: ").split(" is refused by the namespace policy")[0]
        assert namespace.rule(f"/{'' if refused.startswith('v3') else 'etcdserverpb.'}{refused}")[0] is (
            namespace.Action.REFUSE
        ), err
    else:
        assert (err.code, err.details) == (code, message)
    # The connection (and the proxy behind it) still serves requests afterwards. A Put (through
    # raft) also lets etcd 3.5.1 finish a rejected membership change before the next one is proposed.
    assert target.kv.Put(rpc_pb2.PutRequest(key=b"after-error"), timeout=T).header.revision > 0


# --------------------------------------------------------------------------- Lease


def lease_scenario(s: Stubs, p: bytes) -> list[tuple[str, Any]]:
    norm = Normalizer(prefix=p, base_revision=current_revision(s))
    out: list[tuple[str, Any]] = []
    ls = s.lease
    own_id = int.from_bytes(uuid.uuid4().bytes[:6], "big") | 1

    def step(name: str, fn: Callable[[], Any]) -> None:
        out.append((name, outcome(norm, fn)))

    granted = ls.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=120), timeout=T)
    out.append(("grant", ("ok", norm(granted))))
    lid = granted.ID
    step("grant chosen id", lambda: ls.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60, ID=own_id), timeout=T))
    step("grant same id again", lambda: ls.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60, ID=own_id), timeout=T))
    s.kv.Put(rpc_pb2.PutRequest(key=p + b"l1", value=b"x", lease=lid), timeout=T)
    s.kv.Put(rpc_pb2.PutRequest(key=p + b"l2", value=b"y", lease=lid), timeout=T)

    ttl = ls.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lid, keys=True), timeout=T)
    # TTL counts down between the two runs: compare it as "close to granted", the rest exactly.
    assert 100 <= ttl.TTL <= 120, ttl
    ttl.TTL = 0
    keys = sorted(ttl.keys)  # etcd lists a lease's keys in map order
    del ttl.keys[:]
    ttl.keys.extend(keys)
    out.append(("time to live with keys", ("ok", norm(ttl))))
    ttl_nokeys = ls.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lid), timeout=T)
    assert not ttl_nokeys.keys

    leases = ls.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=T)
    out.append(("leases lists both", sorted(norm.lease_id(x.ID) for x in leases.leases if x.ID in (lid, own_id))))
    step("revoke", lambda: ls.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=T))
    step("revoke again", lambda: ls.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=T))
    step("time to live revoked", lambda: ls.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lid), timeout=T))
    step("keys gone with the lease", lambda: s.kv.Range(rpc_pb2.RangeRequest(key=p, range_end=prefix_end(p))))
    step("revoke chosen id", lambda: ls.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=own_id), timeout=T))
    leases = ls.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=T)
    out.append(("leases after revoke", [x.ID for x in leases.leases if x.ID in (lid, own_id)]))
    return out


def test_lease_unary_matches(direct: Stubs, via_proxy: Stubs) -> None:
    run_both(direct, via_proxy, lease_scenario)


# --------------------------------------------------------------------------- Cluster


def test_member_list_pass_through(direct: Stubs, via_proxy: Stubs) -> None:
    """``--advertise-client-url ""``: MemberList is etcd's own answer."""
    want = direct.cluster.MemberList(rpc_pb2.MemberListRequest(), timeout=T)
    got = via_proxy.cluster.MemberList(rpc_pb2.MemberListRequest(linearizable=True), timeout=T)
    assert len(want.members) == 1
    for m in (want, got):
        m.header.ClearField("raft_term")
        m.header.ClearField("revision")
    assert got == want


@pytest.mark.parametrize("advertise", [None, "10.1.2.3:23790"], ids=["default-advertise-url", "explicit"])
def test_member_list_answered_by_proxy(
    proxy: Callable[..., ProxyProcess], advertise: str | None, etcd_server: EtcdServer
) -> None:
    """With an advertise URL (the default is 127.0.0.1:23790) the proxy lists only itself."""
    p = proxy(advertise_client_url=advertise)
    stubs = connect("proxy", p.endpoint)
    try:
        resp = stubs.cluster.MemberList(rpc_pb2.MemberListRequest(), timeout=T)
    finally:
        stubs.close()
    assert not resp.HasField("header")
    assert len(resp.members) == 1
    member = resp.members[0]
    assert member.name == socket.gethostname()
    # unset, --advertise-client-url follows --listen-addr (Go's default is 127.0.0.1:23790 whatever it listens on)
    assert list(member.clientURLs) == [advertise or f"127.0.0.1:{p.port}"]
    assert (member.ID, list(member.peerURLs), member.isLearner) == (0, [], False)


def membership_scenario(s: Stubs, p: bytes, etcd: EtcdServer) -> list[tuple[str, Any]]:
    """Learner add/update/promote/remove: safe on a one-member cluster (quorum never changes).

    etcd 3.5.1's raft drops a configuration change proposed while the previous one is still
    pending (the call then hangs), so every change is followed by a Put that passes through raft.
    """
    norm = Normalizer(prefix=p, base_revision=current_revision(s))
    bogus = f"http://127.0.0.1:{free_port()}"
    moved = f"http://127.0.0.1:{free_port()}"
    norm.volatile.update({bogus: "<bogus-url>", moved: "<moved-url>"})
    out: list[tuple[str, Any]] = []
    cl = s.cluster
    norm.ids[s.maintenance.Status(rpc_pb2.StatusRequest(), timeout=T).header.member_id] = 100

    def settle() -> None:
        s.kv.Put(rpc_pb2.PutRequest(key=p + b"settle"), timeout=T)

    def change(name: str, fn: Callable[[], Any]) -> tuple[Any, ...]:
        result = outcome(norm, fn)
        settle()
        out.append((name, result))
        return result

    def members() -> list[dict[str, Any]]:
        resp = cl.MemberList(rpc_pb2.MemberListRequest(), timeout=T)
        return sorted((norm(m) for m in resp.members), key=lambda m: str(m.get("peerURLs")))

    added = cl.MemberAdd(rpc_pb2.MemberAddRequest(peerURLs=[bogus], isLearner=True), timeout=T)
    settle()
    new_id = added.member.ID
    norm.ids[new_id] = 200
    assert added.member.isLearner and list(added.member.peerURLs) == [bogus]
    assert new_id in {m.ID for m in added.members}
    out.append(("add learner", ("ok", norm(added.member))))
    out.append(("members after add", sorted(str(norm(m)) for m in added.members)))
    out.append(("list with learner", members()))
    change(
        "add a second learner (etcd allows one)",
        lambda: cl.MemberAdd(rpc_pb2.MemberAddRequest(peerURLs=[moved], isLearner=True), timeout=T),
    )
    change(
        "add an existing peer url",
        lambda: cl.MemberAdd(rpc_pb2.MemberAddRequest(peerURLs=[etcd.peer_url], isLearner=True), timeout=T),
    )
    upd = cl.MemberUpdate(rpc_pb2.MemberUpdateRequest(ID=new_id, peerURLs=[moved]), timeout=T)
    settle()
    out.append(("update learner urls", sorted(str(norm(m)) for m in upd.members)))
    change("promote learner not in sync", lambda: cl.MemberPromote(rpc_pb2.MemberPromoteRequest(ID=new_id), timeout=T))
    rem = cl.MemberRemove(rpc_pb2.MemberRemoveRequest(ID=new_id), timeout=T)
    settle()
    out.append(("remove learner", [norm(m) for m in rem.members]))
    change("remove again", lambda: cl.MemberRemove(rpc_pb2.MemberRemoveRequest(ID=new_id), timeout=T))
    out.append(("list after remove", members()))
    return out


def test_membership_changes_match(fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    with direct_and_proxied(fresh_etcd, proxy(etcd=fresh_etcd)) as (direct, proxied):
        run_both(direct, proxied, lambda s, pfx: membership_scenario(s, pfx, fresh_etcd))


# --------------------------------------------------------------------------- Maintenance


def test_maintenance_matches(direct: Stubs, via_proxy: Stubs) -> None:
    def ask(fn: Callable[[Stubs], Any]) -> tuple[Any, Any]:
        return fn(direct), fn(via_proxy)

    # Status: the same member answers; sizes/indexes move with other traffic, identity does not.
    want, got = ask(lambda s: s.maintenance.Status(rpc_pb2.StatusRequest(), timeout=T))
    for field in ("version", "leader", "isLearner", "raftTerm", "errors"):
        assert getattr(got, field) == getattr(want, field), field
    assert (got.header.cluster_id, got.header.member_id) == (want.header.cluster_id, want.header.member_id)
    assert got.raftIndex >= want.raftIndex > 0 and got.dbSize > 0

    # Hash / HashKV: no write in between, so the same numbers.
    want, got = ask(lambda s: s.maintenance.HashKV(rpc_pb2.HashKVRequest(), timeout=T))
    assert (got.hash, got.compact_revision, got.header.revision) == (
        want.hash,
        want.compact_revision,
        want.header.revision,
    )
    want, got = ask(lambda s: s.maintenance.Hash(rpc_pb2.HashRequest(), timeout=T))
    assert got.hash == want.hash != 0

    alarm = rpc_pb2.AlarmRequest
    for req in (
        alarm(action=alarm.GET),
        alarm(action=alarm.GET, alarm=rpc_pb2.NOSPACE),
        alarm(action=alarm.DEACTIVATE, memberID=want.header.member_id, alarm=rpc_pb2.NOSPACE),
    ):
        a, b = ask(lambda s, r=req: s.maintenance.Alarm(r, timeout=T))
        assert list(b.alarms) == list(a.alarms) == []
        assert b.header.member_id == a.header.member_id

    a, b = ask(lambda s: s.maintenance.Defragment(rpc_pb2.DefragmentRequest(), timeout=30))
    assert b == a  # etcd 3.5 answers an empty DefragmentResponse

    leader = want.header.member_id
    a, b = ask(lambda s: s.maintenance.MoveLeader(rpc_pb2.MoveLeaderRequest(targetID=leader), timeout=T))
    assert b == a  # moving the leadership to the leader itself succeeds

    a, b = ask(
        lambda s: s.maintenance.Downgrade(
            rpc_pb2.DowngradeRequest(action=rpc_pb2.DowngradeRequest.VALIDATE, version="3.4"), timeout=T
        )
    )
    assert (b.version, b.header.member_id) == (a.version, a.header.member_id)
    assert a.version  # etcd answers the current cluster version


# --------------------------------------------------------------------------- Auth


def auth_scenario(s: Stubs, p: bytes) -> list[tuple[str, Any]]:
    """All 17 Auth RPCs, and auth errors on KV, from auth disabled back to auth disabled."""
    norm = Normalizer(prefix=p, base_revision=current_revision(s))
    out: list[tuple[str, Any]] = []
    au, kv = s.auth, s.kv
    auth_base: list[int] = []  # authRevision of the first AuthStatus: later ones are relative to it

    def step(name: str, fn: Callable[[], Any]) -> Any:
        result = outcome(norm, fn)
        if result[0] == "ok" and "authRevision" in result[1]:
            if not auth_base:
                auth_base.append(result[1]["authRevision"])
            result[1]["authRevision"] -= auth_base[0]
        if result[0] == "ok" and "token" in result[1]:
            result[1]["token"] = "<token>" if result[1]["token"] else ""
        out.append((name, result))
        return result

    def token(user: str, password: str) -> str:
        return str(au.Authenticate(rpc_pb2.AuthenticateRequest(name=user, password=password), timeout=T).token)

    perm = auth_pb2.Permission
    step("status (off)", lambda: au.AuthStatus(rpc_pb2.AuthStatusRequest(), timeout=T))
    step("enable without root", lambda: au.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T))
    step("user add empty", lambda: au.UserAdd(rpc_pb2.AuthUserAddRequest(name="", password="x"), timeout=T))
    step("user add root", lambda: au.UserAdd(rpc_pb2.AuthUserAddRequest(name="root", password="rootpw"), timeout=T))
    step("enable without root role", lambda: au.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T))
    step("role add root", lambda: au.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="root"), timeout=T))
    step("grant root", lambda: au.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root")))
    step("user add alice", lambda: au.UserAdd(rpc_pb2.AuthUserAddRequest(name="alice", password="a1"), timeout=T))
    step("user add alice again", lambda: au.UserAdd(rpc_pb2.AuthUserAddRequest(name="alice", password="a1")))
    step("user add bob", lambda: au.UserAdd(rpc_pb2.AuthUserAddRequest(name="bob", password="b1"), timeout=T))
    step("role add reader", lambda: au.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="reader"), timeout=T))
    step(
        "grant read on prefix",
        lambda: au.RoleGrantPermission(
            rpc_pb2.AuthRoleGrantPermissionRequest(
                name="reader", perm=perm(permType=perm.READ, key=p, range_end=prefix_end(p))
            ),
            timeout=T,
        ),
    )
    step(
        "grant write on one key",
        lambda: au.RoleGrantPermission(
            rpc_pb2.AuthRoleGrantPermissionRequest(name="reader", perm=perm(permType=perm.WRITE, key=p + b"w")),
            timeout=T,
        ),
    )
    step(
        "grant reader to alice", lambda: au.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="alice", role="reader"))
    )
    step("grant missing role", lambda: au.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="bob", role="nope")))
    step("user get alice", lambda: au.UserGet(rpc_pb2.AuthUserGetRequest(name="alice"), timeout=T))
    step("user list", lambda: au.UserList(rpc_pb2.AuthUserListRequest(), timeout=T))
    step("role get reader", lambda: au.RoleGet(rpc_pb2.AuthRoleGetRequest(role="reader"), timeout=T))
    step("role get missing", lambda: au.RoleGet(rpc_pb2.AuthRoleGetRequest(role="nope"), timeout=T))
    step("role list", lambda: au.RoleList(rpc_pb2.AuthRoleListRequest(), timeout=T))
    step(
        "change bob's password",
        lambda: au.UserChangePassword(rpc_pb2.AuthUserChangePasswordRequest(name="bob", password="b2"), timeout=T),
    )
    kv.Put(rpc_pb2.PutRequest(key=p + b"r", value=b"secret"), timeout=T)
    step("enable", lambda: au.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T))

    # Auth is on: every call carries (or lacks) a token.
    step("range without token", lambda: kv.Range(rpc_pb2.RangeRequest(key=p + b"r"), timeout=T))
    step("status without token", lambda: au.AuthStatus(rpc_pb2.AuthStatusRequest(), timeout=T))
    step(
        "authenticate wrong password",
        lambda: au.Authenticate(rpc_pb2.AuthenticateRequest(name="alice", password="nope"), timeout=T),
    )
    step("authenticate old password", lambda: au.Authenticate(rpc_pb2.AuthenticateRequest(name="bob", password="b1")))
    step("authenticate alice", lambda: au.Authenticate(rpc_pb2.AuthenticateRequest(name="alice", password="a1")))
    alice, bob, root = token("alice", "a1"), token("bob", "b2"), token("root", "rootpw")
    md_alice, md_bob, md_root = token_md(alice), token_md(bob), token_md(root)
    step("alice reads", lambda: kv.Range(rpc_pb2.RangeRequest(key=p + b"r"), metadata=md_alice, timeout=T))
    step(
        "alice reads serializable",
        lambda: kv.Range(rpc_pb2.RangeRequest(key=p + b"r", serializable=True), metadata=md_alice),
    )
    step("bob reads (no role)", lambda: kv.Range(rpc_pb2.RangeRequest(key=p + b"r"), metadata=md_bob, timeout=T))
    step(
        "bob reads serializable (no role)",
        lambda: kv.Range(rpc_pb2.RangeRequest(key=p + b"r", serializable=True), metadata=md_bob, timeout=T),
    )
    step("alice writes read-only key", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"r", value=b"x"), metadata=md_alice))
    step("alice writes her key", lambda: kv.Put(rpc_pb2.PutRequest(key=p + b"w", value=b"x"), metadata=md_alice))
    step(
        "alice txn nested write denied",
        lambda: kv.Txn(
            rpc_pb2.TxnRequest(
                success=[
                    rpc_pb2.RequestOp(
                        request_txn=rpc_pb2.TxnRequest(
                            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=p + b"r", value=b"y"))]
                        )
                    )
                ]
            ),
            metadata=md_alice,
            timeout=T,
        ),
    )
    step("alice reads outside prefix", lambda: kv.Range(rpc_pb2.RangeRequest(key=b"elsewhere"), metadata=md_alice))
    step("wrong token", lambda: kv.Range(rpc_pb2.RangeRequest(key=p + b"r"), metadata=token_md("bogus.1"), timeout=T))
    step("alice lists users", lambda: au.UserList(rpc_pb2.AuthUserListRequest(), metadata=md_alice, timeout=T))
    step("root status", lambda: au.AuthStatus(rpc_pb2.AuthStatusRequest(), metadata=md_root, timeout=T))
    step("root lists roles", lambda: au.RoleList(rpc_pb2.AuthRoleListRequest(), metadata=md_root, timeout=T))
    step(
        "revoke write permission",
        lambda: au.RoleRevokePermission(
            rpc_pb2.AuthRoleRevokePermissionRequest(role="reader", key=p + b"w"), metadata=md_root, timeout=T
        ),
    )
    step(
        "revoke missing permission",
        lambda: au.RoleRevokePermission(
            rpc_pb2.AuthRoleRevokePermissionRequest(role="reader", key=p + b"zzz"), metadata=md_root, timeout=T
        ),
    )
    step(
        "revoke reader from alice",
        lambda: au.UserRevokeRole(rpc_pb2.AuthUserRevokeRoleRequest(name="alice", role="reader"), metadata=md_root),
    )
    # Alice's token is still valid but she lost the role: permission denied now.
    step("alice reads after revoke", lambda: kv.Range(rpc_pb2.RangeRequest(key=p + b"r"), metadata=md_alice, timeout=T))
    step("delete role reader", lambda: au.RoleDelete(rpc_pb2.AuthRoleDeleteRequest(role="reader"), metadata=md_root))
    step(
        "delete alice", lambda: au.UserDelete(rpc_pb2.AuthUserDeleteRequest(name="alice"), metadata=md_root, timeout=T)
    )
    step("delete bob", lambda: au.UserDelete(rpc_pb2.AuthUserDeleteRequest(name="bob"), metadata=md_root, timeout=T))
    step("delete missing user", lambda: au.UserDelete(rpc_pb2.AuthUserDeleteRequest(name="bob"), metadata=md_root))
    step("disable as alice's stale token", lambda: au.AuthDisable(rpc_pb2.AuthDisableRequest(), metadata=md_alice))
    step("disable", lambda: au.AuthDisable(rpc_pb2.AuthDisableRequest(), metadata=md_root, timeout=T))
    step("status (off again)", lambda: au.AuthStatus(rpc_pb2.AuthStatusRequest(), timeout=T))
    step("delete root role", lambda: au.RoleDelete(rpc_pb2.AuthRoleDeleteRequest(role="root"), timeout=T))
    step("delete root", lambda: au.UserDelete(rpc_pb2.AuthUserDeleteRequest(name="root"), timeout=T))
    step("user list empty", lambda: au.UserList(rpc_pb2.AuthUserListRequest(), timeout=T))
    return out


def test_auth_all_methods_match(fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    with direct_and_proxied(fresh_etcd, proxy(etcd=fresh_etcd)) as (direct, proxied):
        run_both(direct, proxied, auth_scenario)


AUTH_ERRORS = [
    ("no token", None, grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty"),
    ("wrong token", "bogus.1", grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"),
    ("user without permission", "bob", grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
]


def test_auth_errors_keep_codes(fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    """With auth on, the three auth failures of a Range keep etcd's code and message through the proxy."""
    p = proxy(etcd=fresh_etcd)
    direct, proxied = connect("direct", fresh_etcd.endpoint), connect("proxy", p.endpoint)
    au = direct.auth
    au.UserAdd(rpc_pb2.AuthUserAddRequest(name="root", password="r"), timeout=T)
    au.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="root"), timeout=T)
    au.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"), timeout=T)
    au.UserAdd(rpc_pb2.AuthUserAddRequest(name="bob", password="b"), timeout=T)
    au.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=T)
    try:
        for stubs in (direct, proxied):
            bob = stubs.auth.Authenticate(rpc_pb2.AuthenticateRequest(name="bob", password="b"), timeout=T).token
            root = stubs.auth.Authenticate(rpc_pb2.AuthenticateRequest(name="root", password="r"), timeout=T).token
            assert stubs.kv.Range(rpc_pb2.RangeRequest(key=b"k"), metadata=token_md(root), timeout=T).count == 0
            for name, tok, code, message in AUTH_ERRORS:
                md = token_md(bob if tok == "bob" else tok) if tok else None
                err = rpc_error(
                    lambda s=stubs, md=md: s.kv.Range(rpc_pb2.RangeRequest(key=b"k"), metadata=md, timeout=T)
                )
                assert (err.code, err.details) == (code, message), f"{stubs.name}: {name}"
    finally:
        direct.close()
        proxied.close()


# --------------------------------------------------------------------------- Election and Lock


def election_lock_scenario(s: Stubs, p: bytes) -> list[tuple[str, Any]]:
    norm = Normalizer(prefix=p, base_revision=current_revision(s))
    out: list[tuple[str, Any]] = []
    el, lk = s.election, s.lock
    leases = [s.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID for _ in range(2)]
    for i, lid in enumerate(leases):
        norm.volatile[f"{lid:x}"] = f"<lease{i}>"

    def step(name: str, fn: Callable[[], Any]) -> Any:
        out.append((name, outcome(norm, fn)))

    def text(name: str, fn: Callable[[], Any]) -> Any:
        # Keys embed the lease id in hex: compare the text form after placeholder substitution.
        result = outcome(norm, fn)
        out.append((name, norm.text(str(result))))
        return result

    camp = el.Campaign(v3election_pb2.CampaignRequest(name=p + b"e", lease=leases[0], value=b"v1"), timeout=T)
    out.append(("campaign", norm.text(str(norm(camp)))))
    leader = camp.leader
    text("leader", lambda: el.Leader(v3election_pb2.LeaderRequest(name=p + b"e"), timeout=T))
    step("proclaim", lambda: el.Proclaim(v3election_pb2.ProclaimRequest(leader=leader, value=b"v2"), timeout=T))
    text("leader after proclaim", lambda: el.Leader(v3election_pb2.LeaderRequest(name=p + b"e"), timeout=T))
    not_leader = v3election_pb2.LeaderKey(name=p + b"e", key=p + b"e/0", rev=leader.rev, lease=leases[0])
    step("proclaim as non-leader", lambda: el.Proclaim(v3election_pb2.ProclaimRequest(leader=not_leader, value=b"x")))
    step("resign", lambda: el.Resign(v3election_pb2.ResignRequest(leader=leader), timeout=T))
    step("leader after resign", lambda: el.Leader(v3election_pb2.LeaderRequest(name=p + b"e"), timeout=T))
    step("resign again", lambda: el.Resign(v3election_pb2.ResignRequest(leader=leader), timeout=T))

    locked = lk.Lock(v3lock_pb2.LockRequest(name=p + b"l", lease=leases[1]), timeout=T)
    out.append(("lock", norm.text(str(norm(locked)))))
    text("lock key exists", lambda: s.kv.Range(rpc_pb2.RangeRequest(key=locked.key), timeout=T))
    step("unlock", lambda: lk.Unlock(v3lock_pb2.UnlockRequest(key=locked.key), timeout=T))
    step("lock key gone", lambda: s.kv.Range(rpc_pb2.RangeRequest(key=locked.key), timeout=T))
    step("unlock unknown key", lambda: lk.Unlock(v3lock_pb2.UnlockRequest(key=p + b"nope"), timeout=T))
    step("lock with unknown lease", lambda: lk.Lock(v3lock_pb2.LockRequest(name=p + b"l", lease=0x5EED), timeout=T))
    for lid in leases:
        s.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=T)
    return out


def test_election_and_lock_match(direct: Stubs, via_proxy: Stubs) -> None:
    run_both(direct, via_proxy, election_lock_scenario)


def test_lock_deadline_propagates(direct: Stubs, via_proxy: Stubs) -> None:
    """A Lock waiting behind a holder, with a 1 s deadline through the proxy: DEADLINE_EXCEEDED after
    about 1 s, and etcd saw the cancellation (the waiter's key is removed, as when called directly)."""
    name = f"dl-{uuid.uuid4().hex[:8]}".encode()
    holder_lease = direct.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    waiter_lease = direct.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID
    try:
        held = direct.lock.Lock(v3lock_pb2.LockRequest(name=name, lease=holder_lease), timeout=T)
        start = time.monotonic()
        err = rpc_error(lambda: via_proxy.lock.Lock(v3lock_pb2.LockRequest(name=name, lease=waiter_lease), timeout=1))
        elapsed = time.monotonic() - start
        assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.9 <= elapsed < 4, elapsed  # the client enforces its deadline too: the upstream check is below
        prefix = name + b"/"

        def lock_keys() -> list[bytes]:
            resp = direct.kv.Range(rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout=T)
            return [kv.key for kv in resp.kvs]

        wait_until(lambda: lock_keys() == [held.key], 5, "the waiter's lock key to be removed upstream")
        assert via_proxy.kv.Range(rpc_pb2.RangeRequest(key=held.key), timeout=T).count == 1
    finally:
        for lid in (holder_lease, waiter_lease):
            direct.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lid), timeout=T)


# --------------------------------------------------------------------------- raw bytes, unknown methods


MALFORMED = {
    "garbage": b"\xff\xff\xff",
    "huge length prefix": b"\x0a\xff\xff\xff\xff\x0f",
    "truncated field": b"\x0a\x05ab",
}

RANGE_STARTED = {"grpc_service": "etcdserverpb.KV", "grpc_method": "Range"}


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_bytes(payload: bytes, direct: Stubs, via_proxy: Stubs, etcd_server: EtcdServer) -> None:
    err = rpc_error(lambda: direct.raw_unary("/etcdserverpb.KV/Range", payload))
    assert (err.code, err.details) == (grpc.StatusCode.INTERNAL, "grpc: error unmarshalling request: unexpected EOF")

    before = etcd_server.metric("grpc_server_started_total", **RANGE_STARTED)
    err = rpc_error(lambda: via_proxy.raw_unary("/etcdserverpb.KV/Range", payload))
    assert err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT), err
    assert etcd_server.metric("grpc_server_started_total", **RANGE_STARTED) == before, "a request reached etcd"
    # A well-formed request on the same channel still works, and does reach etcd.
    resp = rpc_pb2.RangeResponse.FromString(via_proxy.raw_unary("/etcdserverpb.KV/Range", b"\x0a\x03foo"))
    assert resp.header.revision > 0
    assert etcd_server.metric("grpc_server_started_total", **RANGE_STARTED) > before


def test_range_stream_unimplemented(direct: Stubs, via_proxy: Stubs) -> None:
    def call(s: Stubs) -> Any:
        return list(s.channel.unary_stream("/etcdserverpb.KV/RangeStream")(b"\x0a\x01a", timeout=T))

    # etcd 3.5 predates RangeStream: UNIMPLEMENTED from grpc itself.
    assert rpc_error(lambda: call(direct)).code == grpc.StatusCode.UNIMPLEMENTED
    err = rpc_error(lambda: call(via_proxy))
    assert (err.code, err.details) == (grpc.StatusCode.UNIMPLEMENTED, "RangeStream is not supported by the gRPC proxy")


def test_grpc_health_check_serving(target: Stubs) -> None:
    # HealthCheckRequest{} encodes to b""; HealthCheckResponse{status: SERVING(1)} to b"\x08\x01".
    assert target.raw_unary("/grpc.health.v1.Health/Check", b"") == b"\x08\x01"


@pytest.mark.parametrize("path", ["/etcdserverpb.KV/NoSuchMethod", "/no.such.Service/Range"])
def test_unknown_method_unimplemented(target: Stubs, path: str) -> None:
    assert rpc_error(lambda: target.raw_unary(path, b"")).code == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------- coverage of this file


def test_every_unary_method_is_exercised_here() -> None:
    """Each unary method the proxy serves is called somewhere in this file (a new one needs a test)."""
    source = Path(__file__).read_text()
    missing = [m.path for m in METHODS if m.shape is Shape.UNARY and f".{m.name}(" not in source]
    assert not missing, f"no differential test calls {missing}"
