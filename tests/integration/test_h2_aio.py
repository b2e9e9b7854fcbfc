"""etcdproxy.h2.aio, the grpc.aio-shaped channel the hub uses, against a real etcd: connectivity states, fail-fast
versus wait-for-ready, statuses as RpcError, streams, and close() ending open calls CANCELLED."""

from __future__ import annotations

import asyncio
import socket

import pytest

from etcdproxy.etcdpb import rpc_pb2 as pb
from etcdproxy.h2.aio import EOF, AioChannel, ChannelConnectivity, RpcError
from etcdproxy.h2.status import StatusCode
from tests.helpers import EtcdServer

pytestmark = pytest.mark.integration


def _host_port(server: EtcdServer) -> tuple[str, int]:
    host, port = server.endpoint.rsplit(":", 1)
    return host, int(port)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
def test_states_calls_streams_and_close(etcd_server: EtcdServer) -> None:
    async def scenario() -> None:
        channel = AioChannel(*_host_port(etcd_server))
        assert channel.get_state() is ChannelConnectivity.IDLE
        assert channel.get_state(try_to_connect=True) in (ChannelConnectivity.IDLE, ChannelConnectivity.CONNECTING)
        put = channel.unary_unary("/etcdserverpb.KV/Put")
        await put(pb.PutRequest(key=b"aio", value=b"1").SerializeToString(), timeout=5, wait_for_ready=True)
        assert channel.get_state() is ChannelConnectivity.READY
        rng = channel.unary_unary(
            "/etcdserverpb.KV/Range",
            request_serializer=pb.RangeRequest.SerializeToString,
            response_deserializer=pb.RangeResponse.FromString,
        )
        assert (await rng(pb.RangeRequest(key=b"aio"), timeout=5)).kvs[0].value == b"1"
        with pytest.raises(RpcError) as exc:
            await rng(pb.RangeRequest(key=b"aio", revision=10**9), timeout=5)
        assert exc.value.code() is StatusCode.OUT_OF_RANGE
        assert exc.value.details() == "etcdserver: mvcc: required revision is a future revision"
        # a watch stream: created, one event, then close() ends it CANCELLED
        watch = channel.stream_stream("/etcdserverpb.Watch/Watch")(wait_for_ready=True)
        await watch.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"aio")).SerializeToString())
        assert pb.WatchResponse.FromString(await watch.read()).created
        await put(pb.PutRequest(key=b"aio", value=b"2").SerializeToString(), timeout=5)
        event = pb.WatchResponse.FromString(await watch.read())
        assert [e.kv.value for e in event.events] == [b"2"]
        await channel.close()
        assert channel.get_state() is ChannelConnectivity.SHUTDOWN
        with pytest.raises(RpcError) as exc:
            await watch.read()
        assert exc.value.code() is StatusCode.CANCELLED
        with pytest.raises(RpcError):
            await put(b"", timeout=1)

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_unreachable_endpoint_fails_fast_or_waits() -> None:
    async def scenario() -> None:
        channel = AioChannel("127.0.0.1", _closed_port(), connect_timeout_s=1.0, backoff_s=(0.05, 0.2))
        call = channel.unary_unary("/etcdserverpb.KV/Range")
        state = channel.get_state(try_to_connect=True)
        while state is not ChannelConnectivity.TRANSIENT_FAILURE:
            await asyncio.wait_for(channel.wait_for_state_change(state), 5)
            state = channel.get_state()
        assert "refused" in channel.last_error
        with pytest.raises(RpcError) as exc:  # fail fast, grpc's default
            await call(b"", timeout=5)
        assert exc.value.code() is StatusCode.UNAVAILABLE and "refused" in exc.value.details()
        with pytest.raises(RpcError) as exc:  # wait_for_ready: until the deadline
            await call(b"", timeout=0.3, wait_for_ready=True)
        assert exc.value.code() is StatusCode.DEADLINE_EXCEEDED
        stream = channel.stream_stream("/etcdserverpb.Watch/Watch")(wait_for_ready=True)
        await channel.close()
        with pytest.raises(RpcError) as exc:
            await stream.read()
        assert exc.value.code() is StatusCode.CANCELLED
        assert EOF is not None

    asyncio.run(scenario())
