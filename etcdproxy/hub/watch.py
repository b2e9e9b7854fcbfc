"""The watch hub: c-watchers of every worker coalesced onto shared upstream watches.

Structure (all mutated only from the hub's event loop):
* ``UpstreamStream``: one upstream Watch stream per (token, require-leader) pair, so etcd
  checks every watch with the token of the clients sharing it and ends require-leader
  streams on leader loss. Create requests carry our own watch id (= the s-watcher id);
  their answers come back in request order, which is how rejections (watch_id -1) are matched.
* ``Broadcast`` (core/broadcast.py): one s-watcher per exact range, revision frontier and a
  bounded history so late joiners with older start revisions can join.
* Each upstream response is decoded once and sent once per interested worker, with every
  event serialized with and without prev_kv, so workers never decode or re-encode events.

When an upstream stream breaks, it is re-opened and every s-watcher re-created from its
frontier + 1 (no gap, no duplicate, no second created response). A "from now" c-watcher that
arrives while a live s-watcher exists learns the current revision from a count-only Range
sent after it arrived (like etcd, which starts it at the member's current revision).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from etcdproxy import metrics
from etcdproxy.core.broadcast import (
    STALL_S,
    Broadcast,
    HistoryBudget,
    ProgressGate,
    restart_catch_up,
    stream_progress,
    unsettled_bound,
)
from etcdproxy.core.methods import by_name
from etcdproxy.etcdpb import kv_pb2, rpc_pb2
from etcdproxy.h2 import aio
from etcdproxy.h2.status import StatusCode
from etcdproxy.ipc import schema as s
from etcdproxy.upstream import interrupted

if TYPE_CHECKING:
    from etcdproxy.hub.host import WorkerHost, WorkerState

log = logging.getLogger(__name__)

WATCH_PATH = "/etcdserverpb.Watch/Watch"
RANGE = by_name("etcdserverpb.KV", "Range")
DELETE = kv_pb2.Event.DELETE
NO_LEADER = "etcdserver: no leader"
# How often the hub asks etcd for progress on each upstream stream, so that frontiers of
# quiet ranges advance (a restarted hub re-creates watches from there).
PROGRESS_INTERVAL_S = 30.0
# while clients' progress answers are parked (core/broadcast.py ProgressGate), ask etcd again this often
PROGRESS_RECHECK_S = 0.25
# the loop notes it ran this often; a progress answer handled long after the last note comes out of a stall (STALL_S)
STALL_TICK_S = 0.1
REOPEN_BACKOFF_S = (0.05, 2.0)

Group = tuple[str, bool]  # (auth token, require leader)
Receiver = tuple[bytes, int]  # (worker identity, wid)


def group_of(metadata: s.Metadata) -> Group:
    values = dict(metadata)
    return values.get("token", ""), values.get("hasleader", "") == "true"


def wire_events(events: Any) -> list[s.WireEvent]:
    out: list[s.WireEvent] = []
    for event in events:
        with_prev = event.SerializeToString()
        if event.HasField("prev_kv"):
            event.ClearField("prev_kv")
            without = event.SerializeToString()
        else:
            without = with_prev
        out.append((event.kv.mod_revision, event.type == DELETE, with_prev, without))
    return out


@dataclass(slots=True)
class Probe:
    """A count-only Range telling the current revision to "from now" joiners."""

    waiting: list[tuple[WorkerState, s.WatchCreate]] = field(default_factory=list)
    running: bool = False


class UpstreamStream:
    def __init__(self, watch_hub: WatchHub, group: Group) -> None:
        self.watch_hub = watch_hub
        self.group = group
        metadata: list[tuple[str, str]] = []
        if group[0]:
            metadata.append(("token", group[0]))
        if group[1]:
            metadata.append(("hasleader", "true"))
        self.metadata = tuple(metadata)
        self.broadcasts: dict[int, Broadcast] = {}
        self.creates: deque[int] = deque()  # sw ids whose create answer is awaited, in order
        # the upstream's watch id when it is not the sw id we asked for (a Go grpc-proxy as "etcd" ignores the
        # requested id and numbers its own): upstream id -> sw id, and back for cancels; per stream opening
        self.from_upstream: dict[int, int] = {}
        self.to_upstream: dict[int, int] = {}
        self.progress_waiters: deque[tuple[WorkerState, int] | None] = deque()
        self.gate: ProgressGate[tuple[WorkerState, int]] = ProgressGate()
        self.recheck: asyncio.TimerHandle | None = None
        self.newest_event = 0  # revision of the newest event received on this stream
        self.fragments: dict[int, list[Any]] = {}
        self.last_header = b""
        self.call: Any = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        # requests for the current call, written by one writer task (grpc allows one write
        # in flight); a create is marked sent only when it is really written
        self.outbox: deque[tuple[bytes, Broadcast | None]] = deque()
        self.wake = asyncio.Event()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _write(self, request: rpc_pb2.WatchRequest, broadcast: Broadcast | None = None) -> None:
        self.outbox.append((request.SerializeToString(), broadcast))
        self.wake.set()

    async def _writer(self, call: Any) -> None:
        try:
            while True:
                while self.outbox:
                    data, broadcast = self.outbox.popleft()
                    if broadcast is not None:
                        broadcast.sent = True
                    await call.write(data)
                self.wake.clear()
                await self.wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the reader sees the failure and re-opens the stream
            log.debug("watch write failed: %s", exc)

    def create(self, broadcast: Broadcast, start_revision: int) -> None:
        self.creates.append(broadcast.sw_id)
        create = rpc_pb2.WatchCreateRequest(
            key=broadcast.key,
            range_end=broadcast.range_end,
            start_revision=start_revision,
            progress_notify=True,
            prev_kv=True,
            watch_id=broadcast.sw_id,
            fragment=True,
        )
        self._write(rpc_pb2.WatchRequest(create_request=create), broadcast)

    def cancel(self, sw_id: int) -> None:
        self.broadcasts.pop(sw_id, None)
        upstream_id = self.to_upstream.pop(sw_id, sw_id)
        self.from_upstream.pop(upstream_id, None)
        self._write(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=upstream_id)))

    def request_progress(self, waiter: tuple[WorkerState, int] | None) -> None:
        self.progress_waiters.append(waiter)
        self._write(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))

    async def _run(self) -> None:
        backoff = REOPEN_BACKOFF_S[0]
        while not self.closed:
            channel = self.watch_hub.hub.channel  # read at each (re)open: it changes on failover
            self.call = channel.stream_stream(WATCH_PATH)(metadata=self.metadata, wait_for_ready=True)
            # (Re-)create every s-watcher from where it stands: no gap, no duplicate.
            self.outbox.clear()
            self.creates.clear()
            self.from_upstream.clear()
            self.to_upstream.clear()
            self.fragments.clear()
            waiters = list(self.progress_waiters)
            self.progress_waiters.clear()
            for broadcast in list(self.broadcasts.values()):
                self.create(broadcast, broadcast.resume_revision() or broadcast.start_revision)
            for waiter in waiters:
                self.request_progress(waiter)
            writer = asyncio.get_running_loop().create_task(self._writer(self.call))
            code, details = StatusCode.OK, ""
            try:
                while True:
                    data = await self.call.read()
                    if data is aio.EOF:
                        break
                    backoff = REOPEN_BACKOFF_S[0]
                    self._on_response(rpc_pb2.WatchResponse.FromString(data))
                code, details = await self.call.code(), await self.call.details()
            except aio.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except asyncio.CancelledError:
                if not interrupted():
                    self.call.cancel()
                    raise
                code, details = StatusCode.CANCELLED, "endpoint failover"  # channel closed under us
            finally:
                writer.cancel()
            if self.closed:
                return
            log.warning("upstream watch stream ended (%s %s); re-opening", code.name, details)
            if details == NO_LEADER or code in (StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED):
                # etcd refuses this group (leader lost on a require-leader stream, or the
                # token is no longer valid): its c-watchers end with etcd's own reason.
                self.watch_hub.fail_group(self, details or code.name)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, REOPEN_BACKOFF_S[1])

    def _on_response(self, response: rpc_pb2.WatchResponse) -> None:
        header = response.header.SerializeToString()
        self.last_header = header
        if response.created:
            sw_id = self.creates.popleft() if self.creates else response.watch_id
            if response.watch_id != sw_id and not response.canceled:
                self.from_upstream[response.watch_id] = sw_id
                self.to_upstream[sw_id] = response.watch_id
            self.watch_hub.on_created(self, sw_id, response, header)
            return
        sw_id = self.from_upstream.get(response.watch_id, response.watch_id)
        if sw_id == -1 and not response.events and not response.canceled:
            waiter = self.progress_waiters.popleft() if self.progress_waiters else None
            self.watch_hub.on_stream_progress(self, response.header.revision, header, waiter)
            return
        broadcast = self.broadcasts.get(sw_id)
        if broadcast is None:
            return  # cancelled by us meanwhile
        if response.canceled:
            self.broadcasts.pop(sw_id, None)
            self.watch_hub.on_canceled(broadcast, header, response.compact_revision, response.cancel_reason)
            return
        if response.fragment:
            self.fragments.setdefault(sw_id, []).extend(response.events)
            return
        events = list(response.events)
        if sw_id in self.fragments:
            events = self.fragments.pop(sw_id) + events
        if events:
            last = events[-1].kv.mod_revision
            if last > self.newest_event:
                self.newest_event = last
            self.watch_hub.on_events(broadcast, header, wire_events(events))
        else:
            self.watch_hub.on_progress(broadcast, response.header.revision, header, requested=False)

    def recheck_later(self) -> None:
        """Ask etcd for progress again soon (clients' answers are parked until the stream settles)."""
        if self.recheck is None and not self.closed:
            self.recheck = asyncio.get_running_loop().call_later(PROGRESS_RECHECK_S, self._recheck)

    def _recheck(self) -> None:
        self.recheck = None
        if not self.closed:
            self.request_progress(None)

    def close(self) -> None:
        self.closed = True
        if self.recheck is not None:
            self.recheck.cancel()
        if self.call is not None:
            self.call.cancel()
        if self.task is not None:
            self.task.cancel()


def with_revision(header: bytes, revision: int) -> bytes:
    """A serialized ResponseHeader with another revision (cluster id, member id and raft term kept)."""
    parsed = rpc_pb2.ResponseHeader.FromString(header)
    parsed.revision = revision
    return parsed.SerializeToString()  # type: ignore[no-any-return]


class WatchHub:
    def __init__(self, hub: WorkerHost) -> None:
        self.hub = hub
        self.streams: dict[Group, UpstreamStream] = {}
        self.broadcasts: dict[int, Broadcast] = {}
        self.stream_of: dict[int, UpstreamStream] = {}
        self.by_range: dict[tuple[Group, bytes, bytes], list[Broadcast]] = {}
        self.receiver_of: dict[Receiver, int] = {}  # c-watcher -> sw id
        self.probes: dict[Group, Probe] = {}
        self.workers: dict[bytes, WorkerState] = {}
        # highest compaction revision seen (Compact through this proxy, or a watch cancelled
        # for compaction): a start below it is not served from history but sent to etcd,
        # which refuses it exactly as it would directly
        self.compact_revision = 0
        self.history = HistoryBudget()
        self.history_bytes = 0  # all broadcasts' history, kept by on_events/_remove_broadcast
        self._ids = itertools.count(1)
        self._progress_task = hub.loop.create_task(self._progress_loop())
        self.last_tick = time.monotonic()
        self._tick_handle = hub.loop.call_later(STALL_TICK_S, self._tick)
        hub.register(s.Kind.WATCH_CREATE, self.on_watch_create)
        hub.register(s.Kind.WATCH_CANCEL, self.on_watch_cancel)
        hub.register(s.Kind.WATCH_PROGRESS_REQUEST, self.on_progress_request)
        hub.worker_gone.append(self.on_worker_gone)
        hub.closers.append(self.close)

    # ---- counts (metrics) ----------------------------------------------------------------

    @property
    def c_watchers(self) -> int:
        return sum(len(b.receivers) + len(b.waiting) for b in self.broadcasts.values())

    @property
    def s_watchers(self) -> int:
        return len(self.broadcasts)

    # ---- helpers -------------------------------------------------------------------------

    def _stream(self, group: Group) -> UpstreamStream:
        stream = self.streams.get(group)
        if stream is None:
            stream = self.streams[group] = UpstreamStream(self, group)
            stream.start()
        return stream

    def _send(self, identity: bytes, build: Any) -> None:
        worker = self.workers.get(identity) or self.hub.workers.get(identity)
        if worker is not None:
            self.hub.send(worker, build(self.hub.epoch, self.hub.next_seq(worker)))

    def _new_broadcast(self, group: Group, create: s.WatchCreate, start_revision: int) -> Broadcast:
        broadcast = Broadcast(next(self._ids), create.key, create.range_end, start_revision)
        stream = self._stream(group)
        self.broadcasts[broadcast.sw_id] = broadcast
        self.stream_of[broadcast.sw_id] = stream
        stream.broadcasts[broadcast.sw_id] = broadcast
        self.by_range.setdefault((group, create.key, create.range_end), []).append(broadcast)
        stream.create(broadcast, start_revision)
        return broadcast

    def _remove_broadcast(self, broadcast: Broadcast) -> None:
        if not broadcast.dead:
            self.history_bytes -= broadcast.history_bytes
        broadcast.dead = True
        self.broadcasts.pop(broadcast.sw_id, None)
        stream = self.stream_of.pop(broadcast.sw_id, None)
        if stream is not None:
            group = stream.group
            siblings = self.by_range.get((group, broadcast.key, broadcast.range_end), [])
            if broadcast in siblings:
                siblings.remove(broadcast)
                if not siblings:
                    del self.by_range[(group, broadcast.key, broadcast.range_end)]
        for receiver in list(broadcast.receivers) + broadcast.waiting:
            self.receiver_of.pop(receiver, None)

    def _admit(
        self, worker: WorkerState, create: s.WatchCreate, broadcast: Broadcast, start: int, header: bytes
    ) -> None:
        """Join a c-watcher starting at ``start`` (0: where etcd starts ``broadcast``)."""
        receiver = (worker.identity, create.wid)
        self.receiver_of[receiver] = broadcast.sw_id
        broadcast.add_receiver(receiver, start)
        if not broadcast.live:
            broadcast.waiting.append(receiver)
            if header:
                broadcast.join_headers[receiver] = header
            return
        self._confirm(worker.identity, create.wid, broadcast, start, header)

    def _confirm(self, identity: bytes, wid: int, broadcast: Broadcast, start: int, header: bytes) -> None:
        """Tell the worker its c-watcher is created, then replay history it has not seen."""
        sw_id = broadcast.sw_id
        self._send(identity, lambda e, q: s.WatchCreated(e, q, wid, sw_id, start, header))
        if broadcast.frontier is not None and start <= broadcast.frontier:
            replay = broadcast.replay_from(start)
            if replay:
                self._send(identity, lambda e, q: s.WatchReplay(e, q, wid, header, replay))

    def note_compaction(self, revision: int) -> None:
        self.compact_revision = max(self.compact_revision, revision)

    def _joinable(self, broadcast: Broadcast, start: int) -> bool:
        return start >= self.compact_revision and broadcast.can_join(start)

    # ---- worker requests -----------------------------------------------------------------

    def on_watch_create(self, worker: WorkerState, create: s.WatchCreate) -> None:
        self.workers[worker.identity] = worker
        group = group_of(create.metadata)
        siblings = self.by_range.get((group, create.key, create.range_end), [])
        start = create.start_revision
        if start > 0:
            for broadcast in siblings:
                if self._joinable(broadcast, start):
                    self._admit(worker, create, broadcast, start, self.streams[group].last_header)
                    return
            self._admit(worker, create, self._new_broadcast(group, create, start), start, b"")
            return
        if start < 0:  # let etcd answer it exactly as it would directly
            self._admit(worker, create, self._new_broadcast(group, create, start), start, b"")
            return
        for broadcast in siblings:
            if broadcast.can_join_now():
                self._admit(worker, create, broadcast, 0, b"")
                return
        if any(not b.dead for b in siblings):
            probe = self.probes.setdefault(group, Probe())
            probe.waiting.append((worker, create))
            if not probe.running:
                probe.running = True
                self.hub.loop.create_task(self._run_probe(group, probe))
            return
        self._admit(worker, create, self._new_broadcast(group, create, 0), 0, b"")

    async def _run_probe(self, group: Group, probe: Probe) -> None:
        """Serve "from now" joiners; each batch uses a Range sent after all of them arrived."""
        try:
            while probe.waiting:
                batch, probe.waiting = probe.waiting, []
                create = batch[0][1]
                request = rpc_pb2.RangeRequest(
                    key=create.key, range_end=create.range_end, count_only=True, serializable=True, limit=1
                )
                metadata = [(k, v) for k, v in create.metadata if k in ("token", "hasleader")]
                code, body = await self.hub.forwarder.unary(RANGE, request.SerializeToString(), metadata, 10.0)
                for worker, waiting_create in batch:
                    if worker.identity not in self.hub.workers:
                        continue
                    if code != 0:
                        # refused (a dead token, no permission, no leader): etcd words a refused
                        # watch differently from a refused Range, so let it answer this create itself
                        self._admit(worker, waiting_create, self._new_broadcast(group, waiting_create, 0), 0, b"")
                        continue
                    header_msg = rpc_pb2.RangeResponse.FromString(body).header  # type: ignore[arg-type]
                    self._join_at(
                        worker, waiting_create, group, header_msg.revision + 1, header_msg.SerializeToString()
                    )
        finally:
            probe.running = False

    def _join_at(
        self, worker: WorkerState, create: s.WatchCreate, group: Group, start: int, header: bytes, wait: bool = True
    ) -> None:
        siblings = self.by_range.get((group, create.key, create.range_end), [])
        for broadcast in siblings:
            if self._joinable(broadcast, start):
                self._admit(worker, create, broadcast, start, header)
                return
        for broadcast in siblings if wait else ():
            if broadcast.can_wait_for(start):
                self._admit(worker, create, broadcast, start, header)
                return
        broadcast = self._new_broadcast(group, create, start)
        self._admit(worker, create, broadcast, start, header)

    def on_watch_cancel(self, worker: WorkerState, cancel: s.WatchCancel) -> None:
        receiver = (worker.identity, cancel.wid)
        sw_id = self.receiver_of.pop(receiver, None)
        if sw_id is None:
            probe_lists = [p.waiting for p in self.probes.values()]
            for waiting in probe_lists:
                waiting[:] = [(w, c) for w, c in waiting if (w.identity, c.wid) != receiver]
            return
        broadcast = self.broadcasts.get(sw_id)
        if broadcast is None:
            return
        broadcast.remove_receiver(receiver)
        if receiver in broadcast.waiting:
            broadcast.waiting.remove(receiver)
        if not broadcast.receivers and not broadcast.waiting:
            stream = self.stream_of.get(sw_id)
            self._remove_broadcast(broadcast)
            if stream is not None:
                stream.cancel(sw_id)

    def on_progress_request(self, worker: WorkerState, request: s.WatchProgressRequest) -> None:
        self.workers[worker.identity] = worker
        self._stream(group_of(request.metadata)).request_progress((worker, request.req_id))

    def on_worker_gone(self, worker: WorkerState) -> None:
        self.workers.pop(worker.identity, None)
        for receiver in [r for r in self.receiver_of if r[0] == worker.identity]:
            self.on_watch_cancel(worker, s.WatchCancel(self.hub.epoch, receiver[1]))
        for probe in self.probes.values():
            probe.waiting = [(w, c) for w, c in probe.waiting if w.identity != worker.identity]

    # ---- upstream responses --------------------------------------------------------------

    def on_created(self, stream: UpstreamStream, sw_id: int, response: rpc_pb2.WatchResponse, header: bytes) -> None:
        broadcast = stream.broadcasts.get(sw_id)
        if broadcast is None:
            if response.watch_id == sw_id and not response.canceled:
                stream.cancel(sw_id)  # nobody wants it any more
            return
        if response.canceled:  # rejected by etcd: every waiting c-watcher gets etcd's answer
            stream.broadcasts.pop(sw_id, None)
            waiting = list(broadcast.waiting)
            self._remove_broadcast(broadcast)
            for identity, wid in waiting:
                self._send(
                    identity,
                    lambda e, q, w=wid: s.WatchCanceled(
                        e, q, w, sw_id, header, response.compact_revision, response.cancel_reason, True
                    ),
                )
            for identity, wid in broadcast.receivers:
                if (identity, wid) not in waiting:
                    self._send(
                        identity,
                        lambda e, q, w=wid: s.WatchCanceled(
                            e, q, w, sw_id, header, response.compact_revision, response.cancel_reason, False
                        ),
                    )
            return
        broadcast.on_created(response.header.revision, time.monotonic())
        waiting, broadcast.waiting = broadcast.waiting, []
        join_headers, broadcast.join_headers = broadcast.join_headers, {}
        floor = broadcast.floor or 0
        for receiver in waiting:
            identity, wid = receiver
            start = broadcast.receivers.get(receiver, 0)
            # "from now"; a negative start has its own s-watcher: etcd 3.5 starts it from now too,
            # or (if the store was ever compacted) cancels it next as compacted, relayed as is
            if start <= 0:
                start = floor
            elif start < floor:
                # it waited for this create but etcd started the watch later than it needs
                broadcast.remove_receiver(receiver)
                self._rehome(stream.group, broadcast, receiver, start, join_headers.get(receiver, header))
                continue
            broadcast.add_receiver(receiver, start)
            self._confirm(identity, wid, broadcast, start, join_headers.get(receiver, header))
        if not broadcast.receivers:
            self._remove_broadcast(broadcast)
            stream.cancel(sw_id)

    def _rehome(self, group: Group, old: Broadcast, receiver: Receiver, start: int, header: bytes) -> None:
        identity, wid = receiver
        worker = self.workers.get(identity) or self.hub.workers.get(identity)
        if worker is None:
            self.receiver_of.pop(receiver, None)
            return
        create = s.WatchCreate(self.hub.epoch, wid, old.key, old.range_end, start, [], False)
        self._join_at(worker, create, group, start, header, wait=False)  # never wait twice

    def on_events(self, broadcast: Broadcast, header: bytes, events: list[s.WireEvent]) -> None:
        before = broadcast.history_bytes
        batch = broadcast.on_events(events, time.monotonic())
        self.history_bytes += broadcast.history_bytes - before
        self.history_bytes = self.history.record(broadcast, batch, self.history_bytes)
        self._fan_out(broadcast, header, events, False)

    def on_progress(self, broadcast: Broadcast, revision: int, header: bytes, requested: bool) -> None:
        broadcast.on_progress(revision)
        self._fan_out(broadcast, header, [], requested)

    def _fan_out(self, broadcast: Broadcast, header: bytes, events: list[s.WireEvent], progress_only: bool) -> None:
        sw_id = broadcast.sw_id
        # Go: += receivers - 1 per upstream response of the watcher (not our stream-wide progress fan-out)
        if len(broadcast.receivers) > 1 and not progress_only:
            metrics.EVENTS_COALESCING.inc(len(broadcast.receivers) - 1)
        for identity in broadcast.workers():
            self._send(identity, lambda e, q: s.WatchEvents(e, q, sw_id, header, events, progress_only))

    def on_stream_progress(
        self, stream: UpstreamStream, revision: int, header: bytes, waiter: tuple[WorkerState, int] | None
    ) -> None:
        now = time.monotonic()
        if now - self.last_tick > STALL_S:
            # the tick is overdue: the loop stalled, and catch-up events etcd sent meanwhile may still be unread
            self.last_tick = now
            held = sum(restart_catch_up(list(st.broadcasts.values()), now) for st in self.streams.values())
            if held:
                log.info("watch hub: the event loop stalled; progress answers of %d watches wait for events", held)
        broadcasts = list(stream.broadcasts.values())
        moved, settled = stream_progress(broadcasts, set(stream.creates), revision, now)
        for broadcast in moved:
            self.on_progress(broadcast, revision, header, requested=True)
        bound = None if settled else unsettled_bound(broadcasts, now)
        ready, answer = stream.gate.on_answer(revision, stream.newest_event, waiter, settled, now, bound)
        if stream.gate.parked:
            stream.recheck_later()
        if ready:
            if answer != revision:
                header = with_revision(header, answer)
            for worker, req_id in ready:
                self._send(worker.identity, lambda e, q, r=req_id: s.WatchProgress(e, q, r, header))

    def on_canceled(self, broadcast: Broadcast, header: bytes, compact_revision: int, reason: str) -> None:
        """etcd ended an s-watcher (compaction, or a cancel with a reason): tell every c-watcher."""
        sw_id = broadcast.sw_id
        if compact_revision:
            self.note_compaction(compact_revision)
        stream = self.stream_of.get(sw_id)
        survivors = broadcast.past_compaction(compact_revision) if stream is not None else []
        self._remove_broadcast(broadcast)
        waiting = set(broadcast.waiting)
        # Admitted from at or above the compaction: they move to another s-watcher (a created answer for those
        # still waiting, a new s-watcher id for the others, sent before the cancel of the rest of their worker)
        fallback = stream.last_header if stream is not None else header
        for receiver in survivors:
            assert stream is not None
            start = broadcast.receivers[receiver]
            broadcast.remove_receiver(receiver)
            self._rehome(stream.group, broadcast, receiver, start, broadcast.join_headers.get(receiver, fallback))
        # not created yet: those c-watchers are known to their worker only by wid
        for identity, wid in waiting:
            if (identity, wid) in broadcast.receivers:
                self._send(
                    identity,
                    lambda e, q, w=wid: s.WatchCanceled(e, q, w, sw_id, header, compact_revision, reason, True),
                )
        # created ones: one message per worker (wid -1: all of its c-watchers of this s-watcher), except where
        # some moved: that worker files them under this s-watcher until their new created answer (which may wait
        # for etcd), so the others there are cancelled one by one
        moved = {identity for identity, _ in survivors}
        told: set[bytes] = set()
        for identity, wid in broadcast.receivers:
            if (identity, wid) in waiting or identity in told:
                continue
            target = wid if identity in moved else -1
            if target == -1:
                told.add(identity)
            self._send(
                identity,
                lambda e, q, w=target: s.WatchCanceled(e, q, w, sw_id, header, compact_revision, reason, False),
            )

    def fail_group(self, stream: UpstreamStream, reason: str) -> None:
        self.streams.pop(stream.group, None)
        for broadcast in list(stream.broadcasts.values()):
            self.on_canceled(broadcast, stream.last_header, 0, reason)
        stream.broadcasts.clear()
        waiters = [w for w in stream.progress_waiters if w is not None] + stream.gate.take_all()
        for worker, req_id in waiters:
            self._send(worker.identity, lambda e, q, r=req_id: s.WatchProgress(e, q, r, stream.last_header))

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            for stream in list(self.streams.values()):
                if stream.broadcasts:
                    stream.request_progress(None)

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self._tick_handle = self.hub.loop.call_later(STALL_TICK_S, self._tick)

    async def close(self) -> None:
        self._progress_task.cancel()
        self._tick_handle.cancel()
        for stream in self.streams.values():
            stream.close()
