"""The workers' side of a graceful stop (issue 14 item 1, on our transport): existing connections get the two-phase
GOAWAY at once, the listener keeps accepting (and serving) for --drain-delay, connections accepted meanwhile are told
when it ends, then the listener closes, and long streams end with UNAVAILABLE so clients reconnect elsewhere."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2 as pb
from etcdproxy.etcdpb import rpc_pb2_grpc
from tests.h2.rawclient import GOAWAY, NO_ERROR, H2Client, range_request
from tests.helpers import LOCALHOST, EtcdServer, start_proxy, stop_process_tree

MAX_ID = 2**31 - 1
DRAIN_S = 3.0


def goaways(client: H2Client, until: float) -> list[int]:
    """Last-stream-ids of the GOAWAYs read until ``until`` (monotonic) or the close."""
    seen = []
    try:
        while time.monotonic() < until:
            frame = client.read_frame(timeout=max(until - time.monotonic(), 0.01))
            if frame is not None and frame.type == GOAWAY:
                assert frame.error_code == NO_ERROR
                seen.append(frame.last_stream_id)
    except Exception:  # closed by the server: what we read is the answer
        pass
    return seen


def refused(port: int) -> bool:
    try:
        socket.create_connection((LOCALHOST, port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_drain_goaway_keep_accepting_then_close(fresh_etcd: EtcdServer, tmp_path: Path) -> None:
    # started by hand (not the ``proxy`` fixture, which reports a proxy that exits during the test)
    p = start_proxy(
        [fresh_etcd.endpoint], tmp_path, workers=1, extra_args=[f"--drain-delay={DRAIN_S}s", "--graceful-timeout=5s"]
    )
    early = H2Client(LOCALHOST, p.port).connect()
    late: H2Client | None = None
    channel = grpc.insecure_channel(p.endpoint)
    try:
        watch = rpc_pb2_grpc.WatchStub(channel).Watch(
            iter([pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"drain"))]), timeout=30
        )
        assert next(watch).created
        started = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        # the connection open before the stop: GOAWAY(max id), then the final GOAWAY with the real last id
        assert goaways(early, started + 1.5)[:2] == [MAX_ID, 0]
        # during the delay a new connection is accepted and served normally
        late = H2Client(LOCALHOST, p.port).connect()
        sid = late.start_request(body=range_request(b"drain"))
        response = late.read_response(sid)
        assert response.grpc_status == 0, response
        assert time.monotonic() - started < DRAIN_S
        # when the delay ends: the late connection is told too, and the listener is closed
        assert goaways(late, started + DRAIN_S + 2.0)[:1] == [MAX_ID]
        assert refused(p.port)
        # the long stream ended with UNAVAILABLE: the client reconnects elsewhere
        with pytest.raises(grpc.RpcError) as exc:
            for _ in watch:
                pass
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert p.proc.wait(timeout=15) == 0
    finally:
        early.close()
        if late is not None:
            late.close()
        channel.close()
        stop_process_tree(p.proc)
