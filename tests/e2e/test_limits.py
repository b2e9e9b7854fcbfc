"""Message size limits (SPEC 16, etcd issue 11984): with default flags etcd, not the proxy, decides.

The Go proxy's defaults answer for etcd: its --max-send-bytes default (1.5 MiB) makes a Put between
1.5 and 4 MiB fail in the proxy with RESOURCE_EXHAUSTED, and its server refuses anything above
4 MiB, whatever etcd was started with. etcdproxy leaves an unset flag to etcd, so a client sees what
etcd itself answers (measured with a direct client whose own limits are off):

* value 1.6 MiB: INVALID_ARGUMENT "etcdserver: request is too large" (above --max-request-bytes);
* value 2.5 MiB / 5 MiB: RESOURCE_EXHAUSTED "grpc: received message larger than max (N vs. 2097152)"
  (etcd's server takes --max-request-bytes + 512 KiB);
* a 4.2 MiB Range response: sent fine (etcd's send limit is MaxInt32).

An explicit --max-send-bytes / --max-recv-bytes is honoured like Go: RESOURCE_EXHAUSTED in the proxy.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.helpers import IMPL_GO, EtcdServer, ProxyProcess, proxy_impl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

MiB = 1 << 20
# Clients that accept and send anything, so every limit seen is the server's.
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
GO_PREEMPTS = pytest.mark.xfail(
    proxy_impl() == IMPL_GO, reason="the Go proxy's 1.5 MiB / 4 MiB limits answer for etcd (SPEC 16)", strict=True
)


@contextlib.contextmanager
def kv_stub(endpoint: str) -> Iterator[rpc_pb2_grpc.KVStub]:
    channel = grpc.insecure_channel(endpoint, options=UNLIMITED)
    try:
        yield rpc_pb2_grpc.KVStub(channel)
    finally:
        channel.close()


@pytest.fixture
def direct_kv(etcd_server: EtcdServer) -> Iterator[rpc_pb2_grpc.KVStub]:
    with kv_stub(etcd_server.endpoint) as kv:
        yield kv


@pytest.fixture
def proxy_kv(shared_proxy: ProxyProcess) -> Iterator[rpc_pb2_grpc.KVStub]:
    with kv_stub(shared_proxy.endpoint) as kv:
        yield kv


def prefixes() -> tuple[bytes, bytes]:
    """Two key prefixes of equal length, so sizes in etcd's messages are equal too."""
    run = uuid.uuid4().hex[:12].encode()
    return b"/limits/d/" + run + b"/", b"/limits/p/" + run + b"/"


def answer(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        response = call()
    except grpc.RpcError as exc:
        return ("error", exc.code(), exc.details())
    return ("ok", type(response).__name__)


def put(kv: rpc_pb2_grpc.KVStub, key: bytes, size: int) -> tuple[Any, ...]:
    return answer(lambda: kv.Put(rpc_pb2.PutRequest(key=key, value=b"v" * size), timeout=20))


TOO_LARGE = ("error", grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large")


@pytest.mark.parametrize(
    ("size", "etcd_answer"),
    [
        pytest.param(1 * MiB, ("ok", "PutResponse"), id="1MiB"),
        pytest.param(int(1.6 * MiB), TOO_LARGE, id="1.6MiB", marks=GO_PREEMPTS),
        pytest.param(int(2.5 * MiB), grpc.StatusCode.RESOURCE_EXHAUSTED, id="2.5MiB", marks=GO_PREEMPTS),
        pytest.param(5 * MiB, grpc.StatusCode.RESOURCE_EXHAUSTED, id="5MiB", marks=GO_PREEMPTS),
    ],
)
def test_large_put_gets_etcds_answer(
    direct_kv: rpc_pb2_grpc.KVStub, proxy_kv: rpc_pb2_grpc.KVStub, size: int, etcd_answer: Any
) -> None:
    direct_prefix, proxy_prefix = prefixes()
    direct = put(direct_kv, direct_prefix + b"k", size)
    if isinstance(etcd_answer, tuple):
        assert direct == etcd_answer
    else:  # the message carries the size: "grpc: received message larger than max (N vs. 2097152)"
        assert direct[:2] == ("error", etcd_answer)
        assert direct[2].startswith("grpc: received message larger than max (")
    assert put(proxy_kv, proxy_prefix + b"k", size) == direct


def test_large_range_response_passes(direct_kv: rpc_pb2_grpc.KVStub, proxy_kv: rpc_pb2_grpc.KVStub) -> None:
    """3 x 1.4 MiB values: a 4.2 MiB response, above gRPC's 4 MiB default, which etcd sends."""
    sizes = {}
    for kv, prefix in zip((direct_kv, proxy_kv), prefixes(), strict=True):
        for i in range(3):
            assert put(kv, prefix + b"%d" % i, int(1.4 * MiB)) == ("ok", "PutResponse")
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        for serializable in (False, True):  # the proxy's range cache answers the second one
            response = kv.Range(rpc_pb2.RangeRequest(key=prefix, range_end=end, serializable=serializable), timeout=20)
            assert [len(item.value) for item in response.kvs] == [int(1.4 * MiB)] * 3
            sizes.setdefault(prefix, set()).add(response.ByteSize())
    direct_sizes, proxy_sizes = sizes.values()
    assert direct_sizes == proxy_sizes
    assert min(direct_sizes) > 4 * MiB


def test_explicit_limits_are_applied_like_go(proxy: Callable[..., ProxyProcess]) -> None:
    """--max-send-bytes / --max-recv-bytes given: the proxy refuses with RESOURCE_EXHAUSTED like Go."""
    limit = 1572864  # Go's default, given explicitly; clientv3 wants recv >= send
    limited = proxy(workers=1, extra_args=(f"--max-send-bytes={limit}", f"--max-recv-bytes={limit}"))
    _, prefix = prefixes()
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    with kv_stub(limited.endpoint) as kv:
        for name in (b"a", b"b"):
            assert put(kv, prefix + name, int(1.4 * MiB)) == ("ok", "PutResponse")  # under the send limit
        for size in (int(1.6 * MiB), int(2.5 * MiB), 5 * MiB):  # Go: in its client, then (> 4 MiB) its server
            code, status, details = put(kv, prefix + b"c", size)
            assert (code, status) == ("error", grpc.StatusCode.RESOURCE_EXHAUSTED), details
            assert "message larger than max" in details.lower()
        one = answer(lambda: kv.Range(rpc_pb2.RangeRequest(key=prefix + b"a"), timeout=20))
        assert one == ("ok", "RangeResponse")
        # 2 x 1.4 MiB: a response above --max-recv-bytes
        code, status, details = answer(lambda: kv.Range(rpc_pb2.RangeRequest(key=prefix, range_end=end), timeout=20))
        assert (code, status) == ("error", grpc.StatusCode.RESOURCE_EXHAUSTED), details
        assert "message larger than max" in details.lower()
