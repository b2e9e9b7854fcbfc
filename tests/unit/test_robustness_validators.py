"""Table tests for the robustness validators (tests/robustness/validators.py): for each, a
recorded history it must accept and one it must reject. Histories are built by hand here, in
the recorder's format, on a tiny keyspace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.robustness import validators as v
from tests.robustness.harness import growth
from tests.robustness.history import History, Recorder, load
from tests.robustness.model import Replay, in_range, prefix_end

Rec = dict[str, Any]


def kv(key: str, rev: int, value: str = "v", create: int | None = None, version: int = 1, lease: int = 0) -> Rec:
    return {
        "key": key,
        "value": value,
        "create_revision": create or rev,
        "mod_revision": rev,
        "version": version,
        "lease": lease,
    }


def put(key: str, rev: int, value: str = "v", prev: Rec | None = None, **kw: Any) -> Rec:
    ev: Rec = {"type": "PUT", "kv": kv(key, rev, value, **kw)}
    if prev is not None:
        ev["prev_kv"] = prev
    return ev


def delete(key: str, rev: int, prev: Rec | None = None) -> Rec:
    ev: Rec = {"type": "DELETE", "kv": {**kv(key, rev, ""), "create_revision": 0, "version": 0}}
    if prev is not None:
        ev["prev_kv"] = prev
    return ev


# The ground truth used by most tables: a@2, b@3, a@4 (version 2), delete b@5, c@6.
A2 = put("a", 2)
B3 = put("b", 3)
A4 = put("a", 4, "v2", prev=kv("a", 2), create=2, version=2)
DB5 = delete("b", 5, prev=kv("b", 3))
C6 = put("c", 6)
TRUTH = [A2, B3, A4, DB5, C6]


def history(*records: Rec, truth: list[Rec] = TRUTH, final: int = 6, drained: tuple[str, ...] = ("s",)) -> History:
    recs: list[Rec] = [{"kind": "meta", "seed": 1}]
    recs += [
        {"kind": "truth", "t": 0.5 + 0.01 * i, "events": [e], "rev": e["kv"]["mod_revision"]}
        for i, e in enumerate(truth)
    ]
    recs += list(records)
    recs.append({"kind": "end", "t": 100.0, "final_revision": final, "drained": list(drained)})
    return History.of(recs)


def create(key: str = "a", end: str = "d", start: int = 0, t: float = 1.0, **kw: Any) -> Rec:
    return {
        "kind": "wreq",
        "stream": "s",
        "client": "c",
        "t": t,
        "req": {"create": {"key": key, "range_end": end, "start_revision": start, **kw}},
    }


def resp(t: float = 1.0, wid: int = 0, rev: int = 6, events: list[Rec] | None = None, **kw: Any) -> Rec:
    r: Rec = {"watch_id": wid, "rev": rev, **kw}
    if events:
        r["events"] = events
    elif not kw:
        r["progress"] = True
    return {"kind": "wresp", "stream": "s", "client": "c", "t": t, "resp": r}


def created(wid: int = 0, rev: int = 1, t: float = 1.0) -> Rec:
    return resp(t=t, wid=wid, rev=rev, created=True)


def run(name: str, h: History) -> list[v.Violation]:
    return v.check(h, only=(name,)).violations


def op(
    kind: str, req: Rec, resp_: Rec | None, invoke: float, ret: float, rev: int = 0, via: str = "proxy", **kw: Any
) -> Rec:
    r: Rec = {"kind": "op", "client": "c1", "op": kind, "req": req, "invoke": invoke, "ret": ret, "via": via}
    if resp_ is None:
        r.update(ok=False, error=kw.get("error", {"code": "UNAVAILABLE", "message": "x"}))
    else:
        r.update(ok=True, resp=resp_, rev=rev)
    return r


def rng(key: str, end: str, kvs: list[Rec], rev: int, invoke: float, serializable: bool = False, **kw: Any) -> Rec:
    return op(
        "range",
        {"key": key, "range_end": end, "serializable": serializable},
        {"kvs": kvs, "count": len(kvs)},
        invoke,
        invoke + 0.01,
        rev,
        **kw,
    )


def bare(ev: Rec) -> Rec:
    """The event as a watcher that did not ask for prev_kv sees it."""
    return {k: x for k, x in ev.items() if k != "prev_kv"}


# --------------------------------------------------------------------------- model


def test_model_range_rules_and_replay() -> None:
    assert in_range("a", "a", "") and not in_range("ab", "a", "")
    assert in_range("zz", "b", "\0") and not in_range("a", "b", "\0")
    assert prefix_end("/k/") == "/k0"
    r = Replay.of([*TRUTH, B3])  # a duplicate from a resumed truth watch is dropped
    assert [kv_["key"] for kv_ in r.range_at("a", "z", 3)] == ["a", "b"]
    assert r.range_at("a", "z", 5) == [kv("a", 4, "v2", create=2, version=2)]
    assert r.change_revisions("b", "", 6) == [0, 3, 5]
    assert [e["kv"]["mod_revision"] for e in r.events_in("a", "c", 3)] == [3, 4, 5]


def test_recorder_round_trip(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "h.jsonl", {"seed": 7})
    rec.write({"kind": "truth", "t": 1.0, "events": [A2], "rev": 2})
    rec.close()
    with (tmp_path / "h.jsonl").open("a") as f:
        f.write('{"kind": "op", "torn')  # a run killed mid-line
    records = load(tmp_path / "h.jsonl")
    assert records[0]["seed"] == 7 and records[1]["events"] == [json.loads(json.dumps(A2))]
    assert len(records) == 2


# --------------------------------------------------------------------------- watch tables

WATCH_OK = [
    create(start=2),
    created(),
    resp(events=[A2]),
    resp(events=[B3]),
    resp(events=[bare(A4)]),
    resp(events=[bare(DB5)]),
    resp(events=[C6], t=2.0),
]

CASES: list[tuple[str, list[Rec], list[Rec]]] = [
    # name, accepted records, rejected records
    ("watch_ordered", WATCH_OK, [create(start=2), created(), resp(events=[A2, A4]), resp(events=[B3])]),
    ("watch_unique", WATCH_OK, [create(start=2), created(), resp(events=[A2]), resp(events=[A2])]),
    (
        "watch_atomic",
        [create(start=2), created(), resp(events=[A2, B3])],
        [create(start=2), created(), resp(events=[put("a", 7)]), resp(events=[put("b", 7)])],
    ),
    (
        "watch_range",
        [create("a", "b", start=2), created(), resp(events=[A2])],
        [create("a", "b", start=2), created(), resp(events=[B3])],
    ),
    (
        "watch_filters",
        [create(start=2, filters=["NOPUT"]), created(), resp(events=[DB5])],
        [create(start=2, filters=["NOPUT"]), created(), resp(events=[A2])],
    ),
    (
        "watch_prev_kv",
        [create(start=4, prev_kv=True), created(), resp(events=[A4, DB5])],
        [create(start=4), created(), resp(events=[A4])],  # prev_kv not asked for
    ),
    ("watch_reliable", WATCH_OK, [create(start=2), created(), resp(events=[A2]), resp(events=[A4])]),  # B3 lost
    (
        "watch_resumable",
        [
            create(start=3),
            created(),
            resp(events=[B3]),
            op("compact", {"revision": 5}, {}, 1, 1.1, 6),
            create(start=2, t=2),
            created(1, t=2),
            resp(wid=1, rev=6, canceled=True, cancel_reason="compacted", compact_revision=5, t=2),
        ],
        [
            create(start=2),
            created(),
            resp(wid=0, rev=6, canceled=True, cancel_reason="x", compact_revision=4),
        ],  # never compacted
    ),
    (
        "watch_bookmarkable",
        [create(start=2), created(), resp(events=[A2, B3]), resp(rev=3)],
        [create(start=2), created(), resp(events=[A2]), resp(wid=-1, rev=3), resp(events=[B3])],
    ),
    (
        "watch_progress_revision",
        [create(start=2), created(), resp(events=[A2, B3]), resp(wid=-1, rev=3)],
        [create(start=2), created(), resp(events=[A2, B3]), resp(wid=-1, rev=2)],  # a stale header
    ),
    (
        "watch_ids",
        [create(start=2, watch_id=7), created(7), resp(wid=7, events=[A2])],
        [create(start=2), created(), resp(wid=3, events=[A2])],
    ),
    (
        "watch_canceled",
        [
            create(start=2),
            created(),
            {"kind": "wreq", "stream": "s", "t": 2, "req": {"cancel": 0}},
            resp(wid=0, canceled=True),
        ],
        [create(start=2), created(), resp(wid=0, canceled=True)],
    ),
    (
        "watch_streams",
        [
            create(start=2),
            created(),
            {"kind": "fault", "name": "kill worker", "start": 1.5, "end": 1.6, "type": "conn"},
            {
                "kind": "wend",
                "stream": "s",
                "t": 2.0,
                "by": "server",
                "error": {"code": "UNAVAILABLE", "message": "Socket closed"},
            },
        ],
        [create(start=2), created(), {"kind": "wend", "stream": "s", "t": 2.0, "by": "server", "error": None}],
    ),
]


@pytest.mark.parametrize(("name", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_watch_validator_table(name: str, good: list[Rec], bad: list[Rec]) -> None:
    assert run(name, history(*good)) == []
    found = run(name, history(*bad))
    assert found and all(x.validator == name for x in found), found


def test_prev_kv_may_be_missing_once_the_revision_before_was_compacted() -> None:
    compact = op("compact", {"revision": 4}, {}, 0.5, 0.6, 6)
    events = [create(start=4, prev_kv=True), created(), resp(events=[bare(A4)], t=2.0)]
    assert run("watch_prev_kv", history(*events))
    assert run("watch_prev_kv", history(compact, *events)) == []


def test_reliable_requires_the_tail_on_drained_streams_only() -> None:
    partial = [create(start=2), created(), resp(events=[A2, B3])]
    assert run("watch_reliable", history(*partial, drained=())) == []
    found = run("watch_reliable", history(*partial))
    assert found and "never arrived" in found[0].message


def test_delete_at_the_compaction_revision_may_be_gone_for_a_later_watch() -> None:
    """etcd removes a tombstone at the compaction revision itself (checked with etcd 3.5: put, delete at R,
    compact R, watch from R sees only what follows); a soak flagged the proxy for doing the same."""
    compact = op("compact", {"revision": 5}, {}, 0.7, 0.8, 6)
    without = [create(start=5, t=1.0), created(), resp(events=[C6], t=1.1)]
    assert run("watch_reliable", history(compact, *without)) == []
    assert run("watch_reliable", history(compact, create(start=5), created(), resp(events=[DB5, C6]))) == []
    assert run("watch_reliable", history(*without))  # no compaction: the delete is owed
    late = op("compact", {"revision": 5}, {}, 2.0, 2.1, 6)
    assert run("watch_reliable", history(late, *without))  # compacted after it was created: owed too
    gap = op("compact", {"revision": 4}, {}, 0.7, 0.8, 6)
    assert run("watch_reliable", history(gap, create(start=4), created(), resp(events=[C6])))  # only at 5 itself


def test_compacted_cancel_of_a_watcher_already_past_the_compaction() -> None:
    """A hub restart that resumes a quiet watcher from its last event, not from the progress it
    had reported, gets it canceled as compacted though it needed nothing compacted."""
    compact = op("compact", {"revision": 5}, {}, 1, 1.1, 6)
    cancel = resp(wid=0, rev=0, canceled=True, compact_revision=5, t=3)
    quiet = create("z", "", start=2)  # nothing ever happens on z
    found = run("watch_resumable", history(compact, quiet, created(), resp(wid=-1, rev=6), cancel))
    assert found and "though it was at revision 6" in found[0].message
    assert run("watch_resumable", history(compact, create(start=7), created(), cancel))  # start above it


def test_compaction_in_doubt_may_cancel_a_watcher() -> None:
    """A Compact whose client got UNAVAILABLE may have been applied (CI: compact_revision 41 from one): a cancel
    citing it is etcd's; one citing a refused Compact or none at all is not."""
    cancel = resp(wid=0, rev=0, canceled=True, compact_revision=5, t=3)
    watch = [create("z", "", start=2), created(), cancel]
    in_doubt = op("compact", {"revision": 5}, None, 1, 1.1)
    assert run("watch_resumable", history(in_doubt, *watch)) == []
    refused = op("compact", {"revision": 5}, None, 1, 1.1, error={"code": "OUT_OF_RANGE", "message": "x"})
    assert run("watch_resumable", history(refused, *watch))
    assert run("watch_resumable", history(*watch))


