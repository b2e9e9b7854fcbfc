"""MemberList answers the proxy gives itself (SPEC 6.1 modes 2 and 3). Pure."""

from __future__ import annotations

from collections.abc import Iterable

from etcdproxy.etcdpb import rpc_pb2


def proxy_member_list(members: Iterable[tuple[str, str]]) -> bytes:
    """Serialized MemberListResponse listing proxies as (name, client URL) pairs.

    Like the Go proxy: no header, member ID 0, no peer URLs, never a learner, so clients that
    auto-sync their endpoints from MemberList move to the proxies instead of etcd members.
    """
    response = rpc_pb2.MemberListResponse(
        members=[rpc_pb2.Member(name=name, clientURLs=[url]) for name, url in members]
    )
    return response.SerializeToString()
