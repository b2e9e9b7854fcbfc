"""Validators: pure functions over a recorded ``History`` (and the ``Replay`` of its ground
truth), each returning the violations it found. No I/O, no clocks: a recorded file checked
twice gives the same answer (``python -m tests.robustness --check FILE``).

Times are the recorder's monotonic seconds. Keys and values are latin-1 strings.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.robustness.history import History, Record
from tests.robustness.model import Replay, in_range

MUTATIONS = ("put", "delete", "txn", "lease_revoke")
# Codes a transport or a client deadline produce: any message is fine.
TRANSPORT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
# Codes etcd never answers with on these calls (the Go proxy turns errors into UNKNOWN).
FOREIGN_CODES = frozenset({"UNKNOWN", "INTERNAL", "UNIMPLEMENTED", "DATA_LOSS"})
ETCD_MESSAGES = {
    "OUT_OF_RANGE": (
        "etcdserver: mvcc: required revision has been compacted",
        "etcdserver: mvcc: required revision is a future revision",
    ),
    "NOT_FOUND": ("etcdserver: requested lease not found",),
}


@dataclass(frozen=True)
class Violation:
    validator: str
    message: str
    detail: Any = None

    def __str__(self) -> str:
        return f"[{self.validator}] {self.message}"


@dataclass
class Config:
    """Bounds the checks allow (read from the history's meta record, these defaults otherwise)."""

    staleness_s: float = 2.0  # serializable reads may miss writes made elsewhere this long
    lease_slack_s: float = 1.0  # a lease expires within TTL + this after its last keepalive
    stream_fault_grace_s: float = 10.0  # a stream may break this long after a connection fault

    @classmethod
    def of(cls, meta: Record) -> Config:
        c = cls()
        for name in ("staleness_s", "lease_slack_s", "stream_fault_grace_s"):
            if name in meta:
                setattr(c, name, float(meta[name]))
        return c


# --------------------------------------------------------------------------- watchers


@dataclass
class Watcher:
    """One watcher on one client stream, as the client saw it."""

    stream: str
    watch_id: int
    req: Record  # the create request's fields
    created_t: float
    created_rev: int
    events: list[tuple[int, Record]] = field(default_factory=list)  # (response number, event)
    responses: int = 0
    # (delivered event count then, progress revision) for every progress that reached it
    progress: list[tuple[int, int]] = field(default_factory=list)
    canceled: Record | None = None
    cancel_requested: bool = False
    resp_t: dict[int, float] = field(default_factory=dict)  # response number -> receive time
    # revisions of compactions begun before it was created, at or above its start revision: etcd drops a
    # tombstone at the compaction revision itself (a key's last version at or below it is kept unless it is a
    # delete), so a watch read from there on does not see that delete (checked against etcd 3.5)
    compacted_at: frozenset[int] = frozenset()

    @property
    def start(self) -> int:
        return int(self.req.get("start_revision") or 0) or self.created_rev + 1

    @property
    def key(self) -> str:
        return str(self.req.get("key", ""))

    @property
    def range_end(self) -> str:
        return str(self.req.get("range_end", ""))

    @property
    def filters(self) -> set[str]:
        return set(self.req.get("filters", ()))

    def name(self) -> str:
        return f"{self.stream}/w{self.watch_id}[{self.key!r},{self.range_end!r}) start={self.start}"

    def reached(self) -> int:
        last = self.events[-1][1]["kv"]["mod_revision"] if self.events else 0
        prog = max((r for _, r in self.progress), default=0)
        return max(last, prog)


@dataclass
class Streams:
    """Watchers rebuilt from the watch records; ``problems`` are protocol violations found on the way."""

    watchers: list[Watcher] = field(default_factory=list)
    problems: list[Violation] = field(default_factory=list)
    ended: dict[str, Record] = field(default_factory=dict)  # stream -> its wend record
    drained: set[str] = field(default_factory=set)
    unanswered: list[tuple[str, Record]] = field(default_factory=list)  # creates never answered
    responses: int = 0


def compactions_applied(h: History) -> list[tuple[float, int]]:
    """(invoke time, revision) of every Compact that etcd may have applied: answered OK, or in doubt (a transport
    error: CI saw a compaction at 41 applied though its client got UNAVAILABLE, connection reset)."""
    return [
        (op["invoke"], int(op["req"]["revision"]))
        for op in h.ops
        if op["op"] == "compact" and (op["ok"] or op.get("error", {}).get("code") in TRANSPORT_CODES)
    ]


# etcd's refusal of a client-chosen id that is still in use on the stream (created and canceled, watch id -1)
DUPLICATE_WATCH_ID = "mvcc: duplicate watch ID provided on the WatchStream"


def rebuild(h: History) -> Streams:
    out = Streams(drained=set(h.end.get("drained", ())))
    pending: dict[str, deque[Record]] = {}
    active: dict[str, dict[int, Watcher]] = {}
    for r in h.watch:
        stream = r["stream"]
        live = active.setdefault(stream, {})
        queue = pending.setdefault(stream, deque())
        if r["kind"] == "wreq":
            req = r["req"]
            if "create" in req:
                queue.append(req["create"])
            elif "cancel" in req and req["cancel"] in live:
                live[req["cancel"]].cancel_requested = True
            continue
        if r["kind"] == "wend":
            out.ended[stream] = r
            continue
        resp = r["resp"]
        out.responses += 1
        wid = resp["watch_id"]
        if resp.get("created"):
            if not queue:
                out.problems.append(
                    Violation("watch_ids", f"{stream}: created response without a create request", resp)
                )
                continue
            req = queue.popleft()
            asked = int(req.get("watch_id") or 0)
            duplicate = resp.get("canceled") and resp.get("cancel_reason") == DUPLICATE_WATCH_ID and asked in live
            if asked and asked != wid and not duplicate:  # an id still in use is refused, as etcd does
                out.problems.append(Violation("watch_ids", f"{stream}: asked for watch id {asked}, got {wid}", resp))
            if wid in live and wid >= 0:
                out.problems.append(Violation("watch_ids", f"{stream}: watch id {wid} reused while active", resp))
            w = Watcher(stream, wid, req, r["t"], int(resp.get("rev", 0)))
            if wid >= 0:
                live[wid] = w
            out.watchers.append(w)
            if resp.get("canceled"):
                w.canceled = resp
                live.pop(wid, None)
            continue
        if resp.get("progress") and wid == -1:
            for w in live.values():
                w.progress.append((len(w.events), int(resp["rev"])))
            continue
        w0 = live.get(wid)
        if w0 is None:
            if resp.get("events"):
                out.problems.append(Violation("watch_ids", f"{stream}: events for unknown watch id {wid}", resp))
            continue
        w0.responses += 1
        w0.resp_t[w0.responses] = r["t"]
        if resp.get("progress"):
            w0.progress.append((len(w0.events), int(resp["rev"])))
        for ev in resp.get("events", ()):
            w0.events.append((w0.responses, ev))
        if resp.get("canceled"):
            w0.canceled = resp
            del live[wid]
    for stream, queue in pending.items():
        if stream in out.drained:
            out.unanswered.extend((stream, req) for req in queue)
    compactions = compactions_applied(h)
    for w in out.watchers:
        asked = int(w.req.get("start_revision") or 0)
        if asked > 0:
            w.compacted_at = frozenset(c for t, c in compactions if t <= w.created_t and c >= asked)
    return out


def expected_events(w: Watcher, replay: Replay, upto: int | None = None) -> list[Record]:
    evs = replay.events_in(w.key, w.range_end, w.start, upto)
    f = w.filters
    out = [
        e for e in evs if not ("NOPUT" in f and e["type"] == "PUT") and not ("NODELETE" in f and e["type"] == "DELETE")
    ]
    if w.compacted_at:  # a delete at a compaction revision it did not get: etcd had removed it (Watcher)
        got = {(e["kv"]["mod_revision"], e["kv"]["key"]) for _, e in w.events}
        out = [
            e
            for e in out
            if not (
                e["type"] == "DELETE"
                and e["kv"]["mod_revision"] in w.compacted_at
                and (e["kv"]["mod_revision"], e["kv"]["key"]) not in got
            )
        ]
    return out


def _ev_id(ev: Record) -> tuple[Any, ...]:
    kv = ev["kv"]
    return (kv["mod_revision"], kv["key"], ev["type"], kv["value"], kv["create_revision"], kv["version"], kv["lease"])


def watch_ids(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    out = list(s.problems)
    for stream, req in s.unanswered:
        out.append(Violation("watch_ids", f"{stream}: create request never answered (created/canceled)", req))
    return out


def watch_ordered(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    out = []
    for w in s.watchers:
        last_rev, last_resp = 0, 0
        for n, ev in w.events:
            rev = ev["kv"]["mod_revision"]
            if rev < last_rev or (rev == last_rev and n != last_resp and not w.req.get("fragment")):
                out.append(Violation("watch_ordered", f"{w.name()}: revision {rev} after {last_rev}", ev))
                break
            last_rev, last_resp = rev, n
    return out


def watch_unique(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    out = []
    for w in s.watchers:
        seen: set[tuple[int, str]] = set()
        for _, ev in w.events:
            k = (ev["kv"]["mod_revision"], ev["kv"]["key"])
            if k in seen:
                out.append(Violation("watch_unique", f"{w.name()}: event {k} delivered twice", ev))
                break
            seen.add(k)
    return out


def watch_atomic(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """The events of one revision arrive in one response (unless fragment was asked)."""
    out = []
    for w in s.watchers:
        if w.req.get("fragment"):
            continue
        where: dict[int, int] = {}
        for n, ev in w.events:
            rev = ev["kv"]["mod_revision"]
            if where.setdefault(rev, n) != n:
                out.append(Violation("watch_atomic", f"{w.name()}: revision {rev} split over responses", ev))
                break
    return out


def watch_range(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    out = []
    for w in s.watchers:
        for _, ev in w.events:
            if not in_range(ev["kv"]["key"], w.key, w.range_end):
                out.append(Violation("watch_range", f"{w.name()}: event on {ev['kv']['key']!r} outside the range", ev))
                break
    return out


def watch_filters(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    out = []
    for w in s.watchers:
        for _, ev in w.events:
            if ("NOPUT" in w.filters and ev["type"] == "PUT") or ("NODELETE" in w.filters and ev["type"] == "DELETE"):
                out.append(Violation("watch_filters", f"{w.name()}: {ev['type']} passed filters {w.filters}", ev))
                break
    return out


def watch_prev_kv(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """prev_kv only when asked for, and then the replay's (absent if revision - 1 was compacted)."""
    out = []
    compactions = [(op["invoke"], int(op["req"]["revision"])) for op in h.ops if op["op"] == "compact"]
    for w in s.watchers:
        for n, ev in w.events:
            got = ev.get("prev_kv")
            if not w.req.get("prev_kv"):
                if got is not None:
                    out.append(Violation("watch_prev_kv", f"{w.name()}: prev_kv not asked for but sent", ev))
                    break
                continue
            truth = [
                e for e in replay.by_revision.get(ev["kv"]["mod_revision"], ()) if e["kv"]["key"] == ev["kv"]["key"]
            ]
            rev, t = ev["kv"]["mod_revision"], w.resp_t.get(n, 0.0)
            if got is None and any(c >= rev and ti <= t for ti, c in compactions):
                continue  # etcd reads prev_kv at revision - 1, which was compacted by then: none
            if truth and truth[0].get("prev_kv") != got:
                out.append(Violation("watch_prev_kv", f"{w.name()}: prev_kv {got} != {truth[0].get('prev_kv')}", ev))
                break
    return out


def watch_reliable(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """What a watcher saw is exactly the start of what it should see (same events, no gap, no
    extra); a watcher still open on a drained stream at the end saw everything up to the end."""
    out = []
    final = int(h.end.get("final_revision", 0))
    for w in s.watchers:
        if w.canceled is not None and w.canceled.get("created"):
            continue  # refused at creation
        got = [_ev_id(e) for _, e in w.events]
        want_all = expected_events(w, replay)
        want = [_ev_id(e) for e in want_all[: len(got)]]
        if got != want:
            i = next(i for i, (a, b) in enumerate(zip(got, want + [None] * len(got), strict=False)) if a != b)
            out.append(
                Violation(
                    "watch_reliable",
                    f"{w.name()}: event #{i} is {got[i][:3]}, expected {want[i][:3] if i < len(want) else 'none'}",
                    {"got": got[max(0, i - 2) : i + 3], "want": want[max(0, i - 2) : i + 3]},
                )
            )
            continue
        open_at_end = w.canceled is None and not w.cancel_requested and w.stream in s.drained
        if open_at_end and final:
            missing = [e for e in expected_events(w, replay, final)[len(got) :]]
            if missing:
                revs = [e["kv"]["mod_revision"] for e in missing]
                out.append(
                    Violation(
                        "watch_reliable",
                        f"{w.name()}: {len(missing)} events up to the final revision {final} never arrived "
                        f"(first {revs[:5]}; it saw {len(got)})",
                        revs[:20],
                    )
                )
    return out


def watch_resumable(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """A watch from start revision R starts exactly at R (first event >= R, none skipped: see
    reliable) or is canceled as compacted with a compact_revision c that was really compacted
    and that it still needed: etcd cancels a watcher only if its next revision is below c, so
    one known to be at or past c (start - 1, its last event, a progress) is never canceled."""
    out = []
    compacted = [revision for _, revision in compactions_applied(h)]
    top = max(compacted, default=0)
    for w in s.watchers:
        if w.events and w.events[0][1]["kv"]["mod_revision"] < w.start:
            first = w.events[0][1]
            out.append(Violation("watch_resumable", f"{w.name()}: first event before the start revision", first))
        cr = int(w.canceled.get("compact_revision", 0)) if w.canceled else 0
        if not cr:
            continue
        # a progress counts only once the watcher was in sync (past the revision it was created
        # at) and if it was a true bookmark: etcd < 3.5.8 sends progress to catching-up watchers
        revs = [e["kv"]["mod_revision"] for _, e in w.events]
        valid = [
            rev
            for n, rev, _, missing in _bookmarks(w, replay)
            if missing is None and (w.start > w.created_rev or (n and revs[n - 1] > w.created_rev))
        ]
        at = max(w.start - 1, revs[-1] if revs else 0, *valid)
        if at >= cr or cr > top:
            out.append(
                Violation(
                    "watch_resumable",
                    f"{w.name()}: canceled as compacted at {cr} though it was at revision {at} "
                    f"(compactions up to {top})",
                    {"cancel": w.canceled, "progress": w.progress[-3:], "events": len(w.events)},
                )
            )
    return out


def _bookmarks(w: Watcher, replay: Replay) -> list[tuple[int, int, int, int | None]]:
    """(delivered, progress revision, due, first missing revision or None) per progress."""
    revs = [e["kv"]["mod_revision"] for e in expected_events(w, replay)]
    out = []
    for delivered, rev in w.progress:
        due = bisect.bisect_right(revs, rev)
        out.append((delivered, rev, due, revs[delivered] if delivered < due else None))
    return out


def watch_bookmarkable(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """A progress at R reaches a watcher only after every event <= R it should get.

    A watcher from a past start revision that has not yet shown it caught up (no event after
    the revision it was created at delivered yet) is reported as ``watch_bookmarkable_unsynced``:
    etcd before 3.5.8 answers RequestProgress while such a watcher waits for its sync loop
    (etcd issue 15220, found by etcd's own robustness tests); a watcher that was in sync is
    ``watch_bookmarkable``."""
    out = []
    for w in s.watchers:
        revs = [e["kv"]["mod_revision"] for _, e in w.events]
        for delivered, rev, due, missing in _bookmarks(w, replay):
            if missing is None:
                continue
            catching_up = w.start <= w.created_rev and not any(r > w.created_rev for r in revs[:delivered])
            name = "watch_bookmarkable_unsynced" if catching_up else "watch_bookmarkable"
            out.append(
                Violation(
                    name,
                    f"{w.name()}: progress at {rev} after {delivered} events, but {due} are at or below it "
                    f"(next missing revision {missing}; created at {w.created_rev})",
                    {"progress": rev, "delivered": delivered, "due": due},
                )
            )
            break
    return out


def watch_progress_revision(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """A progress never goes back: its revision is at least that of every event the watcher
    already got (etcd answers with its current revision)."""
    out = []
    for w in s.watchers:
        revs = [e["kv"]["mod_revision"] for _, e in w.events]
        for delivered, rev in w.progress:
            if delivered and revs[delivered - 1] > rev:
                out.append(
                    Violation(
                        "watch_progress_revision",
                        f"{w.name()}: progress at {rev} after an event at {revs[delivered - 1]}",
                        {"progress": rev, "delivered": delivered},
                    )
                )
                break
    return out


def watch_canceled(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """A cancel the client did not ask for says why (reason or compact revision)."""
    out = []
    for w in s.watchers:
        cn = w.canceled
        if cn and not w.cancel_requested and not cn.get("cancel_reason") and not cn.get("compact_revision"):
            out.append(Violation("watch_canceled", f"{w.name()}: canceled without a reason", w.canceled))
    return out


def _fault_near(h: History, t: float, grace: float, kinds: tuple[str, ...]) -> bool:
    return any(f["start"] - 0.5 <= t <= f["end"] + grace for f in h.faults if f.get("type") in kinds)


def watch_streams(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """etcd never ends a Watch stream by itself (not even half-closed ones); only a broken
    connection to the proxy (a killed or stopped worker, churn) may, with UNAVAILABLE."""
    out = []
    for stream, end in s.ended.items():
        if end.get("by") != "server":
            continue
        err = end.get("error")
        if err is None:
            out.append(Violation("watch_streams", f"{stream}: stream ended by the server with OK", end))
        elif err["code"] != "UNAVAILABLE" or not _fault_near(h, end["t"], c.stream_fault_grace_s, ("conn",)):
            out.append(Violation("watch_streams", f"{stream}: stream ended: {err['code']} {err['message']!r}", end))
    return out


# --------------------------------------------------------------------------- KV


def _acked(h: History, kinds: tuple[str, ...]) -> tuple[list[float], list[int]]:
    """Return times and a running max of header revisions of successful ``kinds`` ops, by return time."""
    done = sorted((op["ret"], int(op["rev"])) for op in h.ops if op["ok"] and op["op"] in kinds and op.get("rev"))
    times, maxrev, top = [], [], 0
    for t, rev in done:
        top = max(top, rev)
        times.append(t)
        maxrev.append(top)
    return times, maxrev


def _max_before(index: tuple[list[float], list[int]], t: float) -> int:
    i = bisect.bisect_left(index[0], t)
    return index[1][i - 1] if i else 0


def _kvs_equal(got: list[Record], want: list[Record], keys_only: bool) -> bool:
    if keys_only:
        got = [{**kv, "value": ""} for kv in got]
        want = [{**kv, "value": ""} for kv in want]
    return got == want


def _ranges(h: History, serializable: bool) -> list[Record]:
    return [
        op
        for op in h.ops
        if op["op"] == "range"
        and op["ok"]
        and bool(op["req"].get("serializable")) == serializable
        and not op["req"].get("revision")
    ]


def reads_linearizable(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """A linearizable read is served at a revision >= every write (and linearizable read)
    acknowledged before it started, and returns the replay at that revision."""
    out = []
    lin = _linear_index(h)
    for op in _ranges(h, serializable=False):
        need = _max_before(lin, op["invoke"])
        if op["rev"] < need:
            out.append(
                Violation("reads_linearizable", f"{op['client']}: read at {op['rev']} after {need} was acked", op)
            )
            continue
        out.extend(_range_matches(op, replay, int(op["rev"]), "reads_linearizable"))
    return out


def _linear_index(h: History) -> tuple[list[float], list[int]]:
    done = sorted(
        (op["ret"], int(op["rev"]))
        for op in h.ops
        if op["ok"]
        and op.get("rev")
        and (op["op"] in MUTATIONS or (op["op"] == "range" and not op["req"].get("serializable")))
    )
    times, maxrev, top = [], [], 0
    for t, rev in done:
        top = max(top, rev)
        times.append(t)
        maxrev.append(top)
    return times, maxrev


def _range_matches(op: Record, replay: Replay, rev: int, name: str) -> list[Violation]:
    req, resp = op["req"], op["resp"]
    if rev > replay.last_revision:
        return [Violation(name, f"{op['client']}: read at {rev} beyond the ground truth ({replay.last_revision})", op)]
    want = replay.range_at(req["key"], req.get("range_end", ""), rev)
    limit = int(req.get("limit") or 0)
    shown = want[:limit] if limit else want
    if not _kvs_equal(resp.get("kvs", []), shown, bool(req.get("keys_only"))) or resp.get("count") != len(want):
        return [
            Violation(
                name,
                f"{op['client']}: range [{req['key']!r},{req.get('range_end', '')!r}) at {rev} returned "
                f"{len(resp.get('kvs', []))}/{resp.get('count')} kvs, the replay has {len(shown)}/{len(want)}",
                {"got": resp.get("kvs", [])[:5], "want": shown[:5]},
            )
        ]
    return []


def reads_serializable(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """A serializable read returns the replay at some revision that includes every write acked
    through the same endpoint before it started (read-your-writes) and every write acked
    anywhere more than ``staleness_s`` before it started."""
    out = []
    via_index: dict[str, tuple[list[float], list[int]]] = {}
    everywhere = _acked(h, MUTATIONS)
    for op in _ranges(h, serializable=True):
        via = op.get("via", "")
        if via not in via_index:
            via_index[via] = _acked(History(ops=[o for o in h.ops if o.get("via", "") == via]), MUTATIONS)
        need = max(_max_before(via_index[via], op["invoke"]), _max_before(everywhere, op["invoke"] - c.staleness_s))
        req, resp = op["req"], op["resp"]
        changes = replay.change_revisions(req["key"], req.get("range_end", ""), replay.last_revision)
        first = changes[max(0, bisect.bisect_right(changes, need) - 1)]
        limit = int(req.get("limit") or 0)
        matched = False
        for rev in reversed(changes):
            if rev < first:
                break
            want = replay.range_at(req["key"], req.get("range_end", ""), rev)
            shown = want[:limit] if limit else want
            if _kvs_equal(resp.get("kvs", []), shown, bool(req.get("keys_only"))) and resp.get("count") == len(want):
                matched = True
                break
        if not matched:
            out.append(
                Violation(
                    "reads_serializable",
                    f"{op['client']}: serializable range [{req['key']!r},{req.get('range_end', '')!r}) "
                    f"(header {op['rev']}) matches no revision >= {need}",
                    {
                        "got": resp.get("kvs", [])[:5],
                        "want_at_need": replay.range_at(req["key"], req.get("range_end", ""), need)[:5],
                    },
                )
            )
    return out


def writes_acknowledged(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """Every acknowledged write is in the replay at its revision, with its own revision."""
    out = []
    owner: dict[int, Record] = {}
    for op in h.ops:
        if not op["ok"] or op["op"] not in ("put", "txn", "delete"):
            continue
        rev = int(op["rev"])
        puts: list[Record] = []
        deletes: list[Record] = []
        if op["op"] == "put":
            puts = [op["req"]]
        elif op["op"] == "delete":
            deletes = [op["req"]]
        else:
            branch = op["req"]["success" if op["resp"].get("succeeded") else "failure"]
            puts = [x["put"] for x in branch if "put" in x]
            deletes = [x["delete"] for x in branch if "delete" in x]
        changed = bool(puts) or int(op["resp"].get("deleted", 1 if deletes else 0)) > 0
        if changed and puts:
            if rev in owner:
                out.append(Violation("writes_acknowledged", f"revision {rev} acked to two writes", [owner[rev], op]))
            owner[rev] = op
        if rev > replay.last_revision:
            out.append(Violation("writes_acknowledged", f"{op['client']}: write at {rev} beyond the ground truth", op))
            continue
        for p in puts:
            kv = replay.get(p["key"], rev)
            if kv is None or kv["value"] != p["value"] or kv["mod_revision"] != rev:
                out.append(
                    Violation(
                        "writes_acknowledged", f"{op['client']}: put {p['key']!r} acked at {rev}, replay has {kv}", op
                    )
                )
        for d in deletes:
            left = replay.range_at(d["key"], d.get("range_end", ""), rev)
            if left:
                out.append(
                    Violation(
                        "writes_acknowledged",
                        f"{op['client']}: delete {d['key']!r} acked at {rev}, {len(left)} keys left",
                        op,
                    )
                )
        if op["op"] == "put" and op["req"].get("prev_kv"):
            want = replay.get(op["req"]["key"], rev - 1)
            if op["resp"].get("prev_kv") != want:
                out.append(
                    Violation(
                        "writes_acknowledged", f"{op['client']}: put prev_kv {op['resp'].get('prev_kv')} != {want}", op
                    )
                )
    return out


def _compare(cmp: Record, kv: Record | None) -> bool:
    """etcd's Compare on one key: a missing key fails a VALUE compare, else counts as zeros."""
    target, result, operand = cmp["target"], cmp["result"], cmp["operand"]
    if kv is None:
        if target == "value":
            return False
        have: Any = 0
    else:
        have = {"version": kv["version"], "mod": kv["mod_revision"], "value": kv["value"]}[target]
    return bool(
        {
            "EQUAL": have == operand,
            "NOT_EQUAL": have != operand,
            "GREATER": have > operand,
            "LESS": have < operand,
        }[result]
    )


def txn_compares(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """An acknowledged Txn took the branch its compares give on the replay just before it (at
    its revision when it changed nothing)."""
    out = []
    for op in h.ops:
        if op["op"] != "txn" or not op["ok"] or int(op["rev"]) > replay.last_revision:
            continue
        rev = int(op["rev"])
        branch = op["req"]["success" if op["resp"].get("succeeded") else "failure"]
        changed = any("put" in x for x in branch) or int(op["resp"].get("deleted", 0)) > 0
        base = rev - 1 if changed else rev
        want = all(_compare(cmp, replay.get(cmp["key"], base)) for cmp in op["req"]["compare"])
        if want != bool(op["resp"].get("succeeded")):
            out.append(
                Violation(
                    "txn_compares",
                    f"{op['client']}: txn at {rev} succeeded={op['resp'].get('succeeded')}, the replay at {base} "
                    f"says {want}",
                    op,
                )
            )
    return out


def errors_are_etcds(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """Every error a client saw is one etcd gives: its code, and its message for that code."""
    out = []
    errors = [(op["client"], op["op"], op["error"]) for op in h.ops if not op["ok"]]
    errors += [(r["stream"], "watch", r["error"]) for r in h.watch if r["kind"] == "wend" and r.get("error")]
    for client, what, err in errors:
        code, msg = err["code"], err["message"]
        if code in TRANSPORT_CODES:
            continue
        bad = code in FOREIGN_CODES
        if not bad and code in ETCD_MESSAGES:
            bad = msg not in ETCD_MESSAGES[code]
        elif not bad:
            bad = not msg.startswith("etcdserver: ")
        if bad:
            out.append(Violation("errors_are_etcds", f"{client} {what}: {code} {msg!r} is not etcd's", err))
    return out


# --------------------------------------------------------------------------- leases


@dataclass
class LeaseLife:
    id: int
    ttl: int
    granted: float  # return time of the grant
    grant_invoked: float
    key: str = ""
    kept: list[Record] = field(default_factory=list)  # ka records (a send: recv None; an answer), in order
    revoked_at: float | None = None  # first revoke invoke time
    expired_at: float | None = None  # ground-truth time of its key's DELETE (not revoked)
    deleted_at: float | None = None  # ground-truth time of its key's DELETE, whatever the cause


def leases(h: History) -> dict[int, LeaseLife]:
    out: dict[int, LeaseLife] = {}
    for op in h.ops:
        if op["op"] == "lease_grant" and op["ok"]:
            lid = int(op["resp"]["id"])
            out[lid] = LeaseLife(lid, int(op["resp"]["ttl"]), op["ret"], op["invoke"])
    for op in h.ops:
        if op["op"] == "put" and op["ok"] and op["req"].get("lease") in out:
            out[op["req"]["lease"]].key = op["req"]["key"]
        if op["op"] == "lease_revoke" and int(op["req"]["id"]) in out:
            life = out[int(op["req"]["id"])]
            life.revoked_at = op["invoke"] if life.revoked_at is None else min(life.revoked_at, op["invoke"])
    for ka in h.keepalives:
        if ka["lease"] in out:
            out[ka["lease"]].kept.append(ka)
    by_key = {life.key: life for life in out.values() if life.key}
    for ev in h.truth_events():
        found = by_key.get(ev["kv"]["key"])
        if found is None or ev["type"] != "DELETE" or found.deleted_at is not None:
            continue
        if ev.get("prev_kv", {}).get("lease") not in (None, found.id):
            continue
        found.deleted_at = ev["t"]
        if found.revoked_at is None or found.revoked_at > ev["t"]:
            found.expired_at = ev["t"]
    return out


def leases_kept_alive(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """No lease expires before TTL after a keepalive answered with a positive TTL was sent."""
    out = []
    for life in leases(h).values():
        if life.expired_at is None:
            continue
        if life.expired_at < life.grant_invoked + life.ttl - 0.5:
            out.append(Violation("leases_kept_alive", f"lease {life.id:x}: expired before its TTL {life.ttl}", life.id))
            continue
        for ka in life.kept:
            if ka.get("ttl") and life.expired_at < ka["sent"] + ka["ttl"] - 0.5:
                out.append(
                    Violation(
                        "leases_kept_alive",
                        f"lease {life.id:x}: expired {life.expired_at - ka['sent']:.2f}s after a keepalive "
                        f"answered with TTL {ka['ttl']}",
                        ka,
                    )
                )
                break
    return out


def _last_keepalive(life: LeaseLife, h: History) -> float:
    """When the lease was last renewed as far as its client can tell: a keepalive counts from
    its answer (one delayed on the way renews late, as with etcd on a slow network); one never
    answered, from its sending, or from the end of a proxy or link fault it was sent in."""
    answered = {ka["sent"] for ka in life.kept if ka.get("recv") is not None}
    last = life.granted
    for ka in life.kept:
        t = ka["recv"] if ka.get("recv") is not None else ka["sent"]
        if ka.get("recv") is None and ka["sent"] not in answered:
            for f in h.faults:
                if f.get("type") != "member" and f["start"] <= t <= f["end"]:
                    t = f["end"]
        last = max(last, t)
    return last


def leases_expire(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """A lease no longer kept alive expires within TTL + lease_slack_s of its last keepalive
    (see _last_keepalive; leases whose window overlaps an etcd member fault are skipped: etcd extends leases when a
    leader is elected)."""
    out = []
    run_end = float(h.end.get("t", 0.0))
    for life in leases(h).values():
        if not life.key or (life.revoked_at is not None and (life.expired_at is None)):
            continue
        last = _last_keepalive(life, h)
        deadline = last + life.ttl + c.lease_slack_s
        if _fault_near(h, last, life.ttl + c.lease_slack_s, ("member",)) or any(
            f["start"] <= deadline and f["end"] >= last for f in h.faults if f.get("type") == "member"
        ):
            continue
        if life.expired_at is not None and life.expired_at > deadline:
            out.append(
                Violation(
                    "leases_expire",
                    f"lease {life.id:x} (TTL {life.ttl}): expired {life.expired_at - last:.2f}s "
                    "after its last keepalive",
                    {"last_keepalive": last, "expired": life.expired_at},
                )
            )
        elif (
            life.expired_at is None
            and life.deleted_at is None
            and run_end > deadline + 1.0
            and (life.revoked_at is None or life.revoked_at > deadline)
        ):
            out.append(
                Violation(
                    "leases_expire",
                    f"lease {life.id:x} (TTL {life.ttl}): still alive {run_end - last:.2f}s after its last keepalive",
                    {"last_keepalive": last},
                )
            )
    return out


# --------------------------------------------------------------------------- the whole history


def truth_contiguous(s: Streams, replay: Replay, h: History, c: Config) -> list[Violation]:
    """Self-check of the ground truth: every revision from 2 to the last has events."""
    if not replay.revisions:
        return []
    first = replay.revisions[0]
    if first != 2 and not h.meta.get("truth_from"):
        return [Violation("truth", f"ground truth starts at revision {first}, not 2")]
    gaps = [r for a, r in zip(replay.revisions, replay.revisions[1:], strict=False) if r != a + 1]
    return [Violation("truth", f"ground truth has gaps before revisions {gaps[:5]}")] if gaps else []


Validator = Callable[[Streams, Replay, History, Config], list[Violation]]
VALIDATORS: dict[str, Validator] = {
    "truth": truth_contiguous,
    "watch_ids": watch_ids,
    "watch_ordered": watch_ordered,
    "watch_unique": watch_unique,
    "watch_atomic": watch_atomic,
    "watch_range": watch_range,
    "watch_filters": watch_filters,
    "watch_prev_kv": watch_prev_kv,
    "watch_reliable": watch_reliable,
    "watch_resumable": watch_resumable,
    "watch_bookmarkable": watch_bookmarkable,  # also reports watch_bookmarkable_unsynced
    "watch_progress_revision": watch_progress_revision,
    "watch_canceled": watch_canceled,
    "watch_streams": watch_streams,
    "reads_linearizable": reads_linearizable,
    "reads_serializable": reads_serializable,
    "writes_acknowledged": writes_acknowledged,
    "txn_compares": txn_compares,
    "errors_are_etcds": errors_are_etcds,
    "leases_kept_alive": leases_kept_alive,
    "leases_expire": leases_expire,
}


@dataclass
class Report:
    violations: list[Violation]
    operations: int
    watch_events: int
    watchers: int
    leases: int

    def by_validator(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.violations:
            out[v.validator] = out.get(v.validator, 0) + 1
        return out

    def summary(self) -> str:
        return (
            f"{self.operations} operations, {self.watchers} watchers, {self.watch_events} watch events checked, "
            f"{self.leases} leases, {len(self.violations)} violations {self.by_validator() or ''}"
        )


def check(h: History, only: tuple[str, ...] = ()) -> Report:
    replay = Replay.of(h.truth_events())
    streams = rebuild(h)
    config = Config.of(h.meta)
    found: list[Violation] = []
    for name, fn in VALIDATORS.items():
        if not only or name in only:
            found.extend(fn(streams, replay, h, config))
    return Report(
        violations=found,
        operations=len(h.ops) + sum(1 for ka in h.keepalives if ka.get("recv") is None),
        watch_events=sum(len(w.events) for w in streams.watchers),
        watchers=len(streams.watchers),
        leases=len(leases(h)),
    )
