"""The only place that creates gRPC channels to etcd: endpoints, failover, limits, keepalive.

Runs in the hub only (after fork). The hub talks to one etcd endpoint at a time, chosen at
random at start (so several proxies spread over the members), through one channel. The
``Upstream`` object moves to the next endpoint when the current one

* cannot be reached (the channel falls into TRANSIENT_FAILURE: connection refused, connect
  timeout, or a keepalive ping left unanswered on a partitioned link), or
* has lost its raft leader (a require-leader Watch stream with no watcher, which etcd ends with
  ``etcdserver: no leader``; the Go proxy's ``__lostleader`` watch plays the same role).

Moving closes the old channel, which cancels every call on it: the hub's own streams (watch,
lease, cache, cluster) re-open on ``Upstream.channel`` and resume where they stood; forwarded
idempotent unary calls are retried there; mutations and forwarded client streams end with
UNAVAILABLE (they may have reached etcd, so only the client can decide to repeat them).

A channel to a single endpoint (instead of one channel balancing over all of them) keeps each
endpoint's TLS server name right and lets host names be re-resolved by grpc itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from etcdproxy import metrics, tls
from etcdproxy.config import Config
from etcdproxy.core import errors
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import aio
from etcdproxy.h2.client import ClientSettings
from etcdproxy.h2.status import StatusCode

log = logging.getLogger(__name__)

WATCH_PATH = "/etcdserverpb.Watch/Watch"
MEMBER_LIST_PATH = "/etcdserverpb.Cluster/MemberList"
# When --dial-keepalive-time is 0 (Go's "off"), the hub still pings etcd while calls are open,
# or a member behind a silent partition is never left (TCP alone gives up after ~15 min).
# 10 s is above etcd's default --grpc-keepalive-min-time (5 s), so etcd never answers with
# GOAWAY too_many_pings.
LIVENESS_PING_S = 10.0
LIVENESS_TIMEOUT_S = 5.0
# Lower bound of a connection attempt (grpc's default is 20 s): a member that accepts TCP but
# never speaks HTTP/2 is given up after this long.
CONNECT_TIMEOUT_MS = 3000
# Pause after every endpoint has failed in a row, doubling up to the cap.
ROUND_BACKOFF_S = (0.1, 2.0)
AUTO_SYNC_TIMEOUT_S = 5.0
# Operator-facing reachability log (_report_reachability): WARN once the hub has been without a
# READY connection for this long (so within 2 s of start or of the loss), then at most once per
# endpoint per WARN_EVERY_S; INFO when it connects again. The Go proxy logs every 1-2 s.
UNREACHABLE_AFTER_S = 1.0
WARN_EVERY_S = 10.0
REPORT_TICK_S = 0.25
STATUS_PATH = "/etcdserverpb.Maintenance/Status"


def interrupted() -> bool:
    """Inside ``except asyncio.CancelledError``: True if it came from a grpc call cancelled under
    us (its channel was closed to fail over, and grpc.aio raises CancelledError for calls
    cancelled locally), False if the running task itself is being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def host_port(endpoint: str) -> str:
    """``http://10.0.0.1:2379`` or ``10.0.0.1:2379`` -> ``10.0.0.1:2379``."""
    for scheme in ("http://", "https://", "unix://", "unixs://"):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/")
    return endpoint.rstrip("/")


def target(endpoint: str) -> str:
    """grpc target of one endpoint (host names are resolved, and re-resolved, by grpc)."""
    if endpoint.startswith(("unix://", "unixs://")):
        return "unix:" + host_port(endpoint)
    return host_port(endpoint)


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); etcd's default client port when none is given."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        return address.strip("[]"), 2379
    return host.strip("[]"), int(port)


def message_limits(config: Config) -> tuple[int, int]:
    """(send, receive) limits of the upstream channel in bytes, -1 for none: etcd itself decides what is too
    large, so only explicit --max-send-bytes/--max-recv-bytes limit anything (<= 0: none, like Go)."""
    send = config.max_send_bytes if config.max_send_bytes > 0 else -1
    receive = config.max_recv_bytes if config.max_recv_bytes > 0 else -1
    return send, receive


