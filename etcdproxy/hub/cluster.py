"""MemberList answers and ``--resolver-prefix`` registration/discovery, as the Go proxy's cluster.go.

* Registration: a lease of ``--resolver-ttl`` seconds, kept alive every TTL/3 on a stream of our
  own, holding ``<namespace><prefix>/<advertise-client-url>`` with the Go proxy's value
  (core/cluster.py), so Go proxies and ours share a prefix. When the lease is lost (keep-alive
  answers TTL <= 0, stream or etcd failure) the proxy registers again with a new lease; when our
  key is deleted while the lease lives, it is written again. A graceful stop revokes the lease.
* Discovery: a serializable listing of ``<namespace><prefix>/`` then a watch from the next
  revision. Each listing *replaces* the map (entries deleted while the watch was down are
  forgotten, unlike the Go proxy); malformed values are skipped and logged once per key.
* MemberList: ``--advertise-client-url`` empty -> None (forwarded to etcd); else the registered
  proxies if ``--resolver-prefix`` is set and any are known, else this proxy alone.

Proxy-originated calls carry no auth token (like Go): with etcd auth on they fail and
are retried every second, and MemberList falls back to this proxy alone.
Shared state (``members``) is mutated only from the hub's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from etcdproxy.core import errors
from etcdproxy.core.cache import prefix_end
from etcdproxy.core.cluster import parse_registration, proxy_member_list, registration_value
from etcdproxy.core.methods import by_name
from etcdproxy.etcdpb import kv_pb2, rpc_pb2
from etcdproxy.h2 import aio
from etcdproxy.upstream import interrupted

if TYPE_CHECKING:
    from etcdproxy.hub.host import ClusterHost

log = logging.getLogger(__name__)

GRANT = by_name("etcdserverpb.Lease", "LeaseGrant")
REVOKE = by_name("etcdserverpb.Lease", "LeaseRevoke")
PUT = by_name("etcdserverpb.KV", "Put")
RANGE = by_name("etcdserverpb.KV", "Range")
KEEPALIVE_PATH = "/etcdserverpb.Lease/LeaseKeepAlive"
WATCH_PATH = "/etcdserverpb.Watch/Watch"
CALL_TIMEOUT_S = 5.0
RETRY_S = 1.0  # the Go proxy's rate limit for both loops
DELETE = kv_pb2.Event.DELETE


class RegistrationError(Exception):
    pass


class ClusterHub:
    def __init__(self, hub: ClusterHost) -> None:
        self.hub = hub
        config = hub.config
        self.advertise = config.advertise_client_url
        self.resolver = bool(config.resolver_prefix and self.advertise)
        namespace = config.namespace.encode("utf-8", "surrogateescape")
        # the Go proxy's own client is wrapped by --namespace, so its keys live inside it
        self.watch_prefix = namespace + config.resolver_prefix.encode() + b"/"
        self.own_key = self.watch_prefix + self.advertise.encode()
        self.ttl_s = config.resolver_ttl_s
        # registration key -> (name, client URL); rebuilt from every listing
        self.members: dict[bytes, tuple[str, str]] = {}
        self._malformed: set[bytes] = set()  # keys whose bad value was logged already
        self._lease = 0
        self._put_revision = 0  # revision of our last Put; a later delete of our key means "re-put"
        self._key_lost = asyncio.Event()
        self._last_error: dict[str, str] = {}  # per loop: the same failure every second is logged once
        self._tasks: list[asyncio.Task[None]] = []
        if self.resolver:
            self._tasks = [
                hub.loop.create_task(self._forever(self._register, "registration")),
                hub.loop.create_task(self._forever(self._discover, "discovery")),
            ]
            hub.closers.append(self.close)

    def member_list(self) -> bytes | None:
        """Serialized MemberListResponse, or None when MemberList goes to etcd (no advertise URL)."""
        if not self.advertise:
            return None
        if self.resolver and self.members:
            return proxy_member_list(self.members[key] for key in sorted(self.members))
        return proxy_member_list([(self.hub.hostname, self.advertise)])

    # ---- loops ---------------------------------------------------------------------------

    async def _forever(self, run: Any, what: str) -> None:
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                if not interrupted():
                    raise
                log.info("resolver %s: endpoint failover; starting again", what)
            except (aio.RpcError, RegistrationError, TimeoutError) as exc:
                text = f"{exc.code().name}: {exc.details()}" if isinstance(exc, aio.RpcError) else str(exc)
                (log.warning if text != self._last_error.get(what) else log.debug)("resolver %s: %s", what, text)
                self._last_error[what] = text
            except Exception:
                log.exception("resolver %s failed", what)
            await asyncio.sleep(RETRY_S)

    async def _unary(self, method: Any, request: Any) -> Any:
        code, body = await self.hub.forwarder.unary(method, request.SerializeToString(), [], CALL_TIMEOUT_S)
        if code != 0:
            raise RegistrationError(f"{method.name}: {errors.CODES[code].name} {body!s}")
        return method.response.FromString(body)

    async def _put_own_key(self) -> None:
        value = registration_value(self.advertise, self.hub.hostname)
        put = await self._unary(PUT, rpc_pb2.PutRequest(key=self.own_key, value=value, lease=self._lease))
        self._put_revision = put.header.revision

    async def _register(self) -> None:
        """One session: grant, put, keep alive until the lease is lost."""
        self._lease = 0
        grant = await self._unary(GRANT, rpc_pb2.LeaseGrantRequest(TTL=self.ttl_s))
        if grant.error:
            raise RegistrationError(f"LeaseGrant: {grant.error}")
        self._lease = grant.ID
        self._key_lost.clear()
        try:
            await self._put_own_key()
        except Exception:
            # e.g. etcd auth on (no token: "user name is empty"): drop the lease now rather than
            # leave one per retry second alive for --resolver-ttl
            await self._revoke()
            raise
        log.info("registered %r (lease %x, ttl %d s)", self.own_key.decode(errors="replace"), self._lease, self.ttl_s)
        self._last_error.pop("registration", None)
        call = self.hub.channel.stream_stream(KEEPALIVE_PATH)(wait_for_ready=True)
        request = rpc_pb2.LeaseKeepAliveRequest(ID=self._lease).SerializeToString()
        try:
            while True:
                await call.write(request)
                data = await asyncio.wait_for(call.read(), self.ttl_s)
                if data is aio.EOF:
                    raise RegistrationError("keep-alive stream ended")
                if rpc_pb2.LeaseKeepAliveResponse.FromString(data).TTL <= 0:
                    log.warning("session expired; possible network partition or server restart")
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._key_lost.wait(), self.ttl_s / 3)
                    self._key_lost.clear()
                    log.warning("registration key %r was deleted; writing it again", self.own_key.decode())
                    await self._put_own_key()
        finally:
            call.cancel()

    def _note_deleted(self, key: bytes, revision: int) -> None:
        if key == self.own_key and self._lease and revision > self._put_revision:
            self._key_lost.set()

    def _parse(self, kv: kv_pb2.KeyValue) -> tuple[str, str] | None:
        member = parse_registration(kv.value)
        if member is None:
            if kv.key not in self._malformed:
                self._malformed.add(kv.key)
                log.warning("skipping malformed registration under the resolver prefix: %r = %r", kv.key, kv.value)
            return None
        self._malformed.discard(kv.key)
        return member

    async def _discover(self) -> None:
        """List the prefix (replacing the map), then follow it with a watch until that ends."""
        end = prefix_end(self.watch_prefix)
        listing = await self._unary(
            RANGE, rpc_pb2.RangeRequest(key=self.watch_prefix, range_end=end, serializable=True)
        )
        members = {}
        for kv in listing.kvs:
            member = self._parse(kv)
            if member is not None:
                members[kv.key] = member
        self.members = members
        self._last_error.pop("discovery", None)
        if self.own_key not in members:
            self._note_deleted(self.own_key, listing.header.revision)
        create = rpc_pb2.WatchCreateRequest(
            key=self.watch_prefix, range_end=end, start_revision=listing.header.revision + 1
        )
        call = self.hub.channel.stream_stream(WATCH_PATH)(wait_for_ready=True)
        try:
            await call.write(rpc_pb2.WatchRequest(create_request=create).SerializeToString())
            while True:
                data = await call.read()
                if data is aio.EOF:
                    raise RegistrationError("watch stream ended")
                response = rpc_pb2.WatchResponse.FromString(data)
                if response.canceled:
                    raise RegistrationError(f"watch cancelled: {response.cancel_reason}")
                for event in response.events:
                    key = event.kv.key
                    member = None if event.type == DELETE else self._parse(event.kv)
                    if member is None:
                        self.members.pop(key, None)
                        self._note_deleted(key, event.kv.mod_revision)
                    else:
                        self.members[key] = member
        finally:
            call.cancel()

    async def _revoke(self) -> None:
        lease, self._lease = self._lease, 0
        if lease:
            with contextlib.suppress(Exception):
                request = rpc_pb2.LeaseRevokeRequest(ID=lease).SerializeToString()
                await self.hub.forwarder.unary(REVOKE, request, [], 1.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self._revoke()  # like the Go proxy closing its session: our key goes at once
