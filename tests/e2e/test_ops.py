"""Operating the proxy (issue 14): logs an operator can use, --version, start-up refusals, run dir cleanup.

Real processes only: ``python -m etcdproxy`` against a real etcd that is stopped and started again.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

import etcdproxy
from etcdproxy.etcdpb import rpc_pb2
from tests.helpers import (
    LOCALHOST,
    ROOT,
    EtcdServer,
    child_pid,
    find_binary,
    free_port,
    http_get,
    proxy_command,
    start_etcd,
    start_proxy,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.e2e


def restart_etcd(server: EtcdServer) -> None:
    """Start a stopped one-member etcd again on the same ports and data dir."""
    args = [
        find_binary("etcd"),
        f"--name={server.name}",
        f"--data-dir={server.data_dir}",
        f"--listen-client-urls={server.client_url}",
        f"--advertise-client-urls={server.client_url}",
        f"--listen-peer-urls={server.peer_url}",
        f"--initial-advertise-peer-urls={server.peer_url}",
        f"--initial-cluster={server.name}={server.peer_url}",
        f"--listen-metrics-urls=http://{LOCALHOST}:{server.metrics_port}",
        "--log-level=warn",
    ]
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_until(server.healthy, 30, "etcd healthy again")


def json_entries(path: Path) -> list[dict[str, Any]]:
    """Every line of a --log-format=json log, parsed (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ts(entry: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(entry["ts"]).timestamp()


@pytest.mark.timeout(120)
def test_json_logs_unreachable_endpoint_recovery_and_killed_worker(tmp_path: Path) -> None:
    etcd = start_etcd(tmp_path)
    etcd.stop()  # its port now refuses connections
    proxy = start_proxy([etcd.endpoint], tmp_path, workers=1, extra_args=["--log-format=json"])
    try:
        entries: list[dict[str, Any]] = []

        def warned() -> list[dict[str, Any]]:
            entries[:] = json_entries(proxy.log_path)
            return [e for e in entries if e["level"] == "warn" and "is unreachable" in e["msg"]]

        (warning,) = wait_until(warned, 10, "an unreachable-endpoint WARN")
        hub_ready = next(e for e in entries if e["msg"].startswith("hub ready"))
        assert ts(warning) - ts(hub_ready) <= 2.5, (warning, hub_ready)  # within 2 s (loose)
        # grpcio says "Connection refused"; our own client (etcdproxy.h2) "connect call failed"
        assert re.search(r"connection refused|connect call failed", warning["msg"], re.IGNORECASE), warning
        assert warning["endpoint"] == f"http://{etcd.endpoint}"
        assert warning["role"] == "hub" and warning["pid"] == child_pid(proxy.proc.pid, "etcdproxy: hub")
        for entry in entries:
            assert set(entry) >= {"level", "ts", "caller", "msg", "role", "pid"}
            assert entry["ts"][-6] in "+-" or entry["ts"].endswith("Z")  # a zone, RFC 3339
        time.sleep(4)
        assert len(warned()) == 1  # rate-limited: one per endpoint per 10 s

        restart_etcd(etcd)
        wait_until(
            lambda: [e for e in json_entries(proxy.log_path) if "is reachable again" in e["msg"]],
            15,
            "a recovery INFO line",
        )
        assert [e["level"] for e in json_entries(proxy.log_path) if "is reachable again" in e["msg"]] == ["info"]

        worker = child_pid(proxy.proc.pid, "etcdproxy: worker 0")
        assert worker is not None
        os.kill(worker, signal.SIGKILL)

        def killed() -> list[dict[str, Any]]:
            return [e for e in json_entries(proxy.log_path) if f"pid {worker} exited" in e["msg"]]

        (line,) = wait_until(killed, 15, "the killed worker's exit line")
        assert line["level"] == "warn" and "killed by SIGKILL" in line["msg"], line
    finally:
        proxy.stop()
        etcd.stop()


@pytest.mark.timeout(120)
def test_every_endpoint_down_is_logged_without_flooding(tmp_path: Path) -> None:
    """Three members down: the hub cycles through them every 0.1-2 s; the log says so once per endpoint per 10 s."""
    dead = [f"{LOCALHOST}:{free_port()}" for _ in range(3)]
    proxy = start_proxy(dead, tmp_path, workers=1, extra_args=["--log-format=json"])
    try:
        time.sleep(6)
        entries = json_entries(proxy.log_path)
    finally:
        proxy.stop()
    upstream = [e for e in entries if e["logger"] == "etcdproxy.upstream" and e["level"] == "warn"]
    by_endpoint = {e["endpoint"] for e in upstream}
    assert by_endpoint == {f"http://{d}" for d in dead}, upstream  # each one named, with a reason
    for endpoint in by_endpoint:
        lines = [e["msg"] for e in upstream if e["endpoint"] == endpoint]
        assert len(lines) <= 2, lines  # one "moving to" and one reason line per 10 s, not one per retry


@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [("127.0.0.1:abc", '"127.0.0.1:abc"'), ("127.0.0.1", "no port"), ("http://[::1", '"http://[::1"')],
)
@pytest.mark.timeout(60)
def test_malformed_endpoint_is_refused_at_start(endpoint: str, fragment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "etcdproxy", f"--endpoints={endpoint}", "--workers=1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1
    assert f"invalid --endpoints {fragment}" in result.stderr or fragment in result.stderr, result.stderr
    assert "spawned" not in result.stderr  # refused before anything started


# --- item 6: --version, advertise URL and self probe, nothing left behind ---


@pytest.mark.timeout(60)
def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "etcdproxy", "--version"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"etcdproxy {etcdproxy.__version__}\netcd API version: {etcdproxy.ETCD_API_VERSION}\n"


@pytest.mark.timeout(120)
def test_two_instances_on_one_host_each_probe_themselves(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """The issue's report: the second instance's /proxy/health probed the first. Here instance A has a dead
    upstream; B advertises A's address explicitly (so Go's self client would probe A); each probes itself."""
    dead = free_port()
    metrics_a, metrics_b = free_port(), free_port()
    a = start_proxy(
        [f"{LOCALHOST}:{dead}"],
        tmp_path,
        workers=1,
        advertise_client_url=None,  # follows --listen-addr
        extra_args=[f"--metrics-addr=http://{LOCALHOST}:{metrics_a}"],
    )
    b = None
    try:
        b = start_proxy(
            [etcd_server.endpoint],
            tmp_path,
            workers=1,
            advertise_client_url=a.endpoint,
            extra_args=[f"--metrics-addr=http://{LOCALHOST}:{metrics_b}"],
        )
        wait_until(lambda: http_get(f"http://{LOCALHOST}:{metrics_b}/proxy/health")[0] == 200, 15, "B healthy")
        status, body = http_get(f"http://{LOCALHOST}:{metrics_a}/proxy/health", timeout=10)
        assert status == 503 and '"health":"false"' in body
        with grpc.insecure_channel(a.endpoint) as channel:  # A's MemberList names A's own address
            reply = channel.unary_unary(
                "/etcdserverpb.Cluster/MemberList",
                request_serializer=rpc_pb2.MemberListRequest.SerializeToString,
                response_deserializer=rpc_pb2.MemberListResponse.FromString,
            )(rpc_pb2.MemberListRequest(), timeout=10)
        assert [list(m.clientURLs) for m in reply.members] == [[a.endpoint]]
    finally:
        if b is not None:
            b.stop()
        a.stop()


@pytest.mark.timeout(120)
def test_nothing_left_in_the_run_dir_after_a_stop(tmp_path: Path, etcd_server: EtcdServer) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)  # an operator's dir (e.g. systemd's RuntimeDirectory=): kept, emptied
    started = time.time()
    proxy = start_proxy([etcd_server.endpoint], tmp_path, workers=2, extra_args=[f"--run-dir={run_dir}"])
    # older versions left /run/etcdproxy-<host>-<port>.lock behind; the supervisor's bind guards the address now
    # (a file an older version left for the same port number earlier on this machine is not ours)
    lock_name = f"etcdproxy-{LOCALHOST}-{proxy.port}.lock"

    def new_locks() -> list[str]:
        paths = [os.path.join(d, lock_name) for d in ("/run", "/tmp")]
        return [p for p in paths if os.path.exists(p) and os.stat(p).st_mtime >= started - 1]

    locks = new_locks()
    try:
        present = set(os.listdir(run_dir))
        assert {"hub.sock", "supervisor.lock", "metrics"} <= present, present
        assert any(name.startswith("heartbeat-") for name in present), present
    finally:
        code = proxy.stop()
    assert code == 0
    assert os.listdir(run_dir) == []
    assert locks == []
    assert new_locks() == []


# --- item 1, supervisor side: drain on SIGTERM ---


def launch(args: list[str], log_path: Path, **env_extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **env_extra)
    with log_path.open("ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)


def health_or_refused(url: str) -> int:
    """HTTP status of GET ``url``, 0 if the connection is refused (the listener is gone)."""
    try:
        return http_get(url, timeout=2)[0]
    except OSError:
        return 0


@pytest.mark.timeout(120)
def test_sigterm_turns_health_503_at_once_and_tells_systemd(tmp_path: Path, etcd_server: EtcdServer) -> None:
    port, metrics_port = free_port(), free_port()
    url = f"http://{LOCALHOST}:{metrics_port}"
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify))
        systemd.settimeout(30)
        args = [
            *proxy_command(
                "etcdproxy", [etcd_server.endpoint], port, workers=1, advertise_client_url=None, extra_args=()
            ),
            f"--metrics-addr={url}",
            "--drain-delay=2s",
            "--graceful-timeout=2s",
        ]
        proxy = launch(args, tmp_path / "proxy.log", NOTIFY_SOCKET=str(notify))
        try:
            assert "READY=1" in systemd.recv(4096).decode().splitlines()
            wait_until(lambda: health_or_refused(url + "/health") == 200, 15, "/health 200")
            statuses: list[tuple[float, int]] = []
            done = threading.Event()

            def poll() -> None:
                while not done.is_set():
                    status = health_or_refused(url + "/health")
                    statuses.append((time.monotonic(), status))
                    if status == 0:
                        return
                    time.sleep(0.01)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            time.sleep(0.1)
            sent = time.monotonic()
            proxy.send_signal(signal.SIGTERM)
            assert systemd.recv(4096) == b"STOPPING=1"
            assert proxy.wait(30) == 0
            done.set()
            poller.join(5)
        finally:
            stop_process(proxy)
    after = [(t - sent, status) for t, status in statuses if t > sent]
    first_503 = next(t for t, status in after if status == 503)
    assert first_503 < 1.0, after  # at once, not after the graceful timeout
    # from then on: 503 until the listener closes, never 200 again
    assert all(status in (503, 0) for t, status in after if t >= first_503), after
    log = (tmp_path / "proxy.log").read_text()
    assert "draining: health endpoints answer 503" in log


DUMMY = """
import asyncio, signal
from etcdproxy import proc, supervisor
from etcdproxy.cli import main

async def child(config, spec):
    proc.child_init(spec, config.debug)
    if spec.role == "worker":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # never drains: the supervisor must KILL it
    else:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    heartbeat = asyncio.create_task(proc.heartbeat_loop(spec, 0.2))
    proc.notify_ready(spec)
    if spec.role == "worker":
        await asyncio.sleep(1000)
    await stop.wait()
    heartbeat.cancel()
    return 0

supervisor.run_child = lambda config, spec: asyncio.run(child(config, spec))
main()
"""


@pytest.mark.timeout(60)
def test_stubborn_worker_is_killed_after_drain_delay_plus_graceful_timeout(tmp_path: Path) -> None:
    script = tmp_path / "dummy.py"
    script.write_text(DUMMY)
    args = [sys.executable, str(script), f"--listen-addr={LOCALHOST}:{free_port()}", "--workers=1"]
    proxy = launch([*args, "--drain-delay=1.5s", "--graceful-timeout=1s"], tmp_path / "dummy.log")
    try:
        wait_until(lambda: "started gRPC proxy" in (tmp_path / "dummy.log").read_text(), 30, "dummy start")
        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
        took = time.monotonic() - started
    finally:
        stop_process(proxy)
    log = (tmp_path / "dummy.log").read_text()
    assert "worker 0 pid" in log and "did not stop in time, sending SIGKILL" in log
    assert 2.5 <= took < 10, took  # drain 1.5 s + graceful 1 s (+ 1 s margin), not graceful alone
