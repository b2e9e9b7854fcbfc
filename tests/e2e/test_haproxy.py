"""contrib/haproxy/haproxy.cfg with the real ``haproxy`` binary in front of two real etcdproxy instances.

The HAProxy config is derived from contrib's file (only addresses, logging and, for the idle test, timeouts are
rewritten; a change of shape in contrib's file breaks the derivation loudly), so what is tested is what users copy.

* idle Watch and LeaseKeepAlive streams outlive every HAProxy timeout (3 s here) thanks to the proxy's keepalive
  pings (``--grpc-keepalive-interval``, scaled down from the docs' 30 s), and still deliver;
* a rolling restart of both instances (SIGTERM one, start it again on the same port, then the other) under a
  steady load of unary Puts and a watch that re-watches from its last revision: failed calls, lost and repeated
  events are counted.

The instances are started here rather than with the ``proxy`` fixture because a restart must reuse the same
listen and metrics ports (HAProxy's server lines name them); they are stopped by pid like the fixture's.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.helpers import (
    IMPL_ETCDPROXY,
    LOCALHOST,
    READY_LINE,
    ROOT,
    EtcdServer,
    free_port,
    log_tail,
    proxy_command,
    proxy_impl,
    stop_process,
    stop_process_tree,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CONTRIB_CFG = ROOT / "contrib" / "haproxy" / "haproxy.cfg"
T = 10  # per-call deadline, seconds

# The keepalive flags docs/operations.md and contrib/haproxy recommend (30s/10s), scaled to the 3 s timeouts here.
KEEPALIVE_ARGS = ("--grpc-keepalive-interval=1s", "--grpc-keepalive-timeout=1s")
SHORT_TIMEOUT = "3s"
# The production default, stated because the test helpers default to 0: longer than contrib's checks need to mark
# an instance down (inter 2s + fastinter 1s).
DRAIN_ARGS = ("--drain-delay=5s",)
IDLE_S = 10.0  # > 3 x every HAProxy timeout of the test config


def _haproxy_binary() -> str:
    found = shutil.which("haproxy")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("haproxy not found (CI=true: .ci/run installs it)")
        pytest.skip("haproxy not found (apt-get install haproxy)")
    return found


@pytest.fixture(autouse=True)
def _only_etcdproxy() -> None:
    if proxy_impl() != IMPL_ETCDPROXY:
        pytest.skip("tests etcdproxy's own flags (--metrics-addr health checks, keepalive pings)")


# --------------------------------------------------------------------------- config derived from contrib


def _sub(pattern: str, repl: str, text: str, count: int = 1) -> str:
    """re.sub that insists on exactly ``count`` matches, so contrib's file cannot drift away from the test."""
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert n == count, f"contrib/haproxy/haproxy.cfg: expected {count} match(es) of {pattern!r}, found {n}"
    return new


def derive_config(
    frontend_port: int, servers: list[tuple[str, int, int]], admin_socket: Path, short_timeouts: bool
) -> str:
    """contrib's config with loopback addresses; ``servers`` is [(name, grpc port, metrics port)]."""
    text = CONTRIB_CFG.read_text()
    # No syslog here: log to stderr (HAProxy's own log file of the test), plus an admin socket to read states.
    text = _sub(r"^(\s*)log /dev/log local0$", rf"\1log stderr format raw local0\n\1stats socket {admin_socket}", text)
    # HAProxy needs 2 x maxconn file descriptors and cannot raise its limit without root.
    text = _sub(r"^(\s*maxconn) \d+$", r"\1 1000", text)
    text = _sub(r"^(\s*bind) :2379$", rf"\1 {LOCALHOST}:{frontend_port}", text)
    # The health-check port moves from default-server to each server line (each test instance has its own).
    text = _sub(r"^(\s*default-server) check port 23791 ", r"\1 check ", text)
    text = _sub(r"^\s*server p\d+ \S+\n", "", text, count=2)
    # A metrics port of 0: check the gRPC port itself (it answers GET /health over HTTP/1.1 too).
    text += "".join(f"    server {n} {LOCALHOST}:{gp}{f' check port {mp}' if mp else ''}\n" for n, gp, mp in servers)
    if short_timeouts:
        for name in ("client", "server", "tunnel"):
            text = _sub(rf"^(\s*timeout {name}) \S+$", rf"\1 {SHORT_TIMEOUT}", text)
    return text


