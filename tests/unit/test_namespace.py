"""core/namespace.py as tables: intervals (SPEC 10.1), every message rewrite, the RPC policy."""

from __future__ import annotations

import pytest

from etcdproxy.core import errors
from etcdproxy.core.methods import METHODS
from etcdproxy.core.namespace import RULES, Action, Namespace, Refused, rule
from etcdproxy.etcdpb import kv_pb2, rpc_pb2, v3election_pb2, v3lock_pb2
from etcdproxy.h2.status import StatusCode

NS = Namespace(b"/a/")


def inside(ns: Namespace, key: bytes) -> bool:
    """Is ``key`` in [prefix, prefix_end) -- the only keys a namespaced client may touch?"""
    return key.startswith(ns.prefix)


def covers(start: bytes, end: bytes, key: bytes) -> bool:
    """etcd's reading of a wire [start, end): single key, from-key ("\\x00") or a range."""
    if not end:
        return key == start
    if end == b"\x00":
        return key >= start
    return start <= key < end


# ---- intervals ---------------------------------------------------------------------------------

INTERVALS = [
    # prefix, key, range_end, expected key, expected range_end
    (b"/a/", b"k", b"", b"/a/k", b""),  # one key
    (b"/a/", b"k", b"m", b"/a/k", b"/a/m"),  # a range
    (b"/a/", b"k", b"\x00", b"/a/k", b"/a0"),  # from-key: up to prefix_end, not +infinity
    (b"/a/", b"\x00", b"\x00", b"/a/\x00", b"/a0"),  # clientv3 `get --prefix ""`: whole namespace
    (b"/a/", b"k", b"l", b"/a/k", b"/a/l"),  # clientv3 `get --prefix k`
    (b"a\xff", b"k", b"\x00", b"a\xffk", b"b"),  # trailing 0xff dropped, carry
    (b"\xff\xff", b"k", b"\x00", b"\xff\xffk", b"\x00"),  # all 0xff: +infinity is still confined
    (b"\xff", b"\x00", b"\x00", b"\xff\x00", b"\x00"),
    (b"a", b"b", b"a", b"ab", b"aa"),  # inverted stays inverted: etcd answers it like directly
]


@pytest.mark.parametrize(("prefix", "key", "range_end", "want_key", "want_end"), INTERVALS)
def test_interval(prefix: bytes, key: bytes, range_end: bytes, want_key: bytes, want_end: bytes) -> None:
    assert Namespace(prefix).interval(key, range_end) == (want_key, want_end)


@pytest.mark.parametrize("range_end", [b"", b"\x00", b"x"])
def test_empty_key_is_refused_like_etcd(range_end: bytes) -> None:
    with pytest.raises(Refused) as info:
        NS.interval(b"", range_end)
    assert info.value.error == errors.EMPTY_KEY
    assert info.value.error.code is StatusCode.INVALID_ARGUMENT


# Adversarial rows: siblings of the prefix that a client might try to reach.
SIBLINGS = [b"/a", b"/a0", b"/a.", b"/b/", b"/b/x", b"/", b"", b"/a/", b"\xff", b"/a0/x", b"/`"]
ATTEMPTS = [
    (b"\x00", b"\x00"),
    (b"\x01", b"\x00"),
    (b"0", b"\x00"),  # "/a/0" .. from-key: would reach "/a0" without the prefix_end rule
    (b"\xff", b"\x00"),
    (b"\xff\xff\xff", b"\x00"),
    (b"a", b"\xff\xff"),
    (b"\x00", b"\xff"),
    (b"z", b"a"),  # inverted
    (b"/", b"0"),
    (b"k", b""),
]


@pytest.mark.parametrize("prefix", [b"/a/", b"a\xff", b"\xff\xff", b"/a"])
@pytest.mark.parametrize(("key", "range_end"), ATTEMPTS)
def test_no_range_reaches_outside(prefix: bytes, key: bytes, range_end: bytes) -> None:
    ns = Namespace(prefix)
    start, end = ns.interval(key, range_end)
    for sibling in [*SIBLINGS, prefix]:
        if covers(start, end, sibling):
            assert inside(ns, sibling) and sibling != prefix, (start, end, sibling)


