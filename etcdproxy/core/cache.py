"""RangeCache: serialized Range responses keyed by (identity, serialized request), pure logic.

Rules (the Go proxy's cache/store.go, with its defects fixed: staleness for writes made elsewhere, no
identity in the key, failed-but-applied writes not invalidated):
* Key = (identity, request bytes with ``serializable=true``). identity is the auth token ("" without
  auth), so a user never gets an answer cached for another identity (#1).
* Wire intervals: ``range_end == ""`` is the point ``key``; ``range_end == "\\x00"`` means +infinity,
  so ``key = range_end = "\\x00"`` is the whole keyspace (#2). An interval is ``(start, end)`` with
  ``end is None`` for +infinity.
* Entries with ``revision == 0`` (latest) are indexed by interval and dropped by every overlapping
  invalidation; entries with a fixed revision are immutable snapshots, never invalidated, only
  evicted, flushed, or refused once compacted. Latest reads stay cacheable after a Compact (C);
  ``0 < revision < compacted`` answers OUT_OF_RANGE like etcd.
* Bounded by entries and bytes (LRU, T); the index holds exactly the live entries (D).
* Fill race (#4, "invalidate after the write as well as before"): a miss takes a ``Ticket`` before
  its request leaves; ``fill`` refuses the answer if an overlapping invalidation (or a flush) came
  after the ticket, or if the answer's revision is older than the newest invalidated revision known
  at ticket time (an answer from a lagging member that misses a write already invalidated).

Not thread-safe; each worker owns one instance and mutates it from its event loop only.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from etcdproxy.core import errors, wire
from etcdproxy.etcdpb import rpc_pb2, v3election_pb2, v3lock_pb2

Interval = tuple[bytes, bytes | None]  # [start, end), end None = +infinity
CacheKey = tuple[str, bytes]  # (identity, serialized RangeRequest with serializable=true)

ENTRY_OVERHEAD_BYTES = 200  # rough per-entry bookkeeping cost counted against max_bytes
INVALIDATION_LOG = 4096  # invalidations remembered for fill checks; older tickets are refused


def to_interval(key: bytes, range_end: bytes) -> Interval:
    """etcd's [key, range_end) on the wire -> an Interval ("\\x00" = +infinity)."""
    if range_end == b"\x00":
        return (b"" if key == b"\x00" else key), None
    if not range_end:
        return key, key + b"\x00"
    return key, range_end


def is_point(interval: Interval) -> bool:
    start, end = interval
    return end == start + b"\x00"


def overlaps(a: Interval, b: Interval) -> bool:
    (a0, a1), (b0, b1) = a, b
    return (a1 is None or b0 < a1) and (b1 is None or a0 < b1) and (a1 is None or a0 < a1) and (b1 is None or b0 < b1)


def prefix_end(prefix: bytes) -> bytes:
    """clientv3's GetPrefixRangeEnd: the first key after every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\x00"
    return stripped[:-1] + bytes([stripped[-1] + 1])


# ---- what a write touches ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What a completed write makes stale: intervals, everything (flush), and/or a compaction."""

    intervals: tuple[tuple[bytes, bytes], ...] = ()  # wire (key, range_end) pairs
    flush: bool = False
    compact_revision: int = 0

    @property
    def empty(self) -> bool:
        return not self.intervals and not self.flush and not self.compact_revision


AUTH_READ_ONLY = frozenset({"Authenticate", "AuthStatus", "UserGet", "UserList", "RoleGet", "RoleList"})
# Codes with which etcd certainly did not apply a write; anything else (OK, UNAVAILABLE, UNKNOWN,
# DEADLINE_EXCEEDED, ...) may have been applied and invalidates (failed-but-applied).
NOT_APPLIED_CODES = frozenset({3, 5, 7, 9, 11, 16})  # INVALID_ARGUMENT NOT_FOUND PERMISSION_DENIED ...


def txn_intervals(txn: rpc_pb2.TxnRequest, out: list[tuple[bytes, bytes]]) -> None:
    """Every compare and every write op of both branches, at every nesting level (conservative)."""
    for compare in txn.compare:
        out.append((compare.key, compare.range_end))
    for op in (*txn.success, *txn.failure):
        which = op.WhichOneof("request")
        if which == "request_put":
            out.append((op.request_put.key, b""))
        elif which == "request_delete_range":
            out.append((op.request_delete_range.key, op.request_delete_range.range_end))
        elif which == "request_txn":
            txn_intervals(op.request_txn, out)


