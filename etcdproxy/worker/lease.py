"""The LeaseKeepAlive servicer of a worker: client streams served through the hub's lease hub.

Each client request for a lease is counted as outstanding on its stream; the hub is asked once
per lease while requests for it are outstanding in this worker (LeaseKeepAlive), and its answer
(LeaseAnswer: etcd's serialized response, or one derived from a recent renewal, see
core/lease.py) is written once per outstanding request to every stream waiting on that lease.

Stream ends, like etcd:
* half-close: the outstanding requests are answered, then the stream ends OK;
* require-leader streams (metadata ``hasleader: true``) end with UNAVAILABLE
  ``etcdserver: no leader`` when the hub reports that etcd lost its leader (LeaseNoLeader);
  other streams keep waiting and are answered once etcd has a leader again.

Nothing is lost across a hub restart or a lost hub frame: every lease with outstanding requests
is asked again of the new hub; a lease unanswered for ASK_AGAIN_S is asked again anyway (the hub
treats a repeated ask as joining the renewal in flight). State is mutated only on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from etcdproxy.core import errors, wire
from etcdproxy.core.lease import Interest, Window
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import rpc
from etcdproxy.ipc import schema as s
from etcdproxy.worker.hubclient import HubClient

log = logging.getLogger(__name__)

PATH = "/etcdserverpb.Lease/LeaseKeepAlive"
ASK_AGAIN_S = 3.0
SWEEP_EVERY_S = 1.0

Item = bytes | errors.EtcdError | None  # a response, the final error, or None: end OK


class ClientStream:
    """One client LeaseKeepAlive stream. Hashed by identity (a waiter in ``Interest``)."""

    __slots__ = ("ended", "half_closed", "pending", "queue", "require_leader")

    def __init__(self, require_leader: bool) -> None:
        self.require_leader = require_leader
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.pending = 0  # requests read from the client and not yet answered
        self.half_closed = False
        self.ended = False

    def deliver(self, payload: bytes, count: int) -> None:
        if self.ended:
            return
        for _ in range(count):
            self.queue.put_nowait(payload)
        self.pending -= count
        if self.half_closed and self.pending <= 0:
            self.end(None)

    def end(self, error: errors.EtcdError | None) -> None:
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(error)


def requires_leader(context: rpc.Context) -> bool:
    return any(k == "hasleader" and v == "true" for k, v in (context.invocation_metadata() or ()))


class LeaseServicer:
    def __init__(self, hub: HubClient, window_s: float = 0.0) -> None:
        self.hub = hub
        # recent renewals the hub told us about: keepalives within --lease-keepalive-window are answered here
        self.window = Window(window_s)
        self.interest: Interest[ClientStream] = Interest()
        self.streams: set[ClientStream] = set()
        self._epoch = 0  # the last hub epoch seen; asks go there while the hub is silent
        self._sweeper: asyncio.Task[None] | None = None
        hub.handlers[s.Kind.LEASE_ANSWER] = self._on_answer
        hub.handlers[s.Kind.LEASE_NO_LEADER] = self._on_no_leader
        hub.handlers[s.Kind.LEASE_FORGET] = self._on_forget
        hub.on_new_epoch.append(self._on_new_epoch)
        hub.on_gap.append(self._on_gap)

    def handler(self) -> rpc.MethodHandler:
        return rpc.stream_stream(self.keep_alive)

    # ---- client side ---------------------------------------------------------------------

    async def keep_alive(self, requests: AsyncIterator[bytes], context: rpc.Context) -> AsyncIterator[bytes]:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        stream = ClientStream(requires_leader(context))
        self.streams.add(stream)
        reader = asyncio.get_running_loop().create_task(self._read(requests, stream))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, bytes):
                    yield item
                    continue
                if item is not None:
                    await context.abort(item.code, item.message)
                return
        finally:
            reader.cancel()
            self.streams.discard(stream)
            self.interest.stream_gone(stream)

    async def _read(self, requests: AsyncIterator[bytes], stream: ClientStream) -> None:
        async for request in requests:
            message, problem = wire.parse(rpc_pb2.LeaseKeepAliveRequest, request)
            if problem is not None:
                stream.end(errors.unmarshal_error(problem))
                return
            # time.monotonic(), not the loop's clock: the window's sent_at is the hub's monotonic time
            local = self.window.answer(message.ID, time.monotonic()) if self.window.recent else None
            if local is not None:
                stream.queue.put_nowait(local)
                continue
            stream.pending += 1
            if self.interest.request(message.ID, stream, self.hub.loop.time()):
                self._ask(message.ID)
        # half-close: answer what is outstanding, then end OK (etcd does; the Go proxy cancels)
        stream.half_closed = True
        if stream.pending <= 0:
            stream.end(None)

    # ---- hub side ------------------------------------------------------------------------

    def _ask(self, lease_id: int) -> None:
        epoch = self.hub.epoch or self._epoch
        if epoch:  # else no hub was ever seen: _on_new_epoch asks for everything outstanding
            self.hub.send(s.LeaseKeepAlive(epoch, lease_id))

    def _on_answer(self, message: s.LeaseAnswer) -> None:
        self.window.record(message.lease_id, message.sent_at, message.granted_ttl, message.payload)
        for stream, count in self.interest.answer(message.lease_id).items():
            stream.deliver(message.payload, count)

    def _on_no_leader(self, message: s.LeaseNoLeader) -> None:
        for stream in list(self.streams):
            if stream.require_leader:
                stream.end(errors.NO_LEADER)

    def _on_forget(self, message: s.LeaseForget) -> None:
        self.window.forget(message.lease_id)
        self.hub.send(s.LeaseForgotten(message.epoch, message.ack_id))

    def _on_new_epoch(self) -> None:
        self._epoch = self.hub.epoch
        self.window.clear()  # a revoke the old hub forwarded may not have been announced
        self._ask_all()

    def _on_gap(self) -> None:
        self.window.clear()  # the lost frame may have been a LeaseForget
        self._ask_all()

    def _ask_all(self) -> None:
        for lease_id in self.interest.ask_all(self.hub.loop.time()):
            self._ask(lease_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            if self.hub.epoch:
                self._epoch = self.hub.epoch
            for lease_id in self.interest.overdue(self.hub.loop.time(), ASK_AGAIN_S):
                self._ask(lease_id)
            self.window.prune(time.monotonic())

    def stop(self, error: errors.EtcdError) -> None:
        """End every client stream (worker shutdown: clients reconnect to another worker)."""
        for stream in list(self.streams):
            stream.end(error)
        if self._sweeper is not None:
            self._sweeper.cancel()