def open_channel(config: Config, endpoint: str) -> aio.AioChannel:
    """Our own HTTP/2 channel to one endpoint (etcdproxy.h2: no grpcio in the hub)."""
    host, port = split_host_port(host_port(endpoint))
    keepalive_s = config.dial_keepalive_time_s if config.dial_keepalive_time_s > 0 else LIVENESS_PING_S
    timeout_s = config.dial_keepalive_timeout_s if config.dial_keepalive_time_s > 0 else LIVENESS_TIMEOUT_S
    context = tls.upstream_ssl_context(config) if tls.upstream_tls(config) else None
    log.info("upstream channel to %s:%d%s", host, port, " over TLS" if context is not None else "")
    send, receive = message_limits(config)
    settings = ClientSettings(max_receive_message=receive if receive > 0 else 2**31 - 1)
    return aio.AioChannel(
        host,
        port,
        ssl_context=context,
        keepalive_time_s=keepalive_s,
        keepalive_timeout_s=timeout_s,
        connect_timeout_s=CONNECT_TIMEOUT_MS / 1000,
        backoff_s=(0.1, 2.0),
        max_send_bytes=max(send, 0),
        settings=settings,
    )


def _fields(endpoint: str) -> dict[str, dict[str, str]]:
    """Structured fields of a log line about ``endpoint`` (logs.py prints them)."""
    return {"fields": {"endpoint": endpoint}}


async def unreachable_reason(channel: aio.AioChannel, down_s: float) -> str:
    """Why ``channel`` has no connection, in grpc's words ("... Connection refused", "DNS resolution
    failed ..."), from one fail-fast call; "" if it got an answer from etcd after all."""
    call = channel.unary_unary(STATUS_PATH)
    try:
        await call(b"", timeout=1.0, wait_for_ready=False)
    except aio.RpcError as exc:
        if exc.code() is StatusCode.DEADLINE_EXCEEDED:
            return f"no connection after {down_s:.1f} s (connecting)"
        if exc.code() is StatusCode.UNAVAILABLE:
            return exc.details() or "unavailable"
        return ""  # etcd itself answered (e.g. auth): reachable
    except asyncio.CancelledError:
        if not interrupted():
            raise
        return ""  # failover closed the channel meanwhile
    return ""


def member_endpoints(members: list[tuple[str, bool, list[str]]]) -> list[str]:
    """Client URLs of named, non-learner members (clientv3's auto-sync rule), in order, once."""
    out: list[str] = []
    for name, is_learner, urls in members:
        if not name or is_learner:
            continue
        out.extend(u for u in urls if u not in out)
    return out