def invalidation_for(service: str, name: str, request: bytes, code: int) -> Invalidation | None:
    """What a call to ``service.name`` with ``request`` that ended with ``code`` invalidates (None: nothing)."""
    if code in NOT_APPLIED_CODES:
        return None
    try:
        if service == "etcdserverpb.KV":
            if name == "Put":
                return Invalidation(((rpc_pb2.PutRequest.FromString(request).key, b""),))
            if name == "DeleteRange":
                req = rpc_pb2.DeleteRangeRequest.FromString(request)
                return Invalidation(((req.key, req.range_end),))
            if name == "Txn":
                out: list[tuple[bytes, bytes]] = []
                txn_intervals(rpc_pb2.TxnRequest.FromString(request), out)
                return Invalidation(tuple(out))
            if name == "Compact":
                return Invalidation(compact_revision=rpc_pb2.CompactionRequest.FromString(request).revision)
            return None
        if service == "etcdserverpb.Lease" and name == "LeaseRevoke":
            return Invalidation(flush=True)  # the attached keys are not known here
        if service == "etcdserverpb.Auth" and name not in AUTH_READ_ONLY:
            return Invalidation(flush=True)  # permissions or identities may have changed
        # etcd's v3election and v3lock write keys "<name>/<lease id in hex>" (concurrency package)
        if service == "v3electionpb.Election":
            if name == "Campaign":
                return _under(v3election_pb2.CampaignRequest.FromString(request).name)
            if name == "Proclaim":
                return Invalidation(((v3election_pb2.ProclaimRequest.FromString(request).leader.key, b""),))
            if name == "Resign":
                return Invalidation(((v3election_pb2.ResignRequest.FromString(request).leader.key, b""),))
        if service == "v3lockpb.Lock":
            if name == "Lock":
                return _under(v3lock_pb2.LockRequest.FromString(request).name)
            if name == "Unlock":
                return Invalidation(((v3lock_pb2.UnlockRequest.FromString(request).key, b""),))
    except Exception:  # undecodable request: etcd rejected it, but be safe
        return Invalidation(flush=True)
    return None


def _under(name: bytes) -> Invalidation:
    prefix = name + b"/"
    return Invalidation(((prefix, prefix_end(prefix)),))


def header_revision(response: bytes) -> int:
    """``header.revision`` of any etcd response (header is field 1) without decoding the rest; 0 if absent."""
    # etcd (Go) writes fields in number order: the header comes first and is short (one length byte)
    if len(response) > 2 and response[0] == 0x0A and response[1] < 0x80 and len(response) >= 2 + response[1]:
        try:
            fast: int = rpc_pb2.ResponseHeader.FromString(response[2 : 2 + response[1]]).revision
            return fast
        except DecodeError:
            return 0
    try:
        for number, wire_type, start, end in wire.fields(response):
            if number == 1 and wire_type == 2:
                revision: int = rpc_pb2.ResponseHeader.FromString(response[start:end]).revision
                return revision
    except (wire.WireError, DecodeError):
        return 0
    return 0


# ---- what a worker may hold: the hub's view ------------------------------------------------