def test_strip() -> None:
    assert NS.strip(b"/a/k") == b"k"
    assert NS.strip(b"/a/") == b""
    assert NS.strip(b"/a0") is None
    assert NS.strip(b"/a") is None


def test_empty_prefix_is_no_namespace() -> None:
    with pytest.raises(ValueError):
        Namespace(b"")


# ---- requests ----------------------------------------------------------------------------------


def kv(key: bytes, value: bytes = b"v") -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=key, value=value, mod_revision=5)


def txn_with(*ops: rpc_pb2.RequestOp, compare: tuple[rpc_pb2.Compare, ...] = ()) -> rpc_pb2.TxnRequest:
    return rpc_pb2.TxnRequest(compare=list(compare), success=list(ops), failure=list(ops))


def op_put(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"v"))


def op_range(key: bytes, end: bytes = b"") -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key, range_end=end))


def op_delete(key: bytes, end: bytes = b"") -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=end))


def op_txn(txn: rpc_pb2.TxnRequest) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_txn=txn)


def translate(path: str, message: object, ns: Namespace = NS) -> bytes:
    return ns.request(path, message.SerializeToString())  # type: ignore[attr-defined]


REQUESTS = [
    (
        "/etcdserverpb.KV/Range",
        rpc_pb2.RangeRequest(key=b"k", range_end=b"\x00", limit=3, serializable=True),
        rpc_pb2.RangeRequest(key=b"/a/k", range_end=b"/a0", limit=3, serializable=True),
    ),
    (
        "/etcdserverpb.KV/Put",
        rpc_pb2.PutRequest(key=b"k", value=b"v", lease=7, prev_kv=True),
        rpc_pb2.PutRequest(key=b"/a/k", value=b"v", lease=7, prev_kv=True),
    ),
    (
        "/etcdserverpb.KV/DeleteRange",
        rpc_pb2.DeleteRangeRequest(key=b"k", range_end=b"l", prev_kv=True),
        rpc_pb2.DeleteRangeRequest(key=b"/a/k", range_end=b"/a/l", prev_kv=True),
    ),
    (
        "/etcdserverpb.KV/Txn",
        txn_with(
            op_put(b"p"),
            op_range(b"r", b"\x00"),
            op_delete(b"d"),
            op_txn(txn_with(op_put(b"deep"), compare=(rpc_pb2.Compare(key=b"c2", range_end=b"\x00"),))),
            rpc_pb2.RequestOp(),  # no operation: forwarded, etcd answers it
            compare=(rpc_pb2.Compare(key=b"c", value=b"x"),),
        ),
        txn_with(
            op_put(b"/a/p"),
            op_range(b"/a/r", b"/a0"),
            op_delete(b"/a/d"),
            op_txn(txn_with(op_put(b"/a/deep"), compare=(rpc_pb2.Compare(key=b"/a/c2", range_end=b"/a0"),))),
            rpc_pb2.RequestOp(),
            compare=(rpc_pb2.Compare(key=b"/a/c", value=b"x"),),
        ),
    ),
    (
        "/v3electionpb.Election/Campaign",
        v3election_pb2.CampaignRequest(name=b"e", lease=9, value=b"v"),
        v3election_pb2.CampaignRequest(name=b"/a/e", lease=9, value=b"v"),
    ),
    (
        "/v3electionpb.Election/Campaign",  # etcd accepts an empty election name; it stays inside
        v3election_pb2.CampaignRequest(name=b"", lease=9),
        v3election_pb2.CampaignRequest(name=b"/a/", lease=9),
    ),
    (
        "/v3electionpb.Election/Proclaim",
        v3election_pb2.ProclaimRequest(leader=v3election_pb2.LeaderKey(name=b"e", key=b"e/1", rev=3), value=b"v"),
        v3election_pb2.ProclaimRequest(leader=v3election_pb2.LeaderKey(name=b"/a/e", key=b"/a/e/1", rev=3), value=b"v"),
    ),
    (
        "/v3electionpb.Election/Resign",
        v3election_pb2.ResignRequest(leader=v3election_pb2.LeaderKey(name=b"e", key=b"e/1")),
        v3election_pb2.ResignRequest(leader=v3election_pb2.LeaderKey(name=b"/a/e", key=b"/a/e/1")),
    ),
    (
        "/v3electionpb.Election/Leader",
        v3election_pb2.LeaderRequest(name=b"e"),
        v3election_pb2.LeaderRequest(name=b"/a/e"),
    ),
    (
        "/v3electionpb.Election/Observe",
        v3election_pb2.LeaderRequest(name=b"e"),
        v3election_pb2.LeaderRequest(name=b"/a/e"),
    ),
    ("/v3lockpb.Lock/Lock", v3lock_pb2.LockRequest(name=b"l", lease=4), v3lock_pb2.LockRequest(name=b"/a/l", lease=4)),
    ("/v3lockpb.Lock/Unlock", v3lock_pb2.UnlockRequest(key=b"l/4"), v3lock_pb2.UnlockRequest(key=b"/a/l/4")),
    ("/etcdserverpb.Lease/LeaseTimeToLive", rpc_pb2.LeaseTimeToLiveRequest(ID=5, keys=True), None),
    ("/etcdserverpb.Lease/LeaseLeases", rpc_pb2.LeaseLeasesRequest(), None),
    ("/etcdserverpb.Maintenance/Status", rpc_pb2.StatusRequest(), None),
    ("/etcdserverpb.Maintenance/Alarm", rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET), None),
    ("/etcdserverpb.Cluster/MemberList", rpc_pb2.MemberListRequest(linearizable=True), None),
]