class Upstream:
    """The hub's channel to etcd and the endpoint it points at; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.endpoints = [e for e in config.endpoints if e]
        random.shuffle(self.endpoints)
        self.index = 0
        self.channel = open_channel(config, self.endpoint)
        self._failed_in_row = 0
        self._moves_logged: dict[str, tuple[float | None, int]] = {}  # endpoint -> (last WARN, moves not logged)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        metrics.UPSTREAM_ENDPOINTS.set([host_port(self.endpoint)])

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.index]

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_state()), loop.create_task(self._watch_leader())]
        self._tasks.append(loop.create_task(self._report_reachability()))
        if self.config.endpoints_auto_sync_interval_s > 0:
            self._tasks.append(loop.create_task(self._auto_sync()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.channel.close(grace=1.0)

    # ---- moving ----------------------------------------------------------------------------

    def fail_over(self, channel: aio.AioChannel, reason: str) -> bool:
        """Leave ``channel``'s endpoint for the next one; False if there is nowhere to go or
        someone already moved away from ``channel``."""
        if channel is not self.channel or len(self.endpoints) < 2:
            return False
        old = self.endpoint
        self._switch((self.index + 1) % len(self.endpoints))
        self._failed_in_row += 1
        # With every member down the hub cycles through them every 0.1-2 s: WARN once per endpoint per
        # WARN_EVERY_S (saying how many moves were not logged), DEBUG in between.
        now = time.monotonic()
        last, skipped = self._moves_logged.get(old, (None, 0))
        if last is not None and now - last < WARN_EVERY_S:
            self._moves_logged[old] = (last, skipped + 1)
            log.debug("etcd endpoint %s %s; moving to %s", old, reason, self.endpoint)
        else:
            self._moves_logged[old] = (now, 0)
            more = f" ({skipped} more moves away from it in the last {WARN_EVERY_S:.0f} s)" if skipped else ""
            log.warning("etcd endpoint %s %s; moving to %s%s", old, reason, self.endpoint, more, extra=_fields(old))
        return True

    def _switch(self, index: int) -> None:
        old = self.channel
        self.index = index
        self.channel = open_channel(self.config, self.endpoint)
        metrics.UPSTREAM_ENDPOINTS.set([host_port(self.endpoint)])
        # grace None cancels every call on the old channel now: their owners re-open here
        task = asyncio.get_running_loop().create_task(old.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _pause_after_round(self) -> None:
        """After every endpoint failed in a row, wait before the next round (no hot loop)."""
        if self._failed_in_row >= len(self.endpoints):
            rounds = self._failed_in_row // len(self.endpoints)
            await asyncio.sleep(min(ROUND_BACKOFF_S[0] * 2 ** (rounds - 1), ROUND_BACKOFF_S[1]))

    # ---- detecting -------------------------------------------------------------------------

    async def _watch_state(self) -> None:
        was_ready: aio.AioChannel | None = None  # the channel last seen READY
        while True:
            channel = self.channel
            state = channel.get_state(try_to_connect=True)
            if state is aio.ChannelConnectivity.READY:
                self._failed_in_row = 0
                was_ready = channel
            elif was_ready is channel and self.fail_over(channel, f"dropped the connection ({state.name})"):
                # a connection that broke (reset, keepalive unanswered, GOAWAY) is not retried on
                # the same member first: that could cost a full connect timeout on a partition
                continue
            elif state is aio.ChannelConnectivity.TRANSIENT_FAILURE and self.fail_over(channel, "is unreachable"):
                await self._pause_after_round()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.wait_for_state_change(state), 1.0)

    async def _report_reachability(self) -> None:
        """Log (never act on) the upstream connection: see UNREACHABLE_AFTER_S."""
        loop = asyncio.get_running_loop()
        down_since: float | None = loop.time()  # not connected yet
        warned_at: dict[str, float] = {}
        warned: set[str] = set()  # endpoints reported unreachable and not reachable since
        while True:
            await asyncio.sleep(REPORT_TICK_S)
            channel, endpoint, now = self.channel, self.endpoint, loop.time()
            if channel.get_state(try_to_connect=False) is aio.ChannelConnectivity.READY:
                if endpoint in warned:
                    outage = f" after {now - down_since:.1f} s" if down_since is not None else ""
                    log.info("etcd endpoint %s is reachable again%s", endpoint, outage, extra=_fields(endpoint))
                    warned.clear()  # another endpoint's outage is over too: we have etcd again
                down_since = None
                continue
            if down_since is None:
                down_since = now
            last = warned_at.get(endpoint)
            if now - down_since < UNREACHABLE_AFTER_S or (last is not None and now - last < WARN_EVERY_S):
                continue
            warned_at[endpoint] = now
            reason = await unreachable_reason(channel, now - down_since)
            if reason:
                warned.add(endpoint)
                log.warning("etcd endpoint %s is unreachable: %s", endpoint, reason, extra=_fields(endpoint))

    async def _watch_leader(self) -> None:
        """A require-leader Watch stream without watchers: etcd ends it when its member has no
        leader (at open, or within a few election timeouts of losing it)."""
        while True:
            channel = self.channel
            call = channel.stream_stream(WATCH_PATH)(metadata=(("hasleader", "true"),), wait_for_ready=True)
            try:
                await call.read()
                details = await call.details() or ""
            except aio.RpcError as exc:
                details = exc.details() or ""
            except asyncio.CancelledError:
                if not interrupted():
                    raise
                details = ""
            finally:
                call.cancel()
            if details == errors.NO_LEADER.message and self.fail_over(channel, "has no leader"):
                await self._pause_after_round()
            else:
                await asyncio.sleep(ROUND_BACKOFF_S[0] if channel is not self.channel else ROUND_BACKOFF_S[1])

    async def _auto_sync(self) -> None:
        """--endpoints-auto-sync-interval: replace the endpoints with the members' client URLs."""
        while True:
            await asyncio.sleep(self.config.endpoints_auto_sync_interval_s)
            call = self.channel.unary_unary(
                MEMBER_LIST_PATH,
                request_serializer=rpc_pb2.MemberListRequest.SerializeToString,
                response_deserializer=rpc_pb2.MemberListResponse.FromString,
            )
            try:
                response = await call(rpc_pb2.MemberListRequest(linearizable=True), timeout=AUTO_SYNC_TIMEOUT_S)
            except aio.RpcError as exc:
                log.warning("endpoint auto-sync: MemberList failed (%s: %s)", exc.code().name, exc.details())
                continue
            except asyncio.CancelledError:
                if not interrupted():
                    raise
                continue
            found = member_endpoints([(m.name, m.isLearner, list(m.clientURLs)) for m in response.members])
            self.replace_endpoints(found)

    def replace_endpoints(self, found: list[str]) -> None:
        if not found or sorted(map(host_port, found)) == sorted(map(host_port, self.endpoints)):
            return
        log.info("endpoint auto-sync: endpoints are now %s", ",".join(found))
        current = host_port(self.endpoint)
        self.endpoints = list(found)
        same = [i for i, e in enumerate(self.endpoints) if host_port(e) == current]
        if same:
            self.index = same[0]
        else:  # our member left the cluster: move now
            self._switch(0)
