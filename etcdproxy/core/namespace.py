"""``--namespace``: keys and ranges in the client's view <-> etcd's view, and the RPC policy. Pure.

Translation (clientv3's namespace package): ``key -> prefix + key``; ``range_end``
empty stays empty (one key), ``"\\x00"`` (every key >= key) becomes ``prefix_end(prefix)``
(``"\\x00"`` again when the prefix is all 0xff bytes: then every key >= prefix + key carries the
prefix anyway), any other value becomes ``prefix + range_end``.

Confinement invariant: every interval sent to etcd lies inside [prefix, prefix_end(prefix)), and
never contains the key equal to the prefix itself, because an empty client key is refused
(``etcdserver: key is not provided``, like etcd) everywhere etcd would refuse it, Txn compares
and ops included (where the Go proxy lets it address the prefix key). Watch maps an empty key to
``"\\x00"`` first, as etcd's watch server does. Responses are stripped of the prefix at every Txn
nesting level; keys that do not carry the prefix (only LeaseTimeToLive can show them) are dropped.

The policy for every other RPC (docs/namespace.md) is the table ``RULES``: each method is
translated, passed through (nothing in it names a key), checked (LeaseRevoke, done by the
worker with ``revoke_allowed``), or refused with PERMISSION_DENIED. A method missing from the
table is refused: new RPCs stay closed until someone decides.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from etcdproxy.core import errors
from etcdproxy.core.cache import prefix_end
from etcdproxy.core.events import WireEvent
from etcdproxy.etcdpb import kv_pb2, rpc_pb2, v3election_pb2, v3lock_pb2
from etcdproxy.h2.status import StatusCode

DOC = "docs/namespace.md"


class Refused(Exception):
    """A request the namespaced proxy answers itself with ``error`` instead of forwarding it."""

    def __init__(self, error: errors.EtcdError) -> None:
        super().__init__(error.message)
        self.error = error


class Action(enum.Enum):
    TRANSLATE = "translate"  # keys in the request and/or response are rewritten
    PASS = "pass"  # nothing in it names a key or reaches outside the namespace
    CHECK = "check"  # allowed after a check the worker makes (LeaseRevoke)
    REFUSE = "refuse"  # PERMISSION_DENIED


_CLUSTER = "membership changes affect the whole cluster"
_MAINTENANCE = "maintenance acts on whole members, not on the namespace"
_WHOLE_KEYSPACE = "it reads or hashes the whole keyspace, not only the namespace"
_AUTH = "users, roles and role key ranges are cluster-wide and not namespaced"
_COMPACT = "compaction is cluster-wide and discards the history of keys outside the namespace"

# path -> (action, reason when refused)
RULES: dict[str, tuple[Action, str]] = {
    "/etcdserverpb.KV/Range": (Action.TRANSLATE, ""),
    "/etcdserverpb.KV/Put": (Action.TRANSLATE, ""),
    "/etcdserverpb.KV/DeleteRange": (Action.TRANSLATE, ""),
    "/etcdserverpb.KV/Txn": (Action.TRANSLATE, ""),
    "/etcdserverpb.KV/Compact": (Action.REFUSE, _COMPACT),
    "/etcdserverpb.KV/RangeStream": (Action.PASS, ""),  # UNIMPLEMENTED anyway
    "/etcdserverpb.Watch/Watch": (Action.TRANSLATE, ""),  # worker/watch.py
    "/etcdserverpb.Lease/LeaseGrant": (Action.PASS, ""),
    "/etcdserverpb.Lease/LeaseRevoke": (Action.CHECK, ""),
    "/etcdserverpb.Lease/LeaseKeepAlive": (Action.PASS, ""),
    "/etcdserverpb.Lease/LeaseTimeToLive": (Action.TRANSLATE, ""),
    "/etcdserverpb.Lease/LeaseLeases": (Action.PASS, ""),  # lease IDs only, no keys
    "/etcdserverpb.Cluster/MemberList": (Action.PASS, ""),
    "/etcdserverpb.Cluster/MemberAdd": (Action.REFUSE, _CLUSTER),
    "/etcdserverpb.Cluster/MemberRemove": (Action.REFUSE, _CLUSTER),
    "/etcdserverpb.Cluster/MemberUpdate": (Action.REFUSE, _CLUSTER),
    "/etcdserverpb.Cluster/MemberPromote": (Action.REFUSE, _CLUSTER),
    "/etcdserverpb.Maintenance/Alarm": (Action.CHECK, _MAINTENANCE),  # GET passes, changes refused
    "/etcdserverpb.Maintenance/Status": (Action.PASS, ""),
    "/etcdserverpb.Maintenance/Defragment": (Action.REFUSE, _MAINTENANCE),
    "/etcdserverpb.Maintenance/Hash": (Action.REFUSE, _WHOLE_KEYSPACE),
    "/etcdserverpb.Maintenance/HashKV": (Action.REFUSE, _WHOLE_KEYSPACE),
    "/etcdserverpb.Maintenance/Snapshot": (Action.REFUSE, _WHOLE_KEYSPACE),
    "/etcdserverpb.Maintenance/MoveLeader": (Action.REFUSE, _MAINTENANCE),
    "/etcdserverpb.Maintenance/Downgrade": (Action.REFUSE, _MAINTENANCE),
    "/etcdserverpb.Auth/Authenticate": (Action.PASS, ""),
    "/etcdserverpb.Auth/AuthStatus": (Action.PASS, ""),
    **{
        f"/etcdserverpb.Auth/{name}": (Action.REFUSE, _AUTH)
        for name in [
            "AuthEnable",
            "AuthDisable",
            "UserAdd",
            "UserGet",
            "UserList",
            "UserDelete",
            "UserChangePassword",
            "UserGrantRole",
            "UserRevokeRole",
            "RoleAdd",
            "RoleGet",
            "RoleList",
            "RoleDelete",
            "RoleGrantPermission",
            "RoleRevokePermission",
        ]
    },
    **{
        f"/v3electionpb.Election/{name}": (Action.TRANSLATE, "")
        for name in ("Campaign", "Proclaim", "Leader", "Observe", "Resign")
    },
    "/v3lockpb.Lock/Lock": (Action.TRANSLATE, ""),
    "/v3lockpb.Lock/Unlock": (Action.TRANSLATE, ""),
}


def rule(path: str) -> tuple[Action, str]:
    return RULES.get(path, (Action.REFUSE, "the proxy has no namespace policy for it"))


def refusal(path: str, reason: str) -> errors.EtcdError:
    method = path.lstrip("/").split(".", 1)[-1]
    return errors.EtcdError(
        StatusCode.PERMISSION_DENIED,
        f"etcdproxy: {method} is refused by the namespace policy (--namespace is set): {reason}; see {DOC}",
    )


class Namespace:
    """One namespace prefix; every method mutates the protobuf message it is given."""

    def __init__(self, prefix: bytes) -> None:
        if not prefix:
            raise ValueError("an empty namespace prefix is no namespace")
        self.prefix = prefix
        self.end = prefix_end(prefix)
        # path -> (request class, request rewrite, response class, response rewrite)
        self._rewrites: dict[str, tuple[Any, Callable[[Any], None] | None, Any, Callable[[Any], None] | None]] = {
            "/etcdserverpb.KV/Range": (rpc_pb2.RangeRequest, self.range_request, rpc_pb2.RangeResponse, self.kvs_of),
            "/etcdserverpb.KV/Put": (rpc_pb2.PutRequest, self.put_request, rpc_pb2.PutResponse, self.prev_kv_of),
            "/etcdserverpb.KV/DeleteRange": (
                rpc_pb2.DeleteRangeRequest,
                self.range_request,
                rpc_pb2.DeleteRangeResponse,
                self.prev_kvs_of,
            ),
            "/etcdserverpb.KV/Txn": (rpc_pb2.TxnRequest, self.txn_request, rpc_pb2.TxnResponse, self.txn_response),
            "/etcdserverpb.Lease/LeaseTimeToLive": (None, None, rpc_pb2.LeaseTimeToLiveResponse, self.ttl_response),
            "/v3electionpb.Election/Campaign": (
                v3election_pb2.CampaignRequest,
                self.named,
                v3election_pb2.CampaignResponse,
                self.leader_of,
            ),
            "/v3electionpb.Election/Proclaim": (v3election_pb2.ProclaimRequest, self.leader_in, None, None),
            "/v3electionpb.Election/Resign": (v3election_pb2.ResignRequest, self.leader_in, None, None),
            "/v3electionpb.Election/Leader": (
                v3election_pb2.LeaderRequest,
                self.named,
                v3election_pb2.LeaderResponse,
                self.kv_of,
            ),
            "/v3electionpb.Election/Observe": (
                v3election_pb2.LeaderRequest,
                self.named,
                v3election_pb2.LeaderResponse,
                self.kv_of,
            ),
            "/v3lockpb.Lock/Lock": (v3lock_pb2.LockRequest, self.named, v3lock_pb2.LockResponse, self.lock_key_of),
            "/v3lockpb.Lock/Unlock": (v3lock_pb2.UnlockRequest, self.unlock_request, None, None),
        }

    # ---- keys and intervals ------------------------------------------------------------------

    def key(self, key: bytes) -> bytes:
        if not key:
            raise Refused(errors.EMPTY_KEY)
        return self.prefix + key

    def range_end(self, range_end: bytes) -> bytes:
        if not range_end:
            return b""
        if range_end == b"\x00":
            return self.end
        return self.prefix + range_end

    def interval(self, key: bytes, range_end: bytes) -> tuple[bytes, bytes]:
        return self.key(key), self.range_end(range_end)

    def strip(self, key: bytes) -> bytes | None:
        """The client's view of an etcd key; None if the key is outside the namespace."""
        return key[len(self.prefix) :] if key.startswith(self.prefix) else None

    # ---- requests ----------------------------------------------------------------------------

    def range_request(self, request: Any) -> None:
        """RangeRequest and DeleteRangeRequest (same key / range_end fields)."""
        request.key, request.range_end = self.interval(request.key, request.range_end)

    def put_request(self, request: rpc_pb2.PutRequest) -> None:
        request.key = self.key(request.key)

    def compare(self, compare: rpc_pb2.Compare) -> None:
        compare.key = self.key(compare.key)
        if compare.range_end:
            compare.range_end = self.range_end(compare.range_end)

    def txn_request(self, txn: rpc_pb2.TxnRequest) -> None:
        for compare in txn.compare:
            self.compare(compare)
        for op in (*txn.success, *txn.failure):
            which = op.WhichOneof("request")
            if which == "request_range":
                self.range_request(op.request_range)
            elif which == "request_put":
                self.put_request(op.request_put)
            elif which == "request_delete_range":
                self.range_request(op.request_delete_range)
            elif which == "request_txn":
                self.txn_request(op.request_txn)
            # no operation: forwarded as is, etcd answers "etcdserver: key not found"

    def watch_create(self, create: rpc_pb2.WatchCreateRequest) -> None:
        # etcd's watch server reads an empty key as "\x00", the smallest key
        create.key, create.range_end = self.interval(create.key or b"\x00", create.range_end)

    def named(self, request: Any) -> None:
        """Election Campaign/Leader/Observe and Lock: the name is a key prefix ("" is allowed, as in etcd)."""
        request.name = self.prefix + request.name

    def leader_in(self, request: Any) -> None:
        """Proclaim and Resign: their LeaderKey names the election and its key."""
        if request.HasField("leader"):
            request.leader.name = self.prefix + request.leader.name
            request.leader.key = self.key(request.leader.key)

    def unlock_request(self, request: v3lock_pb2.UnlockRequest) -> None:
        request.key = self.key(request.key)

    # ---- responses ---------------------------------------------------------------------------

    def _kvs(self, kvs: Any) -> None:
        for i in range(len(kvs) - 1, -1, -1):
            stripped = self.strip(kvs[i].key)
            if stripped is None:
                del kvs[i]
            else:
                kvs[i].key = stripped

    def _kv_field(self, message: Any, name: str) -> None:
        if message.HasField(name):
            stripped = self.strip(getattr(message, name).key)
            if stripped is None:
                message.ClearField(name)
            else:
                getattr(message, name).key = stripped

    def kvs_of(self, response: Any) -> None:
        self._kvs(response.kvs)

    def prev_kv_of(self, response: Any) -> None:
        self._kv_field(response, "prev_kv")

    def prev_kvs_of(self, response: Any) -> None:
        self._kvs(response.prev_kvs)

    def kv_of(self, response: Any) -> None:
        self._kv_field(response, "kv")

    def txn_response(self, txn: rpc_pb2.TxnResponse) -> None:
        for op in txn.responses:
            which = op.WhichOneof("response")
            if which == "response_range":
                self.kvs_of(op.response_range)
            elif which == "response_put":
                self.prev_kv_of(op.response_put)
            elif which == "response_delete_range":
                self.prev_kvs_of(op.response_delete_range)
            elif which == "response_txn":
                self.txn_response(op.response_txn)

    def ttl_response(self, response: rpc_pb2.LeaseTimeToLiveResponse) -> None:
        keys = [k for k in map(self.strip, response.keys) if k is not None]
        del response.keys[:]
        response.keys.extend(keys)

    def leader_of(self, response: v3election_pb2.CampaignResponse) -> None:
        if response.HasField("leader"):
            leader = response.leader
            leader.name = self.strip(leader.name) or b""
            leader.key = self.strip(leader.key) or b""

    def lock_key_of(self, response: v3lock_pb2.LockResponse) -> None:
        response.key = self.strip(response.key) or b""

    def event(self, event: kv_pb2.Event) -> None:
        self._kv_field(event, "kv")
        self._kv_field(event, "prev_kv")

    def events(self, batch: Sequence[WireEvent]) -> list[WireEvent]:
        """One watch batch in the client's view: each event decoded once, both encodings rebuilt."""
        out: list[WireEvent] = []
        for revision, is_delete, with_prev, without_prev in batch:
            event = kv_pb2.Event.FromString(with_prev)
            self.event(event)
            stripped_with = event.SerializeToString()
            if with_prev == without_prev:
                stripped_without = stripped_with
            else:
                event.ClearField("prev_kv")
                stripped_without = event.SerializeToString()
            out.append((revision, is_delete, stripped_with, stripped_without))
        return out

    # ---- whole messages as bytes -------------------------------------------------------------

    def request(self, path: str, data: bytes) -> bytes:
        """The bytes to send to etcd for a client request, or Refused. ``data`` must parse."""
        action, reason = rule(path)
        if action is Action.REFUSE:
            raise Refused(refusal(path, reason))
        if path == "/etcdserverpb.Maintenance/Alarm":
            if rpc_pb2.AlarmRequest.FromString(data).action != rpc_pb2.AlarmRequest.GET:
                raise Refused(refusal(path, reason))
            return data
        rewrite = self._rewrites.get(path)
        if rewrite is None or rewrite[1] is None:
            return data
        message = rewrite[0].FromString(data)
        rewrite[1](message)
        return message.SerializeToString()  # type: ignore[no-any-return]

    def response(self, path: str, data: bytes) -> bytes:
        """etcd's response bytes in the client's view."""
        rewrite = self._rewrites.get(path)
        if rewrite is None or rewrite[3] is None:
            return data
        message = rewrite[2].FromString(data)
        rewrite[3](message)
        return message.SerializeToString()  # type: ignore[no-any-return]

    def rewrites_response(self, path: str) -> bool:
        rewrite = self._rewrites.get(path)
        return rewrite is not None and rewrite[3] is not None

    def revoke_allowed(self, ttl_response: bytes) -> bool:
        """LeaseRevoke deletes every key attached to the lease: allowed only if all carry the prefix.

        ``ttl_response``: etcd's LeaseTimeToLiveResponse (keys=true) for the lease.
        """
        keys: Iterable[bytes] = rpc_pb2.LeaseTimeToLiveResponse.FromString(ttl_response).keys
        return all(key.startswith(self.prefix) for key in keys)