def test_contrib_config_is_valid(tmp_path: Path) -> None:
    binary = _haproxy_binary()
    out = subprocess.run([binary, "-c", "-f", str(CONTRIB_CFG)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Configuration file is valid" in out.stdout + out.stderr
    text = CONTRIB_CFG.read_text()
    assert re.search(r"^\s*mode tcp$", text, re.MULTILINE)
    assert re.search(r"^\s*balance leastconn$", text, re.MULTILINE)
    assert not re.search(r"^\s*[^#\n]*shutdown-sessions", text, re.MULTILINE), "see the comment in the config"
    derived = tmp_path / "derived.cfg"
    derived.write_text(derive_config(free_port(), [("p1", 1, 2), ("p2", 3, 4)], tmp_path / "a.sock", True))
    out = subprocess.run([binary, "-c", "-f", str(derived)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- processes


@dataclass
class Instance:
    """One etcdproxy instance on fixed ports, so it can be restarted behind the same HAProxy server line."""

    name: str
    etcd: EtcdServer
    log_dir: Path
    extra_args: tuple[str, ...]
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        args = proxy_command(
            IMPL_ETCDPROXY,
            [self.etcd.endpoint],
            self.port,
            workers=1,
            advertise_client_url="",
            extra_args=(f"--metrics-addr=http://{LOCALHOST}:{self.metrics_port}", *self.extra_args),
        )
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT
            )
        wait_until(
            lambda: (
                self.proc is not None
                and (self.proc.poll() is not None or READY_LINE in self.log_path.read_text(errors="replace"))
            ),
            60,
            f"{READY_LINE!r} from {self.name}",
        )
        assert self.proc.poll() is None, f"{self.name} exited at start:\n{log_tail(self.log_path)}"

    def terminate(self, haproxy: HAProxy, timeout: float = 90) -> tuple[float, float | None]:
        """SIGTERM (a graceful stop, as systemd or an operator does it), watching HAProxy meanwhile; return how
        long the exit took and when HAProxy marked the instance DOWN (None: not before the exit)."""
        assert self.proc is not None and self.proc.poll() is None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        down_at: float | None = None
        while self.proc.poll() is None and time.monotonic() - started < timeout:
            if down_at is None and haproxy.states().get(self.name) == "DOWN":
                down_at = time.monotonic() - started
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.problems.append(f"{self.name} still running {timeout}s after SIGTERM")
        took = time.monotonic() - started
        self.stop()
        return took, down_at

    def stop(self) -> None:
        if self.proc is not None:
            _code, survivors = stop_process_tree(self.proc)
            if survivors:
                self.problems.append(f"{self.name} left children {survivors}")


class HAProxy:
    def __init__(self, tmp: Path, servers: list[Instance], short_timeouts: bool, check_grpc_port: bool) -> None:
        self.port = free_port()
        self.admin = tmp / "haproxy-admin.sock"
        self.cfg = tmp / "haproxy.cfg"
        self.log_path = tmp / "haproxy.log"
        self.cfg.write_text(
            derive_config(
                self.port,
                [(s.name, s.port, 0 if check_grpc_port else s.metrics_port) for s in servers],
                self.admin,
                short_timeouts,
            )
        )
        with self.log_path.open("ab") as log:
            # -db: stay in the foreground, so the pid we hold is HAProxy itself.
            self.proc = subprocess.Popen(
                [_haproxy_binary(), "-db", "-f", str(self.cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(lambda: self.admin.exists() or self.proc.poll() is not None, 15, "HAProxy's admin socket")
        assert self.proc.poll() is None, log_tail(self.log_path)

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def states(self) -> dict[str, str]:
        """Server name -> HAProxy's status (UP, DOWN, UP 1/2, ...), from ``show stat``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.admin))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "etcdproxy" and r["svname"] != "BACKEND"}

    def wait_state(self, name: str, state: str, timeout: float = 30) -> None:
        wait_until(lambda: self.states().get(name) == state, timeout, f"HAProxy to see {name} {state}")

    def retried_connections(self) -> int:
        """Connections HAProxy had to retry (the retries field of its tcplog lines is not 0, "+" = redispatched),
        e.g. a connect refused by an instance that stopped listening before HAProxy marked it down."""
        fields = re.findall(r" \d+/\d+/\d+/\d+/\+?(\d+) \d+/\d+$", self.log_path.read_text(), re.MULTILINE)
        return sum(1 for f in fields if f != "0")

    def stop(self) -> None:
        stop_process(self.proc)


@contextlib.contextmanager
def cluster(
    etcd: EtcdServer, tmp: Path, extra_args: tuple[str, ...], short: bool, check_grpc_port: bool = False
) -> Iterator[tuple[HAProxy, list[Instance]]]:
    instances = [Instance(f"p{i}", etcd, tmp, extra_args) for i in (1, 2)]
    haproxy: HAProxy | None = None
    failed = True
    try:
        for inst in instances:
            inst.start()
        haproxy = HAProxy(tmp, instances, short, check_grpc_port)
        for inst in instances:
            haproxy.wait_state(inst.name, "UP")
        yield haproxy, instances
        failed = False
    finally:
        if haproxy is not None:
            haproxy.stop()
        for inst in instances:
            inst.stop()
        if failed:
            for inst in instances:
                print(f"\n--- tail of {inst.log_path} ---\n{log_tail(inst.log_path, 30)}")
            if haproxy is not None:
                print(f"\n--- tail of {haproxy.log_path} ---\n{log_tail(haproxy.log_path, 40)}")
    problems = [p for inst in instances for p in inst.problems]
    assert not problems, problems


# --------------------------------------------------------------------------- clients


def _channel(endpoint: str) -> grpc.Channel:
    # Its own subchannel pool: its own TCP connection, so HAProxy balances each client separately.
    return grpc.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)])


class WatchClient:
    """A watcher on a prefix that, like etcd's clients, re-watches from its last revision + 1 whenever its
    stream ends (UNAVAILABLE on drain, a cancel) and records every event revision it receives."""

    def __init__(self, endpoint: str, prefix: bytes, start_revision: int) -> None:
        self.channel = _channel(endpoint)
        self.stub = rpc_pb2_grpc.WatchStub(self.channel)
        self.prefix = prefix
        self.next_revision = start_revision
        self.revisions: list[int] = []
        self.stream_ends: list[str] = []
        self.created = threading.Event()
        self.stopping = threading.Event()
        self.call: grpc.Future | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        end = self.prefix[:-1] + bytes([self.prefix[-1] + 1])
        while not self.stopping.is_set():
            create = rpc_pb2.WatchCreateRequest(key=self.prefix, range_end=end, start_revision=self.next_revision)
            requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
            requests.put(rpc_pb2.WatchRequest(create_request=create))
            self.call = self.stub.Watch(iter(requests.get, None))
            try:
                for resp in self.call:
                    if resp.created:
                        self.created.set()
                    for ev in resp.events:
                        self.revisions.append(ev.kv.mod_revision)
                        self.next_revision = ev.kv.mod_revision + 1
                    if resp.canceled:
                        self.stream_ends.append(f"canceled: {resp.cancel_reason}")
                        break
                else:
                    self.stream_ends.append("stream ended OK")
            except grpc.RpcError as exc:
                if not self.stopping.is_set():
                    self.stream_ends.append(f"{exc.code().name}: {exc.details()}")
                    time.sleep(0.1)  # like clientv3's retry back-off, without hammering a dead address
            finally:
                requests.put(None)

    def close(self) -> None:
        self.stopping.set()
        if self.call is not None:
            self.call.cancel()
        self.thread.join(timeout=10)
        self.channel.close()


class PutLoad:
    """``clients`` threads, each on its own connection, each doing one Put at a time at about ``rate`` per second."""

    def __init__(self, endpoint: str, prefix: bytes, clients: int = 4, rate: float = 10) -> None:
        self.prefix = prefix
        self.interval = 1.0 / rate
        self.ok_revisions: list[int] = []
        self.latencies: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()
        self.channels = [_channel(endpoint) for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        kv = rpc_pb2_grpc.KVStub(self.channels[i])
        n = 0
        while not self.stopping.is_set():
            n += 1
            started = time.monotonic()
            try:
                resp = kv.Put(rpc_pb2.PutRequest(key=self.prefix + b"%d/%d" % (i, n), value=b"v"), timeout=T)
                self.ok_revisions.append(resp.header.revision)
                self.latencies.append(time.monotonic() - started)
            except grpc.RpcError as exc:
                self.failures[f"{exc.code().name}: {exc.details()}"] += 1
            time.sleep(self.interval)

    def close(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=T + 5)
        for ch in self.channels:
            ch.close()


class IdleWatch:
    """One Watch stream with one watcher on ``key``, on its own connection; events land in ``events``."""

    def __init__(self, endpoint: str, key: bytes) -> None:
        self.channel = _channel(endpoint)
        self.requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
        self.requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))
        self.call = rpc_pb2_grpc.WatchStub(self.channel).Watch(iter(self.requests.get, None))
        self.created = threading.Event()
        self.events: queue.Queue[int] = queue.Queue()
        self.ended = threading.Event()
        self.error: str = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                if resp.created:
                    self.created.set()
                for ev in resp.events:
                    self.events.put(ev.kv.mod_revision)
        except grpc.RpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ended.set()

    def close(self) -> None:
        self.call.cancel()
        self.requests.put(None)
        self.channel.close()


class IdleLeaseStream:
    """One LeaseKeepAlive stream on its own connection: send a keepalive, read the answer."""

    def __init__(self, endpoint: str, lease_id: int) -> None:
        self.lease_id = lease_id
        self.channel = _channel(endpoint)
        self.requests: queue.Queue[rpc_pb2.LeaseKeepAliveRequest | None] = queue.Queue()
        self.responses = rpc_pb2_grpc.LeaseStub(self.channel).LeaseKeepAlive(iter(self.requests.get, None))

    def keepalive(self) -> int:
        """TTL of the answer; raises grpc.RpcError if the stream is gone."""
        self.requests.put(rpc_pb2.LeaseKeepAliveRequest(ID=self.lease_id))
        resp: rpc_pb2.LeaseKeepAliveResponse = next(self.responses)
        assert self.lease_id == resp.ID
        return int(resp.TTL)

    def close(self) -> None:
        self.responses.cancel()
        self.requests.put(None)
        self.channel.close()


# --------------------------------------------------------------------------- client processes
# The rolling-restart clients run in processes of their own, so a client library that aborts on what it receives
# (seen: grpc-core's `memory_quota.cc ... Check failed` with our HTTP/2 transport) fails the test with its
# message instead of killing pytest.


class ClientProcess:
    """``python -m tests.e2e.test_haproxy <role> ...`` (``_client_main``): role "put" (PutLoad) or "watch"
    (WatchClient). finish() tells it to stop (with the last revision for a watcher) and returns its results."""

    def __init__(self, tmp: Path, role: str, endpoint: str, prefix: bytes, start: int) -> None:
        self.role = role
        self.out = tmp / f"client-{role}.json"
        self.stop_file = tmp / f"client-{role}.stop"
        self.log_path = tmp / f"client-{role}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        args = [role, endpoint, prefix.decode(), str(start), str(self.out), str(self.stop_file)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.e2e.test_haproxy", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        return "created" in self.log_path.read_text(errors="replace")

    def finish(self, payload: str) -> dict[str, Any]:
        tmp = self.stop_file.with_suffix(".tmp")
        tmp.write_text(payload)
        tmp.rename(self.stop_file)
        try:
            code = self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            code = None
        log = log_tail(self.log_path, 20)
        if code == -signal.SIGABRT and "memory_quota.cc" in log:
            # Seen in about half the runs since the workers serve on etcdproxy.h2 (never with grpcio's server):
            # grpcio 1.85's client aborts; reported to the transport's owner with this test as the reproducer.
            pytest.xfail(f"{self.role} client (grpcio) aborted with grpc-core's memory_quota CHECK: {log[:160]}")
        assert code == 0, f"{self.role} client exited with {code}:\n{log}"
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result

    def stop(self) -> None:
        stop_process(self.proc)


def _wait_for(path: Path) -> str:
    while not path.exists():
        time.sleep(0.1)
    return path.read_text()


def _client_main(argv: list[str]) -> None:
    role, endpoint, prefix, start, out, stop = argv
    result: dict[str, Any]
    if role == "put":
        load = PutLoad(endpoint, prefix.encode())
        _wait_for(Path(stop))
        load.close()
        lat = sorted(load.latencies) or [0.0]
        result = {
            "ok_revisions": load.ok_revisions,
            "failures": dict(load.failures),
            "latency_s": {"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "max": lat[-1]},
        }
    else:
        watcher = WatchClient(endpoint, prefix.encode(), int(start))
        if not watcher.created.wait(T):
            sys.exit("watch not created")
        print("created", flush=True)
        last = int(_wait_for(Path(stop)))
        deadline = time.monotonic() + 20
        while last not in watcher.revisions and time.monotonic() < deadline:
            time.sleep(0.05)
        watcher.close()
        result = {"revisions": watcher.revisions, "stream_ends": watcher.stream_ends}
    Path(out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- tests


def test_idle_streams_outlive_every_haproxy_timeout(etcd_server: EtcdServer, tmp_path: Path) -> None:
    """Timeouts client/server/tunnel 3 s; streams idle for 10 s, then each watch delivers and each lease stream
    answers. Without the keepalive flags the same streams end after 3.0 s (`UNAVAILABLE Stream removed`,
    HAProxy log `cD`)."""
    etcd = etcd_server
    with cluster(etcd, tmp_path, KEEPALIVE_ARGS, short=True) as (haproxy, instances):
        key = b"haproxy-idle/key"
        direct = _channel(etcd.endpoint)
        lease_ids = [
            rpc_pb2_grpc.LeaseStub(direct).LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=T).ID for _ in range(4)
        ]
        watches = [IdleWatch(haproxy.endpoint, key) for _ in range(4)]
        leases = [IdleLeaseStream(haproxy.endpoint, lid) for lid in lease_ids]
        try:
            for w in watches:
                assert w.created.wait(T), w.error
            for s in leases:
                assert s.keepalive() > 0
            # leastconn spread them: both instances hold some of these connections
            used = {i.name for i in instances if _established_to(i.port) > 0}
            assert used == {"p1", "p2"}, used
            started = time.monotonic()
            time.sleep(IDLE_S)
            alive_s = time.monotonic() - started
            assert [w.error for w in watches if w.ended.is_set()] == []
            rev = rpc_pb2_grpc.KVStub(direct).Put(rpc_pb2.PutRequest(key=key, value=b"v"), timeout=T).header.revision
            for w in watches:
                assert w.events.get(timeout=T) == rev
            ttls = [s.keepalive() for s in leases]
            assert all(ttl > 0 for ttl in ttls), ttls
            print(
                f"\n{len(watches)} watch + {len(leases)} lease streams idle {alive_s:.1f}s through HAProxy "
                f"(timeouts {SHORT_TIMEOUT}), all alive and delivering"
            )
        finally:
            for w in watches:
                w.close()
            for s in leases:
                s.close()
            direct.close()


def _established_to(port: int) -> int:
    """Established TCP connections to local ``port`` (any process), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":
            count += 1
    return count


def test_rolling_restart_loses_nothing(etcd_server: EtcdServer, tmp_path: Path) -> None:
    """SIGTERM p1, wait for its exit, start it again on the same ports, wait until HAProxy sees it UP; then
    the same for p2; meanwhile 4 clients Put through HAProxy and a watcher on their prefix re-watches from its
    last revision whenever its stream ends. Zero failed Puts, every successful Put's revision delivered
    exactly once. The clients run in processes of their own (see _client_main)."""
    etcd = etcd_server
    prefix = b"haproxy-rolling/"
    with cluster(etcd, tmp_path, (*DRAIN_ARGS, "--graceful-timeout=5s"), short=False) as (haproxy, instances):
        direct = _channel(etcd.endpoint)
        kv = rpc_pb2_grpc.KVStub(direct)
        start = kv.Put(rpc_pb2.PutRequest(key=b"haproxy-rolling-start", value=b"v"), timeout=T).header.revision + 1
        watcher = ClientProcess(tmp_path, "watch", haproxy.endpoint, prefix, start)
        load: ClientProcess | None = None
        timeline: list[str] = []
        down_before_exit: list[bool] = []
        try:
            wait_until(lambda: watcher.ready() or not watcher.alive(), T, "the watcher to be created")
            load = ClientProcess(tmp_path, "put", haproxy.endpoint, prefix, 0)
            time.sleep(2)
            for inst in instances:
                took, down_at = inst.terminate(haproxy)
                if down_at is not None:
                    timeline.append(f"{inst.name}: DOWN in HAProxy {down_at:.1f}s after SIGTERM, exited at {took:.1f}s")
                else:
                    timeline.append(f"{inst.name}: exited {took:.1f}s after SIGTERM, still UP in HAProxy then")
                    haproxy.wait_state(inst.name, "DOWN", timeout=30)
                down_before_exit.append(down_at is not None)
                inst.start()
                t0 = time.monotonic()
                haproxy.wait_state(inst.name, "UP", timeout=60)
                timeline.append(f"{inst.name} restarted, UP in HAProxy after {time.monotonic() - t0:.1f}s")
            time.sleep(2)
            puts = load.finish("")
            last = kv.Put(rpc_pb2.PutRequest(key=prefix + b"end", value=b"v"), timeout=T).header.revision
            watched = watcher.finish(str(last))
        finally:
            for client in (load, watcher):
                if client is not None:
                    client.stop()
            direct.close()
        watcher_revisions: list[int] = watched["revisions"]
        ok_revisions: list[int] = puts["ok_revisions"]
        failures: dict[str, int] = puts["failures"]
        stream_ends: list[str] = watched["stream_ends"]

        seen = collections.Counter(watcher_revisions)
        expected = [*ok_revisions, last]
        lost = [r for r in expected if r not in seen]
        repeated = {r: n for r, n in seen.items() if n > 1}
        summary = (
            f"\nrolling restart: {len(ok_revisions)} Puts ok, {sum(failures.values())} failed, latency "
            + " ".join(f"{k} {v:.3f}s" for k, v in puts["latency_s"].items())
            + f" {failures}; watch events {len(watcher_revisions)}, lost {len(lost)}, "
            f"repeated {len(repeated)}; watch stream ends {stream_ends}; " + "; ".join(timeline)
        )
        summary += f"; HAProxy connections retried: {haproxy.retried_connections()}"
        print(summary)
        assert len(ok_revisions) > 50, summary
        assert not failures, summary
        assert not lost and not repeated, summary
        # The drain: /health answers 503 while the instance still serves, so HAProxy takes it out before it exits.
        assert down_before_exit == [True, True], summary


def test_health_check_on_the_grpc_port_sees_the_drain(etcd_server: EtcdServer, tmp_path: Path) -> None:
    """The alternative to `check port <metrics port>`: HAProxy checks GET /health on the gRPC port itself. Both
    instances come UP that way, and a SIGTERMed instance is marked DOWN while it still runs (drains)."""
    with cluster(etcd_server, tmp_path, (*DRAIN_ARGS, "--graceful-timeout=2s"), short=False, check_grpc_port=True) as (
        haproxy,
        instances,
    ):
        assert "check port" not in haproxy.cfg.read_text()
        p1 = instances[0]
        took, down_at = p1.terminate(haproxy)
        print(f"\ncheck on the gRPC port: p1 DOWN in HAProxy {down_at or -1:.1f}s after SIGTERM, exited at {took:.1f}s")
        assert down_at is not None and down_at < took, (down_at, took)
        assert haproxy.states()["p2"] == "UP"


if __name__ == "__main__":
    _client_main(sys.argv[1:])