def test_bookmark_before_an_unsynced_watcher_caught_up_is_told_apart() -> None:
    """etcd < 3.5.8 answers RequestProgress before a watcher from a past revision caught up."""
    found = run("watch_bookmarkable", history(create(start=2), created(rev=6), resp(wid=-1, rev=6), resp(events=[A2])))
    assert [x.validator for x in found] == ["watch_bookmarkable_unsynced"]


def test_duplicate_client_chosen_id_is_refused_like_etcd() -> None:
    """A client-chosen id still in use gets etcd's refusal (watch id -1); the same answer for a free id is wrong."""
    refusal = resp(wid=-1, created=True, canceled=True, cancel_reason=v.DUPLICATE_WATCH_ID, t=2.0)
    in_use = [create(watch_id=5), created(wid=5), create(watch_id=5, t=1.5), refusal]
    assert run("watch_ids", history(*in_use)) == []
    found = run("watch_ids", history(create(watch_id=5, t=1.5), refusal))
    assert found and "asked for watch id 5, got -1" in found[0].message


def test_unanswered_create_is_reported() -> None:
    found = run("watch_ids", history(create(start=1)))
    assert found and "never answered" in found[0].message


# --------------------------------------------------------------------------- KV tables


def test_linearizable_reads() -> None:
    w = op("put", {"key": "c", "value": "v"}, {}, 3.0, 3.1, 6)
    good = history(w, rng("a", "d", [kv("a", 4, "v2", create=2, version=2), kv("c", 6)], 6, 3.2))
    assert run("reads_linearizable", good) == []
    stale = history(w, rng("a", "d", [kv("a", 4, "v2", create=2, version=2)], 5, 3.2))  # misses the acked put
    assert run("reads_linearizable", stale)
    wrong = history(rng("a", "d", [kv("a", 2)], 5, 3.2))  # at 5, a is v2
    assert run("reads_linearizable", wrong)


