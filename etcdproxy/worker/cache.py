"""KV.Range of a worker: serializable Ranges answered from this worker's RangeCache.

A hit is a dict lookup on (auth token, request bytes) and returns etcd's stored response bytes:
no protobuf decode of request or response, no trip to the hub. A miss is forwarded through the
hub like any unary call and its answer fills the cache (linearizable answers too, stored under
the request re-serialized with ``serializable=true``, as the Go proxy does); linearizable Ranges
always reach etcd. Identical serializable misses in flight at once share one upstream request,
unless an overlapping invalidation arrived after that request left.

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
from etcdproxy.core.cache import CacheKey, RangeCache, Ticket, to_interval
from etcdproxy.core.methods import by_name
from etcdproxy.core.namespace import Namespace, Refused
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import rpc
from etcdproxy.ipc import schema as s
from etcdproxy.worker.handlers import abort, forwarded_metadata
from etcdproxy.worker.hubclient import HubClient

log = logging.getLogger(__name__)

RANGE = by_name("etcdserverpb.KV", "Range")
Answer = tuple[int, bytes | str]  # (code, body) as the hub replies


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
        # serializable misses in flight: key -> (ticket, interval, answer or None if abandoned)
        self._inflight: dict[CacheKey, tuple[Ticket, tuple[bytes, bytes | None], asyncio.Future[Answer | None]]] = {}
        hub.handlers[s.Kind.CACHE_STATE] = self._on_state
        hub.handlers[s.Kind.CACHE_INVALIDATE] = self._on_invalidate
        hub.on_new_epoch.append(self._on_new_epoch)
        hub.on_gap.append(self._resync)
        self._reported = (0, 0, -1)  # hits, misses, keys last written to the metrics files
        self._reporter = hub.loop.create_task(self._report_loop())

    def handler(self) -> rpc.MethodHandler:
        return rpc.unary_unary(self.range, inline=self.hit)

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

    async def range(self, request: bytes, context: rpc.Context) -> bytes:
        metadata = forwarded_metadata(context)
        identity = identity_of(metadata)
        cache = self.cache
        # Only serializable requests can be stored under these bytes. No hits while the hub is silent
        # (HUB_SILENCE_S): its invalidation watch may be gone with it.
        hit = cache.lookup(identity, request) if self.hub.epoch else None
        if isinstance(hit, bytes):
            return hit
        if hit is not None:
            await abort(context, hit)
        message, problem = wire.parse(rpc_pb2.RangeRequest, request)
        if problem is not None:
            await abort(context, errors.unmarshal_error(problem))
        upstream, forward = message, request  # what etcd gets; the cache key stays the client's bytes
        if self.namespace is not None:
            upstream = rpc_pb2.RangeRequest()
            upstream.CopyFrom(message)
            try:
                self.namespace.range_request(upstream)
            except Refused as refused:
                await abort(context, refused.error)
            forward = upstream.SerializeToString()
        serializable = message.serializable
        if serializable:
            compacted = cache.compacted_error(message.revision)
            if compacted is not None:
                cache.hits += 1  # like Go: a compaction answer from the cache counts as a hit
                await abort(context, compacted)
            cache.misses += 1
            key = request
        else:
            message.serializable = True
            key = message.SerializeToString()
        cache_key = (identity, key)
        interval = to_interval(upstream.key, upstream.range_end)
        code, body = await self._fetch(forward, metadata, context, cache_key, interval, serializable, upstream)
        if code == 0:
            return body  # type: ignore[return-value]
        await context.abort(errors.CODES[code], str(body))
        raise AssertionError("unreachable")

    async def _fetch(
        self,
        request: bytes,
        metadata: s.Metadata,
        context: rpc.Context,
        cache_key: CacheKey,
        interval: tuple[bytes, bytes | None],
        serializable: bool,
        message: Any,
    ) -> Answer:
        cache = self.cache
        if serializable:
            shared = self._inflight.get(cache_key)
            if shared is not None and cache.still_valid(shared[0], interval):
                joined = await asyncio.shield(shared[2])
                if joined is not None:
                    return joined
        ticket = cache.ticket()
        mine: asyncio.Future[Answer | None] | None = None
        if serializable and cache.enabled and cache_key not in self._inflight:
            mine = self.hub.loop.create_future()
            self._inflight[cache_key] = (ticket, interval, mine)
        answer: Answer | None = None
        try:
            req_id, future = self.hub.call(RANGE, request, metadata, context.time_remaining())
            try:
                answer = await future
            except asyncio.CancelledError:
                self.hub.cancel(req_id)
                raise
            code, body = answer
            if code == 0 and isinstance(body, bytes) and self.namespace is not None:
                body = self.namespace.response(RANGE.path, body)
                answer = (code, body)
            if code == 0 and isinstance(body, bytes):
                cache.fill(ticket, cache_key[0], cache_key[1], message.key, message.range_end, message.revision, body)
            return answer
        finally:
            if mine is not None:
                self._inflight.pop(cache_key, None)
                mine.set_result(answer)  # None: abandoned, followers send their own request

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
