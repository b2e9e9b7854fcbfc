"""The Watch servicer of a worker: client streams, c-watchers, and delivery from the hub.

Each client stream has its own writer (the servicer's async generator); the hub's messages
only append to c-watchers and wake writers, so a slow client never delays another. Under
load a writer naturally batches: it builds a c-watcher's response at write time from every
event pending for it (etcd also batches revisions into one response).

Shared state (``by_wid``, ``by_sw``, each stream's tables) is mutated only on the worker's
event loop. Invariants: a client sees ``created`` before any event of a watch; answers to
creates leave in request order and watch ids are allocated at that moment (so ids and
rejections match etcd's exactly); after a hub restart every c-watcher the hub had created is
re-registered from ``resume_revision()`` (resume=True), so clients see neither a gap, nor a
duplicate, nor a second created response.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from etcdproxy import metrics
from etcdproxy.core import errors, wire
from etcdproxy.core.watch import (
    AUTO_WATCH_ID,
    DUPLICATE_WATCH_ID,
    INVALID_WATCH_ID,
    CWatcher,
    encode_response,
    prepare,
)
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import rpc
from etcdproxy.ipc import schema as s
from etcdproxy.worker.handlers import forwarded_metadata
from etcdproxy.worker.hubclient import HubClient
from etcdproxy.worker.namespace import Namespace, client_view

log = logging.getLogger(__name__)

# A stream whose client does not read may buffer this much before its watches are cancelled.
SLOW_STREAM_BYTES = 64 * 1024 * 1024
SLOW_REASON = "etcdproxy: watch stream too slow (more than {} bytes of events buffered); re-create the watch"
NO_LEADER = "etcdserver: no leader"


@dataclass(slots=True, eq=False)
class CancelAck:
    """A client cancel, answered in request order once etcd's current header is known."""

    watch_id: int
    requested: bool = False
    header: bytes | None = None


@dataclass(slots=True, eq=False)
class ProgressAsk:
    """A client's RequestProgress, answered in request order: etcd handles a stream's requests one
    after another, so a cancel sent after it must not stop its watcher before the answer (whose
    revision covers that watcher's events), and the answer never overtakes an earlier create."""

    header: bytes | None = None


@dataclass(slots=True, eq=False)
class WatchStream:
    metadata: s.Metadata
    require_leader: bool
    watchers: dict[int, CWatcher] = field(default_factory=dict)  # by watch_id
    next_watch_id: int = 0
    out: deque[bytes] = field(default_factory=deque)  # ready responses, in order
    dirty: dict[int, CWatcher] = field(default_factory=dict)  # watch_id -> watcher with pending events
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    buffered: int = 0
    end: errors.EtcdError | None = None
    # creates (CWatcher) and cancels (watch id) in request order: etcd answers creates in
    # order and numbers auto ids in order, so answers are released from the head only
    fifo: deque[CWatcher | CancelAck | ProgressAsk] = field(default_factory=deque)
    # newest revision among the events queued for this stream's watchers (a progress answer
    # below it would go back: see _release)
    newest_event: int = 0
    # rpc Context.push: writes a response at once, bypassing the handler's iterator (None: not available)
    sink: Callable[[bytes], bool] | None = None

    def allocate_id(self, requested: int) -> int | None:
        """etcd's rule: 0 picks the next free id, any other id is used unless taken."""
        if requested != AUTO_WATCH_ID:
            return None if requested in self.watchers else requested
        while self.next_watch_id in self.watchers:
            self.next_watch_id += 1
        watch_id = self.next_watch_id
        self.next_watch_id += 1
        return watch_id

    def flush(self, watcher: CWatcher) -> None:
        """Move a watcher's pending events into the ordered output (before a control response)."""
        if self.dirty.pop(watcher.watch_id, None) is not None:
            self.buffered -= watcher.pending_bytes
            self.out.extend(watcher.take_responses())

    def push(self, response: bytes) -> None:
        self.out.append(response)
        self.wake.set()


