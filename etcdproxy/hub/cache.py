"""The hub's part of the range cache: invalidations for every worker, and when they may serve hits.

The caches live in the workers (worker/cache.py); the hub sees every write and runs one
upstream watch, so it tells all workers what became stale:

* Writes through this proxy: after the write's upstream call ends (OK, or an error with which
  it may have been applied), a ``CacheInvalidate`` goes to every worker, and the writer's reply
  is held until every other worker acknowledged it (the writer's own worker gets it on the same
  ordered link, before the reply). So once a client has its answer, no worker serves the old
  value: read-your-writes holds across connections and workers. A worker that does not ack
  within ``ACK_TIMEOUT_S`` is logged and the reply goes out anyway.
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
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from etcdproxy.core.cache import Invalidation, header_revision, invalidation_for
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
WHOLE_KEYSPACE = rpc_pb2.WatchRequest(
    create_request=rpc_pb2.WatchCreateRequest(key=b"\x00", range_end=b"\x00")
).SerializeToString()
AUTH_STATUS_PATH = "/etcdserverpb.Auth/AuthStatus"
AUTH_PROBE_S = 1.0
AUTH_CODES = (StatusCode.INVALID_ARGUMENT, StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED)
PROGRESS = rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()).SerializeToString()


def _serializable(request: bytes) -> bool:
    try:
        return bool(rpc_pb2.RangeRequest.FromString(request).serializable)
    except Exception:
        return True  # not ours to share; etcd will reject it


@dataclass(slots=True)
class SharedRange:
    """One upstream linearizable Range for identical calls; ``task`` is None until it starts."""

    done: asyncio.Future[tuple[int, bytes | str]]
    timeouts: list[float | None]
    task: asyncio.Task[tuple[int, bytes | str]] | None = None


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
        hub.register(s.Kind.CACHE_SYNC, self._on_sync)
        hub.register(s.Kind.CACHE_ACK, self._on_ack)
        hub.worker_gone.append(self._on_worker_gone)
        hub.closers.append(self.close)
        self._task = hub.loop.create_task(self._watch_loop())
        self._prober = hub.loop.create_task(self._auth_probe_loop())

    # ---- worker messages -----------------------------------------------------------------

    def _on_sync(self, worker: WorkerState, message: s.CacheSync) -> None:
        hub = self.hub
        hub.send(worker, s.CacheState(hub.epoch, hub.next_seq(worker), self.enabled, self.revision))

    def _on_ack(self, worker: WorkerState, message: s.CacheAck) -> None:
        self._acked(message.ack_id, worker.identity)

    def _on_worker_gone(self, worker: WorkerState) -> None:
        for ack_id in list(self._waiting):
            self._acked(ack_id, worker.identity)

    def _acked(self, ack_id: int, identity: bytes) -> None:
        waiting = self._waiting.get(ack_id)
        if waiting is not None:
            workers, done = waiting
            workers.discard(identity)
            if not workers and not done.done():
                done.set_result(None)

    # ---- writes through the proxy ----------------------------------------------------------

    async def after_call(
        self, writer: WorkerState, method: Method, request: bytes, code: int, body: bytes | str
    ) -> None:
        """Invalidate what a finished call may have changed; return once every worker applied it."""
        if code == 0 and method.name == "AuthEnable" and method.service == "etcdserverpb.Auth" and not self._auth_on:
            # auth enabled through us: stop hits now, before the reply leaves (the probe would take up to a second)
            log.info("etcd auth is on (AuthEnable through the proxy): range cache paused")
            self._auth_on = True
            self._update_state()
        invalidation = invalidation_for(method.service, method.name, request, code)
        if invalidation is None:
            return
        revision = header_revision(body) if code == 0 and isinstance(body, bytes) else 0
        done = self.broadcast(invalidation, revision, writer)
        if done is None or done.done():
            return
        # one timer, no Task: wait_for(shield(...)) cost two Tasks and a timer per write
        timer = self.hub.loop.call_later(ACK_TIMEOUT_S, _ack_timeout, done)
        try:
            await done
        finally:
            timer.cancel()

    def after_cancel(self, method: Method, request: bytes) -> None:
        """The client gave up on a call that may still have been applied: invalidate, no waiting."""
        invalidation = invalidation_for(method.service, method.name, request, UNKNOWN)
        if invalidation is not None:
            self.broadcast(invalidation, 0, None)

    def broadcast(
        self, invalidation: Invalidation, revision: int, writer: WorkerState | None
    ) -> asyncio.Future[None] | None:
        """Send ``invalidation`` to every worker; a future of the acks of all but ``writer`` (None: none due)."""
        hub = self.hub
        others = {identity for identity, worker in hub.workers.items() if worker is not writer}
        ack_id = next(self._ack_ids) if others and writer is not None else 0
        intervals = list(invalidation.intervals)
        for worker in list(hub.workers.values()):
            message = s.CacheInvalidate(
                hub.epoch,
                hub.next_seq(worker),
                0 if worker is writer else ack_id,
                intervals,
                invalidation.flush,
                invalidation.compact_revision,
                revision,
            )
            hub.send(worker, message)
        self.invalidations_sent += 1
        if not ack_id:
            return None
        done: asyncio.Future[None] = hub.loop.create_future()
        self._waiting[ack_id] = (others, done)
        done.add_done_callback(lambda _: self._waiting.pop(ack_id, None))
        return done

    # ---- identical linearizable Ranges -------------------------------------------------------

    async def forward(self, method: Method, message: s.Unary) -> tuple[int, bytes | str]:
        """Forward a unary call; identical linearizable Ranges share one upstream request.

        Joining is allowed only until the shared request starts, and it starts only after the
        leader yielded once (letting every call already received join): so the request etcd
        serves was sent after each caller's request arrived, and every answer is linearizable.
        """
        if not self._auth_on and any(key == "token" for key, _ in message.metadata):
            self._probe_now.set()  # a client with a token: auth may have been enabled elsewhere
        forwarder = self.hub.forwarder
        if method is not RANGE or _serializable(message.payload):
            return await forwarder.unary(method, message.payload, message.metadata, message.timeout_s)
        key = (message.payload, tuple(message.metadata))
        shared = self._linear.get(key)
        if shared is not None and shared.task is None:
            shared.timeouts.append(message.timeout_s)
            self.linear_shared += 1
            return await asyncio.shield(shared.done)
        shared = self._linear[key] = SharedRange(self.hub.loop.create_future(), [message.timeout_s])
        await asyncio.sleep(0)  # calls already received get to join
        timeout = None if None in shared.timeouts else max(t for t in shared.timeouts if t is not None)
        shared.task = self.hub.loop.create_task(forwarder.unary(method, message.payload, message.metadata, timeout))

        def finished(task: asyncio.Task[tuple[int, bytes | str]]) -> None:
            if self._linear.get(key) is shared:
                del self._linear[key]
            if task.cancelled():
                shared.done.set_result((CANCELLED, "context canceled"))
            elif task.exception() is not None:
                shared.done.set_result((UNKNOWN, f"etcdproxy: {task.exception()}"))
            else:
                shared.done.set_result(task.result())

        shared.task.add_done_callback(finished)
        return await asyncio.shield(shared.done)

    # ---- writes made elsewhere: the invalidation watch ---------------------------------------

    def _update_state(self) -> None:
        self._set_state(bool(self._watching) and not self._auth_on, self._watching)

    def _set_state(self, enabled: bool, revision: int) -> None:
        if enabled == self.enabled and revision == self.revision:
            return
        self.enabled, self.revision = enabled, revision
        log.info("range cache %s", f"serving (watch from revision {revision})" if enabled else "paused (no watch)")
        hub = self.hub
        for worker in list(hub.workers.values()):
            hub.send(worker, s.CacheState(hub.epoch, hub.next_seq(worker), enabled, revision))

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
                if response.events:
                    keys = list(dict.fromkeys(event.kv.key for event in response.events))
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
