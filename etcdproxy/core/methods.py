"""Every RPC the proxy serves: its path, shape, messages and retry class.

Pure data shared by workers (which validate and route requests) and the hub (which calls
etcd). A method is referred to across IPC by its index in METHODS, so both sides must run
the same code (the HELLO exchange checks ipc.schema.SCHEMA_VERSION).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from etcdproxy.etcdpb import rpc_pb2, v3election_pb2, v3lock_pb2


class Shape(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI_STREAM = "bidi_stream"


@dataclass(frozen=True, slots=True)
class Method:
    index: int
    service: str  # full proto service name, e.g. "etcdserverpb.KV"
    name: str  # e.g. "Range"
    shape: Shape
    request: Any  # protobuf message class
    response: Any
    # True when sending the request twice cannot change etcd's state, so the proxy may
    # re-send it after a hub restart or an upstream failure that happened before the answer.
    idempotent: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


_U, _SS, _BIDI = Shape.UNARY, Shape.SERVER_STREAM, Shape.BIDI_STREAM
_pb, _el, _lk = rpc_pb2, v3election_pb2, v3lock_pb2

# (service, name, shape, request, response, idempotent)
_TABLE: list[tuple[str, str, Shape, Any, Any, bool]] = [
    ("etcdserverpb.KV", "Range", _U, _pb.RangeRequest, _pb.RangeResponse, True),
    ("etcdserverpb.KV", "RangeStream", _SS, _pb.RangeRequest, _pb.RangeStreamResponse, True),
    ("etcdserverpb.KV", "Put", _U, _pb.PutRequest, _pb.PutResponse, False),
    ("etcdserverpb.KV", "DeleteRange", _U, _pb.DeleteRangeRequest, _pb.DeleteRangeResponse, False),
    ("etcdserverpb.KV", "Txn", _U, _pb.TxnRequest, _pb.TxnResponse, False),
    ("etcdserverpb.KV", "Compact", _U, _pb.CompactionRequest, _pb.CompactionResponse, False),
    ("etcdserverpb.Watch", "Watch", _BIDI, _pb.WatchRequest, _pb.WatchResponse, True),
    ("etcdserverpb.Lease", "LeaseGrant", _U, _pb.LeaseGrantRequest, _pb.LeaseGrantResponse, False),
    ("etcdserverpb.Lease", "LeaseRevoke", _U, _pb.LeaseRevokeRequest, _pb.LeaseRevokeResponse, False),
    ("etcdserverpb.Lease", "LeaseKeepAlive", _BIDI, _pb.LeaseKeepAliveRequest, _pb.LeaseKeepAliveResponse, True),
    ("etcdserverpb.Lease", "LeaseTimeToLive", _U, _pb.LeaseTimeToLiveRequest, _pb.LeaseTimeToLiveResponse, True),
    ("etcdserverpb.Lease", "LeaseLeases", _U, _pb.LeaseLeasesRequest, _pb.LeaseLeasesResponse, True),
    ("etcdserverpb.Cluster", "MemberAdd", _U, _pb.MemberAddRequest, _pb.MemberAddResponse, False),
    ("etcdserverpb.Cluster", "MemberRemove", _U, _pb.MemberRemoveRequest, _pb.MemberRemoveResponse, False),
    ("etcdserverpb.Cluster", "MemberUpdate", _U, _pb.MemberUpdateRequest, _pb.MemberUpdateResponse, False),
    ("etcdserverpb.Cluster", "MemberList", _U, _pb.MemberListRequest, _pb.MemberListResponse, True),
    ("etcdserverpb.Cluster", "MemberPromote", _U, _pb.MemberPromoteRequest, _pb.MemberPromoteResponse, False),
    ("etcdserverpb.Maintenance", "Alarm", _U, _pb.AlarmRequest, _pb.AlarmResponse, False),
    ("etcdserverpb.Maintenance", "Status", _U, _pb.StatusRequest, _pb.StatusResponse, True),
    ("etcdserverpb.Maintenance", "Defragment", _U, _pb.DefragmentRequest, _pb.DefragmentResponse, False),
    ("etcdserverpb.Maintenance", "Hash", _U, _pb.HashRequest, _pb.HashResponse, True),
    ("etcdserverpb.Maintenance", "HashKV", _U, _pb.HashKVRequest, _pb.HashKVResponse, True),
    ("etcdserverpb.Maintenance", "Snapshot", _SS, _pb.SnapshotRequest, _pb.SnapshotResponse, True),
    ("etcdserverpb.Maintenance", "MoveLeader", _U, _pb.MoveLeaderRequest, _pb.MoveLeaderResponse, False),
    ("etcdserverpb.Maintenance", "Downgrade", _U, _pb.DowngradeRequest, _pb.DowngradeResponse, False),
    ("etcdserverpb.Auth", "AuthEnable", _U, _pb.AuthEnableRequest, _pb.AuthEnableResponse, False),
    ("etcdserverpb.Auth", "AuthDisable", _U, _pb.AuthDisableRequest, _pb.AuthDisableResponse, False),
    ("etcdserverpb.Auth", "AuthStatus", _U, _pb.AuthStatusRequest, _pb.AuthStatusResponse, True),
    ("etcdserverpb.Auth", "Authenticate", _U, _pb.AuthenticateRequest, _pb.AuthenticateResponse, True),
    ("etcdserverpb.Auth", "UserAdd", _U, _pb.AuthUserAddRequest, _pb.AuthUserAddResponse, False),
    ("etcdserverpb.Auth", "UserGet", _U, _pb.AuthUserGetRequest, _pb.AuthUserGetResponse, True),
    ("etcdserverpb.Auth", "UserList", _U, _pb.AuthUserListRequest, _pb.AuthUserListResponse, True),
    ("etcdserverpb.Auth", "UserDelete", _U, _pb.AuthUserDeleteRequest, _pb.AuthUserDeleteResponse, False),
    (
        "etcdserverpb.Auth",
        "UserChangePassword",
        _U,
        _pb.AuthUserChangePasswordRequest,
        _pb.AuthUserChangePasswordResponse,
        False,
    ),
    ("etcdserverpb.Auth", "UserGrantRole", _U, _pb.AuthUserGrantRoleRequest, _pb.AuthUserGrantRoleResponse, False),
    ("etcdserverpb.Auth", "UserRevokeRole", _U, _pb.AuthUserRevokeRoleRequest, _pb.AuthUserRevokeRoleResponse, False),
    ("etcdserverpb.Auth", "RoleAdd", _U, _pb.AuthRoleAddRequest, _pb.AuthRoleAddResponse, False),
    ("etcdserverpb.Auth", "RoleGet", _U, _pb.AuthRoleGetRequest, _pb.AuthRoleGetResponse, True),
    ("etcdserverpb.Auth", "RoleList", _U, _pb.AuthRoleListRequest, _pb.AuthRoleListResponse, True),
    ("etcdserverpb.Auth", "RoleDelete", _U, _pb.AuthRoleDeleteRequest, _pb.AuthRoleDeleteResponse, False),
    (
        "etcdserverpb.Auth",
        "RoleGrantPermission",
        _U,
        _pb.AuthRoleGrantPermissionRequest,
        _pb.AuthRoleGrantPermissionResponse,
        False,
    ),
    (
        "etcdserverpb.Auth",
        "RoleRevokePermission",
        _U,
        _pb.AuthRoleRevokePermissionRequest,
        _pb.AuthRoleRevokePermissionResponse,
        False,
    ),
    ("v3electionpb.Election", "Campaign", _U, _el.CampaignRequest, _el.CampaignResponse, False),
    ("v3electionpb.Election", "Proclaim", _U, _el.ProclaimRequest, _el.ProclaimResponse, False),
    ("v3electionpb.Election", "Leader", _U, _el.LeaderRequest, _el.LeaderResponse, True),
    ("v3electionpb.Election", "Observe", _SS, _el.LeaderRequest, _el.LeaderResponse, True),
    ("v3electionpb.Election", "Resign", _U, _el.ResignRequest, _el.ResignResponse, False),
    ("v3lockpb.Lock", "Lock", _U, _lk.LockRequest, _lk.LockResponse, False),
    ("v3lockpb.Lock", "Unlock", _U, _lk.UnlockRequest, _lk.UnlockResponse, False),
]

METHODS: tuple[Method, ...] = tuple(Method(i, *row) for i, row in enumerate(_TABLE))
BY_PATH: dict[str, Method] = {m.path: m for m in METHODS}
SERVICES: tuple[str, ...] = tuple(dict.fromkeys(m.service for m in METHODS))


def by_name(service: str, name: str) -> Method:
    return BY_PATH[f"/{service}/{name}"]
