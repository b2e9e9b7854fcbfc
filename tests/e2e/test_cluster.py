"""MemberList modes and ``--resolver-prefix`` registration (SPEC 6, 21 scenarios 9-11), with etcdctl
and the Go proxy (``etcd grpc-proxy start``) sharing a prefix with ours.

Proxies here listen on the address they advertise, so they are started by a local launcher
(the shared one picks its port itself); every process is stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from etcdproxy.core.cluster import registration_value
from etcdproxy.etcdpb import rpc_pb2
from tests.helpers import (
    IMPL_ETCDPROXY,
    IMPL_GO,
    READY_LINE,
    ROOT,
    EtcdServer,
    Stubs,
    connect,
    descendants,
    free_port,
    log_tail,
    proxy_command,
    stop_process,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

T = 10
TTL = 3  # seconds; etcd's minimum lease TTL is about 2 s with default timings
HOST = socket.gethostname()


@dataclass
class Launched:
    impl: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes]
    children: list[tuple[int, int]]  # (pid, start time) seen while it ran, for cleanup by pid

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


class Launcher:
    def __init__(self, etcd: EtcdServer, tmp: Path) -> None:
        self.etcd, self.tmp = etcd, tmp
        self.started: list[Launched] = []

    def __call__(self, impl: str = IMPL_ETCDPROXY, *args: str, advertise: bool = True) -> Launched:
        for attempt in range(3):
            port = free_port()
            argv = proxy_command(
                impl,
                [self.etcd.endpoint],
                port,
                workers=2,
                advertise_client_url=f"127.0.0.1:{port}" if advertise else "",
                extra_args=args,
            )
            log = self.tmp / f"proxy-{impl}-{port}-{attempt}.log"
            env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
            with log.open("ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            launched = Launched(impl, port, log, proc, [])
            self.started.append(launched)
            wait_until(
                lambda p=proc, f=log: p.poll() is not None or READY_LINE in f.read_text(errors="replace"),
                30,
                f"{impl} ready",
            )
            if proc.poll() is None:
                with grpc.insecure_channel(launched.addr) as channel:
                    grpc.channel_ready_future(channel).result(timeout=30)
                launched.children = descendants(proc.pid)
                return launched
            if "address already in use" not in log_tail(log).lower():
                break
        raise RuntimeError(f"{impl} proxy did not start:\n{log_tail(log)}")

    def kill9(self, launched: Launched) -> None:
        launched.children = descendants(launched.proc.pid)
        launched.proc.send_signal(signal.SIGKILL)
        launched.proc.wait(timeout=10)

    def close(self) -> None:
        for launched in reversed(self.started):
            stop_process(launched.proc)
            for pid, start in launched.children:  # children of a killed supervisor, if any survived
                if _start_time(pid) == start:
                    os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[19])


@pytest.fixture
def launch(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(etcd_server, tmp_path)
    yield launcher
    launcher.close()


@pytest.fixture
def prefix() -> str:
    return "proxies-" + uuid.uuid4().hex[:8]


def resolver(prefix: str, ttl: int = TTL) -> tuple[str, ...]:
    return (f"--resolver-prefix={prefix}", f"--resolver-ttl={ttl}")


def ctl(etcdctl: str, endpoints: str, *args: str) -> str:
    proc = subprocess.run(
        [etcdctl, f"--endpoints={endpoints}", "--dial-timeout=5s", "--command-timeout=10s", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, ETCDCTL_API="3"),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def listed(etcdctl: str, endpoint: str) -> set[tuple[str, str]]:
    """(name, client URL) pairs of ``etcdctl member list`` through ``endpoint``."""
    members = json.loads(ctl(etcdctl, endpoint, "member", "list", "-w", "json")).get("members", [])
    return {(m.get("name", ""), url) for m in members for url in m.get("clientURLs", [])}


def eventually(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_until(predicate, timeout, what, interval=0.2)


# ---- registration and discovery ----------------------------------------------------------------


def test_two_proxies_listed_through_either_and_a_killed_one_disappears(
    launch: Launcher, prefix: str, etcdctl_bin: str, direct: Stubs
) -> None:
    a = launch(IMPL_ETCDPROXY, *resolver(prefix))
    b = launch(IMPL_ETCDPROXY, *resolver(prefix))
    both = {(HOST, a.addr), (HOST, b.addr)}
    for proxy in (a, b):
        eventually(lambda p=proxy: listed(etcdctl_bin, p.addr) == both, 15, f"both proxies listed through {proxy.addr}")
    launch.kill9(b)  # the supervisor; its hub dies with it (parent-death signal), the lease is not revoked
    killed = time.monotonic()
    eventually(lambda: listed(etcdctl_bin, a.addr) == {(HOST, a.addr)}, TTL + 8, "the killed proxy to disappear")
    assert time.monotonic() - killed <= TTL + 8
    raw = direct.kv.Range(rpc_pb2.RangeRequest(key=f"{prefix}/{b.addr}".encode()), timeout=T)
    assert raw.count == 0


def test_go_proxy_shares_the_prefix(launch: Launcher, prefix: str, etcdctl_bin: str, direct: Stubs) -> None:
    go = launch(IMPL_GO, *resolver(prefix, 5))
    ours = launch(IMPL_ETCDPROXY, *resolver(prefix, 5))
    values = {}
    for proxy in (go, ours):
        key = f"{prefix}/{proxy.addr}".encode()
        kvs = eventually(
            lambda k=key: direct.kv.Range(rpc_pb2.RangeRequest(key=k), timeout=T).kvs, 15, f"{key!r} registered"
        )
        values[proxy.impl] = kvs[0].value
    # byte-compatible: the same JSON for the same address and host name
    assert values[IMPL_GO] == registration_value(go.addr, HOST)
    assert values[IMPL_ETCDPROXY] == registration_value(ours.addr, HOST)
    both = {(HOST, go.addr), (HOST, ours.addr)}
    eventually(lambda: listed(etcdctl_bin, ours.addr) == both, 15, "the Go proxy listed by ours")
    eventually(lambda: listed(etcdctl_bin, go.addr) == both, 15, "ours listed by the Go proxy")


def test_endpoint_sync_uses_the_listed_urls(launch: Launcher, prefix: str, etcdctl_bin: str) -> None:
    a = launch(IMPL_ETCDPROXY, *resolver(prefix))
    b = launch(IMPL_ETCDPROXY, *resolver(prefix))
    eventually(lambda: len(listed(etcdctl_bin, a.addr)) == 2, 15, "both proxies listed")
    urls = sorted(url for _, url in listed(etcdctl_bin, a.addr))
    assert urls == sorted([a.addr, b.addr])
    key = f"{prefix}-synced"
    ctl(etcdctl_bin, ",".join(urls), "put", key, "v")
    for url in urls:  # each listed URL is a working endpoint on its own
        assert ctl(etcdctl_bin, url, "get", key, "--print-value-only").strip() == "v"


def test_session_loss_and_deleted_key_are_repaired(launch: Launcher, prefix: str, direct: Stubs) -> None:
    proxy = launch(IMPL_ETCDPROXY, *resolver(prefix))
    key = f"{prefix}/{proxy.addr}".encode()

    def registration() -> rpc_pb2.RangeResponse:
        return direct.kv.Range(rpc_pb2.RangeRequest(key=key), timeout=T)

    first = eventually(lambda: registration().kvs, 15, "registration")[0]
    direct.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=first.lease), timeout=T)  # session lost
    again = eventually(lambda: [kv for kv in registration().kvs if kv.lease != first.lease], TTL + 5, "re-registered")
    assert again[0].value == first.value
    direct.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=key), timeout=T)  # key gone, lease alive
    eventually(lambda: registration().kvs, TTL + 5, "key written again")


def test_malformed_entries_are_skipped_and_deleted_ones_forgotten(
    launch: Launcher, prefix: str, etcdctl_bin: str, direct: Stubs
) -> None:
    proxy = launch(IMPL_ETCDPROXY, *resolver(prefix))
    bad = {
        "not-json": b"{",
        "no-addr": b'{"Op":0,"Metadata":"{\\"name\\":\\"x\\"}"}',
        "bad-metadata": b'{"Op":0,"Addr":"10.0.0.7:1","Metadata":"not json"}',
        "delete-op": b'{"Op":1,"Addr":"10.0.0.8:1"}',
    }
    for name, value in bad.items():
        direct.kv.Put(rpc_pb2.PutRequest(key=f"{prefix}/{name}".encode(), value=value), timeout=T)
    other = f"{prefix}/10.1.1.1:2379".encode()
    direct.kv.Put(rpc_pb2.PutRequest(key=other, value=registration_value("10.1.1.1:2379", "other")), timeout=T)
    want = {(HOST, proxy.addr), ("other", "10.1.1.1:2379")}
    eventually(lambda: listed(etcdctl_bin, proxy.addr) == want, 15, "valid entries listed, malformed skipped")
    direct.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=other), timeout=T)
    eventually(lambda: listed(etcdctl_bin, proxy.addr) == {(HOST, proxy.addr)}, 5, "deleted entry forgotten")
    assert "skipping malformed registration" in proxy.log.read_text()


def test_registration_lives_inside_the_namespace(launch: Launcher, prefix: str, direct: Stubs) -> None:
    namespace = f"/nsr-{uuid.uuid4().hex[:6]}/"
    proxy = launch(IMPL_ETCDPROXY, *resolver(prefix), f"--namespace={namespace}")
    raw_key = f"{namespace}{prefix}/{proxy.addr}".encode()
    eventually(lambda: direct.kv.Range(rpc_pb2.RangeRequest(key=raw_key), timeout=T).count, 15, "registration")
    stubs = connect("ns", proxy.addr)
    try:
        seen = stubs.kv.Range(rpc_pb2.RangeRequest(key=f"{prefix}/{proxy.addr}".encode()), timeout=T)
        assert seen.count == 1  # the client sees it in its own view, like through the Go proxy
        members = stubs.cluster.MemberList(rpc_pb2.MemberListRequest(), timeout=T).members
        assert [(m.name, list(m.clientURLs)) for m in members] == [(HOST, [proxy.addr])]
    finally:
        stubs.close()


# ---- the three MemberList modes (SPEC 6.1) -----------------------------------------------------


def test_member_list_modes(launch: Launcher, prefix: str, direct: Stubs) -> None:
    passthrough = launch(IMPL_ETCDPROXY, advertise=False)  # mode 1: etcd's own answer
    alone = launch(IMPL_ETCDPROXY)  # mode 3: advertise URL, no prefix
    registered = launch(IMPL_ETCDPROXY, *resolver(prefix))  # mode 2

    def members(proxy: Launched) -> list[tuple[int, str, list[str]]]:
        stubs = connect("p", proxy.addr)
        try:
            response = stubs.cluster.MemberList(rpc_pb2.MemberListRequest(), timeout=T)
        finally:
            stubs.close()
        return [(m.ID, m.name, list(m.clientURLs)) for m in response.members]

    etcd = direct.cluster.MemberList(rpc_pb2.MemberListRequest(), timeout=T)
    assert members(passthrough) == [(m.ID, m.name, list(m.clientURLs)) for m in etcd.members]
    assert members(alone) == [(0, HOST, [alone.addr])]
    other = f"{prefix}/10.2.2.2:1".encode()
    direct.kv.Put(rpc_pb2.PutRequest(key=other, value=registration_value("10.2.2.2:1", "b")), timeout=T)
    want = sorted([(0, HOST, [registered.addr]), (0, "b", ["10.2.2.2:1"])])
    eventually(lambda: sorted(members(registered)) == want, 15, "registered proxies listed")
    direct.kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=other), timeout=T)
