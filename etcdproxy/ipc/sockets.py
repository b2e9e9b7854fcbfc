"""ZeroMQ sockets for the hub (ROUTER) and the workers (DEALER); the only module importing zmq.

The sockets are plain (non-asyncio) zmq sockets driven by ``loop.add_reader`` on the zmq FD:
no future per message, and every received frame is handed to a callback synchronously.
The zmq FD is edge-triggered, so after every send we re-check ZMQ_EVENTS and drain again if
input is pending; otherwise a message that arrived during the send could sit unseen.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

# Large enough that a burst never hits the high-water mark in practice; the hub still keeps
# its own bounded per-worker backlog for the case where it does (ROUTER_MANDATORY raises).
HWM = 1_000_000
# Messages handled per wake-up before yielding to the event loop (fairness with gRPC).
DRAIN_BATCH = 512
# plain ints: pyzmq's enum flags cost ~0.5 us per '&' or conversion on every send and receive
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class _Driver:
    def __init__(self, sock: zmq.Socket[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self._drain_scheduled = False
        self._closed = False

    def start(self) -> None:
        self.loop.add_reader(self.sock.getsockopt(zmq.FD), self._drain)
        self._schedule_drain()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        self.sock.close(linger=0)

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _after_send(self) -> None:
        if not self._closed and self.sock.getsockopt(_EVENTS) & _POLLIN:
            self._schedule_drain()

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self._closed:
            return
        for _ in range(DRAIN_BATCH):
            try:
                frames = self.sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            try:
                self._deliver(frames)
            except Exception:
                log.exception("error handling an IPC message")
            if self._closed:
                return
        self._schedule_drain()  # more may be waiting: continue on the next loop iteration

    def _deliver(self, frames: list[bytes]) -> None:
        raise NotImplementedError


class WorkerLink(_Driver):
    """A worker's DEALER connected to the hub. ``on_frame(payload)`` gets every hub frame."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        identity: bytes,
        on_frame: Callable[[bytes], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sock.connect(endpoint)
        super().__init__(sock, loop)
        self._on_frame = on_frame
        self._outbox: list[bytes] = []
        # frames sent so far: a message queued while this is unchanged has not left the worker yet
        self.flushes = 0

    def _deliver(self, frames: list[bytes]) -> None:
        self._on_frame(frames[-1])

    def send(self, data: bytes) -> None:
        """Queue encoded messages; everything queued in one loop tick leaves as one frame."""
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(data)

    def _flush(self) -> None:
        if self._closed or not self._outbox:
            return
        frame = b"".join(self._outbox)
        self._outbox.clear()
        self.flushes += 1
        try:
            self.sock.send(frame, _NOBLOCK)
        except zmq.Again:
            # The DEALER queue is full only if the hub has been gone for a long time; the
            # worker's own recovery (epochs, deadlines) covers whatever this loses.
            log.error("IPC queue to the hub is full; dropping %d bytes", len(frame))
        finally:
            self._after_send()


class HubLink(_Driver):
    """The hub's ROUTER. ``on_frame(identity, payload)`` gets every worker frame.

    Sends never block and are never silently dropped: ROUTER_MANDATORY makes a full or
    vanished peer raise, a full peer's frames wait in a bounded per-worker backlog that is
    retried on a timer, and a vanished peer is reported through ``on_unreachable``.
    """

    BACKLOG_LIMIT = 200_000
    RETRY_S = 0.002

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        on_frame: Callable[[bytes, bytes], None],
        on_unreachable: Callable[[bytes], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.bind(endpoint)
        super().__init__(sock, loop)
        self._on_frame = on_frame
        self._on_unreachable = on_unreachable
        self._backlog: dict[bytes, collections.deque[bytes]] = {}
        self._retry_handle: asyncio.TimerHandle | None = None
        # messages produced in this loop tick, per worker; sent as one frame per worker
        self._outbox: dict[bytes, list[bytes]] = {}

    def _deliver(self, frames: list[bytes]) -> None:
        if len(frames) >= 2:
            self._on_frame(frames[0], frames[-1])

    def backlog_depth(self, identity: bytes) -> int:
        q = self._backlog.get(identity)
        return len(q) if q else 0

    def send(self, identity: bytes, data: bytes) -> None:
        """Queue encoded messages for a worker; they leave at the end of this loop tick."""
        box = self._outbox.get(identity)
        if box is None:
            if not self._outbox:
                self.loop.call_soon(self._flush_outbox)
            self._outbox[identity] = [data]
        else:
            box.append(data)

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, {}
        try:
            for identity, box in outbox.items():
                self._send_frame(identity, b"".join(box), check_input=False)
        finally:
            self._after_send()  # once for all the frames of this tick

    def _send_frame(self, identity: bytes, frame: bytes, check_input: bool = True) -> bool:
        """Send or queue; False only when the worker is unreachable or its backlog is full."""
        if self._closed:
            return False
        q = self._backlog.get(identity)
        if q:  # keep order: never overtake frames already waiting
            if len(q) >= self.BACKLOG_LIMIT:
                log.error("worker %r backlog full; dropping a frame (its streams will see a gap)", identity)
                return False
            q.append(frame)
            return True
        try:
            self.sock.send_multipart((identity, frame), _NOBLOCK)
        except zmq.Again:
            self._backlog[identity] = collections.deque((frame,))
            self._arm_retry()
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self.forget(identity)
                self._on_unreachable(identity)
                return False
            raise
        finally:
            if check_input:
                self._after_send()
        return True

    def forget(self, identity: bytes) -> None:
        self._backlog.pop(identity, None)
        self._outbox.pop(identity, None)

    def _arm_retry(self) -> None:
        if self._retry_handle is None and not self._closed:
            self._retry_handle = self.loop.call_later(self.RETRY_S, self._flush)

    def _flush(self) -> None:
        self._retry_handle = None
        for identity in list(self._backlog):
            q = self._backlog[identity]
            try:
                while q:
                    self.sock.send_multipart((identity, q[0]), _NOBLOCK)
                    q.popleft()
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                self.forget(identity)
                self._on_unreachable(identity)
                continue
            del self._backlog[identity]
        self._after_send()
        if self._backlog:
            self._arm_retry()

    def close(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        super().close()


def new_context() -> zmq.Context[zmq.Socket[bytes]]:
    """A fresh context; each process makes its own after fork."""
    return zmq.Context()
