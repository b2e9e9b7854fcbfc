"""A 3-member etcd cluster on loopback for the member faults (kill -9 of the leader or a
follower, quorum loss and return). Every member is stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.helpers import LOCALHOST, EtcdServer, find_binary, free_port, log_tail, wait_until

MEMBER_ARGS = ("--log-level=warn", "--grpc-keepalive-min-time=500ms")


@dataclass
class Cluster:
    base: Path
    size: int = 3
    members: list[EtcdServer] = field(default_factory=list)
    args: list[list[str]] = field(default_factory=list)

    def start(self) -> None:
        binary = find_binary("etcd")
        for i in range(self.size):
            name = f"m{i}"
            self.members.append(
                EtcdServer(
                    name, self.base / f"{name}.data", free_port(), free_port(), free_port(), self.base / f"{name}.log"
                )
            )
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            self.args.append(
                [
                    binary,
                    f"--name={m.name}",
                    f"--data-dir={m.data_dir}",
                    f"--listen-client-urls={m.client_url}",
                    f"--advertise-client-urls={m.client_url}",
                    f"--listen-peer-urls={m.peer_url}",
                    f"--initial-advertise-peer-urls={m.peer_url}",
                    f"--initial-cluster={initial}",
                    f"--listen-metrics-urls=http://{LOCALHOST}:{m.metrics_port}",
                    "--initial-cluster-state=new",
                    "--initial-cluster-token=robustness",
                    *MEMBER_ARGS,
                ]
            )
        for i in range(self.size):
            self.run(i)
        for i in range(self.size):
            self.wait_healthy(i)

    def run(self, i: int) -> None:
        m = self.members[i]
        with m.log_path.open("ab") as log:
            m.proc = subprocess.Popen(self.args[i], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def alive(self, i: int) -> bool:
        proc = self.members[i].proc
        return proc is not None and proc.poll() is None

    def wait_healthy(self, i: int, timeout: float = 30) -> None:
        """Wait for member ``i``; start it again if it exited (its port taken meanwhile)."""
        m = self.members[i]
        deadline = time.monotonic() + timeout
        while True:
            wait_until(lambda: not self.alive(i) or m.healthy(), timeout, f"member {m.name} healthy")
            if self.alive(i):
                return
            assert time.monotonic() < deadline, f"member {m.name} keeps exiting:\n{log_tail(m.log_path, 5)}"
            time.sleep(0.5)
            self.run(i)

    def kill(self, i: int) -> None:
        proc = self.members[i].proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def leader(self) -> int | None:
        for i, m in enumerate(self.members):
            if not self.alive(i):
                continue
            try:
                with grpc.insecure_channel(m.endpoint) as ch:
                    st = rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest(), timeout=2)
            except grpc.RpcError:
                continue
            if st.leader and st.leader == st.header.member_id:
                return i
        return None

    def stop(self) -> None:
        for m in self.members:
            m.stop()