@pytest.mark.parametrize(("path", "request_", "expected"), REQUESTS)
def test_request(path: str, request_: object, expected: object) -> None:
    want = request_ if expected is None else expected
    assert translate(path, request_) == want.SerializeToString()  # type: ignore[attr-defined]


EMPTY_KEYS = [
    ("/etcdserverpb.KV/Range", rpc_pb2.RangeRequest(key=b"", range_end=b"\x00")),
    ("/etcdserverpb.KV/Put", rpc_pb2.PutRequest(key=b"")),
    ("/etcdserverpb.KV/DeleteRange", rpc_pb2.DeleteRangeRequest(key=b"", range_end=b"z")),
    # inside a Txn the Go proxy sends these to etcd as the prefix key itself
    ("/etcdserverpb.KV/Txn", txn_with(op_put(b""))),
    ("/etcdserverpb.KV/Txn", txn_with(op_range(b"", b"\x00"))),
    ("/etcdserverpb.KV/Txn", txn_with(op_txn(txn_with(op_delete(b""))))),
    ("/etcdserverpb.KV/Txn", txn_with(compare=(rpc_pb2.Compare(key=b""),))),
    ("/v3lockpb.Lock/Unlock", v3lock_pb2.UnlockRequest(key=b"")),
    ("/v3electionpb.Election/Resign", v3election_pb2.ResignRequest(leader=v3election_pb2.LeaderKey(name=b"e"))),
]


@pytest.mark.parametrize(("path", "request_"), EMPTY_KEYS)
def test_empty_keys_refused(path: str, request_: object) -> None:
    with pytest.raises(Refused) as info:
        translate(path, request_)
    assert info.value.error == errors.EMPTY_KEY


@pytest.mark.parametrize(
    ("create", "key", "range_end"),
    [
        (rpc_pb2.WatchCreateRequest(key=b"k"), b"/a/k", b""),
        (rpc_pb2.WatchCreateRequest(key=b"k", range_end=b"\x00"), b"/a/k", b"/a0"),
        (rpc_pb2.WatchCreateRequest(key=b"\x00", range_end=b"\x00"), b"/a/\x00", b"/a0"),
        (rpc_pb2.WatchCreateRequest(key=b"", range_end=b""), b"/a/\x00", b""),  # etcd: "" means "\x00"
        (rpc_pb2.WatchCreateRequest(key=b"", range_end=b"\x00"), b"/a/\x00", b"/a0"),  # never the prefix key
    ],
)
def test_watch_create(create: rpc_pb2.WatchCreateRequest, key: bytes, range_end: bytes) -> None:
    NS.watch_create(create)
    assert (create.key, create.range_end) == (key, range_end)


