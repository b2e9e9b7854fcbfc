"""``--namespace`` in a worker: which Namespace, and the one RPC that needs a check (LeaseRevoke).

Every other translation is a call into core/namespace.py from the servicer that owns the RPC
(worker/handlers.py for unary calls and Observe, worker/cache.py for Range, worker/watch.py for
Watch), so requests reach the hub, the range cache and etcd in etcd's key space, and responses
leave in the client's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TypeVar

from etcdproxy.config import Config
from etcdproxy.core import errors, wire
from etcdproxy.core.methods import Method, by_name
from etcdproxy.core.namespace import DOC, Namespace
from etcdproxy.etcdpb import rpc_pb2
from etcdproxy.h2 import rpc
from etcdproxy.h2.status import StatusCode
from etcdproxy.ipc import schema as s
from etcdproxy.worker.handlers import abort, forwarded_metadata
from etcdproxy.worker.hubclient import HubClient

REVOKE = by_name("etcdserverpb.Lease", "LeaseRevoke")
TIME_TO_LIVE = by_name("etcdserverpb.Lease", "LeaseTimeToLive")


def namespace_of(config: Config) -> Namespace | None:
    """The proxy's namespace; the flag is a raw byte string (Go strings are bytes)."""
    if not config.namespace:
        return None
    return Namespace(config.namespace.encode("utf-8", "surrogateescape"))


def revoke_refused(lease_id: int) -> errors.EtcdError:
    return errors.EtcdError(
        StatusCode.PERMISSION_DENIED,
        f"etcdproxy: LeaseRevoke is refused by the namespace policy (--namespace is set): lease {lease_id:x} "
        f"has keys attached outside the namespace, which revoking it would delete; see {DOC}",
    )


class LeaseRevokeGuard:
    """LeaseRevoke under a namespace: revoking deletes every key attached to the lease, and lease
    IDs are global, so a lease holding keys outside the namespace is not revoked.

    The check is LeaseTimeToLive(keys=true) with the client's token, then the revoke: a key
    attached outside the namespace between the two calls would still be deleted (documented).
    """

    def __init__(self, hub: HubClient, namespace: Namespace) -> None:
        self.hub = hub
        self.namespace = namespace

    def handler(self) -> rpc.MethodHandler:
        return rpc.unary_unary(self.revoke)

    async def _call(
        self, method: Method, payload: bytes, metadata: s.Metadata, context: rpc.Context
    ) -> tuple[int, bytes | str]:
        req_id, future = self.hub.call(method, payload, metadata, context.time_remaining())
        try:
            return await future
        except asyncio.CancelledError:
            self.hub.cancel(req_id)
            raise

    async def revoke(self, request: bytes, context: rpc.Context) -> bytes:
        message, problem = wire.parse(rpc_pb2.LeaseRevokeRequest, request)
        if problem is not None:
            await abort(context, errors.unmarshal_error(problem))
        metadata = forwarded_metadata(context)
        probe = rpc_pb2.LeaseTimeToLiveRequest(ID=message.ID, keys=True).SerializeToString()
        code, body = await self._call(TIME_TO_LIVE, probe, metadata, context)
        # fail closed: a probe etcd refused proves nothing, so its error is the answer (an unknown
        # lease is no error: TTL -1, no keys, and the revoke then gets etcd's "lease not found")
        if code != 0:
            await context.abort(errors.CODES[code], str(body))
        if not self.namespace.revoke_allowed(body):  # type: ignore[arg-type]
            await abort(context, revoke_refused(message.ID))
        code, body = await self._call(REVOKE, request, metadata, context)
        if code == 0:
            return body  # type: ignore[return-value]
        await context.abort(errors.CODES[code], str(body))
        raise AssertionError("unreachable")


WatchBatch = TypeVar("WatchBatch", s.WatchEvents, s.WatchReplay)


def client_view(namespace: Namespace, message: WatchBatch) -> WatchBatch:
    """A hub event batch with every key stripped, decoded once per batch for all its c-watchers
    (there is one namespace per proxy, so every c-watcher wants the same view)."""
    if not message.events:
        return message
    return dataclasses.replace(message, events=namespace.events(message.events))