def test_serializable_reads() -> None:
    w = op("put", {"key": "c", "value": "v"}, {}, 3.0, 3.1, 6)
    old = rng("c", "", [], 6, 3.5, serializable=True)  # misses c@6, acked 0.4 s earlier through the same proxy
    assert run("reads_serializable", history(w, rng("c", "", [kv("c", 6)], 6, 3.5, serializable=True))) == []
    assert run("reads_serializable", history(w, old))
    elsewhere = {**w, "via": "direct"}
    assert run("reads_serializable", history(elsewhere, old)) == []  # within the staleness bound
    late = rng("c", "", [], 6, 9.0, serializable=True)
    assert run("reads_serializable", history(elsewhere, late))
    never = rng("a", "", [kv("a", 3)], 6, 1.0, serializable=True)  # a never had revision 3
    assert run("reads_serializable", history(never))


def test_writes_acknowledged() -> None:
    good = op("put", {"key": "a", "value": "v2", "prev_kv": True}, {"prev_kv": kv("a", 2)}, 1, 1.1, 4)
    assert run("writes_acknowledged", history(good)) == []
    lost = op("put", {"key": "a", "value": "v3"}, {}, 1, 1.1, 4)
    assert run("writes_acknowledged", history(lost))
    txn = {"compare": [], "success": [{"put": {"key": "c", "value": "v"}}], "failure": []}
    assert run("writes_acknowledged", history(op("txn", txn, {"succeeded": True}, 1, 1.1, 6))) == []
    assert run("writes_acknowledged", history(op("txn", txn, {"succeeded": True}, 1, 1.1, 5)))
    gone = op("delete", {"key": "b", "range_end": ""}, {"deleted": 1}, 1, 1.1, 5)
    assert run("writes_acknowledged", history(gone)) == []
    assert run("writes_acknowledged", history({**gone, "rev": 4}))