class Footprint:
    """A multiset of intervals: what a worker may hold latest-revision entries for, as the hub sees it.

    The hub records the interval of every Range it forwards (only a Range's answer can fill a worker's
    cache), so an invalidation that touches none of a worker's recorded intervals has nothing to drop
    there and need not be sent. Once an invalidation of interval I was sent to a worker, every interval
    overlapping I recorded before can go: the worker drops those entries, and refuses the fills of
    Ranges it sent before the invalidation reached it (their tickets are older; see RangeCache.fill).
    ``add``/``remove`` count, so the same structure also holds the Ranges in flight.
    """

    __slots__ = ("_points", "_ranges", "_sorted")

    def __init__(self) -> None:
        self._points: dict[bytes, int] = {}  # point key -> count
        self._sorted: list[bytes] = []  # sorted keys of _points (range invalidations bisect it)
        self._ranges: dict[Interval, int] = {}  # non-point interval -> count

    def __len__(self) -> int:
        return len(self._points) + len(self._ranges)

    @property
    def empty(self) -> bool:
        return not self._points and not self._ranges

    def add(self, interval: Interval) -> None:
        start, end = interval
        if end is not None and end == start + b"\x00":
            count = self._points.get(start)
            if count is None:
                self._points[start] = 1
                bisect.insort(self._sorted, start)
            else:
                self._points[start] = count + 1
        else:
            self._ranges[interval] = self._ranges.get(interval, 0) + 1

    def remove(self, interval: Interval) -> None:
        """Forget one ``add`` of ``interval`` (no-op if it is not there)."""
        start, end = interval
        if end is not None and end == start + b"\x00":
            count = self._points.get(start)
            if count is None:
                return
            if count > 1:
                self._points[start] = count - 1
            else:
                del self._points[start]
                del self._sorted[bisect.bisect_left(self._sorted, start)]
        else:
            count = self._ranges.get(interval)
            if count is None:
                return
            if count > 1:
                self._ranges[interval] = count - 1
            else:
                del self._ranges[interval]

    def touches(self, interval: Interval) -> bool:
        """Does any recorded interval overlap ``interval``?"""
        if not self._points and not self._ranges:
            return False
        start, end = interval
        if end is not None and end == start + b"\x00":
            if start in self._points:
                return True
        else:
            at = bisect.bisect_left(self._sorted, start)
            if at < len(self._sorted) and (end is None or self._sorted[at] < end):
                return True
        return any(overlaps(recorded, interval) for recorded in self._ranges)

    def touches_any(self, intervals: list[Interval]) -> bool:
        if not self._points and not self._ranges:
            return False
        for interval in intervals:  # noqa: SIM110 (a plain loop: no generator on the hub's per-write path)
            if self.touches(interval):
                return True
        return False

    def touches_key(self, key: bytes) -> bool:
        """touches() for the point ``key`` (the invalidation watch's events)."""
        if key in self._points:
            return True
        if not self._ranges:
            return False
        point = (key, key + b"\x00")
        return any(overlaps(recorded, point) for recorded in self._ranges)

    def drop(self, interval: Interval) -> None:
        """Forget every recorded interval overlapping ``interval`` (an invalidation of it was sent)."""
        start, end = interval
        if end is not None and end == start + b"\x00":
            if self._points.pop(start, None) is not None:
                del self._sorted[bisect.bisect_left(self._sorted, start)]
        else:
            lo = bisect.bisect_left(self._sorted, start)
            hi = len(self._sorted) if end is None else bisect.bisect_left(self._sorted, end)
            for point in self._sorted[lo:hi]:
                del self._points[point]
            del self._sorted[lo:hi]
        if self._ranges:
            for recorded in [r for r in self._ranges if overlaps(r, interval)]:
                del self._ranges[recorded]

    def clear(self) -> None:
        self._points.clear()
        self._sorted.clear()
        self._ranges.clear()


# ---- the cache -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ticket:
    """Taken before a miss goes upstream; ``fill`` checks that nothing relevant happened since."""

    seq: int
    flush_seq: int
    floor: int


@dataclass(slots=True)
class Entry:
    key: CacheKey
    response: bytes
    interval: Interval | None  # None: a fixed-revision snapshot, not indexed
    revision: int
    size: int