# ---- responses ---------------------------------------------------------------------------------

RESPONSES = [
    (
        "/etcdserverpb.KV/Range",
        rpc_pb2.RangeResponse(kvs=[kv(b"/a/x"), kv(b"/a/y")], count=2, more=True),
        rpc_pb2.RangeResponse(kvs=[kv(b"x"), kv(b"y")], count=2, more=True),
    ),
    (
        "/etcdserverpb.KV/Put",
        rpc_pb2.PutResponse(prev_kv=kv(b"/a/x")),
        rpc_pb2.PutResponse(prev_kv=kv(b"x")),
    ),
    ("/etcdserverpb.KV/Put", rpc_pb2.PutResponse(), rpc_pb2.PutResponse()),
    (
        "/etcdserverpb.KV/DeleteRange",
        rpc_pb2.DeleteRangeResponse(deleted=2, prev_kvs=[kv(b"/a/x"), kv(b"/a/y")]),
        rpc_pb2.DeleteRangeResponse(deleted=2, prev_kvs=[kv(b"x"), kv(b"y")]),
    ),
    (
        "/etcdserverpb.KV/Txn",
        rpc_pb2.TxnResponse(
            succeeded=True,
            responses=[
                rpc_pb2.ResponseOp(response_range=rpc_pb2.RangeResponse(kvs=[kv(b"/a/r")], count=1)),
                rpc_pb2.ResponseOp(response_put=rpc_pb2.PutResponse(prev_kv=kv(b"/a/p"))),
                rpc_pb2.ResponseOp(response_delete_range=rpc_pb2.DeleteRangeResponse(prev_kvs=[kv(b"/a/d")])),
                rpc_pb2.ResponseOp(
                    response_txn=rpc_pb2.TxnResponse(
                        responses=[rpc_pb2.ResponseOp(response_range=rpc_pb2.RangeResponse(kvs=[kv(b"/a/deep")]))]
                    )
                ),
            ],
        ),
        rpc_pb2.TxnResponse(
            succeeded=True,
            responses=[
                rpc_pb2.ResponseOp(response_range=rpc_pb2.RangeResponse(kvs=[kv(b"r")], count=1)),
                rpc_pb2.ResponseOp(response_put=rpc_pb2.PutResponse(prev_kv=kv(b"p"))),
                rpc_pb2.ResponseOp(response_delete_range=rpc_pb2.DeleteRangeResponse(prev_kvs=[kv(b"d")])),
                rpc_pb2.ResponseOp(
                    response_txn=rpc_pb2.TxnResponse(
                        responses=[rpc_pb2.ResponseOp(response_range=rpc_pb2.RangeResponse(kvs=[kv(b"deep")]))]
                    )
                ),
            ],
        ),
    ),
    (
        "/etcdserverpb.Lease/LeaseTimeToLive",  # keys of other namespaces are not shown
        rpc_pb2.LeaseTimeToLiveResponse(ID=5, TTL=9, keys=[b"/a/x", b"/a0", b"/b/y", b"/a/z", b"/a"]),
        rpc_pb2.LeaseTimeToLiveResponse(ID=5, TTL=9, keys=[b"x", b"z"]),
    ),
    (
        "/v3electionpb.Election/Campaign",
        v3election_pb2.CampaignResponse(leader=v3election_pb2.LeaderKey(name=b"/a/e", key=b"/a/e/1", rev=3)),
        v3election_pb2.CampaignResponse(leader=v3election_pb2.LeaderKey(name=b"e", key=b"e/1", rev=3)),
    ),
    (
        "/v3electionpb.Election/Leader",
        v3election_pb2.LeaderResponse(kv=kv(b"/a/e/1")),
        v3election_pb2.LeaderResponse(kv=kv(b"e/1")),
    ),
    (
        "/v3electionpb.Election/Observe",
        v3election_pb2.LeaderResponse(kv=kv(b"/a/e/1")),
        v3election_pb2.LeaderResponse(kv=kv(b"e/1")),
    ),
    ("/v3lockpb.Lock/Lock", v3lock_pb2.LockResponse(key=b"/a/l/4"), v3lock_pb2.LockResponse(key=b"l/4")),
    ("/etcdserverpb.Lease/LeaseLeases", rpc_pb2.LeaseLeasesResponse(), rpc_pb2.LeaseLeasesResponse()),
]


