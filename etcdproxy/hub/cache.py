"""The hub's part of the range cache: invalidations for every worker, and when they may serve hits.

The caches live in the workers (worker/cache.py); the hub sees every write and runs one
upstream watch, so it tells all workers what became stale:

* Writes through this proxy: after the write's upstream call ends (OK, or an error with which
  it may have been applied), a ``CacheInvalidate`` goes to every worker, and the writer's reply
  is held until every other worker acknowledged it (the writer's own worker gets it on the same
  ordered link, before the reply). So once a client has its answer, no worker serves the old
  value: read-your-writes holds across connections and workers. A worker that does not ack
  within ``ACK_TIMEOUT_S`` is logged and the reply goes out anyway.
* Only workers that may hold something a write touches get its invalidation: a worker's cache fills
  only from Range answers the hub forwarded, so the hub keeps each worker's ``Footprint`` (the
  intervals of its Ranges since it last flushed) plus the Ranges still in flight (worker not known
  until they end; an invalidation touching one goes to every worker). A write touching nothing a
  worker may cache costs that worker no message and the writer no ack wait. Intervals leave a
  footprint when their invalidation is sent, but the worker may serve them until it has processed
  it: so every message that drops entries asks for an ack (the writer's own worker's too, though the
  writer does not wait for it), and a worker with one unacknowledged is never skipped. The newest invalidated
  revision (``floor``) travels in ``CacheState`` instead, so a worker enabled after a failover still
  refuses answers of a lagging member older than writes it was never told about.
* Writes made elsewhere (direct clients, other proxies, lease expiry): one upstream watch on the
  whole keyspace; each event batch becomes a ``CacheInvalidate`` of its keys. Staleness of a
  cached serializable read is bounded by the watch latency. While the watch is not established
  (start-up, etcd down, reconnecting, refused e.g. because etcd auth is on and the proxy has no
  credentials of its own) workers are told ``CacheState(enabled=False)`` and serve no hits; when
  it is back they flush and start again from its start revision. A watch that stays silent for
  ``STALL_S`` despite progress requests every ``PROGRESS_EVERY_S`` is treated as down, so the
  bound is never worse than ``STALL_S`` plus the watch latency.
* etcd auth: the proxy has no credentials of its own, so it cannot learn about permission changes
  made elsewhere. Hits are therefore served only while etcd answers a token-less AuthStatus
  (auth off), probed every ``AUTH_PROBE_S`` and at once when a call carries a token. Entries are
  keyed by token anyway, and Auth mutations through the proxy flush every cache.
* Identical linearizable Ranges (same bytes and metadata) received before their shared upstream
  request starts use that one request (``forward``).

Shared state is mutated only from the hub's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from etcdproxy.core.cache import (
    NOT_APPLIED_CODES,
    Footprint,
    Interval,
    Invalidation,
    header_revision,
    invalidation_for,
    to_interval,
)
from etcdproxy.core.methods import Method, by_name
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import aio
from etcdproxy.h2.status import StatusCode
from etcdproxy.ipc import schema as s
from etcdproxy.upstream import interrupted

if TYPE_CHECKING:
    from etcdproxy.hub.host import WorkerHost, WorkerState

log = logging.getLogger(__name__)

WATCH_PATH = "/etcdserverpb.Watch/Watch"
ACK_TIMEOUT_S = 1.0
PROGRESS_EVERY_S = 1.0
STALL_S = 5.0
BACKOFF_S = (0.1, 5.0)
UNKNOWN = int(StatusCode.UNKNOWN)
CANCELLED = int(StatusCode.CANCELLED)
RANGE = by_name("etcdserverpb.KV", "Range")
PUT = by_name("etcdserverpb.KV", "Put")
# writes whose invalidation is intervals only (no flush, no compaction): skipped whole when nobody may cache
POINTWISE = frozenset(
    by_name(service, name).index
    for service, name in (
        ("etcdserverpb.KV", "Put"),
        ("etcdserverpb.KV", "DeleteRange"),
        ("etcdserverpb.KV", "Txn"),
        ("v3electionpb.Election", "Campaign"),
        ("v3electionpb.Election", "Proclaim"),
        ("v3electionpb.Election", "Resign"),
        ("v3lockpb.Lock", "Lock"),
        ("v3lockpb.Lock", "Unlock"),
    )
)
WHOLE_KEYSPACE = rpc_pb2.WatchRequest(
    create_request=rpc_pb2.WatchCreateRequest(key=b"\x00", range_end=b"\x00")
).SerializeToString()
AUTH_STATUS_PATH = "/etcdserverpb.Auth/AuthStatus"
AUTH_PROBE_S = 1.0
AUTH_CODES = (StatusCode.INVALID_ARGUMENT, StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED)
PROGRESS = rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()).SerializeToString()


def _range_of(request: bytes) -> tuple[Interval | None, bool]:
    """(the interval a worker may cache the answer under, or None: nothing; serializable) of a RangeRequest."""
    try:
        req = rpc_pb2.RangeRequest.FromString(request)
    except Exception:
        return None, True  # not ours to share or record; etcd will reject it
    # a fixed revision is an immutable snapshot: never invalidated by intervals (flush/compact reach everyone)
    return (to_interval(req.key, req.range_end) if req.revision == 0 else None), req.serializable


Answer = tuple[int, bytes | str]


class _Member:
    """One caller of a shared linearizable Range."""

    __slots__ = ("left", "on_answer")

    def __init__(self, on_answer: Callable[[Answer], None]) -> None:
        self.on_answer = on_answer
        self.left = False  # withdrawn by its caller: the answer is not wanted

    def answered(self, done: asyncio.Future[Answer]) -> None:
        if not self.left:
            self.on_answer(done.result())


@dataclass(slots=True)
class SharedRange:
    """One upstream linearizable Range for identical calls; ``task`` is None until it starts."""

    done: asyncio.Future[tuple[int, bytes | str]]
    timeouts: list[float | None]
    task: asyncio.Task[tuple[int, bytes | str]] | None = None


def footprint_limit(cache_max_entries: int) -> int:
    """Intervals the hub tracks per worker before it flushes that worker (it never sees LRU evictions)."""
    return max(4 * cache_max_entries, 1024)


def _ack_timeout(done: asyncio.Future[None]) -> None:
    if not done.done():
        log.warning("cache invalidation not acknowledged by every worker within %.1f s", ACK_TIMEOUT_S)
        done.set_result(None)


class CacheHub:
    def __init__(self, hub: WorkerHost) -> None:
        self.hub = hub
        self.enabled = False  # workers may serve hits: watching and auth known to be off
        self.revision = 0  # start revision of the current watch
        self._watching = 0  # start revision of the established invalidation watch; 0: none
        self._auth_on = True  # until the first probe says otherwise
        self._probe_now = asyncio.Event()
        self._ack_ids = itertools.count(1)
        self._waiting: dict[int, tuple[set[bytes], asyncio.Future[None]]] = {}  # ack id -> (workers, done)
        self._call: Any = None
        self._refusal = ""  # why etcd refused the last watch (logged once per reason)
        self.invalidations_sent = 0  # CacheInvalidate broadcasts (tests and logs)
        self._linear: dict[tuple[bytes, tuple[tuple[str, str], ...]], SharedRange] = {}
        self.linear_shared = 0  # linearizable Ranges answered by another call's upstream request
        # identity -> intervals the worker may cache entries for; no entry: unknown, it gets every invalidation
        # (until its CacheSync: it flushed, so from then on only Ranges the hub sees can fill it)
        self._footprints: dict[bytes, Footprint] = {}
        # identity -> ack ids of messages that drop entries there and are not acknowledged yet: until they are,
        # the worker may still serve what they drop, so it is not skipped (every such message asks for an ack)
        self._unconfirmed: dict[bytes, set[int]] = {}
        self._footprint_limit = footprint_limit(hub.config.cache_max_entries)
        self._in_flight = Footprint()  # Ranges forwarded and not yet answered (their worker is not known here)
        self._in_flight_by: dict[bytes, tuple[Interval, int]] = {}  # request bytes -> (interval, count)
        self.floor = 0  # newest revision any invalidation carried (sent or not)
        self.invalidations_skipped = 0  # worker messages not needed: nothing there the write touches
        self._settled: asyncio.Future[None] = hub.loop.create_future()  # after_call's "nothing to wait for"
        self._settled.set_result(None)
        hub.register(s.Kind.CACHE_SYNC, self._on_sync)
        hub.register(s.Kind.CACHE_ACK, self._on_ack)
        hub.worker_gone.append(self._on_worker_gone)
        hub.closers.append(self.close)
        self._task = hub.loop.create_task(self._watch_loop())
        self._prober = hub.loop.create_task(self._auth_probe_loop())

    # ---- worker messages -----------------------------------------------------------------

    def _on_sync(self, worker: WorkerState, message: s.CacheSync) -> None:
        # the worker flushed before sending this, and refuses fills of Ranges it sent earlier: start tracking
        self._footprints[worker.identity] = Footprint()
        self._unconfirmed[worker.identity] = set()  # it flushed everything those messages were to drop
        hub = self.hub
        hub.send(worker, s.CacheState(hub.epoch, hub.next_seq(worker), self.enabled, self._state_revision()))

    def _state_revision(self) -> int:
        # the floor too: a worker skipped by invalidations must still refuse older answers of a lagging member
        return max(self.revision, self.floor) if self.enabled else self.revision

    def _on_ack(self, worker: WorkerState, message: s.CacheAck) -> None:
        self._acked(message.ack_id, worker.identity)

    def _on_worker_gone(self, worker: WorkerState) -> None:
        self._footprints.pop(worker.identity, None)
        self._unconfirmed.pop(worker.identity, None)
        for ack_id in list(self._waiting):
            self._acked(ack_id, worker.identity)

    def _acked(self, ack_id: int, identity: bytes) -> None:
        unconfirmed = self._unconfirmed.get(identity)
        if unconfirmed:
            unconfirmed.discard(ack_id)
        waiting = self._waiting.get(ack_id)
        if waiting is not None:
            workers, done = waiting
            workers.discard(identity)
            if not workers and not done.done():
                done.set_result(None)

    # ---- writes through the proxy ----------------------------------------------------------

    def after_call(
        self, writer: WorkerState, method: Method, request: bytes, code: int, body: bytes | str
    ) -> Awaitable[None]:
        """Invalidate what a finished call may have changed; the awaitable ends once every worker applied it.

        A plain function: most calls have nothing to wait for and get an already-done future (no coroutine).
        """
        if method is RANGE:
            self._range_done(writer, request, code)
            return self._settled
        if code == 0 and method.name == "AuthEnable" and method.service == "etcdserverpb.Auth" and not self._auth_on:
            # auth enabled through us: stop hits now, before the reply leaves (the probe would take up to a second)
            log.info("etcd auth is on (AuthEnable through the proxy): range cache paused")
            self._auth_on = True
            self._update_state()
        if method.index in POINTWISE and (
            self._quiet() or (method is PUT and code not in NOT_APPLIED_CODES and not self._put_touches(request))
        ):
            # no worker may hold anything this write touches: no message, no ack (quiet: not even a decode)
            if code == 0 and isinstance(body, bytes):
                revision = header_revision(body)
                if revision > self.floor:
                    self.floor = revision
            return self._settled
        invalidation = invalidation_for(method.service, method.name, request, code)
        if invalidation is None:
            return self._settled
        revision = header_revision(body) if code == 0 and isinstance(body, bytes) else 0
        done = self.broadcast(invalidation, revision, writer)
        if done is None or done.done():
            return self._settled
        # one timer, no Task: wait_for(shield(...)) cost two Tasks and a timer per write
        timer = self.hub.loop.call_later(ACK_TIMEOUT_S, _ack_timeout, done)
        done.add_done_callback(lambda _: timer.cancel())
        return done  # a caller cancelled while waiting cancels it: the acks are then not waited for

    def _range_done(self, worker: WorkerState, request: bytes, code: int) -> None:
        """A forwarded Range ended: its interval moves from in flight to the worker's footprint (if answered)."""
        recorded = self._in_flight_by.get(request)
        if recorded is None:
            return
        interval = self._forget_in_flight(request, recorded)
        if code != 0:
            return  # nothing to fill
        footprint = self._footprints.get(worker.identity)
        if footprint is None:
            return  # not tracked: gets everything anyway
        footprint.add(interval)
        if len(footprint) > self._footprint_limit:
            # the hub never learns of the worker's LRU evictions: flush it now and then instead of tracking forever
            self._send_flush(worker, footprint)

    def _forget_in_flight(self, request: bytes, recorded: tuple[Interval, int]) -> Interval:
        interval, count = recorded
        if count > 1:
            self._in_flight_by[request] = (interval, count - 1)
        else:
            del self._in_flight_by[request]
        self._in_flight.remove(interval)
        return interval

    def _send_flush(self, worker: WorkerState, footprint: Footprint) -> None:
        self._send_dropping(worker, next(self._ack_ids), [], True, 0, 0)
        footprint.clear()

    def _send_dropping(
        self,
        worker: WorkerState,
        ack_id: int,
        intervals: list[tuple[bytes, bytes]],
        flush: bool,
        compact: int,
        rev: int,
    ) -> None:
        """A CacheInvalidate that asks for an ack; the worker is not skipped until it acknowledged it."""
        hub = self.hub
        hub.send(worker, s.CacheInvalidate(hub.epoch, hub.next_seq(worker), ack_id, intervals, flush, compact, rev))
        unconfirmed = self._unconfirmed.get(worker.identity)
        if unconfirmed is not None:
            unconfirmed.add(ack_id)

    def after_cancel(self, method: Method, request: bytes) -> None:
        """The client gave up on a call that may still have been applied: invalidate, no waiting."""
        invalidation = invalidation_for(method.service, method.name, request, UNKNOWN)
        if invalidation is not None:
            self.broadcast(invalidation, 0, None)

    def broadcast(
        self, invalidation: Invalidation, revision: int, writer: WorkerState | None
    ) -> asyncio.Future[None] | None:
        """Send ``invalidation`` to every worker that may hold something it touches; a future of the acks of
        all of them but ``writer`` (None: none due)."""
        hub = self.hub
        if revision > self.floor:
            self.floor = revision
        wire_intervals = invalidation.intervals
        # a compaction or a flush reaches everyone (snapshots at fixed revisions are not in footprints)
        everyone = invalidation.flush or bool(invalidation.compact_revision)
        intervals = [to_interval(key, range_end) for key, range_end in wire_intervals]
        if not everyone:
            everyone = self._in_flight.touches_any(intervals)
        targets: list[WorkerState] = []
        unconfirmed = self._unconfirmed
        for identity, worker in hub.workers.items():
            footprint = self._footprints.get(identity)
            if everyone or footprint is None or unconfirmed.get(identity) or footprint.touches_any(intervals):
                targets.append(worker)
            else:
                self.invalidations_skipped += 1
        if not targets:
            return None
        # every target acks (the writer's own worker too: its ack confirms the drop for later writes), the
        # writer waits for all but its own worker (which gets this before the reply, on the same link)
        ack_id = next(self._ack_ids)
        others = {worker.identity for worker in targets if worker is not writer} if writer is not None else set()
        message_intervals = list(wire_intervals)
        for worker in targets:
            self._send_dropping(
                worker,
                ack_id,
                message_intervals,
                invalidation.flush,
                invalidation.compact_revision,
                revision,
            )
            footprint = self._footprints.get(worker.identity)
            if footprint is not None:
                if invalidation.flush:
                    footprint.clear()
                else:
                    for interval in intervals:
                        footprint.drop(interval)
        self.invalidations_sent += 1
        if not others:
            return None
        done: asyncio.Future[None] = hub.loop.create_future()
        self._waiting[ack_id] = (others, done)
        done.add_done_callback(lambda _: self._waiting.pop(ack_id, None))
        return done

    def _put_touches(self, request: bytes) -> bool:
        try:
            key: bytes = rpc_pb2.PutRequest.FromString(request).key
        except Exception:
            return True  # the general path decides (it flushes on undecodable writes)
        return self._any_touches([key])

    def _any_touches(self, keys: list[bytes]) -> bool:
        """May some worker hold one of these keys (the watch's events; most touch nothing cached)?"""
        in_flight = self._in_flight
        footprints = self._footprints
        unconfirmed = self._unconfirmed
        for identity in self.hub.workers:
            footprint = footprints.get(identity)
            if footprint is None or unconfirmed.get(identity):
                return True
            for key in keys:
                if footprint.touches_key(key):
                    return True
        return any(in_flight.touches_key(key) for key in keys)

    def _quiet(self) -> bool:
        """No worker may cache anything: every one tracked with an empty footprint, no Range in flight."""
        if not self._in_flight.empty:
            return False
        footprints = self._footprints
        unconfirmed = self._unconfirmed
        for identity in self.hub.workers:
            footprint = footprints.get(identity)
            if footprint is None or not footprint.empty or unconfirmed.get(identity):
                return False
        return True

    # ---- identical linearizable Ranges -------------------------------------------------------

    def note_metadata(self, metadata: s.Metadata) -> None:
        """Every forwarded call's metadata passes here first."""
        if not self._auth_on and any(key == "token" for key, _ in metadata):
            self._probe_now.set()  # a client with a token: auth may have been enabled elsewhere

    def forward(self, method: Method, message: s.Unary) -> Awaitable[Answer]:
        """Forward a unary call (a Range: recorded while in flight); no coroutine of its own for the others."""
        self.note_metadata(message.metadata)
        if method is not RANGE:
            return self.hub.forwarder.unary(method, message.payload, message.metadata, message.timeout_s)
        return self._forward_range(method, message)

    async def _forward_range(self, method: Method, message: s.Unary) -> Answer:
        """A Range through the general path (a Task): serializable ones are forwarded as they are, linearizable
        ones share an upstream request (join_linear)."""
        payload = message.payload
        interval, serializable = _range_of(payload)
        if not serializable:
            answer: asyncio.Future[Answer] = self.hub.loop.create_future()
            leave = self._join_linear(message, interval, answer.set_result)
            try:
                return await answer
            except BaseException:
                leave()
                raise
        self._enter_in_flight(payload, interval)
        try:
            return await self.hub.forwarder.unary(method, payload, message.metadata, message.timeout_s)
        except BaseException:
            self._leave_in_flight(payload, interval)
            raise

    def join_linear(self, message: s.Unary, on_answer: Callable[[Answer], None]) -> Callable[[], None] | None:
        """A linearizable Range without a Task of its own: ``on_answer`` gets the shared request's answer. Returns
        the function that withdraws the call (its client gave up), or None for a serializable Range."""
        interval, serializable = _range_of(message.payload)
        if serializable:
            return None
        self.note_metadata(message.metadata)
        return self._join_linear(message, interval, on_answer)

    def _join_linear(
        self, message: s.Unary, interval: Interval | None, on_answer: Callable[[Answer], None]
    ) -> Callable[[], None]:
        """Identical linearizable Ranges share one upstream request.

        Joining is allowed only until the shared request starts, and it starts only after the loop
        turned once (call_soon: every call already received joins first): so the request etcd serves
        was sent after each caller's request arrived, and every answer is linearizable.
        """
        payload = message.payload
        self._enter_in_flight(payload, interval)  # until after_call moves it to the worker's footprint
        key = (payload, tuple(message.metadata))
        shared = self._linear.get(key)
        if shared is not None and shared.task is None:
            shared.timeouts.append(message.timeout_s)
            self.linear_shared += 1
        else:
            shared = self._linear[key] = SharedRange(self.hub.loop.create_future(), [message.timeout_s])
            self.hub.loop.call_soon(self._start_shared, key, shared)
        member = _Member(on_answer)
        shared.done.add_done_callback(member.answered)

        def leave() -> None:
            """The caller gave up before it used an answer (possibly after the answer came)."""
            if member.left:
                return
            member.left = True  # a callback already scheduled still runs: it checks this
            shared.done.remove_done_callback(member.answered)
            self._leave_in_flight(payload, interval)

        return leave

    def _start_shared(self, key: tuple[bytes, tuple[tuple[str, str], ...]], shared: SharedRange) -> None:
        payload, metadata = key
        timeout = None if None in shared.timeouts else max(t for t in shared.timeouts if t is not None)
        shared.task = self.hub.loop.create_task(self.hub.forwarder.unary(RANGE, payload, list(metadata), timeout))
        shared.task.add_done_callback(functools.partial(self._shared_done, key, shared))

    def _enter_in_flight(self, payload: bytes, interval: Interval | None) -> None:
        # in flight until after_call moves it to the worker's footprint: an invalidation meanwhile goes to all
        if interval is not None:
            recorded = self._in_flight_by.get(payload)
            self._in_flight_by[payload] = (interval, 1) if recorded is None else (interval, recorded[1] + 1)
            self._in_flight.add(interval)

    def _leave_in_flight(self, payload: bytes, interval: Interval | None) -> None:
        recorded = self._in_flight_by.get(payload) if interval is not None else None
        if recorded is not None:
            self._forget_in_flight(payload, recorded)

    def _shared_done(
        self, key: tuple[bytes, tuple[tuple[str, str], ...]], shared: SharedRange, task: asyncio.Task[Answer]
    ) -> None:
        if self._linear.get(key) is shared:
            del self._linear[key]
        if task.cancelled():
            shared.done.set_result((CANCELLED, "context canceled"))
        elif task.exception() is not None:
            shared.done.set_result((UNKNOWN, f"etcdproxy: {task.exception()}"))
        else:
            shared.done.set_result(task.result())

    # ---- writes made elsewhere: the invalidation watch ---------------------------------------

    def _update_state(self) -> None:
        self._set_state(bool(self._watching) and not self._auth_on, self._watching)

    def _set_state(self, enabled: bool, revision: int) -> None:
        if enabled == self.enabled and revision == self.revision:
            return
        self.enabled, self.revision = enabled, revision
        log.info("range cache %s", f"serving (watch from revision {revision})" if enabled else "paused (no watch)")
        hub = self.hub
        state_revision = self._state_revision()
        ack_id = next(self._ack_ids)
        for worker in list(hub.workers.values()):
            hub.send(worker, s.CacheState(hub.epoch, hub.next_seq(worker), enabled, state_revision))
            # every worker flushes on CacheState: its footprint empties, confirmed by the ack of an empty invalidation
            self._send_dropping(worker, ack_id, [], False, 0, 0)
        for footprint in self._footprints.values():
            footprint.clear()

    async def _watch_loop(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            try:
                if await self._watch_once():
                    backoff = BACKOFF_S[0]
            except aio.RpcError as exc:
                # a failover closes the channel under the watch: expected, and upstream.py logs the move itself
                level = logging.DEBUG if exc.details() == aio.CLOSED[1] else logging.WARNING
                log.log(level, "cache invalidation watch failed (%s: %s)", exc.code().name, exc.details())
            except asyncio.CancelledError:
                if not interrupted():
                    raise
                log.info("cache invalidation watch: endpoint failover; re-opening")
            except Exception:  # a bug must not leave the cache serving without invalidations
                log.exception("cache invalidation watch: unexpected error")
            finally:
                self._watching = 0
                self._update_state()
                if self._call is not None:
                    self._call.cancel()
                    self._call = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])

    async def _watch_once(self) -> bool:
        """Run one upstream watch until it ends; True if it was established."""
        loop = self.hub.loop
        call = self._call = self.hub.channel.stream_stream(WATCH_PATH)(wait_for_ready=True)
        await call.write(WHOLE_KEYSPACE)
        data = await call.read()
        if data is aio.EOF:
            return False
        created = rpc_pb2.WatchResponse.FromString(data)
        if not created.created or created.canceled:
            reason = created.cancel_reason or "not created"
            # e.g. etcd auth is on and the proxy has no credentials: retried every BACKOFF_S[1]
            (log.warning if reason != self._refusal else log.debug)("cache invalidation watch refused: %s", reason)
            self._refusal = reason
            return False
        self._refusal = ""
        self._watching = max(created.header.revision, 1)
        self._update_state()
        last_heard = loop.time()

        async def keep_alive() -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY_S)
                if loop.time() - last_heard > STALL_S:
                    log.warning("cache invalidation watch silent for %.0f s; re-opening", STALL_S)
                    call.cancel()
                    return
                await call.write(PROGRESS)

        pinger = loop.create_task(keep_alive())
        try:
            while True:
                data = await call.read()
                if data is aio.EOF:
                    return True
                last_heard = loop.time()
                response = rpc_pb2.WatchResponse.FromString(data)
                if response.canceled:
                    log.warning("cache invalidation watch cancelled by etcd: %s", response.cancel_reason)
                    return True
                if response.header.revision > self.floor:
                    self.floor = response.header.revision
                if response.events and not self._quiet():
                    keys = list(dict.fromkeys(event.kv.key for event in response.events))
                    if self._any_touches(keys):
                        self.broadcast(Invalidation(tuple((key, b"") for key in keys)), response.header.revision, None)
        except asyncio.CancelledError:
            if pinger.done():  # cancelled by keep_alive (stall), not by the hub stopping
                return True
            raise  # the hub stopping, or a failover (_watch_loop tells them apart)
        finally:
            pinger.cancel()

    # ---- etcd auth: no hits while it is on ------------------------------------------------------

    async def _auth_probe_loop(self) -> None:
        """AuthStatus without a token every AUTH_PROBE_S (and at once when a call carries a token).

        etcd answers it only while auth is off. With auth on the proxy has no credentials of its own,
        so its watch could miss nothing but etcd would also not tell it about permission changes made
        elsewhere; an anonymous watch opened earlier even survives AuthEnable. So the cache serves
        only while auth is off: enabling auth anywhere stops hits within AUTH_PROBE_S.
        """
        while True:
            call = self.hub.channel.unary_unary(AUTH_STATUS_PATH)  # the channel changes on failover
            try:
                await call(b"", timeout=AUTH_PROBE_S)
                auth_on = False
            except aio.RpcError as exc:
                auth_on = exc.code() in AUTH_CODES or self._auth_on  # other failures: unknown, keep
            except asyncio.CancelledError:
                if not interrupted():
                    raise
                auth_on = self._auth_on
            if auth_on != self._auth_on:
                log.info(
                    "etcd auth is %s: range cache %s", "on" if auth_on else "off", "paused" if auth_on else "allowed"
                )
                self._auth_on = auth_on
                self._update_state()
            self._probe_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), AUTH_PROBE_S)

    async def close(self) -> None:
        self._prober.cancel()
        self._task.cancel()
        if self._call is not None:
            self._call.cancel()
