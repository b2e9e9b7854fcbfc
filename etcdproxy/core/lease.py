"""Keepalive bookkeeping for the lease hub and the worker's LeaseKeepAlive servicer; pure.

The proxy renews a lease upstream only when a client asks (never on its own timer), so a lease
whose clients stop sending expires TTL after their last keepalive, like with etcd directly.

Two levels of coalescing:

* Worker (``Interest``): the hub is asked once per lease while client requests for it are
  outstanding; its LeaseAnswer answers every outstanding request of every stream, one
  response per request.
* Hub (``RenewalBook``): at most one renewal per lease is in flight on the single upstream
  LeaseKeepAlive stream; every worker that asked meanwhile gets its answer.

Coalescing window (``--lease-keepalive-window``, default 500ms): a keepalive arriving at most
that long after an upstream renewal of its lease was *sent* is answered from that renewal, with
``TTL = floor(granted TTL - time since the renewal was sent)``. etcd renewed the lease after we
sent the request, so this TTL is never longer than what is really left. Consequences: a client in
a tight loop costs etcd at most one renewal per lease per window; a lease may expire up to one
window earlier than TTL after a client's last keepalive, but never earlier than the TTL that
client was told. TTL <= 0 answers (revoked, expired, unknown lease) are never reused, and a
renewal is reused only while at least 1 s of it is left. A LeaseRevoke forwarded by this proxy
drops the lease's recent renewal (before and after the revoke), so a keepalive sent after a
revoke through the proxy completed is answered TTL 0; a revoke made elsewhere (another proxy,
etcd directly) is seen at the next upstream renewal, at most one window later. Window 0 sends every keepalive
upstream (concurrent ones still share one renewal).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from etcdproxy.etcdpb import rpc_pb2

W = TypeVar("W", bound=Hashable)

DEFAULT_WINDOW_S = 0.5


# ---- wire helpers ----------------------------------------------------------------------------


def keepalive_request(lease_id: int) -> bytes:
    """Serialized LeaseKeepAliveRequest{ID}."""
    return rpc_pb2.LeaseKeepAliveRequest(ID=lease_id).SerializeToString()  # type: ignore[no-any-return]


def parse_response(payload: bytes) -> tuple[int, int]:
    """(ID, TTL) of a serialized LeaseKeepAliveResponse."""
    response = rpc_pb2.LeaseKeepAliveResponse.FromString(payload)
    return int(response.ID), int(response.TTL)


def with_ttl(payload: bytes, ttl: int) -> bytes:
    """The same LeaseKeepAliveResponse (header, ID) with another TTL."""
    response = rpc_pb2.LeaseKeepAliveResponse.FromString(payload)
    response.TTL = ttl
    return response.SerializeToString()  # type: ignore[no-any-return]


def remaining_ttl(granted_ttl: int, sent_at: float, now: float) -> int:
    """Whole seconds left of a renewal sent at ``sent_at`` that granted ``granted_ttl``; >= 0."""
    return max(math.floor(granted_ttl - (now - sent_at)), 0)


def late_answer(payload: bytes, ttl: int, sent_at: float, now: float) -> bytes:
    """etcd's answer to a renewal sent at ``sent_at`` and read only at ``now``: etcd renewed the lease when the
    request reached it, so once a second or more has passed (the hub was stopped, the connection stalled) the
    client is told what is left of it (at least 1: it was renewed, and the client will renew again at once)
    instead of the whole TTL (a soak saw a lease expire 1.1 s after an answer of TTL 3 read 2 s late).
    Answers read within the second, and TTL 0 (unknown or expired), pass untouched."""
    if ttl <= 0 or sent_at <= 0 or now - sent_at < 1.0:
        return payload
    return with_ttl(payload, max(remaining_ttl(ttl, sent_at, now), 1))


# ---- outstanding requests --------------------------------------------------------------------


class Outstanding(Generic[W]):
    """lease_id -> {waiter: number of unanswered requests}, with a waiter -> leases index.

    Invariant: a lease is present iff it has at least one unanswered request (counts >= 1).
    """

    def __init__(self) -> None:
        self._by_lease: dict[int, dict[W, int]] = {}
        self._by_waiter: dict[W, set[int]] = {}

    def add(self, lease_id: int, waiter: W, count: int = 1) -> bool:
        """Record ``count`` more requests; True if the lease had none outstanding before."""
        waiters = self._by_lease.get(lease_id)
        first = waiters is None
        if waiters is None:
            waiters = self._by_lease[lease_id] = {}
        waiters[waiter] = waiters.get(waiter, 0) + count
        self._by_waiter.setdefault(waiter, set()).add(lease_id)
        return first

    def pop(self, lease_id: int) -> dict[W, int]:
        """Every waiter of ``lease_id`` with its count; the lease is answered for all of them."""
        waiters = self._by_lease.pop(lease_id, {})
        for waiter in waiters:
            leases = self._by_waiter.get(waiter)
            if leases is not None:
                leases.discard(lease_id)
                if not leases:
                    del self._by_waiter[waiter]
        return waiters

    def remove_waiter(self, waiter: W) -> list[int]:
        """Forget ``waiter`` (stream ended, worker gone); returns the leases left with no waiter."""
        emptied: list[int] = []
        for lease_id in self._by_waiter.pop(waiter, ()):
            waiters = self._by_lease.get(lease_id)
            if waiters is None:
                continue
            waiters.pop(waiter, None)
            if not waiters:
                del self._by_lease[lease_id]
                emptied.append(lease_id)
        return emptied

    def count(self, lease_id: int, waiter: W) -> int:
        return self._by_lease.get(lease_id, {}).get(waiter, 0)

    def leases(self) -> list[int]:
        return list(self._by_lease)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._by_lease

    def __len__(self) -> int:
        return len(self._by_lease)


# ---- worker side -----------------------------------------------------------------------------


class Interest(Generic[W]):
    """A worker's client requests per lease (waiters are client streams) and when it asked the hub.

    Invariant: ``asked_at`` has an entry for every lease with outstanding requests once the hub
    was asked for it; it is dropped when the lease is answered or loses its last waiter.
    """

    def __init__(self) -> None:
        self.outstanding: Outstanding[W] = Outstanding()
        self.asked_at: dict[int, float] = {}

    def request(self, lease_id: int, stream: W, now: float) -> bool:
        """A client request arrived; True if the hub must be asked now (none outstanding before)."""
        first = self.outstanding.add(lease_id, stream)
        if first:
            self.asked_at[lease_id] = now
        return first

    def answer(self, lease_id: int) -> dict[W, int]:
        """The hub answered ``lease_id``: every outstanding request of it, per stream."""
        self.asked_at.pop(lease_id, None)
        return self.outstanding.pop(lease_id)

    def stream_gone(self, stream: W) -> None:
        for lease_id in self.outstanding.remove_waiter(stream):
            self.asked_at.pop(lease_id, None)

    def ask_all(self, now: float) -> list[int]:
        """Leases to ask again after a hub restart or a lost hub frame."""
        leases = self.outstanding.leases()
        for lease_id in leases:
            self.asked_at[lease_id] = now
        return leases

    def overdue(self, now: float, after_s: float) -> list[int]:
        """Leases asked more than ``after_s`` ago and still unanswered (asked again from now)."""
        late = [lease_id for lease_id, at in self.asked_at.items() if now - at > after_s]
        for lease_id in late:
            self.asked_at[lease_id] = now
        return late


@dataclass(frozen=True, slots=True)
class Renewal:
    sent_at: float
    ttl: int
    payload: bytes


def answer_from(renewal: Renewal, now: float, window_s: float) -> bytes | None:
    """The answer a recent renewal gives a keepalive arriving at ``now``, or None (too old, < 1 s left)."""
    if now - renewal.sent_at > window_s:
        return None
    ttl = remaining_ttl(renewal.ttl, renewal.sent_at, now)
    if ttl < 1:
        return None
    return renewal.payload if ttl == renewal.ttl else with_ttl(renewal.payload, ttl)


class Window:
    """A worker's copy of the hub's recent renewals, so a keepalive within the window is answered in the worker
    (no IPC, no hub, no etcd), by the same rule as the hub's: ``TTL = floor(granted - time since the renewal was
    sent)``, reused only while >= 1 s is left. ``sent_at`` is the hub's CLOCK_MONOTONIC (time.monotonic(), one
    clock for every process of the machine), so the TTL is never longer than what etcd left.

    A LeaseRevoke through the proxy makes the hub tell every worker to forget the lease, and waits for their
    acknowledgements before and after forwarding it (hub/lease.py), as the hub's own book does.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.recent: dict[int, Renewal] = {}
        self._made: dict[int, tuple[int, bytes]] = {}  # lease -> (TTL, answer with it): one encode per second

    def record(self, lease_id: int, sent_at: float, ttl: int, payload: bytes) -> None:
        if self.window_s > 0 and sent_at > 0 and ttl > 0:
            self.recent[lease_id] = Renewal(sent_at, ttl, payload)
            self._made.pop(lease_id, None)

    def answer(self, lease_id: int, now: float) -> bytes | None:
        renewal = self.recent.get(lease_id)
        if renewal is None:
            return None
        if now - renewal.sent_at > self.window_s:
            self.forget(lease_id)
            return None
        ttl = remaining_ttl(renewal.ttl, renewal.sent_at, now)
        if ttl < 1:
            self.forget(lease_id)
            return None
        if ttl == renewal.ttl:
            return renewal.payload
        made = self._made.get(lease_id)
        if made is None or made[0] != ttl:
            made = (ttl, with_ttl(renewal.payload, ttl))
            self._made[lease_id] = made
        return made[1]

    def forget(self, lease_id: int) -> None:
        self.recent.pop(lease_id, None)
        self._made.pop(lease_id, None)

    def clear(self) -> None:
        self.recent.clear()
        self._made.clear()

    def prune(self, now: float) -> None:
        for lease_id in [i for i, r in self.recent.items() if now - r.sent_at > self.window_s]:
            self.forget(lease_id)


