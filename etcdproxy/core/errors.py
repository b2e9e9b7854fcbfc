"""The etcd errors the proxy itself raises, with etcd's exact codes and messages.

Errors that come from etcd pass through untouched (code and message); only the situations
below are decided by the proxy. Clients match these strings, so they are copied verbatim
from etcd's api/v3rpc/rpctypes/error.go where etcd has an equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass

from etcdproxy.h2.status import StatusCode

CODES: dict[int, StatusCode] = {int(c): c for c in StatusCode}


@dataclass(frozen=True, slots=True)
class EtcdError:
    code: StatusCode
    message: str


KEY_NOT_FOUND = EtcdError(StatusCode.INVALID_ARGUMENT, "etcdserver: key not found")
EMPTY_KEY = EtcdError(StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided")
COMPACTED = EtcdError(StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted")
NO_LEADER = EtcdError(StatusCode.UNAVAILABLE, "etcdserver: no leader")
PERMISSION_DENIED = EtcdError(StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")

# The Go proxy's own answer: kept so scripts that match it keep working.
RANGE_STREAM_UNSUPPORTED = EtcdError(StatusCode.UNIMPLEMENTED, "RangeStream is not supported by the gRPC proxy")

# Proxy-internal conditions: UNAVAILABLE tells every etcd client to retry.
HUB_RESTARTED = EtcdError(
    StatusCode.UNAVAILABLE, "etcdproxy: hub restarted; the request may or may not have been applied"
)
HUB_GAP = EtcdError(StatusCode.UNAVAILABLE, "etcdproxy: lost a message from the hub; please retry")
WORKER_STOPPING = EtcdError(StatusCode.UNAVAILABLE, "etcdproxy: worker is shutting down; please reconnect")


def unmarshal_error(detail: str) -> EtcdError:
    """What grpc-go (and so etcd) answers for request bytes it cannot parse."""
    return EtcdError(StatusCode.INTERNAL, f"grpc: error unmarshalling request: {detail}")
