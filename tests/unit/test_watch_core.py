"""Table tests for the pure watch logic: response encoding, c-watcher filtering, broadcasts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etcdproxy.core.broadcast import (
    CATCH_UP_S,
    HISTORY_EVENTS,
    Broadcast,
    HistoryBudget,
    ProgressGate,
    restart_catch_up,
    stream_progress,
    unsettled_bound,
)
from etcdproxy.core.watch import CWatcher, encode_response, event_field, fragments, prepare, valid_range, varint
from etcdproxy.etcdpb import kv_pb2, rpc_pb2


def event(revision: int, key: bytes = b"k", delete: bool = False, prev: bool = True) -> tuple[int, bool, bytes, bytes]:
    kv = kv_pb2.KeyValue(key=key, mod_revision=revision, value=b"v%d" % revision)
    full = kv_pb2.Event(type=kv_pb2.Event.DELETE if delete else kv_pb2.Event.PUT, kv=kv)
    bare = full.SerializeToString()
    if prev:
        full.prev_kv.CopyFrom(kv_pb2.KeyValue(key=key, mod_revision=revision - 1))
    return revision, delete, full.SerializeToString(), bare


HEADER = rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=9, raft_term=3).SerializeToString()


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -2])
def test_varint_matches_protobuf(value: int) -> None:
    # field 2 (watch_id, int64) of WatchResponse: key 0x10 then the varint
    expected = rpc_pb2.WatchResponse(watch_id=value).SerializeToString()
    assert (b"\x10" + varint(value) if value else b"") == expected


@pytest.mark.parametrize(
    ("kwargs", "events"),
    [
        ({}, []),
        ({"created": True}, []),
        (
            {
                "canceled": True,
                "cancel_reason": "etcdserver: mvcc: required revision has been compacted",
                "compact_revision": 7,
            },
            [],
        ),
        ({"created": True, "canceled": True}, []),
        ({"fragment": True}, [1, 2]),
        ({}, [5]),
    ],
)
@pytest.mark.parametrize("watch_id", [0, 3, -1])
def test_encode_response_round_trips(kwargs: dict[str, object], events: list[int], watch_id: int) -> None:
    evs = [event(r) for r in events]
    data = encode_response(watch_id, HEADER, [event_field(e[2]) for e in evs], **kwargs)  # type: ignore[arg-type]
    parsed = rpc_pb2.WatchResponse.FromString(data)
    assert parsed.watch_id == watch_id
    assert parsed.header.revision == 9 and parsed.header.member_id == 2
    for name, value in kwargs.items():
        assert getattr(parsed, name) == value
    assert [e.kv.mod_revision for e in parsed.events] == events
    assert all(e.HasField("prev_kv") for e in parsed.events)


@pytest.mark.parametrize(
    ("key", "range_end", "valid"),
    [
        (b"a", b"", True),
        (b"a", b"b", True),
        (b"a", b"a", False),
        (b"b", b"a", False),
        (b"foo", b"\x00", True),
        (b"\x00", b"\x00", True),
    ],
)
def test_valid_range(key: bytes, range_end: bytes, valid: bool) -> None:
    assert valid_range(key, range_end) is valid


def watcher(**kwargs: object) -> CWatcher:
    w = CWatcher(watch_id=4, wid=1, key=b"k", range_end=b"", start_revision=0)
    for name, value in kwargs.items():
        setattr(w, name, value)
    return w


# (watcher settings, batches of event revisions (negative: delete), expected delivered revisions)
CASES = [
    ({"next_revision": 1}, [[2, 3], [4]], [2, 3, 4]),
    ({"next_revision": 4}, [[2, 3], [4, 5]], [4, 5]),  # joined late: older events already seen
    ({"next_revision": 3}, [[2, 3], [3, 4]], [3, 4]),  # a replayed batch overlapping the live one
    ({"next_revision": 1, "noput": True}, [[2, -3, 4]], [-3]),
    ({"next_revision": 1, "nodelete": True}, [[2, -3, 4]], [2, 4]),
    ({"next_revision": 10}, [[2, 3]], []),
    # etcd < 3.5.8 may send a progress at 31 ahead of the event at 31: a progress never filters
    ({"next_revision": 20, "progress_revision": 31}, [[31], [32]], [31, 32]),
    # never below the client's start revision, even before the hub said where it starts (soak: 3770 to a
    # watcher created at 3771 around a hub restart)
    ({"next_revision": 0, "start_revision": 10}, [[9, 10], [11]], [10, 11]),
    ({"next_revision": 5, "start_revision": 10}, [[8, 9, 10]], [10]),
]


@pytest.mark.parametrize(("settings", "batches", "expected"), CASES)
def test_cwatcher_accept(settings: dict[str, object], batches: list[list[int]], expected: list[int]) -> None:
    w = watcher(**settings)
    for batch in batches:
        w.accept(prepare([event(abs(r), delete=r < 0) for r in batch]))
    w.pending_header = HEADER
    delivered = []
    for data in w.take_responses():
        parsed = rpc_pb2.WatchResponse.FromString(data)
        assert parsed.watch_id == 4
        delivered += [-e.kv.mod_revision if e.type == kv_pb2.Event.DELETE else e.kv.mod_revision for e in parsed.events]
    assert delivered == expected
    # events advance next_revision even when filtered, so a later replay can't duplicate them
    last = max(abs(r) for batch in batches for r in batch)
    assert w.next_revision == max(settings["next_revision"], last + 1)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("next_revision", "progress_revision", "resume"),
    [(0, 0, 0), (0, 40, 0), (7, 0, 7), (7, 31, 32), (40, 31, 40)],
)
def test_cwatcher_resumes_past_its_events_and_progress(next_revision: int, progress_revision: int, resume: int) -> None:
    w = watcher(next_revision=next_revision, progress_revision=progress_revision)
    assert w.resume_revision() == resume


@pytest.mark.parametrize("prev_kv", [True, False])
def test_prev_kv_only_when_asked(prev_kv: bool) -> None:
    w = watcher(next_revision=1, prev_kv=prev_kv)
    w.accept(prepare([event(2)]))
    (data,) = w.take_responses()
    assert rpc_pb2.WatchResponse.FromString(data).events[0].HasField("prev_kv") is prev_kv


def test_fragmented_response_splits_and_flags() -> None:
    big = [b"x" * 1000] * 5
    runs = fragments([event_field(b) for b in big], limit=2100)
    assert [len(r) for r in runs] == [2, 2, 1]
    w = watcher(next_revision=1, fragment=True)
    big_event = kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"k", value=b"y" * 1_000_000)).SerializeToString()
    w.pending = [event_field(big_event), event_field(big_event)]
    w.pending_bytes = sum(map(len, w.pending))  # what accept keeps in step with pending
    w.pending_header = HEADER
    parts = [rpc_pb2.WatchResponse.FromString(d) for d in w.take_responses()]
    assert [p.fragment for p in parts] == [True, False]


def test_progress_only_when_nothing_pending() -> None:
    w = watcher(next_revision=1)
    w.pending_progress = True
    w.pending_header = HEADER
    (data,) = w.take_responses()
    parsed = rpc_pb2.WatchResponse.FromString(data)
    assert not parsed.events and parsed.header.revision == 9
    assert w.take_responses() == []


# ---- broadcasts --------------------------------------------------------------------------


def test_explicit_start_broadcast_joins() -> None:
    b = Broadcast(1, b"k", b"", start_revision=10)
    assert (b.frontier, b.floor) == (9, 10)
    assert b.can_join(10) and b.can_join(50) and not b.can_join(9)
    b.on_created(20)
    b.on_events([event(10), event(11)])
    assert b.frontier == 11 and [e[0] for e in b.replay_from(11)] == [11]


def test_from_now_broadcast() -> None:
    b = Broadcast(1, b"k", b"", start_revision=0)
    assert b.can_join_now() and not b.can_join(5)
    b.sent = True
    assert not b.can_join_now() and b.can_wait_for(5)
    b.on_created(41)
    assert (b.frontier, b.floor, b.resume_revision()) == (41, 42, 42)
    assert b.can_join(42) and not b.can_join(41)
    b.on_progress(50)
    assert b.frontier == 50 and b.resume_revision() == 51


def test_history_is_bounded_and_raises_the_floor() -> None:
    b = Broadcast(1, b"k", b"", start_revision=1)
    for r in range(1, HISTORY_EVENTS + 11):
        b.on_events([event(r)])
    assert b.history_events == HISTORY_EVENTS
    assert b.floor == 11 and b.can_join(11) and not b.can_join(10)
    assert b.replay_from(11)[0][0] == 11


def test_dead_broadcast_is_never_joined() -> None:
    b = Broadcast(1, b"k", b"", start_revision=5)
    b.dead = True
    assert not b.can_join(5) and not b.can_join_now()


def test_history_budget_evicts_oldest_across_broadcasts() -> None:
    budget = HistoryBudget(max_bytes=3 * len(event(1)[2]) * 2)
    a, b = Broadcast(1, b"a", b"", start_revision=1), Broadcast(2, b"b", b"", start_revision=1)
    total = 0
    for rev, owner in [(1, a), (2, b), (3, a), (4, b)]:
        batch = owner.on_events([event(rev)])
        total = budget.record(owner, batch, total + batch.size)
    # four batches of equal size, room for three: the oldest (a's revision 1) went first
    assert [x.revision for x in a.history] == [3] and a.floor == 2
    assert [x.revision for x in b.history] == [2, 4] and b.floor == 1
    assert total == a.history_bytes + b.history_bytes


def test_stream_progress_only_for_caught_up_broadcasts() -> None:
    catching_up = Broadcast(1, b"k", b"", start_revision=5)
    catching_up.on_created(20)  # etcd has revisions 5..20 to send first
    assert not catching_up.caught_up()
    catching_up.on_events([event(19)])
    assert not catching_up.caught_up()
    catching_up.on_events([event(20)])
    assert catching_up.caught_up()
    from_now = Broadcast(2, b"k", b"", start_revision=0)
    from_now.on_created(20)
    assert from_now.caught_up()


def test_settled_after_catch_up_or_after_the_sync_loop_had_its_time() -> None:
    resumed = Broadcast(1, b"k", b"", start_revision=5)  # quiet range: no event will say it caught up
    assert not resumed.settled(100.0)  # no created answer yet
    resumed.on_created(20, now=100.0)
    assert not resumed.settled(100.0 + CATCH_UP_S / 2)
    assert resumed.settled(100.0 + CATCH_UP_S)
    assert resumed.frontier == 4  # settling never moves the frontier (where a broken watch resumes from)
    busy = Broadcast(2, b"k", b"", start_revision=5)
    busy.on_created(20, now=100.0)
    busy.on_events([event(20)])
    assert busy.settled(100.0)


def test_each_catch_up_batch_starts_the_catch_up_clock_again() -> None:
    """A resumed watch whose catch-up etcd sends over more than CATCH_UP_S is not settled by time while its
    batches below the creation revision keep arriving; the first batch at or above it settles it at once."""
    resumed = Broadcast(1, b"k", b"", start_revision=5)
    resumed.on_created(20, now=100.0)
    resumed.on_events([event(8)], now=100.0 + CATCH_UP_S * 0.9)
    assert not resumed.settled(100.0 + CATCH_UP_S)  # would have settled by time without that batch
    assert not resumed.settled(100.0 + CATCH_UP_S * 1.8)
    assert resumed.settled(100.0 + CATCH_UP_S * 1.9)
    resumed.on_events([event(12)], now=100.0 + CATCH_UP_S * 2)
    assert not resumed.settled(100.0 + CATCH_UP_S * 2.5)
    resumed.on_events([event(20)], now=100.0 + CATCH_UP_S * 2.6)
    assert resumed.settled(100.0 + CATCH_UP_S * 2.6)  # caught up
    assert resumed.frontier == 20
    # before its created answer a batch (a rev-0 create's first events) touches no clock
    fresh = Broadcast(2, b"k", b"", start_revision=0)
    fresh.on_events([event(30)], now=50.0)
    assert fresh.catch_up_clock == 0.0


def test_a_stall_of_the_hub_holds_every_broadcast_for_catch_up_s() -> None:
    """The soak case: the hub was SIGSTOPped 2 s; etcd had set event R aside meanwhile (its send loop blocked),
    and its stream-wide progress answer at R came first after the hub woke. No broadcast of the stream, caught
    up or not, takes such an answer for CATCH_UP_S, and clients parked meanwhile are told at most the lowest
    frontier."""
    caught_up = Broadcast(1, b"a", b"", start_revision=0)
    caught_up.on_created(100, now=10.0)
    caught_up.on_events([event(104, b"a")], now=11.0)
    resumed = Broadcast(2, b"b", b"", start_revision=90)
    resumed.on_created(100, now=10.0)
    not_created = Broadcast(3, b"c", b"", start_revision=50)
    assert stream_progress([caught_up, resumed], set(), 110, 13.0) == ([caught_up, resumed], True)
    for b in (caught_up, resumed):
        b.on_progress(110)
    assert restart_catch_up([caught_up, resumed, not_created], 20.0) == 2  # woke at 20 after the stall
    assert stream_progress([caught_up, resumed], set(), 112, 20.0) == ([], False)
    assert unsettled_bound([caught_up, resumed], 20.0) == 110  # nothing past what was passed on
    assert stream_progress([caught_up, resumed], set(), 112, 20.0 + CATCH_UP_S / 2) == ([], False)
    assert stream_progress([caught_up, resumed], set(), 112, 20.0 + CATCH_UP_S) == ([caught_up, resumed], True)
    # one still catching up when the hub stalled starts its clock again, and settles by its events or by time
    late = Broadcast(4, b"d", b"", start_revision=40)
    late.on_created(100, now=19.0)
    restart_catch_up([late], 21.0)
    assert not late.settled(19.0 + CATCH_UP_S) and not late.settled(21.0 + CATCH_UP_S * 0.9)
    assert late.settled(21.0 + CATCH_UP_S)
    assert not_created.hold_until == 0.0 and not not_created.live


def test_stream_progress_moves_every_settled_frontier_the_clients_will_hear() -> None:
    # the CI failure: a watch re-created at 65 after quorum loss, quiet since (frontier 64,
    # created at 72); the stream's answer at 82 goes to the clients once it settled by time, so
    # its frontier must move too, or a resume after the next break starts at 65 (compacted)
    resumed = Broadcast(1, b"/k/03", b"", start_revision=65)
    resumed.on_created(72, now=100.0)
    from_now = Broadcast(2, b"/k/", b"/k0", start_revision=0)
    from_now.on_created(70, now=100.0)
    moved, settled = stream_progress([resumed, from_now], set(), 82, 100.0 + CATCH_UP_S / 2)
    assert (moved, settled) == ([from_now], False)  # the resumed one may still be catching up
    moved, settled = stream_progress([resumed, from_now], set(), 82, 100.0 + CATCH_UP_S)
    assert (moved, settled) == ([resumed, from_now], True)
    for b in moved:
        b.on_progress(82)
    assert resumed.resume_revision() == 83 and from_now.resume_revision() == 83
    # a (re-)create not answered yet holds the stream back and takes nothing
    again = Broadcast(3, b"/k/1", b"", start_revision=50)
    moved, settled = stream_progress([again, from_now], {3}, 90, 200.0)
    assert (moved, settled) == ([from_now], False)
    # never backwards: an answer at or below the frontier moves nothing but still settles
    assert stream_progress([from_now], set(), 82, 200.0) == ([], True)


# (revision, newest event, waiter, settled, seconds) per upstream answer -> (answered waiters, revision told)
GATE_CASES = [
    # settled at once: answered with etcd's revision
    ([(30, 30, "a", True, 0.0)], [(["a"], 30)]),
    # etcd's send loop put a later event first: never below an event the client may have
    ([(30, 31, "a", True, 0.0)], [(["a"], 31)]),
    # parked while a resumed s-watcher catches up, answered by a later answer after it settled
    (
        [(30, 12, "a", False, 0.0), (30, 30, None, False, 0.25), (31, 30, "b", True, 0.5)],
        [([], 30), ([], 30), (["a", "b"], 31)],
    ),
    # churn never lets the stream settle: answered anyway after the hold limit
    (
        [(30, 0, "a", False, 0.0), (31, 0, None, False, 2.9), (32, 0, None, False, 3.0)],
        [([], 30), ([], 31), (["a"], 32)],
    ),
    # an answer asked by the hub itself (no waiter) with nobody parked answers nobody
    ([(30, 0, None, True, 0.0)], [([], 30)]),
]


@pytest.mark.parametrize(("answers", "expected"), GATE_CASES)
def test_progress_gate(
    answers: list[tuple[int, int, str | None, bool, float]], expected: list[tuple[list[str], int]]
) -> None:
    gate: ProgressGate[str] = ProgressGate(max_hold_s=3.0)
    got = [gate.on_answer(*answer) for answer in answers]
    assert got == expected
    assert gate.parked == []


def test_progress_gate_cap_never_runs_ahead_of_unsettled_broadcasts() -> None:
    """The soak case: after a reset the resumed broadcasts owe events from 5127 while etcd answers 5144; the
    hold cap releases the client at the lowest unsettled frontier, or not at all if that is below an event
    already passed on; once settled, the full answer."""
    gate: ProgressGate[str] = ProgressGate(max_hold_s=3.0)
    assert gate.on_answer(5144, 5120, "a", False, 0.0, 5126) == ([], 5126)  # parked: not yet capped
    assert gate.on_answer(5144, 5120, None, False, 3.5, 5126) == (["a"], 5126)  # capped: at the bound
    gate.on_answer(5144, 5130, "b", False, 4.0, 5126)
    assert gate.on_answer(5144, 5130, None, False, 7.5, 5126)[0] == []  # bound below an event sent: hold on
    assert gate.on_answer(5150, 5130, None, True, 8.0, None) == (["b"], 5150)  # settled: everything


def test_unsettled_bound() -> None:
    caught_up = Broadcast(sw_id=1, key=b"a", range_end=b"", start_revision=0)
    caught_up.on_created(100, now=0.0)
    resumed = Broadcast(sw_id=2, key=b"b", range_end=b"", start_revision=90)  # resumed from 90, owes up to 100
    resumed.on_created(100, now=0.0)
    waiting = Broadcast(sw_id=3, key=b"c", range_end=b"", start_revision=50)  # not created yet: not live
    assert unsettled_bound([caught_up, resumed, waiting], now=0.5) == 89
    assert unsettled_bound([caught_up, resumed, waiting], now=60.0) is None  # settled by time
    assert unsettled_bound([caught_up], now=0.5) is None


def test_progress_gate_hands_back_everyone_parked_when_the_stream_fails() -> None:
    gate: ProgressGate[str] = ProgressGate()
    gate.on_answer(30, 0, "a", False, 0.0)
    gate.on_answer(30, 0, "b", False, 0.1)
    assert gate.take_all() == ["a", "b"] and gate.parked == []


@given(
    batches=st.lists(
        st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=6),
        min_size=1,
        max_size=6,
    ),
    start=st.integers(0, 12),
    noput=st.booleans(),
    nodelete=st.booleans(),
    prev_kv=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_accept_whole_batch_fast_path_matches_the_event_loop(
    batches: list[list[tuple[int, bool]]], start: int, noput: bool, nodelete: bool, prev_kv: bool
) -> None:
    """CWatcher.accept takes a Prepared batch it wants whole with one extend: pending fields, cuts, sizes and
    next_revision must be exactly what the per-event loop (fed a plain list) produces."""
    fast = watcher(next_revision=start, noput=noput, nodelete=nodelete, prev_kv=prev_kv)
    slow = watcher(next_revision=start, noput=noput, nodelete=nodelete, prev_kv=prev_kv)
    base = 0
    for batch in batches:
        # revisions non-decreasing within a batch and across batches (a replay may overlap: start over at base)
        revisions = sorted(base + r for r, _ in batch)
        deletes = [d for _, d in batch]
        events = [event(r, key=b"k%d" % i, delete=d) for i, (r, d) in enumerate(zip(revisions, deletes, strict=True))]
        prepared = prepare(events)
        assert fast.accept(prepared) == slow.accept(list(prepared))
        base = revisions[-1] - 1  # the next batch may repeat the last revision's neighbourhood
    for name in ("pending", "pending_cuts", "pending_revision", "pending_bytes", "next_revision"):
        assert getattr(fast, name) == getattr(slow, name), name
    fast.pending_header = slow.pending_header = HEADER
    assert fast.take_responses() == slow.take_responses()


def test_workers_follow_receivers() -> None:
    b = Broadcast(1, b"k", b"", start_revision=0)
    b.add_receiver((b"w1", 1), 0)
    b.add_receiver((b"w1", 2), 5)
    b.add_receiver((b"w2", 1), 0)
    b.add_receiver((b"w1", 2), 7)  # a new start for the same receiver: no second count
    assert sorted(b.workers()) == [b"w1", b"w2"] and b.receivers[(b"w1", 2)] == 7
    b.remove_receiver((b"w1", 1))
    assert sorted(b.workers()) == [b"w1", b"w2"]
    b.remove_receiver((b"w1", 2))
    b.remove_receiver((b"w1", 2))  # already gone: nothing changes
    assert b.workers() == (b"w2",)
    b.remove_receiver((b"w2", 1))
    assert b.workers() == () and not b.receivers


@pytest.mark.parametrize(
    ("starts", "compact_revision", "survivors"),
    [
        ({1: 10, 2: 20, 3: 25}, 20, [2, 3]),  # at the compaction revision itself: etcd still has it
        ({1: 10, 2: 19}, 20, []),  # both needed something compacted
        ({1: 10, 2: 30}, 0, []),  # not a compaction (a cancel with a reason): everyone goes
        ({}, 20, []),
    ],
)
def test_receivers_past_a_compaction(starts: dict[int, int], compact_revision: int, survivors: list[int]) -> None:
    broadcast = Broadcast(1, b"k", b"", 10)
    for wid, start in starts.items():
        broadcast.add_receiver((b"w", wid), start)
    assert broadcast.past_compaction(compact_revision) == [(b"w", wid) for wid in survivors]
    negative = Broadcast(2, b"k", b"", -1)  # etcd 3.5 cancels a negative start as compacted, receivers and all
    negative.add_receiver((b"w", 1), 30)
    assert negative.past_compaction(20) == []
