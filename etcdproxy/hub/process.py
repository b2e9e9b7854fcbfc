"""The hub process: the one upstream connection to etcd, serving every worker over IPC.

Lifecycle: fork (by the supervisor) -> main() -> asyncio loop -> Hub.serve() until SIGTERM.
The hub's ``epoch`` is random per process; workers notice a new one and recover (see
ipc/schema.py). Shared state (``workers``) is mutated only from the event loop thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq

from etcdproxy import proc, upstream
from etcdproxy.config import Config
from etcdproxy.core.methods import METHODS, Method, Shape, by_name
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import aio
from etcdproxy.h2.status import StatusCode
from etcdproxy.hub.cache import CacheHub
from etcdproxy.hub.cluster import ClusterHub
from etcdproxy.hub.forward import CANCELLED, MOVED, OK, RETRY_BACKOFF_S, UNAVAILABLE, Forwarder, UpstreamStream
from etcdproxy.hub.host import WorkerState
from etcdproxy.hub.http import MetricsServer
from etcdproxy.hub.lease import LeaseHub
from etcdproxy.hub.watch import WatchHub
from etcdproxy.ipc import codec
from etcdproxy.ipc import schema as s
from etcdproxy.ipc.sockets import HubLink, new_context

log = logging.getLogger(__name__)

# A worker that sent nothing (not even a Ping) for this long is considered gone: its calls
# and streams are cancelled so upstream resources are released.
WORKER_SILENCE_S = 5.0
MEMBER_LIST = by_name("etcdserverpb.Cluster", "MemberList")
COMPACT = by_name("etcdserverpb.KV", "Compact")
RANGE = by_name("etcdserverpb.KV", "Range")
LEASE_REVOKE = by_name("etcdserverpb.Lease", "LeaseRevoke")


class DirectCall:
    """A forwarded unary call in flight without a Task (Hub._start_direct): in ``worker.calls`` like a Task,
    so a Cancel from the worker or the worker's loss cancels it the same way."""

    __slots__ = (
        "cancelled",
        "channel",
        "finished",
        "hub",
        "leave",
        "message",
        "method",
        "started",
        "stream",
        "waiting",
        "worker",
    )

    def __init__(self, hub: Hub, worker: WorkerState, method: Method, message: s.Unary, channel: Any) -> None:
        self.hub = hub
        self.worker = worker
        self.method = method
        self.message = message
        self.channel = channel  # the AioChannel it went out on (a different one now means failover)
        self.started = hub.loop.time()
        self.stream: Any = None
        self.waiting: asyncio.Future[None] | None = None  # the cache invalidation acks, if waited for
        self.leave: Callable[[], None] | None = None  # withdraws a Range from a shared request
        self.cancelled = False  # cancelled, or replied: nothing more happens
        self.finished = False  # the upstream answer came

    def done(self, code: int, text: str, response: bytes | None, unprocessed: bool) -> None:
        self.finished = True
        if not self.cancelled:
            self.hub._direct_done(self, code, text, response, unprocessed)

    def shared_answer(self, answer: tuple[int, bytes | str]) -> None:
        """The answer of the shared request a Range joined (never before the caller returned)."""
        self.finished = True
        if self.cancelled:
            return
        try:
            self.hub._complete(self, *answer)
        except Exception as exc:  # as _unary: the client gets UNKNOWN, the hub goes on
            log.exception("unary %s failed", self.method.path)
            self.hub._reply_direct(self, int(StatusCode.UNKNOWN), f"etcdproxy: {exc}")

    def cancel(self) -> None:
        """The client gave up (or its worker is gone): RST_STREAM upstream, invalidate, no reply."""
        if self.cancelled:
            return
        self.cancelled = True
        hub = self.hub
        if self.waiting is not None:
            self.waiting.cancel()
        elif self.leave is not None:
            self.leave()  # the shared request goes on for the others
        elif self.stream is not None and not self.finished:
            live = self.channel.channel
            if live is not None:
                live.cancel(self.stream)
        if hub.cache is not None:
            hub.cache.after_cancel(self.method, self.message.payload)


