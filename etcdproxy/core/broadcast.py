"""s-watchers (broadcasts): revision bookkeeping, history and the join rule. Pure.

One Broadcast is one upstream etcd watch on an exact [key, range_end), shared by every
c-watcher of every worker that can be served from it. Revisions:

* ``frontier`` F: every event with revision <= F has been received from etcd (None until
  known). It advances with each event batch (last event revision; etcd never splits one
  revision over responses, and the hub re-assembles fragments) and with progress
  notifications (etcd sends them only for synced watchers).
* ``floor`` H0: ``history`` holds every event with revision in [H0, F]. A c-watcher starting
  at revision S >= H0 can join: the hub replays history from S and live events follow.
  Starting at S > F is a future start: it joins and the worker filters older events.
* The history is bounded per broadcast (events and bytes) and across all broadcasts of the
  hub (``HistoryBudget``, bytes, oldest batch first); evicting a batch raises the floor.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from etcdproxy.core.events import WireEvent

HISTORY_EVENTS = 4096
# etcd moves an unsynced watcher to its synced group within its sync loop (every 100 ms, up to
# 512 watchers a round); a quiet range sends nothing to say so, so past this long after its
# created answer (or its latest catch-up batch, or a stall of the hub) an s-watcher counts as
# caught up for progress answers. 1 s was too short in soaks: right after a hub restart on a
# busy 2-core machine etcd took longer to send some resumed watchers' catch-up events
CATCH_UP_S = 2.0
# the hub's event loop did not run for this long: whatever etcd sent meanwhile is still unread,
# so time spent then says nothing about how far etcd got with a catch-up (SIGSTOP, swap, a GC)
STALL_S = 0.5

W = TypeVar("W")
HISTORY_BYTES = 8 * 1024 * 1024
# All broadcasts together: with 10,000 ranges the per-broadcast bounds alone would allow
# far more memory than a proxy should hold.
TOTAL_HISTORY_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Batch:
    revision: int  # revision of the last event
    events: list[WireEvent]
    size: int


@dataclass(slots=True)
class Broadcast:
    sw_id: int
    key: bytes
    range_end: bytes
    # revision asked of etcd when (re-)creating the upstream watch; 0 = "from now"
    start_revision: int
    frontier: int | None = None
    floor: int | None = None
    history: deque[Batch] = field(default_factory=deque)
    history_events: int = 0
    history_bytes: int = 0
    # receivers: (worker identity, wid) -> start revision they were admitted with
    receivers: dict[tuple[bytes, int], int] = field(default_factory=dict)  # change with add/remove_receiver
    worker_receivers: dict[bytes, int] = field(default_factory=dict)  # identity -> its receivers here
    # receivers waiting for the upstream created response, in arrival order, with the
    # header their created response must carry (b"" = the upstream created header)
    waiting: list[tuple[bytes, int]] = field(default_factory=list)
    join_headers: dict[tuple[bytes, int], bytes] = field(default_factory=dict)
    live: bool = False  # the upstream created response arrived
    dead: bool = False  # etcd cancelled it; never joined again
    sent: bool = False  # the upstream create request left (a rev-0 join after that is not exact)
    # store revision when etcd created the upstream watch: until the frontier reaches it the
    # watch may be catching up (unsynced), and stream-wide progress must not move it
    created_revision: int = 0
    # monotonic time of the (latest) created answer, moved on by each catch-up batch and by a
    # stall of the hub: a not-caught-up watch settles CATCH_UP_S after it
    catch_up_clock: float = 0.0
    # after a stall of the hub, not settled before this (monotonic), caught up or not (restart_catch_up)
    hold_until: float = 0.0

    def __post_init__(self) -> None:
        if self.start_revision > 0:
            self.frontier = self.start_revision - 1
            self.floor = self.start_revision

    # ---- joining -------------------------------------------------------------------------

    def can_join(self, start_revision: int) -> bool:
        """True if a c-watcher starting at ``start_revision`` (> 0) can be served every event."""
        return not self.dead and self.floor is not None and start_revision >= self.floor

    def can_wait_for(self, start_revision: int) -> bool:
        """A c-watcher may wait for a rev-0 create in flight: if it then starts below the
        floor etcd reports, the hub moves it elsewhere (see WatchHub.on_created)."""
        return not self.dead and not self.live and self.start_revision == 0 and start_revision > 0

    def can_join_now(self) -> bool:
        """A "from now" c-watcher may share a rev-0 create that has not been sent yet: it then
        starts exactly where etcd starts the upstream watch."""
        return not self.dead and self.start_revision == 0 and not self.sent and not self.live

    def replay_from(self, start_revision: int) -> list[WireEvent]:
        """History events with revision >= start_revision, oldest first."""
        out: list[WireEvent] = []
        for batch in self.history:
            if batch.revision >= start_revision:
                out.extend(e for e in batch.events if e[0] >= start_revision)
        return out

    # ---- upstream responses --------------------------------------------------------------

    def on_created(self, header_revision: int, now: float = 0.0) -> None:
        """Upstream created: a rev-0 watch starts after the store revision in its header."""
        self.live = True
        self.created_revision = header_revision
        self.catch_up_clock = now
        if self.frontier is None:
            self.frontier = header_revision
            self.floor = header_revision + 1

    def on_events(self, events: list[WireEvent], now: float = 0.0) -> Batch:
        """Record a batch; returns it (for the hub-wide budget). A batch still below the creation
        revision is part of a catch-up that etcd is sending: more may follow, so the catch-up clock
        starts again."""
        size = sum(len(e[2]) + len(e[3]) for e in events)
        last = events[-1][0]
        if self.frontier is None or last > self.frontier:
            self.frontier = last
        if self.live and last < self.created_revision:
            self.catch_up_clock = now
        if self.floor is None:
            self.floor = events[0][0]
        batch = Batch(last, events, size)
        self.history.append(batch)
        self.history_events += len(events)
        self.history_bytes += size
        while self.history and (self.history_events > HISTORY_EVENTS or self.history_bytes > HISTORY_BYTES):
            self.evict_oldest()
        return batch

    def evict_oldest(self) -> int:
        """Drop the oldest batch of history; returns the bytes freed."""
        old = self.history.popleft()
        self.history_events -= len(old.events)
        self.history_bytes -= old.size
        self.floor = old.revision + 1
        return old.size

    def on_progress(self, header_revision: int) -> None:
        """All events up to header_revision were sent (etcd only says so for synced watchers)."""
        if self.frontier is None or header_revision > self.frontier:
            self.frontier = header_revision
        if self.floor is None:
            self.floor = header_revision + 1

    def caught_up(self) -> bool:
        """True once every event up to the creation revision arrived: etcd 3.5 answers a
        stream's RequestProgress even while some of its watchers are unsynced (etcd #15220),
        so only caught-up broadcasts take their frontier from such an answer."""
        return self.live and self.frontier is not None and self.frontier >= self.created_revision

    def settled(self, now: float) -> bool:
        """Caught up, or quiet long enough since its created answer (or latest catch-up batch, or
        stall) that etcd has certainly synced it (CATCH_UP_S)."""
        return self.live and now >= self.hold_until and (self.caught_up() or now - self.catch_up_clock >= CATCH_UP_S)

    def resume_revision(self) -> int:
        """Where to re-create the upstream watch after the stream broke: no gap, no duplicate."""
        return 0 if self.frontier is None else self.frontier + 1

    # ---- receivers -----------------------------------------------------------------------

    def add_receiver(self, receiver: tuple[bytes, int], start: int) -> None:
        if receiver not in self.receivers:
            self.worker_receivers[receiver[0]] = self.worker_receivers.get(receiver[0], 0) + 1
        self.receivers[receiver] = start

    def remove_receiver(self, receiver: tuple[bytes, int]) -> None:
        if self.receivers.pop(receiver, None) is not None:
            identity = receiver[0]
            left = self.worker_receivers[identity] - 1
            if left:
                self.worker_receivers[identity] = left
            else:
                del self.worker_receivers[identity]

    def past_compaction(self, compact_revision: int) -> list[tuple[bytes, int]]:
        """Receivers that need nothing a compaction at ``compact_revision`` removed: admitted from at or
        above it. etcd cancels an s-watcher whose next revision was compacted, but c-watchers that joined it
        for later revisions (a from-now create joined at the probe's revision, a later start) must not share
        its fate (soak: from-now watches canceled as compacted). A negative start has its own s-watcher and etcd
        3.5 cancels it whatever its receivers were told."""
        if compact_revision <= 0 or self.start_revision < 0:
            return []
        return [receiver for receiver, start in self.receivers.items() if start >= compact_revision]

    def workers(self) -> tuple[bytes, ...]:
        """The workers with a receiver here (kept with the receivers: a fan-out to 1,000 c-watchers
        on 2 workers no longer builds a set of 1,000 entries per event batch)."""
        return tuple(self.worker_receivers)


class HistoryBudget:
    """Bounds the history bytes of every broadcast together, evicting the oldest batches first.

    ``order`` lists (broadcast, batch) in arrival order; entries whose batch already left its
    broadcast (evicted by the per-broadcast bound, or the broadcast was removed) are skipped.
    """

    def __init__(self, max_bytes: int = TOTAL_HISTORY_BYTES) -> None:
        self.max_bytes = max_bytes
        self.order: deque[tuple[Broadcast, Batch]] = deque()

    def record(self, broadcast: Broadcast, batch: Batch, live_bytes: int) -> int:
        """Note a new batch; ``live_bytes`` is the total held now. Returns the total after eviction."""
        self.order.append((broadcast, batch))
        while live_bytes > self.max_bytes and self.order:
            owner, oldest = self.order.popleft()
            if owner.history and owner.history[0] is oldest and not owner.dead:
                live_bytes -= owner.evict_oldest()
        return live_bytes


def stream_progress(
    broadcasts: list[Broadcast], pending: set[int], revision: int, now: float
) -> tuple[list[Broadcast], bool]:
    """One upstream progress answer at ``revision`` for a stream: the broadcasts whose frontier
    it moves, and whether the whole stream has settled (clients' parked answers may go).

    A broadcast takes the answer once it has settled, the same test that lets the clients'
    answers go: a client told "everything up to R" must never have its s-watcher resumed below
    R after the stream breaks (seen in CI: a watcher re-created after quorum loss was settled by
    time, not by events, so the clients heard 82 while the frontier stayed at 64, and the
    resume after the next leader kill met a compaction at 68 and cancelled it). Pending
    (re-)creates have not begun their catch-up and hold the stream unsettled.
    """
    moved: list[Broadcast] = []
    settled = True
    for broadcast in broadcasts:
        if broadcast.sw_id in pending or not broadcast.settled(now):
            settled = False
        elif broadcast.frontier is None or revision > broadcast.frontier:
            moved.append(broadcast)
    return moved, settled


def restart_catch_up(broadcasts: list[Broadcast], now: float) -> int:
    """The hub stalled (STALL_S): what etcd sent meanwhile is not read yet, and while the hub did not
    read, etcd's send loop blocked and set watchers aside as victims, to be sent later; etcd 3.5's
    stream-wide progress answer says nothing of those (a soak SIGSTOPped the hub for 2 s, and 0.5 s
    after it woke, clients heard a progress at R just before event R). So every live broadcast is
    unsettled for CATCH_UP_S, and one not caught up starts its catch-up clock again. Returns how
    many broadcasts are held."""
    held = 0
    for broadcast in broadcasts:
        if broadcast.live:
            broadcast.hold_until = now + CATCH_UP_S
            if not broadcast.caught_up():
                broadcast.catch_up_clock = now
            held += 1
    return held


def unsettled_bound(broadcasts: list[Broadcast], now: float) -> int | None:
    """The lowest frontier among the live broadcasts of a stream that have not settled (every event up to it was
    passed on for each of them), or None when none is unsettled: what a progress answer released before the
    stream settled may say without running ahead of events those broadcasts still owe."""
    bound: int | None = None
    for broadcast in broadcasts:
        frontier = broadcast.frontier
        if (
            broadcast.live
            and frontier is not None
            and (bound is None or frontier < bound)
            and not broadcast.settled(now)
        ):
            bound = frontier
    return bound


# longest a client's RequestProgress waits for the stream's s-watchers to settle (new ones keep
# arriving under churn); then it is answered anyway
MAX_PROGRESS_HOLD_S = 3.0


class ProgressGate(Generic[W]):
    """Clients' RequestProgress answers on one upstream stream. Pure.

    etcd (before 3.5.8) answers a stream's RequestProgress at once, with its current revision R,
    even while watchers it is re-syncing (a resumed s-watcher, one from a past revision) still have
    events <= R to send: relayed as is, a client would hear "everything up to R was sent" before
    those events. So an answer goes to the clients waiting for one only when every s-watcher of
    the stream has settled (Broadcast.settled); until then they are parked and the hub asks again.
    The revision answered is also never below the newest event already passed on from the stream
    (etcd's send loop may put a later event ahead of the answer), so a client never hears a
    progress below an event it already has.
    """

    def __init__(self, max_hold_s: float = MAX_PROGRESS_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self.parked: list[tuple[W, float]] = []

    def on_answer(
        self, revision: int, newest_event: int, waiter: W | None, settled: bool, now: float, bound: int | None = None
    ) -> tuple[list[W], int]:
        """One upstream answer (``waiter``: the client it was asked for, if any); returns the
        clients to answer now and the revision to tell them. ``bound`` (unsettled_bound): the answer
        released by the hold cap before the stream settled says at most that much; if even that is below
        an event already passed on, nothing is released (a soak saw progress answers at the stream's
        revision after a reset, ahead of events resumed watchers still owed); the broadcasts settle by
        time (CATCH_UP_S) at the latest."""
        if waiter is not None:
            self.parked.append((waiter, now))
        if settled:
            ready, self.parked = [w for w, _ in self.parked], []
            return ready, max(revision, newest_event)
        if bound is not None:
            if bound < newest_event:
                return [], revision
            revision = min(revision, bound)
        ready = [w for w, at in self.parked if now - at >= self.max_hold_s]
        self.parked = [(w, at) for w, at in self.parked if now - at < self.max_hold_s]
        return ready, max(revision, newest_event)

    def take_all(self) -> list[W]:
        """The stream failed: everyone parked gets its last header."""
        ready, self.parked = [w for w, _ in self.parked], []
        return ready
