"""Per-client watcher logic (c-watchers): filtering and the WatchResponse wire encoding. Pure.

A worker receives each upstream event batch of an s-watcher once and serves every c-watcher
of it from the same bytes: events arrive already serialized twice (with and without prev_kv),
each c-watcher keeps those it wants, and a response is the concatenation of protobuf fields
(field order is free in protobuf), so only ``watch_id`` differs between clients.

Invariant: ``next_revision`` is the lowest revision a c-watcher may still deliver; every event
below it was delivered (or filtered) already, so replays and overlapping batches after a
re-join or a hub restart never produce a duplicate.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from etcdproxy.etcdpb import rpc_pb2

# WatchCreateRequest.FilterType
NOPUT = rpc_pb2.WatchCreateRequest.NOPUT
NODELETE = rpc_pb2.WatchCreateRequest.NODELETE

# etcd's mvcc.AutoWatchID: a create with watch_id 0 gets the next free id of the stream.
AUTO_WATCH_ID = 0
INVALID_WATCH_ID = -1
DUPLICATE_WATCH_ID = "mvcc: duplicate watch ID provided on the WatchStream"

# etcd splits a fragmented response so that no part exceeds its max request size.
FRAGMENT_LIMIT_BYTES = 1572864

# field keys of WatchResponse (field number << 3 | wire type)
_HEADER, _WATCH_ID, _CREATED, _CANCELED, _COMPACT_REVISION = 0x0A, 0x10, 0x18, 0x20, 0x28
_CANCEL_REASON, _FRAGMENT, _EVENTS = 0x32, 0x38, 0x5A


def varint(value: int) -> bytes:
    """Protobuf varint; negative int64 values take ten bytes (two's complement)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(key: int, payload: bytes) -> bytes:
    return bytes((key,)) + varint(len(payload)) + payload


def event_field(event: bytes) -> bytes:
    """One serialized mvccpb.Event as a WatchResponse.events field."""
    return length_delimited(_EVENTS, event)


def encode_response(
    watch_id: int,
    header: bytes,
    events: Sequence[bytes] = (),
    *,
    created: bool = False,
    canceled: bool = False,
    compact_revision: int = 0,
    cancel_reason: str = "",
    fragment: bool = False,
) -> bytes:
    """A serialized WatchResponse; ``events`` are already event fields (see event_field)."""
    parts = [length_delimited(_HEADER, header)]
    if watch_id:
        parts.append(bytes((_WATCH_ID,)) + varint(watch_id))
    if created:
        parts.append(b"\x18\x01")
    if canceled:
        parts.append(b"\x20\x01")
    if compact_revision:
        parts.append(bytes((_COMPACT_REVISION,)) + varint(compact_revision))
    if cancel_reason:
        parts.append(length_delimited(_CANCEL_REASON, cancel_reason.encode()))
    if fragment:
        parts.append(b"\x38\x01")
    parts.extend(events)
    return b"".join(parts)


def fragments(events: Sequence[bytes], limit: int = FRAGMENT_LIMIT_BYTES) -> list[list[bytes]]:
    """Split event fields into runs of at most ``limit`` bytes (a single larger event stays whole)."""
    runs: list[list[bytes]] = [[]]
    size = 0
    for event in events:
        if runs[-1] and size + len(event) > limit:
            runs.append([])
            size = 0
        runs[-1].append(event)
        size += len(event)
    return runs


class Prepared(list[tuple[int, bool, bytes, bytes]]):
    """One batch as ``prepare`` returns it, plus what lets a c-watcher that wants all of it take it whole
    (CWatcher.accept's fast path: a list extend instead of a loop per event per c-watcher)."""

    __slots__ = ("cuts", "deletes", "first", "last", "puts", "with_prev", "with_size", "without_prev", "without_size")

    def __init__(self, events: Iterable[tuple[int, bool, bytes, bytes]]) -> None:
        super().__init__(events)
        self.first = self[0][0] if self else 0
        self.last = self[-1][0] if self else 0
        self.with_prev = [e[2] for e in self]
        self.without_prev = [e[3] for e in self]
        self.with_size = sum(map(len, self.with_prev))
        self.without_size = sum(map(len, self.without_prev))
        # indexes where a new revision starts (after the first event)
        self.cuts = [i for i in range(1, len(self)) if self[i][0] != self[i - 1][0]]
        self.deletes = any(e[1] for e in self)
        self.puts = not all(e[1] for e in self)


def prepare(events: Iterable[Sequence[Any]]) -> Prepared:
    """Hub WireEvents -> the same with both serializations framed as WatchResponse.events
    fields, done once per batch and shared by every c-watcher of the worker."""
    out = []
    for revision, is_delete, with_prev, without_prev in events:
        framed = event_field(with_prev)
        out.append((revision, is_delete, framed, framed if without_prev == with_prev else event_field(without_prev)))
    return Prepared(out)


def revision_runs(events: Sequence[bytes], cuts: Sequence[int], limit: int = FRAGMENT_LIMIT_BYTES) -> list[list[bytes]]:
    """Group event fields into runs of at most ``limit`` bytes, cutting only between revisions
    (``cuts``: indexes where a revision starts); one revision larger than the limit stays whole."""
    runs: list[list[bytes]] = [[]]
    size = 0
    bounds = [0, *(c for c in cuts if 0 < c < len(events)), len(events)]
    for start, end in itertools.pairwise(bounds):
        group = events[start:end]
        group_size = sum(map(len, group))
        if runs[-1] and size + group_size > limit:
            runs.append([])
            size = 0
        runs[-1].extend(group)
        size += group_size
    return runs


def valid_range(key: bytes, range_end: bytes) -> bool:
    """etcd accepts a single key, ``range_end == b"\\x00"`` (all keys >= key), or key < range_end."""
    return not range_end or range_end == b"\x00" or key < range_end


@dataclass(slots=True, eq=False)
class CWatcher:
    """One client watcher, owned by the worker serving its stream."""

    watch_id: int
    wid: int  # the worker-wide id the hub knows it by
    key: bytes
    range_end: bytes
    start_revision: int
    noput: bool = False
    nodelete: bool = False
    prev_kv: bool = False
    progress_notify: bool = False
    fragment: bool = False
    next_revision: int = 0  # 0 until the hub says where it starts
    # highest revision a progress notification said was complete: only where to resume after a
    # hub restart, never a filter, because etcd before 3.5.8 can send a stream's progress answer
    # ahead of events at or below its revision (filtering on it dropped those events)
    progress_revision: int = 0
    sw_id: int = 0
    requested_id: int = AUTO_WATCH_ID  # the client's watch_id; ``watch_id`` is -1 until released
    ready: bool = False  # the hub answered the create (created, or rejected: see ``rejection``)
    created: bool = False  # the created response was queued for the client
    canceled: bool = False
    # etcd's rejection of the create: (header, compact_revision, reason)
    rejection: tuple[bytes, int, str] | None = None
    # a cancel that arrived before the created response could be released, same shape
    cancel_after: tuple[bytes, int, str] | None = None
    last_header: bytes = b""
    # event fields accepted but not yet written to the client, and the newest header
    pending: list[bytes] = field(default_factory=list)
    # indexes into ``pending`` where a new revision starts: responses are cut only there
    pending_cuts: list[int] = field(default_factory=list)
    pending_revision: int = 0  # revision of the last pending event
    pending_bytes: int = 0
    pending_header: bytes = b""
    pending_progress: bool = False

    @classmethod
    def from_request(cls, wid: int, create: rpc_pb2.WatchCreateRequest) -> CWatcher:
        filters = set(create.filters)
        return cls(
            watch_id=INVALID_WATCH_ID,
            requested_id=create.watch_id,
            wid=wid,
            key=create.key,
            range_end=create.range_end,
            start_revision=create.start_revision,
            noput=NOPUT in filters,
            nodelete=NODELETE in filters,
            prev_kv=create.prev_kv,
            progress_notify=create.progress_notify,
            fragment=create.fragment,
        )

    def resume_revision(self) -> int:
        """Where a hub that lost this c-watcher registers it again (0: never started)."""
        if self.next_revision <= 0:
            return 0
        return max(self.next_revision, self.progress_revision + 1)

    def accept(self, events: Iterable[Sequence[Any]]) -> int:
        """Queue the wanted events of one batch; returns how many bytes were queued.

        ``events`` are prepared once per batch by ``prepare`` ([mod_revision, is_delete,
        field with prev_kv, field without]) in revision order. Events below next_revision were
        delivered already and are skipped; next_revision then moves past the batch, so the
        events of one revision are never split and replays never duplicate.
        """
        pending = self.pending
        # never below the client's start revision, even before the hub said where it starts (etcd sends
        # nothing older); a guard only: the soak case that prompted it was a "from now" watch given the
        # wrong created header on a hub restart (worker/watch.py on_created)
        next_revision = self.next_revision
        if next_revision < self.start_revision:
            next_revision = self.start_revision
        if (
            type(events) is Prepared
            and events
            and events.first >= next_revision
            and not (self.nodelete and events.deletes)
            and not (self.noput and events.puts)
        ):
            # the whole batch is wanted: same result as the loop below, without a step per event
            base = len(pending)
            if base and events.first != self.pending_revision:
                self.pending_cuts.append(base)
            if events.cuts:
                self.pending_cuts.extend([base + i for i in events.cuts])
            if self.prev_kv:
                pending.extend(events.with_prev)
                added = events.with_size
            else:
                pending.extend(events.without_prev)
                added = events.without_size
            self.pending_revision = events.last
            self.next_revision = events.last + 1
            self.pending_bytes += added
            return added
        added = 0
        last = 0
        for revision, is_delete, with_prev, without_prev in events:
            last = revision
            if revision < next_revision or (self.nodelete if is_delete else self.noput):
                continue
            data = with_prev if self.prev_kv else without_prev
            if pending and revision != self.pending_revision:
                self.pending_cuts.append(len(pending))
            self.pending_revision = revision
            pending.append(data)
            added += len(data)
        if last >= next_revision:
            self.next_revision = last + 1
        self.pending_bytes += added
        return added

    def take_responses(self) -> list[bytes]:
        """Serialized responses for everything pending (fragmented if the client asked)."""
        events, self.pending = self.pending, []
        cuts, self.pending_cuts = self.pending_cuts, []
        header = self.pending_header or self.last_header
        size, self.pending_bytes = self.pending_bytes, 0  # the sum of len(e) for e in events
        self.pending_header = b""
        progress, self.pending_progress = self.pending_progress, False
        if not events:
            if not progress:
                return []
            self.last_header = header
            return [encode_response(self.watch_id, header)]
        self.last_header = header
        if size <= FRAGMENT_LIMIT_BYTES:
            return [encode_response(self.watch_id, header, events)]
        if not self.fragment:
            # Several revisions piled up (slow reader, replay): one response per run of whole
            # revisions up to the limit, like etcd, instead of one message that may exceed the
            # client's receive limit (grpc's default is 4 MiB).
            return [encode_response(self.watch_id, header, run) for run in revision_runs(events, cuts)]
        runs = fragments(events)
        return [encode_response(self.watch_id, header, run, fragment=i < len(runs) - 1) for i, run in enumerate(runs)]
