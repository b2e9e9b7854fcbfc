"""KV.Range of a worker: serializable Ranges answered from this worker's RangeCache.

A hit is a dict lookup on (auth token, request bytes) and returns etcd's stored response bytes:
no protobuf decode of request or response, no trip to the hub. A miss is forwarded through the
hub like any unary call and its answer fills the cache (linearizable answers too, stored under
the request re-serialized with ``serializable=true``, as the Go proxy does); linearizable Ranges
always reach etcd. Identical serializable misses in flight at once share one upstream request,
unless an overlapping invalidation arrived after that request left. Identical linearizable Ranges
(same bytes, same forwarded metadata) share one while it has not left the worker: it reaches etcd
after each of them began, so its answer is a linearizable answer for all (the hub shares further,
by the same rule, until its request to etcd starts).

What is stale comes from the hub (hub/cache.py): ``CacheInvalidate`` for writes through any
worker (acknowledged, so the writer's reply waits until this worker dropped the old value) and
for events of the hub's invalidation watch, only when this worker may hold something they touch
(the hub tracks the intervals of the Ranges it forwarded for this worker since its last flush);
``CacheState`` turns hits off while that watch is
down and back on (from empty) once it is re-established. After a hub restart or a lost hub
frame the cache is flushed and off until the hub answers ``CacheSync``; while the hub is silent
(hubclient.HUB_SILENCE_S) no hits are served.

Counters for metrics (the Go proxy's metric names): ``hits`` (etcd_grpc_proxy_cache_hits_total, incl.
compaction rejections, like Go), ``misses`` (..._cache_misses_total, serializable misses only),
``keys`` (..._cache_keys_total, entries). State is mutated only on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from etcdproxy import metrics
from etcdproxy.config import Config
from etcdproxy.core import errors, wire
from etcdproxy.core.cache import CacheKey, Interval, RangeCache, Ticket, to_interval
from etcdproxy.core.methods import by_name
from etcdproxy.core.namespace import Namespace, Refused
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import rpc
from etcdproxy.h2.status import StatusCode
from etcdproxy.ipc import schema as s
from etcdproxy.ipc.sockets import WorkerLink
from etcdproxy.worker.handlers import answer_forwarded, forwarded_metadata, refuse
from etcdproxy.worker.hubclient import HubClient

log = logging.getLogger(__name__)

RANGE = by_name("etcdserverpb.KV", "Range")


def identity_of(metadata: s.Metadata) -> str:
    """The cache identity: the auth token (a user's second token gets its own entries)."""
    for key, value in metadata:
        if key == "token":
            return value
    return ""


class RangeService:
    def __init__(self, hub: HubClient, config: Config, namespace: Namespace | None = None) -> None:
        self.hub = hub
        # --namespace: entries are found by the client's request bytes but indexed by intervals in
        # etcd's key space (where invalidations live), and store client-visible (stripped) answers
        self.namespace = namespace
        # off until the hub says its invalidation watch is up (CacheState)
        self.cache = RangeCache(config.cache_max_entries, config.cache_max_bytes, enabled=False)
        # serializable misses in flight, each shared by the identical misses that arrive while it is out
        self._inflight: dict[CacheKey, _Shared] = {}
        # linearizable Ranges by (forwarded metadata, request bytes), joinable until their request leaves
        # the worker (etcd then serves it after every joiner began: a linearizable answer for all of them)
        self._linear: dict[tuple[tuple[Any, ...], bytes], _Shared] = {}
        self.stats = metrics.rpc_stats("unary", "etcdserverpb.KV", "Range")  # the RpcStats instrument() uses
        hub.handlers[s.Kind.CACHE_STATE] = self._on_state
        hub.handlers[s.Kind.CACHE_INVALIDATE] = self._on_invalidate
        hub.on_new_epoch.append(self._on_new_epoch)
        hub.on_gap.append(self._resync)
        self._reported = (0, 0, -1)  # hits, misses, keys last written to the metrics files
        self._reporter = hub.loop.create_task(self._report_loop())

    def handler(self) -> rpc.MethodHandler:
        return rpc.unary_unary(self.range, inline=self.hit, start=self.start)

    def hit(self, request: bytes, context: rpc.Context) -> bytes | None:
        """A cache hit answered in the read path (no Task, no IPC, no decode); None: not a hit."""
        if not self.hub.epoch:  # no hits while the hub is silent: its invalidation watch may be gone with it
            return None
        identity = ""
        for key, value in context.metadata:
            if key == "token":
                identity = value  # type: ignore[assignment]
                break
        hit = self.cache.lookup(identity, request)
        if hit is None or isinstance(hit, bytes):
            return hit
        raise rpc.Abort(int(hit.code), hit.message)  # a compacted revision, answered like etcd

    # ---- metrics -------------------------------------------------------------------------

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def misses(self) -> int:
        return self.cache.misses

    @property
    def keys(self) -> int:
        return self.cache.keys

    def flush_metrics(self) -> None:
        """Write the counts to the multiprocess metric files (plain ints on the hot path, like RpcStats)."""
        hits, misses, keys = self.hits, self.misses, self.keys
        old_hits, old_misses, old_keys = self._reported
        if hits > old_hits:
            metrics.CACHE_HITS.inc(hits - old_hits)
        if misses > old_misses:
            metrics.CACHE_MISSES.inc(misses - old_misses)
        if keys != old_keys:
            metrics.CACHE_KEYS.set(keys)
        self._reported = (hits, misses, keys)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(metrics.FLUSH_INTERVAL_S)
            self.flush_metrics()

    # ---- the RPC -------------------------------------------------------------------------

    def start(self, request: bytes, context: rpc.Context, respond: rpc.Respond) -> rpc.Stop | None:
        """A Range the inline lookup did not answer (the Dispatcher tries ``hit`` first, in the same call
        stack, so nothing changed since): checked, then forwarded through the hub without a Task, its
        answer filling the cache. Counted in RpcStats like instrument() counts a behaviour."""
        stats = self.stats
        stats.started += 1
        stats.open += 1
        stats.received += 1
        try:
            metadata = forwarded_metadata(context)
            linear_key = (tuple(metadata), request)
            pending = self._linear.get(linear_key)
            if pending is not None and pending.unsent():
                # the same bytes as a linearizable Range that has not left this worker yet (so it was
                # checked, and reaches etcd after this call began): its answer is this call's answer too
                call = pending.leader.follower(context, respond)
                pending.followers.append(call)
                call.joined = pending
                return call.stop
            message, problem = wire.parse(rpc_pb2.RangeRequest, request)
            if problem is not None:
                refuse(stats, errors.unmarshal_error(problem), respond)
                return None
            upstream, forward = message, request  # what etcd gets; the cache key stays the client's bytes
            if self.namespace is not None:
                upstream = rpc_pb2.RangeRequest()
                upstream.CopyFrom(message)
                try:
                    self.namespace.range_request(upstream)
                except Refused as refused:
                    refuse(stats, refused.error, respond)
                    return None
                forward = upstream.SerializeToString()
            cache = self.cache
            serializable = message.serializable
            if serializable:
                compacted = cache.compacted_error(message.revision)
                if compacted is not None:
                    cache.hits += 1  # like Go: a compaction answer from the cache counts as a hit
                    refuse(stats, compacted, respond)
                    return None
                cache.misses += 1
                key = request
            else:
                message.serializable = True  # linearizable answers are stored as serializable ones
                key = message.SerializeToString()
            call = _RangeCall(self, context, respond, metadata, forward, upstream, (identity_of(metadata), key))
            if serializable:
                call.fetch(True)
            else:
                call.linear_key = linear_key
                call.send_linear()
        except BaseException:
            stats.end("Unknown")  # the Dispatcher answers UNKNOWN
            raise
        return call.stop

    async def range(self, request: bytes, context: rpc.Context) -> bytes:
        """The async form of ``start`` (the Dispatcher runs ``start``; same answers, counted there)."""
        answer: asyncio.Future[tuple[int, Any]] = self.hub.loop.create_future()
        stop = self.start(request, context, lambda code, body: answer.set_result((code, body)))
        try:
            code, body = await answer
        except asyncio.CancelledError:
            if stop is not None and not answer.done():
                stop()
            raise
        if code:
            await context.abort(code, body)
        return body  # type: ignore[no-any-return]

    # ---- hub messages --------------------------------------------------------------------

    def _on_state(self, message: s.CacheState) -> None:
        if message.enabled:
            self.cache.enable(message.revision)
        else:
            self.cache.disable()

    def _on_invalidate(self, message: s.CacheInvalidate) -> None:
        cache = self.cache
        if message.flush:
            cache.flush()
        for key, range_end in message.intervals:
            cache.invalidate(key, range_end, message.revision)
        if message.compact_revision:
            cache.compact(message.compact_revision)
        cache.floor = max(cache.floor, message.revision)
        if message.ack_id:
            self.hub.send(s.CacheAck(self.hub.epoch, message.ack_id))

    def _on_new_epoch(self) -> None:
        self.cache.floor = 0  # the new hub may watch a restored etcd whose revisions are lower
        self._resync()

    def _resync(self) -> None:
        """New hub or a lost frame: invalidations may be lost; flush (in-flight fills are then
        refused), stop serving, ask the hub for the state."""
        self.cache.disable()
        if self.hub.epoch:
            self.hub.send(s.CacheSync(self.hub.epoch))


# the answers that end only the call that sent the request (from its deadline or cancel), not the others'
_OWN_ENDINGS = frozenset({int(StatusCode.DEADLINE_EXCEEDED), int(StatusCode.CANCELLED)})


class _Shared:
    """A Range in flight and the identical ones that joined it. A serializable miss is joined while no
    overlapping invalidation arrived since it left (``still_valid`` on its ticket); a linearizable Range only
    while its request has not left the worker (``unsent``)."""

    __slots__ = ("flushes", "followers", "interval", "leader", "link", "ticket")

    def __init__(self, ticket: Ticket, interval: Interval, leader: _RangeCall) -> None:
        self.ticket = ticket
        self.interval = interval
        self.leader = leader
        self.followers: list[_RangeCall] = []
        # a linearizable one: joinable while the IPC link has not sent a frame since its request was queued
        self.link: WorkerLink | None = None
        self.flushes = 0

    def unsent(self) -> bool:
        link = self.link
        return link is not None and link.flushes == self.flushes


class _RangeCall:
    """One forwarded Range: sent to the hub itself (``req_id``), or waiting on another's answer (``joined``)."""

    __slots__ = (
        "context",
        "forward",
        "interval",
        "joined",
        "key",
        "leads",
        "linear_key",
        "metadata",
        "req_id",
        "respond",
        "service",
        "ticket",
        "upstream",
    )

    def __init__(
        self,
        service: RangeService,
        context: rpc.Context,
        respond: rpc.Respond,
        metadata: s.Metadata,
        forward: bytes,
        upstream: rpc_pb2.RangeRequest,
        key: CacheKey,
        interval: Interval | None = None,
    ) -> None:
        self.service = service
        self.context = context
        self.respond = respond
        self.metadata = metadata
        self.forward = forward
        self.upstream = upstream
        self.key = key
        self.interval = to_interval(upstream.key, upstream.range_end) if interval is None else interval
        self.ticket: Ticket | None = None
        self.req_id = 0
        self.leads: _Shared | None = None  # the shared request this call is the sender of
        self.joined: _Shared | None = None  # the shared request this call waits on
        self.linear_key: tuple[tuple[Any, ...], bytes] | None = None  # set for a linearizable Range

    def follower(self, context: rpc.Context, respond: rpc.Respond) -> _RangeCall:
        """A call of the same request (same bytes and metadata), to be answered with this one's answer."""
        call = _RangeCall(
            self.service, context, respond, self.metadata, self.forward, self.upstream, self.key, self.interval
        )
        call.linear_key = self.linear_key
        return call

    def send_linear(self) -> None:
        """Send a linearizable Range that identical ones may join until it leaves the worker."""
        service = self.service
        assert self.linear_key is not None
        self.ticket = ticket = service.cache.ticket()
        self.leads = shared = service._linear[self.linear_key] = _Shared(ticket, self.interval, self)
        link = shared.link = service.hub.link
        self._send()
        shared.flushes = link.flushes

    def fetch(self, share: bool) -> None:
        service = self.service
        cache, inflight = service.cache, service._inflight
        if share:
            shared = inflight.get(self.key)
            if shared is not None and cache.still_valid(shared.ticket, self.interval):
                shared.followers.append(self)
                self.joined = shared
                return
        self.ticket = ticket = cache.ticket()
        if share and cache.enabled and self.key not in inflight:
            self.leads = inflight[self.key] = _Shared(ticket, self.interval, self)
        self._send()

    def _send(self) -> None:
        timeout = self.context.time_remaining()
        self.req_id = self.service.hub.start_call(RANGE, self.forward, self.metadata, timeout, self.reply)

    def reply(self, code: int, body: bytes | str) -> None:
        """The hub's answer: fills the cache, answers this call and every one that joined it."""
        service = self.service
        try:
            if code == 0 and isinstance(body, bytes):
                if service.namespace is not None:
                    body = service.namespace.response(RANGE.path, body)
                upstream = self.upstream
                assert self.ticket is not None
                service.cache.fill(
                    self.ticket, self.key[0], self.key[1], upstream.key, upstream.range_end, upstream.revision, body
                )
        except Exception as exc:
            log.exception("answer of %s failed", RANGE.path)
            code, body = -1, f"Unexpected {type(exc).__name__}: {exc}"
        followers = self._release()
        self.answer(code, body)
        if code in _OWN_ENDINGS:  # this caller's deadline or cancel, not the others': they go on
            self._hand_on(followers)
            return
        for follower in followers:
            follower.joined = None
            follower.answer(code, body)

    def answer(self, code: int, body: bytes | str) -> None:
        answer_forwarded(self.service.stats, self.respond, code, body)

    def _release(self) -> list[_RangeCall]:
        shared, self.leads = self.leads, None
        if shared is None:
            return []
        if self.linear_key is not None:
            linear = self.service._linear
            if linear.get(self.linear_key) is shared:
                del linear[self.linear_key]
        else:
            inflight = self.service._inflight
            if inflight.get(self.key) is shared:
                del inflight[self.key]
        return shared.followers

    def _hand_on(self, followers: list[_RangeCall]) -> None:
        """The sender is gone (reset, or its own deadline passed): those that joined it get their own request."""
        if followers and self.linear_key is not None:
            # the first that joined sends it now (after they all began), the others wait on it
            heir, rest = followers[0], followers[1:]
            heir.joined = None
            heir.send_linear()
            assert heir.leads is not None
            heir.leads.followers = rest
            for follower in rest:
                follower.joined = heir.leads
            return
        for follower in followers:  # serializable: each sends (and shares) its own
            follower.joined = None
            follower.fetch(True)

    def stop(self) -> None:
        """The client reset the call or its deadline passed (the transport answered it)."""
        service = self.service
        joined = self.joined
        if joined is not None:
            self.joined = None
            joined.followers.remove(self)
        else:
            service.hub.cancel(self.req_id)
            self._hand_on(self._release())
        remaining = self.context.time_remaining()
        service.stats.end("DeadlineExceeded" if remaining is not None and remaining <= 0 else "Canceled")
