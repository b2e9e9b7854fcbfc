"""Reload (SIGHUP with --config-file) and upgrade (SIGUSR2) of a running proxy, under client load (issue 14 item 2).

Real etcd, real ``python -m etcdproxy``; clients: Puts on one long-lived connection, Ranges each on a fresh
connection (a refused or reset connect would fail them), and a watch that must see every Put exactly once.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2
from tests.helpers import (
    LOCALHOST,
    READY_LINE,
    ROOT,
    EtcdServer,
    free_port,
    http_get,
    proxy_command,
    stop_process_tree,
    wait_until,
)

pytestmark = pytest.mark.e2e

PUT = "/etcdserverpb.KV/Put"
RANGE = "/etcdserverpb.KV/Range"
WATCH = "/etcdserverpb.Watch/Watch"


class Load:
    """Clients running until stop(): Puts (one connection), Ranges (a new connection each), one watch."""

    def __init__(self, endpoint: str, prefix: bytes) -> None:
        self.endpoint = endpoint
        self.prefix = prefix
        self.failures: list[str] = []
        self.puts = 0
        self.ranges = 0
        self.put_revisions: list[int] = []
        self.events: list[tuple[bytes, int]] = []
        self.done = threading.Event()
        self.watch_channel = grpc.insecure_channel(endpoint)
        self.watch_call = self.watch_channel.stream_stream(
            WATCH,
            request_serializer=rpc_pb2.WatchRequest.SerializeToString,
            response_deserializer=rpc_pb2.WatchResponse.FromString,
        )
        self.threads = [threading.Thread(target=self._watch, daemon=True)]
        self.watch_ready = threading.Event()
        self.threads[0].start()
        assert self.watch_ready.wait(15), "watch not created"
        self.threads += [
            threading.Thread(target=self._put, daemon=True),
            threading.Thread(target=self._range, daemon=True),
        ]
        for thread in self.threads[1:]:
            thread.start()

    def _watch(self) -> None:
        """One watch; when its stream breaks (a worker drains), re-watch from the last revision + 1."""
        next_revision = 0
        while not self.done.is_set():
            create = rpc_pb2.WatchCreateRequest(key=self.prefix, range_end=self.prefix + b"\xff")
            if next_revision:
                create.start_revision = next_revision
            requests: list[rpc_pb2.WatchRequest] = [rpc_pb2.WatchRequest(create_request=create)]
            stop = threading.Event()

            def gen(
                reqs: list[rpc_pb2.WatchRequest] = requests, stop: threading.Event = stop
            ) -> Iterator[rpc_pb2.WatchRequest]:
                yield from reqs
                stop.wait()

            call = self.watch_call(gen(), timeout=120)
            try:
                for response in call:
                    if response.created:
                        self.watch_ready.set()
                    for event in response.events:
                        self.events.append((event.kv.key, event.kv.mod_revision))
                        next_revision = event.kv.mod_revision + 1
                    if self.done.is_set() and self.put_revisions and next_revision > self.put_revisions[-1]:
                        break
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or self.done.is_set():
                    if not self.done.is_set():
                        self.failures.append(f"watch: {exc.code().name} {exc.details()}")
                    return
                if not next_revision and self.put_revisions:
                    next_revision = self.put_revisions[0]
            finally:
                stop.set()
                call.cancel()
            if self.done.is_set():
                return

    def _put(self) -> None:
        with grpc.insecure_channel(self.endpoint) as channel:
            put = channel.unary_unary(
                PUT,
                request_serializer=rpc_pb2.PutRequest.SerializeToString,
                response_deserializer=rpc_pb2.PutResponse.FromString,
            )
            while not self.done.is_set():
                key = self.prefix + b"%06d" % self.puts
                try:
                    reply = put(rpc_pb2.PutRequest(key=key, value=b"v"), timeout=10, wait_for_ready=True)
                except grpc.RpcError as exc:
                    self.failures.append(f"put {key!r}: {exc.code().name} {exc.details()}")
                    continue
                self.puts += 1
                self.put_revisions.append(reply.header.revision)
                time.sleep(0.01)

    def _range(self) -> None:
        while not self.done.is_set():
            with grpc.insecure_channel(self.endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                call = channel.unary_unary(RANGE)
                try:
                    call(rpc_pb2.RangeRequest(key=b"x").SerializeToString(), timeout=10)
                except grpc.RpcError as exc:
                    self.failures.append(f"range: {exc.code().name} {exc.details()}")
                    continue
            self.ranges += 1

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads[1:]:
            thread.join(20)
        # the watch ends once it saw the last Put
        self.threads[0].join(20)
        self.watch_channel.close()

    def check(self) -> None:
        assert self.failures == [], self.failures[:10]
        assert self.puts > 0 and self.ranges > 0
        expected = [(self.prefix + b"%06d" % i, revision) for i, revision in enumerate(self.put_revisions)]
        assert self.events == expected  # every Put seen once, in order: nothing lost or repeated


class Proxy:
    def __init__(
        self, tmp_path: Path, etcd: EtcdServer, config_file: Path, port: int, extra: tuple[str, ...] = ()
    ) -> None:
        self.port = port
        self.log_path = tmp_path / f"proxy-{port}.log"
        args = proxy_command("etcdproxy", [etcd.endpoint], port, workers=2, advertise_client_url=None, extra_args=())
        args = [a for a in args if not a.startswith(("--workers", "--listen-addr"))]  # from the file
        args += [f"--config-file={config_file}", *extra]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PROMETHEUS_MULTIPROC_DIR")}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT
            )
        wait_until(lambda: self.proc.poll() is not None or READY_LINE in self.log(), 30, "proxy start")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process_tree(self.proc, grace=30)


def write_config(path: Path, port: int, **extra: object) -> None:
    lines = [f"listen-addr: {LOCALHOST}:{port}", "drain-delay: 1s", "graceful-timeout: 3s"]
    lines += [f"{key.replace('_', '-')}: {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")


def workers(pid: int) -> set[int]:
    from tests.helpers import children_with_titles

    return {p for p, title in children_with_titles(pid).items() if title.startswith("etcdproxy: worker")}


@pytest.mark.timeout(120)
def test_sighup_reloads_the_config_file_under_load(tmp_path: Path, etcd_server: EtcdServer) -> None:
    port = free_port()
    config = tmp_path / "etcdproxy.yaml"
    write_config(config, port, workers=2, log_level="info")
    proxy = Proxy(tmp_path, etcd_server, config, port)
    try:
        before = workers(proxy.proc.pid)
        assert len(before) == 2
        load = Load(f"{LOCALHOST}:{port}", b"reload/")
        time.sleep(1)
        # live: worker count, log level, cache size; needs a restart: --listen-addr, --namespace
        write_config(config, free_port(), workers=3, log_level="debug", cache_max_entries=100, namespace="/ns/")
        proxy.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: len(workers(proxy.proc.pid) - before) == 3 and not (workers(proxy.proc.pid) & before),
            30,
            "three new workers, the old ones gone",
        )
        time.sleep(1)
        load.stop()
        load.check()
        log = proxy.log()
        assert re.search(
            r"WARN .*SIGHUP: --listen-addr, (--advertise-client-url, )?--namespace changed in \S+ but need a restart",
            log,
        ), log
        assert "SIGHUP: applying --workers=3, --cache-max-entries=100, --log-level='debug'" in log or (
            "--workers=3" in log and "--log-level='debug'" in log
        ), log
        assert re.search(r"INFO hub\[\d+\] etcdproxy.proc: log level is now debug", log), log
        # a bad file: an ERROR, nothing changes
        config.write_text("workers: [1, 2]\n")
        now = workers(proxy.proc.pid)
        proxy.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: config not reloaded" in proxy.log(), 10, "the reload error")
        time.sleep(0.5)
        assert workers(proxy.proc.pid) == now
        print(
            f"reload under load: {load.puts} puts, {load.ranges} ranges on fresh connections, "
            f"{len(load.events)} events, failures {len(load.failures)}"
        )
    finally:
        proxy.stop()


def stop_pid_tree(pid: int, timeout: float = 30) -> None:
    """SIGTERM a process we did not start with Popen (the upgraded supervisor), wait, then KILL what is left."""
    from tests.helpers import descendants

    kids = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(AssertionError):
        wait_until(
            lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
            timeout,
            "the upgraded supervisor to exit",
        )
    for child, _ in kids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_sigusr2_upgrade_under_load(tmp_path: Path, etcd_server: EtcdServer) -> None:
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "etcdproxy.yaml"
    write_config(config, port, workers=2, metrics_addr=f"http://{LOCALHOST}:{metrics_port}")
    proxy = Proxy(tmp_path, etcd_server, config, port)
    new_pid = 0
    try:
        old_children = workers(proxy.proc.pid)
        load = Load(f"{LOCALHOST}:{port}", b"upgrade/")
        time.sleep(1)
        # an upgrade re-reads the file too; a new --listen-addr cannot apply (the socket is inherited)
        moved = free_port()
        write_config(config, moved, workers=2, metrics_addr=f"http://{LOCALHOST}:{metrics_port}")
        proxy.proc.send_signal(signal.SIGUSR2)
        wait_until(lambda: re.search(r"as pid (\d+); leaving once it serves", proxy.log()), 10, "the new supervisor")
        new_pid = int(re.findall(r"as pid (\d+); leaving once it serves", proxy.log())[0])
        assert proxy.proc.wait(30) == 0  # the old one drained and left
        assert not any(Path(f"/proc/{pid}").exists() for pid in old_children)
        new_workers = workers(new_pid)
        assert len(new_workers) == 2
        time.sleep(1.5)  # traffic on the new generation only
        load.stop()
        load.check()
        status, _ = http_get(f"http://{LOCALHOST}:{metrics_port}/health", timeout=5)
        assert status == 200  # the new hub serves the inherited metrics socket
        log = proxy.log()
        assert "upgrade: serving the inherited socket of --listen-addr" in log
        assert (
            f"upgrade: --listen-addr is now {LOCALHOST}:{moved}, but the inherited socket listens on port {port}" in log
        )
        assert "STOPPING=1" not in log
        print(
            f"upgrade under load: {load.puts} puts, {load.ranges} ranges on fresh connections, "
            f"{len(load.events)} events, failures {len(load.failures)}"
        )
    finally:
        proxy.stop()
        if new_pid:
            stop_pid_tree(new_pid)


DUMMY = """
import asyncio, signal
from etcdproxy import proc, supervisor
from etcdproxy.cli import main