# ---- hub side --------------------------------------------------------------------------------


class Verdict(enum.Enum):
    ANSWER = "answer"  # answer now from a recent renewal (payload given)
    SEND = "send"  # no renewal in flight: send one upstream
    JOIN = "join"  # a renewal is in flight (or waits for the stream): its answer will do


class RenewalBook(Generic[W]):
    """The hub's renewals: who waits on which lease, what is in flight, what was renewed lately.

    Waiters are workers. Invariants: ``in_flight`` holds only leases sent on the *current*
    upstream stream and not yet answered (etcd answers a stream's requests in order, one each);
    every lease with waiters is in ``in_flight`` or in ``unsent()``; ``recent`` holds only
    renewals with TTL > 0.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self.waiting: Outstanding[W] = Outstanding()
        self.in_flight: dict[int, float] = {}
        self.recent: dict[int, Renewal] = {}
        # in-flight renewals whose answer must not be reused: a revoke of the lease crossed them
        self.uncacheable: set[int] = set()

    def request(self, lease_id: int, worker: W, now: float) -> tuple[Verdict, bytes]:
        renewal = self.recent.get(lease_id)
        if renewal is not None:
            payload = answer_from(renewal, now, self.window_s)
            if payload is not None:
                return Verdict.ANSWER, payload
            del self.recent[lease_id]
        self.waiting.add(lease_id, worker)
        if lease_id in self.in_flight:
            return Verdict.JOIN, b""
        return Verdict.SEND, b""

    def sent(self, lease_id: int, now: float) -> None:
        self.in_flight[lease_id] = now

    def answered(self, lease_id: int, ttl: int, payload: bytes) -> list[W]:
        """etcd answered ``lease_id``: the workers to send ``payload`` to."""
        sent_at = self.in_flight.pop(lease_id, None)
        reusable = lease_id not in self.uncacheable
        self.uncacheable.discard(lease_id)
        if ttl > 0 and sent_at is not None and reusable:
            self.recent[lease_id] = Renewal(sent_at, ttl, payload)
        else:
            self.recent.pop(lease_id, None)
        return list(self.waiting.pop(lease_id))

    def revoking(self, lease_id: int) -> None:
        """A LeaseRevoke of ``lease_id`` is being forwarded, or just finished (call at both).

        No renewal from before the revoke's completion may answer a keepalive sent after it:
        forget the recent one, and do not reuse the answer of one in flight.
        """
        self.recent.pop(lease_id, None)
        if lease_id in self.in_flight:
            self.uncacheable.add(lease_id)

    def stream_lost(self) -> None:
        """The upstream stream broke: nothing is in flight any more (``unsent()`` re-sends)."""
        self.in_flight.clear()
        self.uncacheable.clear()

    def unsent(self) -> list[int]:
        """Leases with waiters and no renewal in flight."""
        return [lease_id for lease_id in self.waiting.leases() if lease_id not in self.in_flight]

    def worker_gone(self, worker: W) -> None:
        self.waiting.remove_waiter(worker)

    def prune(self, now: float) -> None:
        """Drop renewals older than the window (they can no longer answer anything)."""
        old = [lease_id for lease_id, r in self.recent.items() if now - r.sent_at > self.window_s]
        for lease_id in old:
            del self.recent[lease_id]