class WatchService:
    def __init__(self, hub: HubClient, namespace: Namespace | None = None) -> None:
        self.hub = hub
        self.namespace = namespace
        self._wids = itertools.count(1)
        self.by_wid: dict[int, tuple[WatchStream, CWatcher]] = {}
        self.by_sw: dict[int, dict[int, tuple[WatchStream, CWatcher]]] = {}
        # progress requests in flight: req_id -> (stream, the cancel to acknowledge with the
        # fresh header, or None for a client's RequestProgress)
        self.progress_waiters: dict[int, tuple[WatchStream, CancelAck | ProgressAsk]] = {}
        self._progress_ids = itertools.count(1)
        self.last_header = b""
        # streams with new events this loop turn, written by one callback (_write_touched) instead of
        # waking each stream's Task; the same counter the instrumented iterator counts its messages in
        self._touched: dict[WatchStream, None] = {}
        self._sent_stats = metrics.rpc_stats("bidi_stream", "etcdserverpb.Watch", "Watch")
        hub.handlers[s.Kind.WATCH_CREATED] = self.on_created
        hub.handlers[s.Kind.WATCH_CANCELED] = self.on_canceled
        hub.handlers[s.Kind.WATCH_EVENTS] = self.on_events
        hub.handlers[s.Kind.WATCH_REPLAY] = self.on_replay
        hub.handlers[s.Kind.WATCH_PROGRESS] = self.on_progress
        if namespace is not None:  # --namespace: event keys stripped once per hub batch
            hub.handlers[s.Kind.WATCH_EVENTS] = lambda m: self.on_events(client_view(namespace, m))
            hub.handlers[s.Kind.WATCH_REPLAY] = lambda m: self.on_replay(client_view(namespace, m))
        hub.on_new_epoch.append(self.on_new_epoch)
        hub.on_gap.append(self.on_gap)

    def handler(self) -> rpc.MethodHandler:
        return rpc.stream_stream(self.watch)

    # ---- the client stream ---------------------------------------------------------------

    async def watch(self, requests: AsyncIterator[bytes], context: rpc.Context) -> AsyncIterator[bytes]:
        metadata = forwarded_metadata(context)
        stream = WatchStream(metadata, dict(metadata).get("hasleader") == "true")
        stream.sink = getattr(context, "push", None)
        reader = asyncio.get_running_loop().create_task(self._read(requests, stream))
        try:
            while True:
                if stream.out:
                    yield stream.out.popleft()
                    continue
                if stream.dirty:
                    watch_id = next(iter(stream.dirty))
                    stream.flush(stream.dirty[watch_id])
                    continue
                if stream.end is not None:
                    await context.abort(stream.end.code, stream.end.message)
                stream.wake.clear()
                await stream.wake.wait()
        finally:
            reader.cancel()
            waiting = [w for w in stream.fifo if isinstance(w, CWatcher)]
            for watcher in list(stream.watchers.values()) + waiting:
                self._forget(stream, watcher, tell_hub=True)

    async def _read(self, requests: AsyncIterator[bytes], stream: WatchStream) -> None:
        # A half-closed stream stays open and keeps delivering, like etcd.
        async for data in requests:
            request, problem = wire.parse(rpc_pb2.WatchRequest, data)
            if problem is not None:
                self._end(stream, errors.unmarshal_error(problem))
                return
            which = request.WhichOneof("request_union")
            if which == "create_request":
                if self.namespace is not None:  # the hub and etcd only see etcd's key space
                    self.namespace.watch_create(request.create_request)
                self._create(stream, request.create_request)
            elif which == "cancel_request":
                self._cancel(stream, request.cancel_request.watch_id)
            elif which == "progress_request":
                ask = ProgressAsk()
                stream.fifo.append(ask)
                self._ask_progress(stream, ask)

    def _ask_progress(self, stream: WatchStream, waiter: CancelAck | ProgressAsk) -> None:
        req_id = next(self._progress_ids)
        self.progress_waiters[req_id] = (stream, waiter)
        self._send_when_up(lambda e: s.WatchProgressRequest(e, req_id, stream.metadata))

    def _end(self, stream: WatchStream, error: errors.EtcdError) -> None:
        stream.end = error
        stream.wake.set()

    def _send_when_up(self, build: Any) -> None:
        # While the hub is silent (it, or this worker, was stopped or slow) the message still goes
        # to the last hub heard from: if that hub comes back with the same epoch it is answered
        # (holding it here lost it: nothing re-sends on the same epoch); if a new hub comes up it
        # drops the message and on_new_epoch re-sends all state. Before any hub: on_new_epoch.
        epoch = self.hub.epoch or self.hub.last_epoch
        if epoch:
            self.hub.send(build(epoch))

    def _create(self, stream: WatchStream, create: rpc_pb2.WatchCreateRequest) -> None:
        watcher = CWatcher.from_request(next(self._wids), create)
        stream.fifo.append(watcher)
        self.by_wid[watcher.wid] = (stream, watcher)
        self._send_when_up(lambda e: self._create_message(e, stream, watcher))

    def _create_message(self, epoch: int, stream: WatchStream, watcher: CWatcher) -> s.WatchCreate:
        # a c-watcher a hub already created resumes where it stands: no gap, no second created
        resume = watcher.next_revision > 0
        start = watcher.resume_revision() if resume else watcher.start_revision
        return s.WatchCreate(epoch, watcher.wid, watcher.key, watcher.range_end, start, stream.metadata, resume)

    def _release(self, stream: WatchStream) -> None:
        """Answer creates and cancels in request order as their outcomes become known."""
        while stream.fifo:
            head = stream.fifo[0]
            if isinstance(head, CancelAck):
                if not head.requested:
                    head.requested = True
                    if not self._start_cancel(stream, head):
                        stream.fifo.popleft()  # unknown id: etcd does not answer either
                        continue
                if head.header is None:
                    return
                stream.fifo.popleft()
                stream.push(encode_response(head.watch_id, head.header, canceled=True))
                continue
            if isinstance(head, ProgressAsk):
                if head.header is None:
                    return
                revision = rpc_pb2.ResponseHeader.FromString(head.header).revision
                if revision < stream.newest_event:
                    # answered while it waited behind a cancel, and events newer than the answer
                    # went to the client meanwhile (seen in CI: progress 41 after event 42): ask
                    # again; the hub's next answer is at least every event it sent before it
                    head.header = None
                    self._ask_progress(stream, head)
                    return
                stream.fifo.popleft()
                for watcher in list(stream.dirty.values()):
                    stream.flush(watcher)
                # the client now holds everything up to it: a hub restart must not resume its
                # watchers from below (a compaction since would cancel them though they were past it)
                for watcher in stream.watchers.values():
                    if revision > watcher.progress_revision:
                        watcher.progress_revision = revision
                # etcd answers RequestProgress with watch id -1: every event up to the revision was sent
                stream.push(encode_response(INVALID_WATCH_ID, head.header))
                continue
            if not head.ready:
                return
            stream.fifo.popleft()
            if head.rejection is not None:
                header, compact_revision, reason = head.rejection
                self._forget(stream, head, tell_hub=False)
                stream.push(
                    encode_response(
                        INVALID_WATCH_ID,
                        header or self.last_header,
                        created=True,
                        canceled=True,
                        compact_revision=compact_revision,
                        cancel_reason=reason,
                    )
                )
                continue
            watch_id = stream.allocate_id(head.requested_id)
            if watch_id is None:
                self._forget(stream, head, tell_hub=True)
                stream.push(
                    encode_response(
                        INVALID_WATCH_ID,
                        self.last_header,
                        created=True,
                        canceled=True,
                        cancel_reason=DUPLICATE_WATCH_ID,
                    )
                )
                continue
            head.watch_id = watch_id
            head.created = True
            stream.watchers[watch_id] = head
            stream.push(encode_response(watch_id, head.last_header or self.last_header, created=True))
            if head.pending or head.pending_progress:
                stream.dirty[watch_id] = head
            if head.cancel_after is not None:
                self._cancel_from_hub(stream, head, *head.cancel_after, created=False)

    def _cancel(self, stream: WatchStream, watch_id: int) -> None:
        stream.fifo.append(CancelAck(watch_id))
        self._release(stream)

    def _start_cancel(self, stream: WatchStream, ack: CancelAck) -> bool:
        """Stop the watcher now; its ack waits for the store revision (an upstream progress
        answer), since etcd's cancel answer carries the header of the moment it cancelled."""
        watcher = stream.watchers.get(ack.watch_id)
        if watcher is None:
            return False
        stream.flush(watcher)
        self._forget(stream, watcher, tell_hub=True)
        self._ask_progress(stream, ack)
        return True

    def _forget(self, stream: WatchStream, watcher: CWatcher, tell_hub: bool) -> None:
        watcher.canceled = True
        if watcher.created:
            stream.watchers.pop(watcher.watch_id, None)
            if stream.dirty.pop(watcher.watch_id, None) is not None:
                stream.buffered -= watcher.pending_bytes
        else:
            stream.buffered -= watcher.pending_bytes
            if watcher in stream.fifo:
                stream.fifo.remove(watcher)
        self.by_wid.pop(watcher.wid, None)
        self._leave_sw(watcher)
        if tell_hub:
            self._send_when_up(lambda e: s.WatchCancel(e, watcher.wid))

    def _leave_sw(self, watcher: CWatcher) -> None:
        """Drop the c-watcher from its s-watcher's members (none: nothing to do)."""
        if watcher.sw_id:
            members = self.by_sw.get(watcher.sw_id)
            if members is not None:
                members.pop(watcher.wid, None)
                if not members:
                    del self.by_sw[watcher.sw_id]

    # ---- hub messages --------------------------------------------------------------------

    def on_created(self, message: s.WatchCreated) -> None:
        entry = self.by_wid.get(message.wid)
        if entry is None:
            return
        stream, watcher = entry
        if message.header and not watcher.ready:
            # Only the first hub's answer: its header is where the watcher starts (a "from now" watch gets the
            # events after header.revision). A resume after a hub restart carries the new hub's header, which
            # says nothing about this watcher; taking it for a created answer not yet released told a client
            # "created at 3770" before event 3770 (soak, seed 256792300, kill-hub).
            self.last_header = message.header
            watcher.last_header = message.header
        if watcher.sw_id != message.sw_id:
            # moved to another s-watcher (its own was canceled as compacted, which it was past): a cancel of
            # the old one's remaining c-watchers must not reach it
            self._leave_sw(watcher)
        watcher.sw_id = message.sw_id
        self.by_sw.setdefault(message.sw_id, {})[watcher.wid] = entry
        watcher.next_revision = max(watcher.next_revision, message.next_revision)
        if not watcher.ready:
            watcher.ready = True
            self._release(stream)

    def on_canceled(self, message: s.WatchCanceled) -> None:
        if message.header:
            self.last_header = message.header
        if message.wid >= 0:
            entry = self.by_wid.get(message.wid)
            targets = [entry] if entry is not None else []
        else:
            targets = list(self.by_sw.get(message.sw_id, {}).values())
        for stream, watcher in targets:
            if message.reason == NO_LEADER and stream.require_leader:
                self._end(stream, errors.NO_LEADER)
                continue
            self._cancel_from_hub(
                stream, watcher, message.header, message.compact_revision, message.reason, message.created
            )

    def _cancel_from_hub(
        self, stream: WatchStream, watcher: CWatcher, header: bytes, compact_revision: int, reason: str, created: bool
    ) -> None:
        if not watcher.created:
            if created and not watcher.ready:  # etcd rejected the create: answered in order
                watcher.ready = True
                watcher.rejection = (header, compact_revision, reason)
            else:  # created by the hub, then cancelled, before its created answer was released
                watcher.cancel_after = (header, compact_revision, reason)
            self._release(stream)
            return
        stream.flush(watcher)
        self._forget(stream, watcher, tell_hub=False)
        stream.push(
            encode_response(
                watcher.watch_id,
                header or watcher.last_header or self.last_header,
                canceled=True,
                compact_revision=compact_revision,
                cancel_reason=reason,
            )
        )

    def _deliver(
        self, stream: WatchStream, watcher: CWatcher, header: bytes, events: list[Any], progress: bool
    ) -> None:
        if watcher.canceled:  # e.g. cancelled as slow while this batch was being fanned out
            return
        if events:
            added = watcher.accept(events)
            if not added:
                return
            if events[-1][0] > stream.newest_event:
                stream.newest_event = events[-1][0]
            stream.buffered += added
        elif not progress:
            return
        else:
            watcher.pending_progress = True
        watcher.pending_header = header
        if watcher.created:  # else its events wait until its created answer is released
            stream.dirty[watcher.watch_id] = watcher
        if stream.buffered > SLOW_STREAM_BYTES:
            self._cancel_slow(stream)
        if stream.sink is None or stream.out or stream.end is not None:
            stream.wake.set()
            return
        if not self._touched:
            asyncio.get_running_loop().call_soon(self._write_touched)
        self._touched[stream] = None

    def _write_touched(self) -> None:
        """Write the responses of every stream that got events this loop turn, in request order: only a
        stream with nothing queued for its iterator is written here (else its Task is woken, as before)."""
        touched, self._touched = self._touched, {}
        stats = self._sent_stats
        for stream in touched:
            out = stream.out
            if out or stream.end is not None or stream.sink is None:
                stream.wake.set()
                continue
            # one watcher's responses at a time, like the iterator: once the stream blocks, the rest
            # stay pending in their watchers, where they count toward SLOW_STREAM_BYTES (flushing all
            # of them first hid a whole fan-out batch from that limit: CI saw a stalled client never
            # cancelled)
            sink, dirty = stream.sink, stream.dirty
            while True:
                while out:
                    if not sink(out[0]):  # blocked: the iterator writes the rest with its backpressure
                        stream.wake.set()
                        break
                    out.popleft()
                    stats.sent += 1
                if out or not dirty:
                    break
                stream.flush(next(iter(dirty.values())))

    def on_events(self, message: s.WatchEvents) -> None:
        members = self.by_sw.get(message.sw_id)
        if not members:
            return
        self.last_header = message.header
        events = message.events
        if not events:
            revision = rpc_pb2.ResponseHeader.FromString(message.header).revision
            for stream, watcher in list(members.values()):
                watcher.progress_revision = max(watcher.progress_revision, revision)
                if watcher.progress_notify and not message.progress_only:
                    self._deliver(stream, watcher, message.header, [], True)
            return
        prepared = prepare(events)
        for stream, watcher in list(members.values()):
            self._deliver(stream, watcher, message.header, prepared, False)

    def on_replay(self, message: s.WatchReplay) -> None:
        entry = self.by_wid.get(message.wid)
        if entry is not None:
            self._deliver(entry[0], entry[1], message.header or self.last_header, prepare(message.events), False)

    def on_progress(self, message: s.WatchProgress) -> None:
        waiter = self.progress_waiters.pop(message.req_id, None)
        if waiter is None:
            return
        stream, ack = waiter
        if message.header:
            self.last_header = message.header
        header = message.header or self.last_header
        # a client's RequestProgress, or the acknowledgement of a client cancel: released in order
        ack.header = header
        self._release(stream)

    def _cancel_slow(self, stream: WatchStream) -> None:
        reason = SLOW_REASON.format(SLOW_STREAM_BYTES)
        log.warning("cancelling the watches of a client that does not read (%d bytes buffered)", stream.buffered)
        for watcher in list(stream.watchers.values()) + [w for w in stream.fifo if isinstance(w, CWatcher)]:
            watcher.pending.clear()
            watcher.pending_bytes = 0
            if watcher.created:
                self._forget(stream, watcher, tell_hub=True)
                stream.push(
                    encode_response(
                        watcher.watch_id, watcher.last_header or self.last_header, canceled=True, cancel_reason=reason
                    )
                )
            else:
                watcher.cancel_after = (watcher.last_header, 0, reason)
        stream.buffered = 0

    # ---- hub restarts --------------------------------------------------------------------

    def on_new_epoch(self) -> None:
        """A new hub knows nothing: register every c-watcher again, created ones from where
        they stand (resume), the others as they were asked for."""
        self.by_sw.clear()
        for stream, watcher in list(self.by_wid.values()):
            watcher.sw_id = 0
            self.hub.send(self._create_message(self.hub.epoch, stream, watcher))
        for req_id, (stream, _) in list(self.progress_waiters.items()):
            self.hub.send(s.WatchProgressRequest(self.hub.epoch, req_id, stream.metadata))

    def on_gap(self) -> None:
        """A lost hub message may have carried events: end every watch with a reason."""
        for stream, watcher in list(self.by_wid.values()):
            self.hub.send(s.WatchCancel(self.hub.epoch, watcher.wid))
            self._cancel_from_hub(stream, watcher, b"", 0, errors.HUB_GAP.message, created=not watcher.ready)