async def child(config, spec):
    proc.child_init(spec, config.debug)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    heartbeat = asyncio.create_task(proc.heartbeat_loop(spec, 0.2))
    proc.notify_ready(spec)
    await stop.wait()
    heartbeat.cancel()
    return 0

supervisor.run_child = lambda config, spec: asyncio.run(child(config, spec))
main()
"""


@pytest.mark.timeout(90)
def test_failed_upgrade_keeps_the_old_supervisor(tmp_path: Path) -> None:
    """Supervisor mechanics only (dummy children, no etcd): a new supervisor that cannot start leaves the old
    one serving; a good one takes over and the old one exits 0."""
    script = tmp_path / "dummy.py"
    script.write_text(DUMMY)
    port = free_port()
    config = tmp_path / "etcdproxy.yaml"
    write_config(config, port, workers=1)
    log_path = tmp_path / "dummy.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with log_path.open("ab") as log:
        old = subprocess.Popen(
            [sys.executable, str(script), f"--config-file={config}"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    new_pid = 0
    try:
        wait_until(lambda: READY_LINE in log_path.read_text(), 30, "dummy start")
        config.write_text("workers: many\n")  # the new supervisor exits 1 at once
        old.send_signal(signal.SIGUSR2)
        wait_until(lambda: "ended before it served; this one keeps serving" in log_path.read_text(), 30, "failure")
        assert old.poll() is None
        write_config(config, port, workers=2)
        old.send_signal(signal.SIGUSR2)
        assert old.wait(30) == 0
        new_pid = int(re.findall(r"as pid (\d+); leaving once it serves", log_path.read_text())[-1])
        assert len(workers(new_pid)) == 2  # the new supervisor read the new file
        with socket.create_connection((LOCALHOST, port), timeout=5):  # the port never closed
            pass
    finally:
        stop_process_tree(old)
        if new_pid:
            stop_pid_tree(new_pid)


@pytest.mark.timeout(60)
def test_sighup_can_remove_workers(tmp_path: Path) -> None:
    script = tmp_path / "dummy.py"
    script.write_text(DUMMY)
    port = free_port()
    config = tmp_path / "etcdproxy.yaml"
    write_config(config, port, workers=3)
    log_path = tmp_path / "dummy.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with log_path.open("ab") as log:
        proxy = subprocess.Popen(
            [sys.executable, str(script), f"--config-file={config}"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_until(lambda: READY_LINE in log_path.read_text(), 30, "dummy start")
        before = workers(proxy.pid)
        assert len(before) == 3
        write_config(config, port, workers=1)
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: len(workers(proxy.pid)) == 1 and not workers(proxy.pid) & before, 30, "one new worker")
        text = log_path.read_text()
        assert "SIGHUP: removing worker 1 (--workers 1)" in text and "SIGHUP: removing worker 2 (--workers 1)" in text
        assert "need a restart" not in text  # only live settings changed
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
    finally:
        stop_process_tree(proxy)