@dataclass(slots=True)
class RangeCache:
    max_entries: int = 2048
    max_bytes: int = 64 << 20
    enabled: bool = True
    entries: OrderedDict[CacheKey, Entry] = field(default_factory=OrderedDict)
    size_bytes: int = 0
    compacted: int = 0  # highest revision compacted through this proxy
    floor: int = 0  # newest revision known to be invalidated (or the revision the cache was enabled at)
    hits: int = 0
    misses: int = 0
    # interval index: exactly the live indexed entries
    _points: dict[bytes, set[CacheKey]] = field(default_factory=dict)
    _point_keys: list[bytes] = field(default_factory=list)  # sorted keys of _points
    _ranges: dict[Interval, set[CacheKey]] = field(default_factory=dict)
    # fill checks
    _seq: int = 0
    _flush_seq: int = 0
    _log: deque[tuple[int, Interval]] = field(default_factory=lambda: deque(maxlen=INVALIDATION_LOG))

    @property
    def keys(self) -> int:
        return len(self.entries)

    @property
    def max_entry_bytes(self) -> int:
        return self.max_bytes // 4

    # ---- reads ---------------------------------------------------------------------------

    def lookup(self, identity: str, request: bytes) -> bytes | errors.EtcdError | None:
        """A stored response for a serializable request, COMPACTED, or None (miss; not counted)."""
        if not self.enabled:
            return None
        key = (identity, request)
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.hits += 1
        if 0 < entry.revision < self.compacted:
            self._remove(entry)
            return errors.COMPACTED
        self.entries.move_to_end(key)
        return entry.response

    def compacted_error(self, revision: int) -> errors.EtcdError | None:
        """etcd's answer for a read at a compacted revision, known without asking etcd."""
        if self.enabled and 0 < revision < self.compacted:
            return errors.COMPACTED
        return None

    def ticket(self) -> Ticket:
        return Ticket(self._seq, self._flush_seq, self.floor)

    def still_valid(self, ticket: Ticket, interval: Interval) -> bool:
        """No flush and no invalidation overlapping ``interval`` since ``ticket`` was taken."""
        if not self.enabled or ticket.flush_seq != self._flush_seq:
            return False
        if self._seq == ticket.seq:
            return True
        if self._seq - ticket.seq > len(self._log):
            return False  # the log no longer covers the ticket
        for seq, invalidated in reversed(self._log):
            if seq <= ticket.seq:
                break
            if overlaps(invalidated, interval):
                return False
        return True

    def fill(
        self,
        ticket: Ticket,
        identity: str,
        request: bytes,
        key: bytes,
        range_end: bytes,
        revision: int,
        response: bytes,
    ) -> bool:
        """Store a successful answer unless something made it possibly stale; True if stored."""
        interval = to_interval(key, range_end)
        if not self.still_valid(ticket, interval):
            return False
        if revision == 0 and header_revision(response) < ticket.floor:
            return False  # from a member behind a write whose invalidation we already saw
        if 0 < revision < self.compacted:
            return False
        size = len(response) + len(request) + len(identity) + ENTRY_OVERHEAD_BYTES
        if size > self.max_entry_bytes:
            return False
        cache_key = (identity, request)
        old = self.entries.get(cache_key)
        if old is not None:
            self._remove(old)
        entry = Entry(cache_key, response, interval if revision == 0 else None, revision, size)
        self.entries[cache_key] = entry
        self.size_bytes += size
        if entry.interval is not None:
            self._index(entry.interval, cache_key)
        while len(self.entries) > self.max_entries or self.size_bytes > self.max_bytes:
            self._remove(next(iter(self.entries.values())))
        return True

    # ---- invalidation --------------------------------------------------------------------

    def invalidate(self, key: bytes, range_end: bytes, revision: int = 0) -> int:
        """Drop every latest-revision entry overlapping wire [key, range_end); returns how many."""
        interval = to_interval(key, range_end)
        self._seq += 1
        self._log.append((self._seq, interval))
        self.floor = max(self.floor, revision)
        victims: set[CacheKey] = set()
        start, end = interval
        if is_point(interval):
            victims.update(self._points.get(start, ()))
        else:
            lo = bisect.bisect_left(self._point_keys, start)
            hi = len(self._point_keys) if end is None else bisect.bisect_left(self._point_keys, end)
            for point in self._point_keys[lo:hi]:
                victims.update(self._points[point])
        for indexed, keys in self._ranges.items():
            if overlaps(indexed, interval):
                victims.update(keys)
        for cache_key in victims:
            self._remove(self.entries[cache_key])
        return len(victims)

    def compact(self, revision: int) -> None:
        self.compacted = max(self.compacted, revision)

    def flush(self) -> None:
        """Drop everything (auth change, lease revoke, lost invalidations)."""
        self._flush_seq += 1
        self.entries.clear()
        self._points.clear()
        self._point_keys.clear()
        self._ranges.clear()
        self.size_bytes = 0

    def disable(self) -> None:
        """Stop serving and filling (invalidations may be missed from now on)."""
        self.enabled = False
        self.flush()

    def enable(self, revision: int) -> None:
        """Serve again from empty; answers older than ``revision`` are refused."""
        self.flush()
        self.enabled = True
        self.floor = max(self.floor, revision)

    # ---- index ---------------------------------------------------------------------------

    def _index(self, interval: Interval, cache_key: CacheKey) -> None:
        if is_point(interval):
            point = interval[0]
            keys = self._points.get(point)
            if keys is None:
                keys = self._points[point] = set()
                bisect.insort(self._point_keys, point)
            keys.add(cache_key)
        else:
            self._ranges.setdefault(interval, set()).add(cache_key)

    def _remove(self, entry: Entry) -> None:
        del self.entries[entry.key]
        self.size_bytes -= entry.size
        interval = entry.interval
        if interval is None:
            return
        if is_point(interval):
            point = interval[0]
            keys = self._points[point]
            keys.discard(entry.key)
            if not keys:
                del self._points[point]
                del self._point_keys[bisect.bisect_left(self._point_keys, point)]
        else:
            keys = self._ranges[interval]
            keys.discard(entry.key)
            if not keys:
                del self._ranges[interval]

    def index_size(self) -> int:
        """Cache keys referenced by the index (== indexed live entries; tests check it never leaks)."""
        return sum(len(k) for k in self._points.values()) + sum(len(k) for k in self._ranges.values())