def test_txn_compares() -> None:
    def txn(result: str, succeeded: bool, rev: int, operand: object = 2) -> Rec:
        cmp = [{"key": "a", "target": "version", "result": result, "operand": operand}]
        req = {"compare": cmp, "success": [{"put": {"key": "c", "value": "v"}}], "failure": []}
        return op("txn", req, {"succeeded": succeeded}, 1, 1.1, rev)

    assert run("txn_compares", history(txn("EQUAL", True, 6))) == []  # a is at version 2 at 5
    assert run("txn_compares", history(txn("EQUAL", False, 6)))
    assert run("txn_compares", history(txn("LESS", False, 6, 1))) == []  # no put in failure: evaluated at 6
    assert run("txn_compares", history(txn("GREATER", False, 6, 1)))


def test_errors_are_etcds() -> None:
    compacted = {"code": "OUT_OF_RANGE", "message": "etcdserver: mvcc: required revision has been compacted"}
    ok = [
        op("range", {"key": "a"}, None, 1, 2, error=compacted),
        op("range", {"key": "a"}, None, 1, 2, error={"code": "UNAVAILABLE", "message": "connection reset"}),
    ]
    assert run("errors_are_etcds", history(*ok)) == []
    bad = op("range", {"key": "a"}, None, 1, 2, error={"code": "UNKNOWN", "message": compacted["message"]})
    assert run("errors_are_etcds", history(bad))
    assert run("errors_are_etcds", history(op("put", {}, None, 1, 2, error={"code": "OUT_OF_RANGE", "message": "x"})))


