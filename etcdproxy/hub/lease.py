"""The lease hub: ONE upstream LeaseKeepAlive stream for every client of every worker.

Workers send LeaseKeepAlive(lease_id) when a client asks (once per lease while their clients'
requests are outstanding); the hub renews upstream on demand only, with at most one renewal in
flight per lease, and sends the serialized LeaseKeepAliveResponse (LeaseAnswer) to every worker
that asked. A keepalive arriving within ``--lease-keepalive-window`` of the last renewal is
answered from it with the remaining TTL (rules in core/lease.py).

The upstream stream is opened lazily (first keepalive) with ``hasleader=true`` and re-opened with
backoff whenever it breaks; renewals that were in flight or waiting are sent again on the new
stream, so no keepalive is lost across a reconnect or an endpoint switch. When etcd reports
``etcdserver: no leader`` the workers are told (LeaseNoLeader) so require-leader client streams
end like they would on etcd; the others wait for the leader to come back and then get answers.
etcd answers TTL 0 for unknown, revoked or expired leases; those answers pass through untouched.

Shared state (``book``, ``_outbox``, ``_call``) is mutated only from the hub's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from etcdproxy.core import errors
from etcdproxy.core.lease import RenewalBook, Verdict, keepalive_request, late_answer, parse_response
from etcdproxy.core.methods import Method, by_name
from etcdproxy.etcdpb import rpc_pb2 as pb
from etcdproxy.h2 import aio
from etcdproxy.ipc import schema as s
from etcdproxy.upstream import interrupted

if TYPE_CHECKING:
    from etcdproxy.hub.host import WorkerHost, WorkerState

log = logging.getLogger(__name__)

PATH = "/etcdserverpb.Lease/LeaseKeepAlive"
LEASE_REVOKE = by_name("etcdserverpb.Lease", "LeaseRevoke")
# The proxy's own stream always requires a leader: a leaderless member must not swallow renewals.
METADATA = (("hasleader", "true"),)
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 1.0
PRUNE_EVERY_S = 1.0
FORGET_TIMEOUT_S = 1.0


class RevokeAwareForwarder:
    """The hub's Forwarder, telling the renewal book about every LeaseRevoke it forwards.

    Installed over ``hub.forwarder`` (wrapping whatever is there) so the unary path stays the
    hub's own; anything but ``unary`` is delegated untouched.
    """

    def __init__(self, inner: Any, book: RenewalBook[bytes], forget: Callable[[int], Awaitable[None]]) -> None:
        self._inner = inner
        self._book = book
        self._forget = forget  # every worker drops its copy of the lease's renewal (acknowledged)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def unary(self, method: Method, payload: bytes, metadata: s.Metadata, timeout_s: float | None) -> Any:
        if method is not LEASE_REVOKE:
            return await self._inner.unary(method, payload, metadata, timeout_s)
        lease_id = int(pb.LeaseRevokeRequest.FromString(payload).ID)  # the worker checked the bytes
        self._book.revoking(lease_id)
        await self._forget(lease_id)
        try:
            return await self._inner.unary(method, payload, metadata, timeout_s)
        finally:
            self._book.revoking(lease_id)
            # before the reply leaves: no worker may answer a later keepalive from a pre-revoke renewal
            await self._forget(lease_id)


# Renewal times are time.monotonic(), not the loop's clock: workers compare them with their own monotonic clock
# (core.lease.Window), and an event loop may cache its time per iteration.
class LeaseHub:
    def __init__(self, hub: WorkerHost) -> None:
        self.hub = hub
        self.book: RenewalBook[bytes] = RenewalBook(hub.config.lease_keepalive_window_s)  # waiters: worker identities
        self._outbox: asyncio.Queue[int] | None = None  # leases to write on the current stream
        self._call: Any = None  # the current upstream call, None while (re)connecting
        self._wanted = asyncio.Event()  # set while a renewal waits for a stream
        self._task: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.renewals_sent = 0  # upstream keepalive requests written (tests and logs)
        self._forget_ids = itertools.count(1)
        self._forgetting: dict[int, tuple[set[bytes], asyncio.Future[None]]] = {}  # ack id -> (workers, done)
        hub.register(s.Kind.LEASE_KEEPALIVE, self._on_keepalive)
        hub.register(s.Kind.LEASE_FORGOTTEN, self._on_forgotten)
        hub.worker_gone.append(self._on_worker_gone)
        hub.closers.append(self.close)
        hub.forwarder = RevokeAwareForwarder(hub.forwarder, self.book, self.forget)  # type: ignore[assignment]

    # ---- worker side ---------------------------------------------------------------------

    def _on_keepalive(self, worker: WorkerState, message: s.LeaseKeepAlive) -> None:
        lease_id = message.lease_id
        verdict, payload = self.book.request(lease_id, worker.identity, time.monotonic())
        if verdict is Verdict.ANSWER:
            self._answer(worker, lease_id, payload)
        elif verdict is Verdict.SEND:
            self._send(lease_id)

    def _on_worker_gone(self, worker: WorkerState) -> None:
        self.book.worker_gone(worker.identity)
        for ack_id in list(self._forgetting):
            self._forgotten(ack_id, worker.identity)

    def _answer(self, worker: WorkerState, lease_id: int, payload: bytes) -> None:
        hub = self.hub
        renewal = self.book.recent.get(lease_id)  # set iff this answer may be reused within the window
        sent_at, ttl = (renewal.sent_at, renewal.ttl) if renewal is not None else (0.0, 0)
        hub.send(worker, s.LeaseAnswer(hub.epoch, hub.next_seq(worker), lease_id, payload, sent_at, ttl))

    async def forget(self, lease_id: int) -> None:
        """Every worker drops its copy of ``lease_id``'s renewal; returns once all acknowledged (or 1 s)."""
        hub = self.hub
        workers = set(hub.workers)
        if not workers:
            return
        ack_id = next(self._forget_ids)
        done: asyncio.Future[None] = hub.loop.create_future()
        self._forgetting[ack_id] = (workers, done)
        for worker in list(hub.workers.values()):
            hub.send(worker, s.LeaseForget(hub.epoch, hub.next_seq(worker), ack_id, lease_id))
        try:
            await asyncio.wait_for(asyncio.shield(done), FORGET_TIMEOUT_S)
        except TimeoutError:
            log.warning("a worker did not acknowledge forgetting lease %x within %.0f s", lease_id, FORGET_TIMEOUT_S)
        finally:
            self._forgetting.pop(ack_id, None)

    def _on_forgotten(self, worker: WorkerState, message: s.LeaseForgotten) -> None:
        self._forgotten(message.ack_id, worker.identity)

    def _forgotten(self, ack_id: int, identity: bytes) -> None:
        entry = self._forgetting.get(ack_id)
        if entry is None:
            return
        workers, done = entry
        workers.discard(identity)
        if not workers and not done.done():
            done.set_result(None)

    def _broadcast_no_leader(self) -> None:
        hub = self.hub
        for worker in list(hub.workers.values()):
            hub.send(worker, s.LeaseNoLeader(hub.epoch, hub.next_seq(worker)))

    # ---- upstream ------------------------------------------------------------------------

    def _send(self, lease_id: int) -> None:
        """Renew ``lease_id`` on the current stream, or have the stream (re)opened for it."""
        if self._outbox is not None:
            self.book.sent(lease_id, time.monotonic())
            self._outbox.put_nowait(lease_id)
            return
        self._wanted.set()
        if self._task is None:
            self._task = self.hub.loop.create_task(self._run())
            self._pruner = self.hub.loop.create_task(self._prune_loop())

    async def _write_loop(self, call: Any, outbox: asyncio.Queue[int]) -> None:
        try:
            while True:
                lease_id = await outbox.get()
                await call.write(keepalive_request(lease_id))
                self.renewals_sent += 1
        except (aio.RpcError, asyncio.InvalidStateError) as exc:
            # the call ended; _run sees why on its next read and re-sends what is unanswered
            log.debug("upstream LeaseKeepAlive write failed: %r", exc)

    def _on_response(self, payload: bytes) -> None:
        lease_id, ttl = parse_response(payload)
        sent_at = self.book.in_flight.get(lease_id)
        if sent_at is not None:
            payload = late_answer(payload, ttl, sent_at, time.monotonic())
        workers = self.hub.workers
        for identity in self.book.answered(lease_id, ttl, payload):
            worker = workers.get(identity)
            if worker is not None:
                self._answer(worker, lease_id, payload)

    async def _run(self) -> None:
        """Keep one upstream stream while renewals are wanted; re-send what a broken one lost."""
        backoff = BACKOFF_MIN_S
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            call = self.hub.channel.stream_stream(PATH)(metadata=METADATA, wait_for_ready=True)
            outbox: asyncio.Queue[int] = asyncio.Queue()
            self._call, self._outbox = call, outbox
            writer = self.hub.loop.create_task(self._write_loop(call, outbox))
            for lease_id in self.book.unsent():
                self._send(lease_id)
            try:
                while True:
                    message = await call.read()
                    if message is aio.EOF:
                        log.warning("upstream LeaseKeepAlive stream ended by etcd; re-opening")
                        break
                    self._on_response(message)
                    backoff = BACKOFF_MIN_S
            except aio.RpcError as exc:
                details = exc.details() or ""
                if details == errors.NO_LEADER.message:
                    log.warning("upstream LeaseKeepAlive: etcd has no leader; telling require-leader clients")
                    self._broadcast_no_leader()
                else:
                    log.warning("upstream LeaseKeepAlive stream failed (%s: %s); re-opening", exc.code().name, details)
            except asyncio.CancelledError:
                if not interrupted():
                    raise
                log.warning("upstream LeaseKeepAlive stream: endpoint failover; re-opening")
            except Exception:  # a bug must not stop renewals for good
                log.exception("upstream LeaseKeepAlive stream: unexpected error; re-opening")
            finally:
                writer.cancel()
                call.cancel()
                self._call = self._outbox = None
                self.book.stream_lost()
            # Renewals that were in flight are wanted again, plus whatever arrived meanwhile.
            if self.book.unsent():
                self._wanted.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            self.book.prune(time.monotonic())

    async def close(self) -> None:
        for task in (self._task, self._pruner):
            if task is not None:
                task.cancel()
        if self._call is not None:
            self._call.cancel()