@pytest.mark.parametrize(("path", "response", "expected"), RESPONSES)
def test_response(path: str, response: object, expected: object) -> None:
    got = NS.response(path, response.SerializeToString())  # type: ignore[attr-defined]
    assert got == expected.SerializeToString()  # type: ignore[attr-defined]


def test_watch_events_batch() -> None:
    put = kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv(b"/a/x"), prev_kv=kv(b"/a/x", b"old"))
    without = kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv(b"/a/x"))
    delete = kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv_pb2.KeyValue(key=b"/a/y", mod_revision=6))
    batch = [
        (5, False, put.SerializeToString(), without.SerializeToString()),
        (6, True, delete.SerializeToString(), delete.SerializeToString()),
    ]
    (r1, d1, with1, without1), (r2, d2, with2, without2) = NS.events(batch)
    assert (r1, d1, r2, d2) == (5, False, 6, True)
    first = kv_pb2.Event.FromString(with1)
    assert (first.kv.key, first.prev_kv.key, first.prev_kv.value) == (b"x", b"x", b"old")
    assert kv_pb2.Event.FromString(without1) == kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv(b"x"))
    assert with2 == without2
    assert kv_pb2.Event.FromString(with2).kv.key == b"y"


@pytest.mark.parametrize(
    ("keys", "allowed"),
    [([], True), ([b"/a/x", b"/a/y"], True), ([b"/a/x", b"/a0"], False), ([b"/b/x"], False), ([b"/a"], False)],
)
def test_revoke_allowed(keys: list[bytes], allowed: bool) -> None:
    response = rpc_pb2.LeaseTimeToLiveResponse(ID=1, TTL=5, keys=keys).SerializeToString()
    assert NS.revoke_allowed(response) is allowed


# ---- policy ------------------------------------------------------------------------------------


def test_every_method_has_a_rule() -> None:
    assert {m.path for m in METHODS} == set(RULES)


def test_unknown_method_is_refused() -> None:
    assert rule("/etcdserverpb.KV/Future")[0] is Action.REFUSE


REFUSED = [
    ("/etcdserverpb.KV/Compact", rpc_pb2.CompactionRequest(revision=3)),
    ("/etcdserverpb.Maintenance/Snapshot", rpc_pb2.SnapshotRequest()),
    ("/etcdserverpb.Maintenance/HashKV", rpc_pb2.HashKVRequest()),
    ("/etcdserverpb.Maintenance/Hash", rpc_pb2.HashRequest()),
    ("/etcdserverpb.Maintenance/Defragment", rpc_pb2.DefragmentRequest()),
    ("/etcdserverpb.Maintenance/MoveLeader", rpc_pb2.MoveLeaderRequest(targetID=1)),
    ("/etcdserverpb.Maintenance/Downgrade", rpc_pb2.DowngradeRequest()),
    ("/etcdserverpb.Maintenance/Alarm", rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.DEACTIVATE)),
    ("/etcdserverpb.Maintenance/Alarm", rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.ACTIVATE)),
    ("/etcdserverpb.Cluster/MemberAdd", rpc_pb2.MemberAddRequest()),
    ("/etcdserverpb.Cluster/MemberRemove", rpc_pb2.MemberRemoveRequest(ID=1)),
    ("/etcdserverpb.Auth/RoleGrantPermission", rpc_pb2.AuthRoleGrantPermissionRequest(name="r")),
    ("/etcdserverpb.Auth/UserList", rpc_pb2.AuthUserListRequest()),
    ("/etcdserverpb.Auth/AuthEnable", rpc_pb2.AuthEnableRequest()),
]


@pytest.mark.parametrize(("path", "request_"), REFUSED)
def test_refused(path: str, request_: object) -> None:
    with pytest.raises(Refused) as info:
        translate(path, request_)
    error = info.value.error
    assert error.code is StatusCode.PERMISSION_DENIED
    assert "namespace policy" in error.message and "docs/namespace.md" in error.message
    assert path.rsplit("/", 1)[1] in error.message