# --------------------------------------------------------------------------- leases

LEASE = 0x10


def lease_history(
    expire_t: float | None,
    keepalives: list[tuple[float, int | None]],
    revoke_t: float | None = None,
    end_t: float = 30.0,
    answer_delay: float = 0.01,
) -> History:
    recs: list[Rec] = [
        op("lease_grant", {"ttl": 2}, {"id": LEASE, "ttl": 2}, 0.9, 1.0, 1),
        op("put", {"key": "l", "value": "v", "lease": LEASE}, {}, 1.0, 1.1, 2),
    ]
    for t, ttl in keepalives:
        recs.append({"kind": "ka", "client": "k", "lease": LEASE, "sent": t, "recv": None, "ttl": None})
        if ttl is not None:
            recs.append({"kind": "ka", "client": "k", "lease": LEASE, "sent": t, "recv": t + answer_delay, "ttl": ttl})
    if revoke_t is not None:
        recs.append(op("lease_revoke", {"id": LEASE}, {}, revoke_t, revoke_t + 0.01, 3))
    truth = [put("l", 2, lease=LEASE)]
    h = History.of([{"kind": "meta"}, *recs, {"kind": "end", "t": end_t, "final_revision": 3}])
    h.truth = [{"kind": "truth", "t": 1.1, "events": truth, "rev": 2}]
    if expire_t is not None:
        h.truth.append(
            {"kind": "truth", "t": expire_t, "events": [delete("l", 3, prev=kv("l", 2, lease=LEASE))], "rev": 3}
        )
    return h


def test_leases_kept_alive() -> None:
    assert run("leases_kept_alive", lease_history(2.0, []))  # expired 1.1 s after a grant of TTL 2
    assert run("leases_kept_alive", lease_history(6.5, [(2.0, 2), (3.0, 2), (4.0, 2)])) == []
    # expired 1 s after a keepalive answered with TTL 2
    assert run("leases_kept_alive", lease_history(5.0, [(2.0, 2), (3.0, 2), (4.0, 2)]))


def test_leases_expire() -> None:
    assert run("leases_expire", lease_history(6.5, [(2.0, 2), (4.0, 2)])) == []  # 2.5 s after the last: TTL + 0.5
    assert run("leases_expire", lease_history(8.5, [(2.0, 2), (4.0, 2)]))  # 4.5 s: about 2 x TTL (the Go proxy)
    assert run("leases_expire", lease_history(8.5, [(2.0, 2), (4.0, 2), (6.0, None)])) == []  # sent, unanswered
    late = lease_history(8.5, [(2.0, 2), (4.0, 2)], answer_delay=1.6)  # answered at 5.6: renewed late on the way
    assert run("leases_expire", late) == []
    assert run("leases_expire", lease_history(None, [(2.0, 2)]))  # never expired
    assert run("leases_expire", lease_history(None, [(2.0, 2)], revoke_t=3.0)) == []  # revoked instead
    h = lease_history(9.0, [(2.0, 2), (4.0, 2)])
    h.faults = [{"kind": "fault", "type": "member", "name": "kill leader", "start": 5.0, "end": 6.0}]
    assert run("leases_expire", h) == []  # etcd extends leases on a leader change


def test_check_counts() -> None:
    report = v.check(history(*WATCH_OK, rng("a", "d", [kv("a", 4, "v2", create=2, version=2), kv("c", 6)], 6, 3.2)))
    assert report.violations == [] and report.watch_events == 5 and report.watchers == 1 and report.operations == 1


def test_growth_of_proxy_processes() -> None:
    def samples(pid: int, rss: list[int], fds: list[int]) -> list[Rec]:
        return [{"pid": pid, "title": "w", "rss_kb": r, "fds": f} for r, f in zip(rss, fds, strict=True)]

    flat = samples(1, [50_000, 52_000, 49_000, 51_000, 50_500, 50_000, 51_000, 50_000], [30] * 8)
    leaking = samples(2, [50_000 + 10_000 * i for i in range(8)], [30 + 10 * i for i in range(8)])
    short = samples(3, [1, 100_000], [1, 500])  # too few samples to judge
    found = growth(flat + leaking + short)
    assert len(found) == 2 and all(f.startswith("pid 2 ") for f in found), found
