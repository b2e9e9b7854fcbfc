"""core/cache.py: the range cache as tables; every Go proxy defect of SPEC 20 (#1-#4, C, D, E, T) is a row."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from etcdproxy.config import Config
from etcdproxy.core import errors
from etcdproxy.core.cache import (
    Footprint,
    Invalidation,
    RangeCache,
    header_revision,
    invalidation_for,
    overlaps,
    prefix_end,
    to_interval,
)
from etcdproxy.core.methods import by_name
from etcdproxy.etcdpb import kv_pb2, rpc_pb2, v3election_pb2, v3lock_pb2
from etcdproxy.hub.cache import CacheHub
from etcdproxy.hub.host import WorkerState
from etcdproxy.ipc import schema as s

INF = None


def req(key: bytes, range_end: bytes = b"", revision: int = 0, **kw: object) -> bytes:
    return rpc_pb2.RangeRequest(
        key=key, range_end=range_end, revision=revision, serializable=True, **kw
    ).SerializeToString()  # type: ignore[no-any-return]


def resp(revision: int, *kvs: tuple[bytes, bytes]) -> bytes:
    return rpc_pb2.RangeResponse(  # type: ignore[no-any-return]
        header=rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=revision, raft_term=3),
        kvs=[kv_pb2.KeyValue(key=k, value=v) for k, v in kvs],
        count=len(kvs),
    ).SerializeToString()


def filled(cache: RangeCache, key: bytes, range_end: bytes = b"", identity: str = "", revision: int = 0) -> bytes:
    request = req(key, range_end, revision)
    assert cache.fill(cache.ticket(), identity, request, key, range_end, revision, resp(10, (key, b"v")))
    return request


# ---- intervals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "range_end", "expected"),
    [
        (b"a", b"", (b"a", b"a\x00")),  # point
        (b"a", b"b", (b"a", b"b")),  # range
        (b"a", b"\x00", (b"a", INF)),  # from-key: +infinity, not the inverted [a, "\x00") (#2)
        (b"\x00", b"\x00", (b"", INF)),  # whole keyspace, not an empty interval (#2)
        (b"b", b"a", (b"b", b"a")),  # inverted: empty, etcd returns nothing
    ],
)
def test_to_interval(key: bytes, range_end: bytes, expected: tuple[bytes, bytes | None]) -> None:
    assert to_interval(key, range_end) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((b"a", b"a\x00"), (b"a", b"a\x00"), True),
        ((b"a", b"a\x00"), (b"b", b"b\x00"), False),
        ((b"a", b"c"), (b"b", b"b\x00"), True),
        ((b"a", b"c"), (b"c", b"c\x00"), False),  # end is exclusive
        ((b"a", INF), (b"zzz", b"zzz\x00"), True),  # from-key sees any later key (#2)
        ((b"", INF), (b"\x01", b"\x01\x00"), True),  # whole keyspace sees everything (#2)
        ((b"k", INF), (b"a", b"b"), False),
        ((b"b", b"a"), (b"a", INF), False),  # empty intervals overlap nothing
    ],
)
def test_overlaps(a: tuple[bytes, bytes | None], b: tuple[bytes, bytes | None], expected: bool) -> None:
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected


@pytest.mark.parametrize(("prefix", "end"), [(b"a", b"b"), (b"a\xff", b"b"), (b"\xff\xff", b"\x00"), (b"ab", b"ac")])
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


# ---- invalidation by interval ------------------------------------------------------------------

# (cached (key, range_end), written (key, range_end), dropped?)
INVALIDATION_ROWS = [
    ((b"foo", b""), (b"foo", b""), True),  # Put foo
    ((b"foo", b""), (b"fop", b""), False),
    ((b"foo", b"fop"), (b"foo1", b""), True),  # prefix read, put under it
    ((b"foo", b"fop"), (b"fop", b""), False),
    ((b"k", b"\x00"), (b"k2", b""), True),  # #2: get --from-key k, then put k2
    ((b"k", b"\x00"), (b"a", b""), False),
    ((b"\x00", b"\x00"), (b"anything", b""), True),  # #2: whole keyspace read, any put
    ((b"foo", b""), (b"a", b"\x00"), True),  # #2: del --from-key a invalidates later keys
    ((b"foo", b""), (b"\x00", b"\x00"), True),  # delete everything
    ((b"foo", b""), (b"a", b"b"), False),
    ((b"a", b"c"), (b"b", b"d"), True),  # overlapping ranges
]


@pytest.mark.parametrize(("cached", "written", "dropped"), INVALIDATION_ROWS)
def test_invalidate(cached: tuple[bytes, bytes], written: tuple[bytes, bytes], dropped: bool) -> None:
    cache = RangeCache()
    request = filled(cache, *cached)
    cache.invalidate(*written)
    assert (cache.lookup("", request) is None) is dropped
    assert cache.index_size() == cache.keys


def test_fixed_revision_entries_are_not_invalidated() -> None:
    cache = RangeCache()
    request = filled(cache, b"foo", revision=5)
    cache.invalidate(b"foo", b"")
    assert cache.lookup("", request) is not None


# ---- identity (#1) -----------------------------------------------------------------------------


def test_identity_separates_entries() -> None:
    cache = RangeCache()
    request = filled(cache, b"/secret", identity="token-of-alice")
    assert cache.lookup("token-of-alice", request) is not None
    assert cache.lookup("token-of-bob", request) is None
    assert cache.lookup("", request) is None


# ---- the write window (#4) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ((b"foo", b""), False),  # a put of foo during the read: the old answer is refused
        ((b"f", b"g"), False),  # a delete range covering foo
        ((b"bar", b""), True),  # unrelated write: the answer is fine
    ],
)
def test_fill_after_overlapping_invalidation_is_refused(written: tuple[bytes, bytes], stored: bool) -> None:
    cache = RangeCache()
    ticket = cache.ticket()
    cache.invalidate(*written, revision=11)
    request = req(b"foo")
    assert cache.fill(ticket, "", request, b"foo", b"", 0, resp(11, (b"foo", b"old"))) is stored


def test_fill_after_flush_is_refused() -> None:
    cache = RangeCache()
    ticket = cache.ticket()
    cache.flush()
    assert not cache.fill(ticket, "", req(b"foo"), b"foo", b"", 0, resp(10))


def test_fill_older_than_invalidated_revision_is_refused() -> None:
    """An answer from a lagging member, sent after a write it does not reflect was invalidated."""
    cache = RangeCache()
    cache.invalidate(b"foo", b"", revision=20)
    ticket = cache.ticket()
    assert not cache.fill(ticket, "", req(b"foo"), b"foo", b"", 0, resp(19))
    assert cache.fill(ticket, "", req(b"foo"), b"foo", b"", 0, resp(20))


def test_ticket_older_than_the_log_is_refused() -> None:
    cache = RangeCache()
    ticket = cache.ticket()
    for i in range(5000):
        cache.invalidate(b"other%d" % i, b"")
    assert not cache.fill(ticket, "", req(b"foo"), b"foo", b"", 0, resp(10))


def test_disabled_cache_neither_serves_nor_fills() -> None:
    cache = RangeCache()
    request = filled(cache, b"foo")
    cache.disable()
    assert cache.lookup("", request) is None
    assert not cache.fill(cache.ticket(), "", request, b"foo", b"", 0, resp(10))
    cache.enable(revision=30)
    assert not cache.fill(cache.ticket(), "", request, b"foo", b"", 0, resp(29))  # older than the watch start
    assert cache.fill(cache.ticket(), "", request, b"foo", b"", 0, resp(30))
    assert cache.lookup("", request) is not None


# ---- compaction (C, #19) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("revision", "compacted", "expected"),
    [
        (0, 10, "hit"),  # C: latest reads stay cacheable after a Compact
        (5, 10, "compacted"),  # 0 < revision < compacted -> OUT_OF_RANGE like etcd
        (10, 10, "hit"),  # the compacted revision itself is still readable in etcd
        (12, 10, "hit"),
    ],
)
def test_compaction(revision: int, compacted: int, expected: str) -> None:
    cache = RangeCache()
    request = filled(cache, b"foo", revision=revision)
    cache.compact(compacted)
    answer = cache.lookup("", request)
    if expected == "hit":
        assert isinstance(answer, bytes)
    else:
        assert answer == errors.COMPACTED
        assert cache.keys == 0
    assert cache.compacted_error(revision) == (errors.COMPACTED if expected == "compacted" else None)


def test_latest_read_fills_after_compact() -> None:
    cache = RangeCache()
    cache.compact(50)
    assert cache.fill(cache.ticket(), "", req(b"foo"), b"foo", b"", 0, resp(60))
    assert not cache.fill(cache.ticket(), "", req(b"foo", revision=40), b"foo", b"", 40, resp(60))


# ---- bounds (D, T) ---------------------------------------------------------------------------


def test_entry_bound_evicts_lru_and_prunes_index() -> None:
    cache = RangeCache(max_entries=10)
    requests = [filled(cache, b"k%03d" % i, b"\x00" if i % 2 else b"") for i in range(100)]
    assert cache.keys == 10
    assert cache.index_size() == 10  # D: evicted entries leave the index
    assert cache.lookup("", requests[0]) is None
    assert cache.lookup("", requests[-1]) is not None


def test_byte_bound() -> None:
    cache = RangeCache(max_bytes=40_000)
    big = b"x" * 5000
    for i in range(50):
        request = req(b"k%d" % i)
        cache.fill(cache.ticket(), "", request, b"k%d" % i, b"", 0, resp(10, (b"k", big)))
    assert cache.size_bytes <= 40_000
    assert 0 < cache.keys < 10
    assert cache.index_size() == cache.keys
    # T: a response larger than a quarter of the budget is not cached at all
    assert not cache.fill(cache.ticket(), "", req(b"huge"), b"huge", b"", 0, resp(10, (b"k", b"x" * 20_000)))


def test_invalidation_prunes_index_for_every_overlapping_node() -> None:
    """D: the Go proxy deletes only the tree node equal to the invalidation interval."""
    cache = RangeCache()
    for key, end in [(b"a", b""), (b"a", b"c"), (b"a", b"\x00"), (b"\x00", b"\x00"), (b"b", b"")]:
        filled(cache, key, end)
    assert cache.invalidate(b"a", b"") == 4
    assert cache.keys == 1
    assert cache.index_size() == 1


def test_hits_misses_and_keys() -> None:
    cache = RangeCache()
    request = filled(cache, b"foo")
    assert cache.lookup("", request) is not None
    assert cache.lookup("", req(b"bar")) is None
    assert (cache.hits, cache.keys) == (1, 1)


# ---- what writes invalidate (E) ----------------------------------------------------------------


def txn(**kw: object) -> bytes:
    return rpc_pb2.TxnRequest(**kw).SerializeToString()  # type: ignore[no-any-return]


def put_op(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key))


def del_op(key: bytes, end: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=end))


NESTED = rpc_pb2.TxnRequest(
    compare=[rpc_pb2.Compare(key=b"n1", range_end=b"n2")], success=[put_op(b"deep")], failure=[del_op(b"x", b"y")]
)

WRITE_ROWS = [
    ("etcdserverpb.KV", "Put", rpc_pb2.PutRequest(key=b"k").SerializeToString(), 0, Invalidation(((b"k", b""),))),
    (
        "etcdserverpb.KV",
        "DeleteRange",
        rpc_pb2.DeleteRangeRequest(key=b"a", range_end=b"\x00").SerializeToString(),
        0,
        Invalidation(((b"a", b"\x00"),)),
    ),
    # E: compares, both branches, nested txn ops; failed Txn branch too (conservative)
    (
        "etcdserverpb.KV",
        "Txn",
        txn(
            compare=[rpc_pb2.Compare(key=b"c")],
            success=[put_op(b"s"), rpc_pb2.RequestOp(request_txn=NESTED)],
            failure=[del_op(b"f", b"g"), rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"r"))],
        ),
        0,
        Invalidation(((b"c", b""), (b"s", b""), (b"n1", b"n2"), (b"deep", b""), (b"x", b"y"), (b"f", b"g"))),
    ),
    # E: a write that failed in a way that may have applied it still invalidates
    ("etcdserverpb.KV", "Put", rpc_pb2.PutRequest(key=b"k").SerializeToString(), 14, Invalidation(((b"k", b""),))),
    ("etcdserverpb.KV", "Put", rpc_pb2.PutRequest(key=b"k").SerializeToString(), 3, None),  # rejected: not applied
    (
        "etcdserverpb.KV",
        "Compact",
        rpc_pb2.CompactionRequest(revision=9).SerializeToString(),
        0,
        Invalidation(compact_revision=9),
    ),
    ("etcdserverpb.KV", "Range", req(b"k"), 0, None),
    # E: LeaseRevoke deletes attached keys the proxy does not know: flush
    (
        "etcdserverpb.Lease",
        "LeaseRevoke",
        rpc_pb2.LeaseRevokeRequest(ID=1).SerializeToString(),
        0,
        Invalidation(flush=True),
    ),
    ("etcdserverpb.Lease", "LeaseGrant", b"", 0, None),
    # #1: auth mutations flush every identity's entries; reads do not
    ("etcdserverpb.Auth", "RoleRevokePermission", b"", 0, Invalidation(flush=True)),
    ("etcdserverpb.Auth", "AuthEnable", b"", 0, Invalidation(flush=True)),
    ("etcdserverpb.Auth", "UserDelete", b"", 0, Invalidation(flush=True)),
    ("etcdserverpb.Auth", "Authenticate", b"", 0, None),
    ("etcdserverpb.Auth", "RoleGet", b"", 0, None),
    (
        "v3lockpb.Lock",
        "Lock",
        v3lock_pb2.LockRequest(name=b"mylock").SerializeToString(),
        0,
        Invalidation(((b"mylock/", b"mylock0"),)),
    ),
    (
        "v3lockpb.Lock",
        "Unlock",
        v3lock_pb2.UnlockRequest(key=b"mylock/1a").SerializeToString(),
        0,
        Invalidation(((b"mylock/1a", b""),)),
    ),
    (
        "v3electionpb.Election",
        "Campaign",
        v3election_pb2.CampaignRequest(name=b"el", lease=26).SerializeToString(),
        0,
        Invalidation(((b"el/", b"el0"),)),
    ),
    (
        "v3electionpb.Election",
        "Resign",
        v3election_pb2.ResignRequest(leader=v3election_pb2.LeaderKey(name=b"el", key=b"el/1a")).SerializeToString(),
        0,
        Invalidation(((b"el/1a", b""),)),
    ),
    ("etcdserverpb.KV", "Put", b"\xff\xff", 0, Invalidation(flush=True)),  # undecodable: be safe
    ("v3electionpb.Election", "Leader", b"", 0, None),
]


@pytest.mark.parametrize(("service", "name", "request_bytes", "code", "expected"), WRITE_ROWS)
def test_invalidation_for(
    service: str, name: str, request_bytes: bytes, code: int, expected: Invalidation | None
) -> None:
    assert invalidation_for(service, name, request_bytes, code) == expected


def test_header_revision() -> None:
    assert header_revision(resp(42, (b"k", b"v"))) == 42
    put = rpc_pb2.PutResponse(header=rpc_pb2.ResponseHeader(revision=7)).SerializeToString()
    assert header_revision(put) == 7
    assert header_revision(b"") == 0
    assert header_revision(b"\xff") == 0


# ---- Footprint: the hub's view of what a worker may cache ----------------------------------------


def iv(key: bytes, range_end: bytes = b"") -> tuple[bytes, bytes | None]:
    return to_interval(key, range_end)


@pytest.mark.parametrize(
    ("recorded", "written", "touched"),
    [
        ((b"a", b""), (b"a", b""), True),  # the same point
        ((b"a", b""), (b"b", b""), False),
        ((b"a", b""), (b"a\x00", b""), False),  # the next key is another point
        ((b"a", b""), (b"", b""), False),  # the point "" is not the whole keyspace
        ((b"a", b""), (b"\x00", b"\x00"), True),  # whole keyspace
        ((b"a", b""), (b"a", b"b"), True),  # a range holding the point
        ((b"b", b""), (b"a", b"b"), False),  # range end is exclusive
        ((b"c", b""), (b"b", b"\x00"), True),  # from-key
        ((b"a", b""), (b"b", b"\x00"), False),
        ((b"p/", b"p0"), (b"p/x", b""), True),  # a prefix read, a write under it
        ((b"p/", b"p0"), (b"q", b""), False),
        ((b"p/", b"p0"), (b"a", b"p/"), False),  # adjacent ranges do not overlap
        ((b"p/", b"p0"), (b"a", b"p/\x00"), True),
        ((b"\x00", b"\x00"), (b"anything", b""), True),  # a whole-keyspace read
        ((b"b", b"a"), (b"a", b"\x00"), False),  # an empty (inverted) read holds nothing
    ],
)
def test_footprint_touches(recorded: tuple[bytes, bytes], written: tuple[bytes, bytes], touched: bool) -> None:
    footprint = Footprint()
    assert not footprint.touches(iv(*written))
    footprint.add(iv(*recorded))
    assert footprint.touches(iv(*written)) is touched
    # touches agrees with the cache's own overlap test
    assert overlaps(iv(*recorded), iv(*written)) is touched


def test_footprint_drop_forgets_everything_overlapping() -> None:
    footprint = Footprint()
    for key in (b"a", b"b", b"c", b"d"):
        footprint.add(iv(key))
    footprint.add(iv(b"p/", b"p0"))
    footprint.add(iv(b"x", b"\x00"))
    footprint.drop(iv(b"b", b"d"))  # b and c
    assert len(footprint) == 4
    assert not footprint.touches(iv(b"b")) and not footprint.touches(iv(b"c"))
    assert footprint.touches(iv(b"a")) and footprint.touches(iv(b"d"))
    footprint.drop(iv(b"p/k"))  # a point write under the prefix drops the prefix read
    assert not footprint.touches(iv(b"p/z"))
    footprint.drop(iv(b"z"))  # from-key x
    assert not footprint.touches(iv(b"zz"))
    footprint.drop(iv(b"\x00", b"\x00"))
    assert len(footprint) == 0 and not footprint.touches(iv(b"\x00", b"\x00"))
    footprint.drop(iv(b"nothing"))  # dropping what is not there is harmless


def test_footprint_counts_for_ranges_in_flight() -> None:
    footprint = Footprint()
    footprint.add(iv(b"k"))
    footprint.add(iv(b"k"))
    footprint.add(iv(b"p/", b"p0"))
    footprint.remove(iv(b"k"))
    assert footprint.touches(iv(b"k"))  # one still in flight
    footprint.remove(iv(b"k"))
    assert not footprint.touches(iv(b"k"))
    assert footprint.touches(iv(b"a", b"\x00"))  # the range is still there
    footprint.remove(iv(b"p/", b"p0"))
    footprint.remove(iv(b"p/", b"p0"))  # one remove too many: a no-op
    footprint.remove(iv(b"never"))
    assert len(footprint) == 0
    footprint.add(iv(b"k"))
    footprint.clear()
    assert not footprint.touches(iv(b"\x00", b"\x00"))


def test_footprint_random_against_overlaps() -> None:
    """Random adds/drops: touches() is exactly 'some recorded interval overlaps' (a naive list as the model)."""
    import random

    rng = random.Random(7)
    keys = [b"", b"a", b"a\x00", b"ab", b"b", b"c", b"\xff", b"\xff\xff"]

    def wire() -> tuple[bytes, bytes]:
        return rng.choice(keys), rng.choice([b"", b"", b"\x00", *keys])

    footprint, model = Footprint(), []
    for _ in range(3000):
        interval = iv(*wire())
        if rng.random() < 0.5:
            footprint.add(interval)
            model.append(interval)
        else:
            footprint.drop(interval)
            model = [m for m in model if not overlaps(m, interval)]
        probe = iv(*wire())
        assert footprint.touches(probe) is any(overlaps(m, probe) for m in model)
        key = rng.choice(keys)
        assert footprint.touches_key(key) is any(overlaps(m, iv(key)) for m in model)
        assert footprint.touches_any([iv(key), probe]) is any(overlaps(m, p) for m in model for p in (iv(key), probe))
        assert footprint.empty is (not model)


# ---- the hub's bookkeeping (hub/cache.py) on a host of recorded sends: who gets which invalidation --------


class _Host:
    """What CacheHub uses of the hub process (hub/host.py WorkerHost): sends are recorded, nothing is upstream."""

    def __init__(self, loop: asyncio.AbstractEventLoop, identities: list[bytes]) -> None:
        self.config = Config(cache_max_entries=8)
        self.loop = loop
        self.epoch = 7
        self.forwarder: Any = None
        self.closers: list[Any] = []
        self.workers = {i: WorkerState(i) for i in identities}
        self.worker_gone: list[Any] = []
        self.handlers: dict[s.Kind, Any] = {}
        self.sent: list[tuple[bytes, s.HubMessage]] = []

    @property
    def channel(self) -> Any:
        raise AssertionError("no upstream in this test")

    def register(self, kind: s.Kind, handler: Any) -> None:
        self.handlers[kind] = handler

    def next_seq(self, worker: WorkerState) -> int:
        worker.seq += 1
        return worker.seq

    def send(self, worker: WorkerState, message: s.HubMessage) -> None:
        self.sent.append((worker.identity, message))

    def take(self) -> list[tuple[bytes, s.HubMessage]]:
        sent, self.sent = self.sent, []
        return sent


def _cache_hub(host: _Host) -> CacheHub:
    hub = CacheHub(host)  # type: ignore[arg-type]
    hub._task.cancel()  # no invalidation watch, no auth probe: they would go upstream
    hub._prober.cancel()
    for worker in host.workers.values():
        hub._on_sync(worker, s.CacheSync(host.epoch))  # tracked from now on
    host.take()
    return hub


def _put(hub: CacheHub, host: _Host, writer: bytes, key: bytes, revision: int) -> Any:
    request = rpc_pb2.PutRequest(key=key, value=b"v").SerializeToString()
    body = rpc_pb2.PutResponse(header=rpc_pb2.ResponseHeader(revision=revision)).SerializeToString()
    return hub.after_call(host.workers[writer], by_name("etcdserverpb.KV", "Put"), request, 0, body)


def _ack(hub: CacheHub, host: _Host, identity: bytes, ack_id: int) -> None:
    hub._on_ack(host.workers[identity], s.CacheAck(host.epoch, ack_id))


def test_hub_skips_workers_that_hold_nothing_a_write_touches() -> None:
    async def run() -> None:
        host = _Host(asyncio.get_running_loop(), [b"w1", b"w2"])
        hub = _cache_hub(host)
        assert _put(hub, host, b"w1", b"k", 5).done() and host.take() == []  # nobody caches anything
        hub._footprints[b"w2"].add(to_interval(b"k", b""))  # w2 answered a Range of k
        assert _put(hub, host, b"w1", b"other", 6).done() and host.take() == []
        assert hub.floor == 6

        first = _put(hub, host, b"w1", b"k", 7)  # touches w2: it must drop k before the reply
        [(to, message)] = host.take()
        assert to == b"w2" and isinstance(message, s.CacheInvalidate) and message.intervals == [(b"k", b"")]
        assert not first.done()
        # a second write of k before w2 acknowledged the first: k left w2's footprint when the first was
        # sent, but w2 may still serve it until it processed that message, so this write waits for w2 too
        second = _put(hub, host, b"w1", b"k", 8)
        [(to2, message2)] = host.take()
        assert to2 == b"w2" and not second.done()
        _ack(hub, host, b"w2", message.ack_id)
        await asyncio.sleep(0)
        assert first.done() and not second.done()
        _ack(hub, host, b"w2", message2.ack_id)
        await asyncio.sleep(0)
        assert second.done()
        # both acknowledged and k dropped: the next write of k needs nobody
        assert _put(hub, host, b"w1", b"k", 9).done() and host.take() == []

    asyncio.run(run())


def test_hub_writer_worker_ack_confirms_its_own_drop() -> None:
    async def run() -> None:
        host = _Host(asyncio.get_running_loop(), [b"w1", b"w2"])
        hub = _cache_hub(host)
        hub._footprints[b"w1"].add(to_interval(b"k", b""))
        own = _put(hub, host, b"w1", b"k", 5)  # only the writer's worker holds k: no wait (same ordered link)
        [(to, message)] = host.take()
        assert to == b"w1" and isinstance(message, s.CacheInvalidate) and message.ack_id and own.done()
        other = _put(hub, host, b"w2", b"k", 6)  # another worker's write: w1 has not confirmed yet
        [(to2, message2)] = host.take()
        assert to2 == b"w1" and isinstance(message2, s.CacheInvalidate) and not other.done()
        _ack(hub, host, b"w1", message.ack_id)
        await asyncio.sleep(0)
        assert not other.done()  # the second message is not acknowledged yet
        _ack(hub, host, b"w1", message2.ack_id)
        await asyncio.sleep(0)
        assert other.done()
        assert _put(hub, host, b"w2", b"k", 7).done() and host.take() == []


def test_hub_state_change_and_resync() -> None:
    """CacheState empties footprints (confirmed by an ack); a worker's CacheSync starts it afresh."""

    async def run() -> None:
        host = _Host(asyncio.get_running_loop(), [b"w1", b"w2"])
        hub = _cache_hub(host)
        hub._footprints[b"w2"].add(to_interval(b"k", b""))
        hub._set_state(True, 3)
        sent = host.take()
        kinds = [(to, type(m).__name__) for to, m in sent]
        assert kinds == [
            (b"w1", "CacheState"),
            (b"w1", "CacheInvalidate"),
            (b"w2", "CacheState"),
            (b"w2", "CacheInvalidate"),
        ]
        pending = _put(hub, host, b"w1", b"x", 4)  # nobody acknowledged the state change yet: everyone
        assert sorted(to for to, _ in host.take()) == [b"w1", b"w2"] and not pending.done()
        hub._on_sync(host.workers[b"w2"], s.CacheSync(host.epoch))  # w2 flushed (e.g. a lost frame)
        host.take()
        hub._on_worker_gone(host.workers[b"w1"])  # w1's acks will never come
        del host.workers[b"w1"]
        await asyncio.sleep(0)
        # w2 never acked, but its CacheSync means it flushed: nothing of the put above is still held there
        assert _put(hub, host, b"w2", b"y", 5).done() and host.take() == []

    asyncio.run(run())

    asyncio.run(run())
