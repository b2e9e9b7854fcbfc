"""A worker's side of the IPC link: pending calls, stream routing, hub restarts and gaps.

Invariants (see ipc/schema.py):
* A request is tagged with the hub epoch the worker knows; while none is known (start-up,
  or the hub went silent) requests wait in ``_unsent`` instead of going to a dead hub.
* When a new epoch appears, calls tagged with the old one are re-sent if idempotent and
  failed with UNAVAILABLE otherwise (the old hub may have applied them); streams of the old
  epoch end with UNAVAILABLE so the client re-establishes them.
* Frames of one epoch arrive with seq 1, 2, 3...; a gap is handled like a hub restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from etcdproxy.core import errors
from etcdproxy.core.methods import Method
from etcdproxy.ipc import codec
from etcdproxy.ipc import schema as s
from etcdproxy.ipc.sockets import WorkerLink, new_context

log = logging.getLogger(__name__)

PING_INTERVAL_S = 0.25
# No frame from the hub for this long: stop sending to it until it answers a Ping again.
HUB_SILENCE_S = 1.5
ACK_EVERY = 16

StreamItem = bytes | tuple[int, str]  # a message, or the final (code, message)
Callback = Callable[[int, bytes | str], None]  # a call's (code, body) as the hub replies


@dataclass(slots=True)
class PendingCall:
    # the answer goes to exactly one of the two: a future (``call``) or a callback (``start_call``)
    future: asyncio.Future[tuple[int, bytes | str]] | None
    method: Method
    payload: bytes
    metadata: s.Metadata
    deadline: float | None
    epoch: int = 0  # epoch it was sent to; 0 = not sent yet
    callback: Callback | None = None

    def settle(self, code: int, body: bytes | str) -> None:
        callback = self.callback
        if callback is not None:
            self.callback = None
            callback(code, body)
            return
        future = self.future
        if future is not None and not future.done():
            future.set_result((code, body))


@dataclass(slots=True)
class StreamState:
    method: Method
    metadata: s.Metadata
    inbox: asyncio.Queue[StreamItem] = field(default_factory=asyncio.Queue)
    epoch: int = 0
    unacked: int = 0
    ended: bool = False
    # client messages (None = half-close) that arrived before the open reached a hub
    backlog: list[bytes | None] = field(default_factory=list)


class HubClient:
    def __init__(self, endpoint: str, worker_index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.worker_index = worker_index
        self.ctx = new_context()
        identity = f"w{worker_index}-{os.getpid()}".encode()
        self.link = WorkerLink(self.ctx, endpoint, identity, self._on_frame, loop)
        self.epoch = 0  # 0: no live hub known (start-up, or it went silent)
        self._adopted_epoch = 0  # the hub whose state components registered last
        self._expected_seq = 0
        self._last_heard = 0.0
        self._ids = itertools.count(1)
        self.calls: dict[int, PendingCall] = {}
        self.streams: dict[int, StreamState] = {}
        self._unsent: deque[tuple[int, bool]] = deque()  # (req_id, is_stream) waiting for a hub
        self._ping_task: asyncio.Task[None] | None = None
        # Components (watch, lease) register handlers for their hub message kinds, and
        # callbacks run after a new hub epoch was adopted (to re-register their state there).
        self.handlers: dict[s.Kind, Callable[[Any], None]] = {}
        self.on_new_epoch: list[Callable[[], None]] = []
        self.on_gap: list[Callable[[], None]] = []

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.link.start()
        self.link.send(codec.encode(s.Hello(s.SCHEMA_VERSION, self.worker_index, os.getpid())))
        self._ping_task = self.loop.create_task(self._ping_loop())

    def close(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
        self.link.close()
        self.ctx.term()

    @property
    def hub_alive(self) -> bool:
        return self.epoch != 0

    @property
    def last_epoch(self) -> int:
        """The epoch of the last hub heard from, even while it is silent (0: none yet). A component
        message tagged with it reaches that hub if it was only slow or stopped (ZeroMQ queues it);
        a new hub drops it as addressed to its predecessor, and on_new_epoch re-sends the state."""
        return self._adopted_epoch

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            if self.epoch and self.loop.time() - self._last_heard > HUB_SILENCE_S:
                log.warning("hub silent for %.1f s; holding new requests until it answers", HUB_SILENCE_S)
                self.epoch = 0
            self.link.send(codec.encode(s.Ping(self.epoch)))
            self._expire_unsent()

    # ---- unary ---------------------------------------------------------------------------

    def call(
        self, method: Method, payload: bytes, metadata: s.Metadata, timeout_s: float | None
    ) -> tuple[int, asyncio.Future[tuple[int, bytes | str]]]:
        """Start a unary call; returns (req_id, future of (code, body))."""
        future: asyncio.Future[tuple[int, bytes | str]] = self.loop.create_future()
        return self._add_call(PendingCall(future, method, payload, metadata, None), timeout_s), future

    def start_call(
        self, method: Method, payload: bytes, metadata: s.Metadata, timeout_s: float | None, callback: Callback
    ) -> int:
        """Start a unary call whose (code, body) goes to ``callback``, called from the frame reader (no future,
        no loop turn); returns the req_id. After ``cancel(req_id)`` the callback is never called."""
        return self._add_call(PendingCall(None, method, payload, metadata, None, 0, callback), timeout_s)

    def _add_call(self, pending: PendingCall, timeout_s: float | None) -> int:
        req_id = next(self._ids)
        if timeout_s is not None:
            pending.deadline = self.loop.time() + timeout_s
        self.calls[req_id] = pending
        if self.epoch:
            self._send_call(req_id, pending)
        else:
            self._unsent.append((req_id, False))
        return req_id

    def _send_call(self, req_id: int, pending: PendingCall) -> None:
        timeout = None if pending.deadline is None else max(pending.deadline - self.loop.time(), 0.0)
        pending.epoch = self.epoch
        message = s.Unary(self.epoch, req_id, pending.method.index, pending.payload, pending.metadata, timeout)
        self.link.send(codec.encode(message))

    def cancel(self, req_id: int) -> None:
        """The client went away: forget the call or stream and tell the hub."""
        pending = self.calls.pop(req_id, None)
        stream = self.streams.pop(req_id, None)
        epoch = pending.epoch if pending else stream.epoch if stream else 0
        if epoch and epoch == self.epoch:
            self.link.send(codec.encode(s.Cancel(epoch, req_id)))

    # ---- streams -------------------------------------------------------------------------

    def open_stream(self, method: Method, metadata: s.Metadata) -> tuple[int, StreamState]:
        req_id = next(self._ids)
        state = StreamState(method, metadata)
        self.streams[req_id] = state
        if self.epoch:
            self._send_open(req_id, state)
        else:
            self._unsent.append((req_id, True))
        return req_id, state

    def _send_open(self, req_id: int, state: StreamState) -> None:
        state.epoch = self.epoch
        self.link.send(codec.encode(s.StreamOpen(self.epoch, req_id, state.method.index, state.metadata, None)))
        backlog, state.backlog = state.backlog, []
        for payload in backlog:
            self._stream_push(req_id, state, payload)

    def _stream_push(self, req_id: int, state: StreamState, payload: bytes | None) -> None:
        if not state.epoch:
            state.backlog.append(payload)
        elif payload is None:
            self.link.send(codec.encode(s.StreamHalfClose(state.epoch, req_id)))
        else:
            self.link.send(codec.encode(s.StreamSend(state.epoch, req_id, payload)))

    def send(self, message: s.WorkerMessage) -> None:
        """Send a component message (built with ``self.epoch``) to the hub."""
        self.link.send(codec.encode(message))

    def stream_send(self, req_id: int, payload: bytes) -> None:
        """Pass one client message on (held back until the stream's open reached a hub)."""
        state = self.streams.get(req_id)
        if state is not None:
            self._stream_push(req_id, state, payload)

    def stream_half_close(self, req_id: int) -> None:
        state = self.streams.get(req_id)
        if state is not None:
            self._stream_push(req_id, state, None)

    def end_stream(self, req_id: int, error: errors.EtcdError) -> None:
        """End one stream from the worker side (e.g. a malformed client message)."""
        state = self.streams.get(req_id)
        if state is not None:
            self.cancel(req_id)
            self._end_stream(req_id, state, error.code, error.message)

    def stream_delivered(self, req_id: int, state: StreamState) -> None:
        """The servicer wrote one message to its client: return credit to the hub in batches."""
        state.unacked += 1
        if state.unacked >= ACK_EVERY and state.epoch == self.epoch:
            self.link.send(codec.encode(s.StreamAck(state.epoch, req_id, state.unacked)))
            state.unacked = 0

    def end_streams(self, error: errors.EtcdError, epoch: int | None = None) -> None:
        """End every stream (of ``epoch``, if given) with ``error``."""
        for req_id, state in list(self.streams.items()):
            if epoch is None or state.epoch == epoch:
                self._end_stream(req_id, state, error.code, error.message)

    def _end_stream(self, req_id: int, state: StreamState, code: int, text: str) -> None:
        self.streams.pop(req_id, None)
        if not state.ended:
            state.ended = True
            state.inbox.put_nowait((code, text))

    # ---- hub frames ----------------------------------------------------------------------

    def _on_frame(self, frame: bytes) -> None:
        for message in codec.decode_frame(frame):
            # One failing handler must not drop the rest of the batch: that would look like
            # (and be handled as) lost IPC messages for every stream of this worker.
            try:
                self._on_message(message)
            except Exception:
                log.exception("error handling hub message %s", message.kind.name)

    def _on_message(self, message: s.Message) -> None:
        self._last_heard = self.loop.time()
        epoch, seq = message.epoch, message.seq  # type: ignore[union-attr]
        if epoch != self.epoch or seq != self._expected_seq:
            self._resync(epoch, seq)
        self._expected_seq = seq + 1
        if isinstance(message, s.Reply):
            pending = self.calls.pop(message.req_id, None)
            if pending is not None:
                pending.settle(message.code, message.body)
        elif isinstance(message, s.StreamRecv):
            state = self.streams.get(message.req_id)
            if state is not None:
                state.inbox.put_nowait(message.payload)
        elif isinstance(message, s.StreamEnd):
            state = self.streams.get(message.req_id)
            if state is not None:
                self._end_stream(message.req_id, state, message.code, message.message)
        elif isinstance(message, s.Stale):
            self._retry_or_fail(message.req_id)
        elif message.kind is s.Kind.PONG:
            pass  # liveness only: _last_heard and the epoch/seq check above did the work
        else:
            handler = self.handlers.get(message.kind)
            if handler is None:
                log.error("no handler for hub message %s", message.kind.name)
            else:
                handler(message)

    def _resync(self, epoch: int, seq: int) -> None:
        """A new hub (epoch changed) or a lost frame (seq gap): recover per the invariants."""
        previous = self.epoch
        new_epoch = epoch != self._adopted_epoch
        self._adopted_epoch = epoch
        if epoch == previous:
            log.error("IPC gap from the hub: expected seq %d, got %d", self._expected_seq, seq)
            self.end_streams(errors.HUB_GAP, previous)
            for callback in self.on_gap:
                callback()
            stale = [rid for rid, p in self.calls.items() if p.epoch == previous]
        else:
            if previous:
                log.warning("hub restarted (epoch %x -> %x)", previous, epoch)
            else:
                log.info("hub is up (epoch %x)", epoch)
            self.epoch = epoch
            for req_id, state in list(self.streams.items()):
                if state.epoch and state.epoch != epoch:
                    self._end_stream(req_id, state, errors.HUB_RESTARTED.code, errors.HUB_RESTARTED.message)
            stale = [rid for rid, p in self.calls.items() if p.epoch and p.epoch != epoch]
        for req_id in stale:
            self._retry_or_fail(req_id)
        self._flush_unsent()
        if new_epoch:
            for callback in self.on_new_epoch:
                callback()

    def _retry_or_fail(self, req_id: int) -> None:
        pending = self.calls.get(req_id)
        if pending is not None:
            if pending.method.idempotent:
                pending.epoch = 0
                if self.epoch:
                    self._send_call(req_id, pending)
                else:
                    self._unsent.append((req_id, False))
            else:
                del self.calls[req_id]
                err = errors.HUB_RESTARTED
                pending.settle(err.code, err.message)
            return
        state = self.streams.get(req_id)
        if state is not None:  # its open reached a newer hub, which did not run it
            err = errors.HUB_RESTARTED
            self._end_stream(req_id, state, err.code, err.message)

    def _flush_unsent(self) -> None:
        while self._unsent and self.epoch:
            req_id, is_stream = self._unsent.popleft()
            if is_stream:
                state = self.streams.get(req_id)
                if state is not None and not state.epoch:
                    self._send_open(req_id, state)
            else:
                pending = self.calls.get(req_id)
                if pending is not None and not pending.epoch:
                    self._send_call(req_id, pending)

    def _expire_unsent(self) -> None:
        """Calls that waited for a hub past their deadline end now (gRPC also cancels them)."""
        now = self.loop.time()
        for req_id, pending in list(self.calls.items()):
            if not pending.epoch and pending.deadline is not None and pending.deadline <= now:
                del self.calls[req_id]
                pending.settle(4, "context deadline exceeded")  # DEADLINE_EXCEEDED