class Hub:
    def __init__(self, config: Config, spec: proc.ChildSpec) -> None:
        self.config = config
        self.spec = spec
        self.epoch = random.getrandbits(62) + 1
        self.workers: dict[bytes, WorkerState] = {}
        self.loop = asyncio.get_running_loop()
        self.upstream = upstream.Upstream(config)
        self.forwarder = Forwarder(self.upstream)
        self.ctx = new_context()
        self.link = HubLink(self.ctx, proc.hub_endpoint(spec.run_dir), self._on_frame, self._on_unreachable, self.loop)
        self.hostname = socket.gethostname()
        self._stop = asyncio.Event()
        # Components (watch hub, lease hub) register the message kinds they handle and are
        # told when a worker goes away; both tables are filled in __init__ and then read-only.
        self.handlers: dict[s.Kind, Callable[[WorkerState, Any], None]] = {}
        self.worker_gone: list[Callable[[WorkerState], None]] = []
        self.closers: list[Callable[[], Awaitable[None]]] = []

        self.watches = WatchHub(self)
        self.leases = LeaseHub(self)
        self.cluster = ClusterHub(self)  # MemberList modes, --resolver-prefix registration
        self.cache = CacheHub(self) if config.cache else None
        # last: it wraps handlers the components registered (to count leases kept alive)
        # its routes also answer HTTP/1.1 on the gRPC port (workers relay HttpRequest); it listens only with
        # --metrics-addr
        self.http_routes = MetricsServer(self)
        self.metrics_server = self.http_routes if config.metrics_addr else None
        self.register(s.Kind.HTTP_REQUEST, self._on_http_request)

    @property
    def channel(self) -> aio.AioChannel:
        """The current channel to etcd: it changes on failover, so read it at each (re)open."""
        return self.upstream.channel

    def register(self, kind: s.Kind, handler: Callable[[WorkerState, Any], None]) -> None:
        self.handlers[kind] = handler

    # ---- sending -------------------------------------------------------------------------

    def _seq(self, worker: WorkerState) -> int:
        worker.seq += 1
        return worker.seq

    def _send(self, worker: WorkerState, message: s.HubMessage) -> None:
        self.link.send(worker.identity, codec.encode(message))

    def next_seq(self, worker: WorkerState) -> int:
        return self._seq(worker)

    def send(self, worker: WorkerState, message: s.HubMessage) -> None:
        """Send a message built with ``self.epoch`` and ``self.next_seq(worker)``."""
        self._send(worker, message)

    def reply(self, worker: WorkerState, req_id: int, code: int, body: bytes | str) -> None:
        self._send(worker, s.Reply(self.epoch, self._seq(worker), req_id, code, body))

    # ---- receiving -----------------------------------------------------------------------

    def _on_unreachable(self, identity: bytes) -> None:
        worker = self.workers.pop(identity, None)
        if worker is not None:
            log.info("worker %s unreachable; dropping its calls", identity.decode())
            self._drop(worker)

    def _drop(self, worker: WorkerState) -> None:
        for gone in self.worker_gone:
            gone(worker)
        for task in worker.calls.values():
            task.cancel()
        for stream in worker.streams.values():
            stream.cancel()
        worker.calls.clear()
        worker.streams.clear()
        self.link.forget(worker.identity)

    def _on_frame(self, identity: bytes, frame: bytes) -> None:
        try:
            messages = codec.decode_frame(frame)
        except codec.CodecError as exc:
            log.error("dropping bad frame from %r: %s", identity, exc)
            return
        for message in messages:
            try:  # one failing handler must not drop the rest of the worker's batch
                self._on_message(identity, message)
            except Exception:
                log.exception("error handling %s from %s", message.kind.name, identity.decode())

    def _on_message(self, identity: bytes, message: s.Message) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            worker = self.workers[identity] = WorkerState(identity)
            log.info("worker %s connected", identity.decode())
        worker.last_seen = self.loop.time()
        kind = message.kind
        if kind is s.Kind.HELLO or kind is s.Kind.PING:
            self._send(worker, s.Pong(self.epoch, self._seq(worker), s.SCHEMA_VERSION))
            return
        epoch: int = message.epoch  # type: ignore[union-attr]
        if epoch != self.epoch:
            # Addressed to a previous hub: never execute it (it may have run there).
            if kind is s.Kind.UNARY or kind is s.Kind.STREAM_OPEN:
                req_id: int = message.req_id  # type: ignore[union-attr]
                self._send(worker, s.Stale(self.epoch, self._seq(worker), req_id))
            return
        if isinstance(message, s.Unary):
            self._on_unary(worker, message)
        elif isinstance(message, s.StreamSend):
            stream = worker.streams.get(message.req_id)
            if stream is not None:
                stream.send(message.payload)
        elif isinstance(message, s.StreamAck):
            stream = worker.streams.get(message.req_id)
            if stream is not None:
                stream.ack(message.count)
        elif isinstance(message, s.StreamOpen):
            self._on_stream_open(worker, message)
        elif isinstance(message, s.StreamHalfClose):
            stream = worker.streams.get(message.req_id)
            if stream is not None:
                stream.half_close()
        elif isinstance(message, s.Cancel):
            task = worker.calls.pop(message.req_id, None)
            if task is not None:
                task.cancel()
            stream = worker.streams.pop(message.req_id, None)
            if stream is not None:
                stream.cancel()
        else:
            handler = self.handlers.get(kind)
            if handler is None:
                log.error("no handler for %s from %s", kind.name, identity.decode())
            else:
                handler(worker, message)

    # ---- HTTP/1.1 on the gRPC port --------------------------------------------------------

    def _on_http_request(self, worker: WorkerState, message: s.HttpRequest) -> None:
        self.loop.create_task(self._http(worker, message))

    async def _http(self, worker: WorkerState, message: s.HttpRequest) -> None:
        try:
            response = await self.http_routes.route(message.method, message.path, {})
            status, ctype, body = response.status, response.content_type, response.body
        except Exception:
            log.exception("HTTP route %s failed", message.path)
            status, ctype, body = 500, "text/plain; charset=utf-8", b"Internal server error\n"
        self._send(worker, s.HttpAnswer(self.epoch, self._seq(worker), message.req_id, status, ctype, body))

    # ---- unary ---------------------------------------------------------------------------

    def _on_unary(self, worker: WorkerState, message: s.Unary) -> None:
        method = METHODS[message.method]
        if method is MEMBER_LIST and self.config.advertise_client_url:
            # with --advertise-client-url (as the Go proxy): the proxies instead of the etcd members (hub/cluster.py)
            self.reply(worker, message.req_id, OK, self.cluster.member_list() or b"")
            return
        if method is RANGE and self.cache is not None:
            if self._join_range(worker, method, message):
                return
        elif method is not LEASE_REVOKE and self._start_direct(worker, method, message):
            return
        task = self.loop.create_task(self._unary(worker, method, message))
        worker.calls[message.req_id] = task

    def _start_direct(self, worker: WorkerState, method: Method, message: s.Unary) -> bool:
        """The common case without a Task or a coroutine: the connection to etcd is up, so the call goes out
        now and its answer comes back through a callback. Anything else (no connection, a retry, a Range
        the cache may share, a LeaseRevoke the lease hub must see) takes the general path, ``_unary``."""
        channel = self.upstream.channel
        live = channel.channel
        if (
            live is None
            or channel.state is not aio.ChannelConnectivity.READY
            or not live.usable
            or (channel.max_send_bytes and len(message.payload) > channel.max_send_bytes)
        ):
            return False
        if self.cache is not None:
            self.cache.note_metadata(message.metadata)
        call = DirectCall(self, worker, method, message, channel)
        worker.calls[message.req_id] = call
        call.stream = live.start_unary(method.path, message.payload, message.metadata, message.timeout_s, call.done)
        if call.finished:  # answered at once (the connection closed under the call): no stream to cancel
            call.stream = None
        return True

    def _join_range(self, worker: WorkerState, method: Method, message: s.Unary) -> bool:
        """A linearizable Range shares the upstream request of identical ones (CacheHub.join_linear), no Task."""
        assert self.cache is not None
        call = DirectCall(self, worker, method, message, self.upstream.channel)
        leave = self.cache.join_linear(message, call.shared_answer)
        if leave is None:
            return False
        call.leave = leave
        worker.calls[message.req_id] = call
        return True

    def _direct_done(self, call: DirectCall, code: int, text: str, response: bytes | None, unprocessed: bool) -> None:
        """The upstream answer of a direct call, with Forwarder.unary's retry rules for the first attempt."""
        try:
            self._direct_answer(call, code, text, response, unprocessed)
        except Exception as exc:  # as _unary: the client gets UNKNOWN, the hub goes on
            log.exception("unary %s failed", call.method.path)
            self._reply_direct(call, int(StatusCode.UNKNOWN), f"etcdproxy: {exc}")

    def _direct_answer(self, call: DirectCall, code: int, text: str, response: bytes | None, unprocessed: bool) -> None:
        worker, method, message = call.worker, call.method, call.message
        if code == OK:
            self._complete(call, OK, response or b"")
            return
        moved = code in (CANCELLED, UNAVAILABLE) and call.channel is not self.upstream.channel
        if (method.idempotent or unprocessed) and (code == UNAVAILABLE or moved):
            # repeatable: the general path takes over (waits for a connection, retries, follows failover) with
            # what is left of the client's deadline; not moved: after Forwarder's pause
            timeout = message.timeout_s
            if timeout is not None:
                timeout -= self.loop.time() - call.started
                if timeout <= RETRY_BACKOFF_S:
                    self._complete(call, code, text)
                    return
            retry = dataclasses.replace(message, timeout_s=timeout)

            def general() -> None:
                if not call.cancelled:
                    worker.calls[message.req_id] = self.loop.create_task(self._unary(worker, method, retry))

            if moved:
                general()
            else:
                self.loop.call_later(RETRY_BACKOFF_S, general)
            return
        self._complete(call, *(MOVED if moved else (code, text)))

    def _complete(self, call: DirectCall, code: int, body: bytes | str) -> None:
        """As the end of ``_unary``: the cache invalidation settles before the reply leaves."""
        worker, method, message = call.worker, call.method, call.message
        if self.cache is not None:
            settled = self.cache.after_call(worker, method, message.payload, code, body)
            if not settled.done():  # type: ignore[attr-defined]
                call.waiting = settled  # type: ignore[assignment]
                settled.add_done_callback(lambda _: self._reply_direct(call, code, body))  # type: ignore[attr-defined]
                return
        self._reply_direct(call, code, body)

    def _reply_direct(self, call: DirectCall, code: int, body: bytes | str) -> None:
        if call.cancelled:
            return
        call.cancelled = True  # done: a late Cancel from the worker finds nothing to do
        call.waiting = None
        worker, method, message = call.worker, call.method, call.message
        if worker.calls.get(message.req_id) is call:
            del worker.calls[message.req_id]
        if method is COMPACT and code == OK:  # history below it is gone upstream: no joins there
            self.watches.note_compaction(rpc_pb2.CompactionRequest.FromString(message.payload).revision)
        self.reply(worker, message.req_id, code, body)

    async def _unary(self, worker: WorkerState, method: Method, message: s.Unary) -> None:
        try:
            if self.cache is not None:  # shares identical linearizable Ranges
                code, body = await self.cache.forward(method, message)
            else:
                code, body = await self.forwarder.unary(method, message.payload, message.metadata, message.timeout_s)
            if self.cache is not None:  # every worker drops what the call changed before the reply
                await self.cache.after_call(worker, method, message.payload, code, body)
            if method is COMPACT and code == OK:  # history below it is gone upstream: no joins there
                self.watches.note_compaction(rpc_pb2.CompactionRequest.FromString(message.payload).revision)
        except asyncio.CancelledError:
            if self.cache is not None:
                self.cache.after_cancel(method, message.payload)
            return  # the client gave up; nobody waits for an answer
        except Exception as exc:
            log.exception("unary %s failed", method.path)
            code, body = int(StatusCode.UNKNOWN), f"etcdproxy: {exc}"
        finally:
            worker.calls.pop(message.req_id, None)
        self.reply(worker, message.req_id, code, body)

    # ---- streams -------------------------------------------------------------------------

    def _on_stream_open(self, worker: WorkerState, message: s.StreamOpen) -> None:
        method = METHODS[message.method]
        if method.shape is Shape.UNARY:
            return
        req_id = message.req_id

        def emit(payload: bytes) -> None:
            self._send(worker, s.StreamRecv(self.epoch, self._seq(worker), req_id, payload))

        def finish(code: int, text: str) -> None:
            worker.streams.pop(req_id, None)
            self._send(worker, s.StreamEnd(self.epoch, self._seq(worker), req_id, code, text))

        worker.streams[req_id] = UpstreamStream(
            self.upstream, method, message.metadata, message.timeout_s, emit, finish
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = self.loop.time()
            for identity, worker in list(self.workers.items()):
                if now - worker.last_seen > WORKER_SILENCE_S:
                    log.info("worker %s silent for %.0f s; dropping it", identity.decode(), now - worker.last_seen)
                    del self.workers[identity]
                    self._drop(worker)

    async def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.loop.add_signal_handler(sig, self._stop.set)
        if self.metrics_server is not None:
            try:
                await self.metrics_server.start()
            except OSError as exc:
                log.error("cannot listen on --metrics-addr %s: %s", self.config.metrics_addr, exc)
                return proc.EXIT_BOOT_ERROR
            self.closers.append(self.metrics_server.close)
        self.link.start()
        self.upstream.start()
        tasks = [
            self.loop.create_task(proc.heartbeat_loop(self.spec)),
            self.loop.create_task(self._sweep()),
        ]
        proc.notify_ready(self.spec)
        log.info("hub ready (epoch %x) on %s", self.epoch, proc.hub_endpoint(self.spec.run_dir))
        await self._stop.wait()
        log.info("hub stopping")
        for task in tasks:
            task.cancel()
        for worker in self.workers.values():
            self._drop(worker)
        for close in self.closers:
            await close()
        self.link.close()
        await self.upstream.close()
        self.ctx.term()
        return 0


def main(config: Config, spec: proc.ChildSpec) -> int:
    proc.child_init(spec, config.debug)
    started = time.monotonic()

    async def run() -> int:
        try:
            hub = Hub(config, spec)
        except zmq.ZMQError as exc:
            log.error("hub cannot bind %s: %s", proc.hub_endpoint(spec.run_dir), exc)
            return proc.EXIT_BOOT_ERROR
        return await hub.serve()

    try:
        import uvloop  # the hub's per-message cost is mostly event-loop work: uvloop cuts it (optional)
    except ImportError:
        code = asyncio.run(run())
    else:
        code = uvloop.run(run())
    log.info("hub exiting with %d after %.1f s (pid %d)", code, time.monotonic() - started, os.getpid())
    return code
