"""The hub reaches etcd over ONE HTTP/2 connection (etcdproxy.h2, not grpcio), whatever the clients do: unary calls,
1,000 c-watchers and 1,000 kept-alive leases from many client connections; workers hold no connection to etcd."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2 as pb
from etcdproxy.etcdpb import rpc_pb2_grpc
from tests.helpers import EtcdServer, child_pid, children_with_titles, established_connections

CLIENTS = 20
PER_CLIENT = 50  # watchers and leases per client connection: 1,000 of each


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_one_upstream_connection_for_everything(fresh_etcd: EtcdServer, proxy: Any) -> None:
    p = proxy(etcd=fresh_etcd, workers=2)
    etcd_port = int(fresh_etcd.endpoint.rsplit(":", 1)[1])
    hub = child_pid(p.proc.pid, "etcdproxy: hub")
    assert hub is not None
    channels = [
        grpc.insecure_channel(p.endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CLIENTS)
    ]
    created = threading.Semaphore(0)
    events: list[int] = [0] * CLIENTS
    watch_calls: list[Any] = []
    keepalive_calls: list[Any] = []
    try:
        kv = rpc_pb2_grpc.KVStub(channels[0])
        lease_stub = rpc_pb2_grpc.LeaseStub(channels[0])
        leases = [
            lease_stub.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=10).ID for _ in range(CLIENTS * PER_CLIENT)
        ]

        def watch(i: int) -> None:
            requests = [
                pb.WatchRequest(create_request=pb.WatchCreateRequest(key=f"/conn/{i}/{j}".encode()))
                for j in range(PER_CLIENT)
            ]
            call = rpc_pb2_grpc.WatchStub(channels[i]).Watch(iter(requests), timeout=120)
            watch_calls.append(call)
            seen_created = 0
            for response in call:
                if response.created:
                    seen_created += 1
                    if seen_created == PER_CLIENT:
                        created.release()
                events[i] += len(response.events)
                if events[i] == PER_CLIENT:
                    return

        threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for _ in range(CLIENTS):
            assert created.acquire(timeout=60), "not every watcher was created"
        # 1,000 leases kept alive over 20 streams
        answered = 0
        for i in range(CLIENTS):
            mine = leases[i * PER_CLIENT : (i + 1) * PER_CLIENT]
            call = rpc_pb2_grpc.LeaseStub(channels[i]).LeaseKeepAlive(
                iter([pb.LeaseKeepAliveRequest(ID=lease) for lease in mine]), timeout=60
            )
            keepalive_calls.append(call)
            for answer in call:
                assert answer.TTL > 50
                answered += 1
        assert answered == CLIENTS * PER_CLIENT
        # unary calls from every connection; each Put is one event for one watcher
        for i in range(CLIENTS):
            stub = rpc_pb2_grpc.KVStub(channels[i])
            for j in range(PER_CLIENT):
                stub.Put(pb.PutRequest(key=f"/conn/{i}/{j}".encode(), value=b"v"), timeout=10)
            assert (
                stub.Range(
                    pb.RangeRequest(key=f"/conn/{i}/".encode(), range_end=f"/conn/{i}0".encode()), timeout=10
                ).count
                == PER_CLIENT
            )
        for t in threads:
            t.join(timeout=60)
        assert events == [PER_CLIENT] * CLIENTS
        # while all of it is open: one connection from the hub to etcd, none from the workers
        assert established_connections(hub, etcd_port, remote=True) == 1
        workers = [pid for pid, title in children_with_titles(p.proc.pid).items() if "worker" in title]
        assert len(workers) == 2 and all(established_connections(w, etcd_port, remote=True) == 0 for w in workers)
        assert kv.Range(pb.RangeRequest(key=b"/conn/0/0"), timeout=10).kvs[0].value == b"v"
    finally:
        for call in watch_calls + keepalive_calls:
            call.cancel()
        for ch in channels:
            ch.close()
