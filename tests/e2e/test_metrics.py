"""--metrics-addr end to end: HTTP semantics, counters across workers and a kill -9, health vs etcd.

The proxy here is started by a local fixture (not conftest's ``proxy``) because /proxy/health
needs ``--advertise-client-url`` pointing at the proxy's own port, which must be known before it
starts, and the respawn test reads the metrics files, so it sets PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from etcdproxy.etcdpb import rpc_pb2
from tests.helpers import (
    IMPL_GO,
    LOCALHOST,
    READY_LINE,
    ROOT,
    EtcdServer,
    HeldWatch,
    ProxyProcess,
    WaitTimeout,
    all_threads_stopped,
    connect,
    descendants,
    established_connections,
    find_binary,
    free_port,
    proxy_command,
    proxy_impl,
    sum_metric,
    wait_until,
)

pytestmark = pytest.mark.e2e

FIVE = (
    "etcd_grpc_proxy_watchers_coalescing_total",
    "etcd_grpc_proxy_events_coalescing_total",
    "etcd_grpc_proxy_cache_keys_total",
    "etcd_grpc_proxy_cache_hits_total",
    "etcd_grpc_proxy_cache_misses_total",
)
TEXT = "text/plain; charset=utf-8"


def request(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


class MetricsProxy:
    def __init__(self, proxy: ProxyProcess, metrics_url: str, metrics_dir: Path) -> None:
        self.proxy = proxy
        self.url = metrics_url
        self.metrics_dir = metrics_dir

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        return request(self.url + path, method)

    def scrape(self) -> str:
        status, _, body = self.get("/proxy/metrics")
        assert status == 200
        return body.decode()

    def value(self, name: str, **labels: str) -> float:
        return sum_metric(self.scrape(), name, labels)


def launch(
    etcd: EtcdServer, log_dir: Path, *, workers: int = 2, advertise: bool = True, extra: tuple[str, ...] = ()
) -> MetricsProxy:
    impl = proxy_impl()
    port, metrics_port = free_port(), free_port()
    metrics_dir = log_dir / f"metrics-{port}"
    metrics_dir.mkdir()
    args = proxy_command(
        impl,
        [etcd.endpoint],
        port,
        workers=workers,
        advertise_client_url=f"{LOCALHOST}:{port}" if advertise else "",
        extra_args=(f"--metrics-addr=http://{LOCALHOST}:{metrics_port}", *extra),
    )
    log_path = log_dir / f"proxy-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    proxy = ProxyProcess(impl=impl, port=port, log_path=log_path, args=args, proc=proc)
    try:
        wait_until(lambda: not proxy.alive() or READY_LINE in log_path.read_text(errors="replace"), 30, "proxy start")
        assert proxy.alive(), proxy.log_tail()
        with grpc.insecure_channel(proxy.endpoint) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        url = f"http://{LOCALHOST}:{metrics_port}"
        wait_until(lambda: request(url + "/proxy/metrics")[0] == 200, 30, "the metrics port")
    except BaseException:
        print(proxy.log_tail())
        proxy.stop()
        raise
    return MetricsProxy(proxy, url, metrics_dir)


@pytest.fixture
def start(etcd_server: EtcdServer, tmp_path: Path) -> Iterator[Callable[..., MetricsProxy]]:
    started: list[MetricsProxy] = []

    def _start(etcd: EtcdServer | None = None, **kwargs: Any) -> MetricsProxy:
        mp = launch(etcd or etcd_server, tmp_path, **kwargs)
        started.append(mp)
        return mp

    yield _start
    for mp in started:
        alive = mp.proxy.alive()
        mp.proxy.stop()  # also SIGKILLs children left behind
        assert alive, f"proxy died during the test:\n{mp.proxy.log_tail()}"


def etcdproxy_only() -> None:
    if proxy_impl() == IMPL_GO:
        pytest.skip("etcdproxy's process tree")


# ---- HTTP semantics --------------------------------------------------------------------------


def test_health_endpoints(start: Callable[..., MetricsProxy]) -> None:
    mp = start()
    for path in ("/health", "/proxy/health"):
        status, headers, body = mp.get(path)
        assert (status, body) == (200, b'{"health":"true","reason":""}'), path
        assert headers["Content-Type"] == TEXT
        status, headers, body = mp.get(path + "?exclude=NOSPACE&serializable=true")  # parsed, ignored
        assert status == 200
        for method in ("POST", "PUT", "DELETE", "HEAD"):
            status, headers, body = mp.get(path, method)
            assert status == 405, (path, method)
            assert headers["Allow"] == "GET"
    text = mp.scrape()
    assert sum_metric(text, "etcd_server_health_success", {}) >= 4
    assert "# TYPE etcd_server_health_success counter" in text


def test_proxy_health_probes_this_instance_without_advertise_url(start: Callable[..., MetricsProxy]) -> None:
    # Go dials --advertise-client-url (so with none given, /proxy/health has nothing to probe); etcdproxy probes
    # its own --listen-addr, so the answer is about this instance whatever is advertised
    mp = start(advertise=False)
    status, headers, body = mp.get("/proxy/health")
    assert (status, body) == (200, b'{"health":"true","reason":""}')
    assert headers["Content-Type"] == TEXT


def test_metrics_is_etcds_and_proxy_metrics_is_ours(start: Callable[..., MetricsProxy], etcd_server: Any) -> None:
    mp = start()
    status, headers, body = mp.get("/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4"
    assert b"etcd_server_has_leader 1" in body
    status, headers, body = mp.get("/proxy/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    for name in FIVE:
        assert f"\n{name} " in text, name
    status, _, body = mp.get("/nope")
    assert (status, body) == (404, b"404 page not found\n")


# ---- counters across workers and a kill -9 ---------------------------------------------------


def workers_of(mp: MetricsProxy) -> list[int]:
    pids = []
    for pid, _ in descendants(mp.proxy.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"worker" in cmdline:
            pids.append(pid)
    return sorted(pids)


def counter_files_with(mp: MetricsProxy, needle: bytes) -> set[int]:
    pids = set()
    for path in mp.metrics_dir.glob("counter_*.db"):
        if needle in path.read_bytes():
            pids.add(int(path.stem.split("_")[1]))
    return pids


def puts(endpoint: str, connections: int, each: int) -> None:
    """``each`` Puts on each of ``connections`` connections, all held open until the last Put (so the workers'
    accept balance, which spreads open connections, gives each worker some of them)."""
    held = []
    try:
        for c in range(connections):
            stubs = connect("proxy", endpoint)
            held.append(stubs)
            for i in range(each):
                stubs.kv.Put(rpc_pb2.PutRequest(key=f"metrics/{c}/{i}".encode(), value=b"v"), timeout=10)
    finally:
        for stubs in held:
            stubs.close()


PUT = {"grpc_type": "unary", "grpc_service": "etcdserverpb.KV", "grpc_method": "Put"}
WATCH = {"grpc_type": "bidi_stream", "grpc_service": "etcdserverpb.Watch", "grpc_method": "Watch"}


def open_watches(mp: MetricsProxy) -> float:
    text = mp.scrape()
    return sum_metric(text, "grpc_server_started_total", WATCH) - sum_metric(text, "grpc_server_handled_total", WATCH)


def test_counters_add_up_across_workers_and_survive_kill_9(start: Callable[..., MetricsProxy]) -> None:
    etcdproxy_only()
    mp = start(workers=2)
    before = mp.value("grpc_server_started_total", **PUT)
    workers = workers_of(mp)
    assert len(workers) == 2
    # held connections until both workers served some: the accept balance spreads open connections
    # (worker/balance.py: a worker defers once it holds SLACK = 4 more, so 4 held connections may all go
    # to one, as CI saw ten rounds in a row), but on a loaded machine a worker that is not scheduled
    # within its peer's deferral cap loses its turn
    sent = 0
    for _ in range(10):
        puts(mp.proxy.endpoint, connections=10, each=2)
        sent += 20
        with contextlib.suppress(WaitTimeout):  # counters reach the files at the workers' next flush
            wait_until(lambda: set(workers) <= counter_files_with(mp, b'"Put"'), 2, "both")
            break
    assert set(workers) <= counter_files_with(mp, b'"Put"'), f"every worker counted Puts ({sent} Puts)"
    wait_until(lambda: mp.value("grpc_server_started_total", **PUT) == before + sent, 10, f"{sent} Puts counted")
    assert mp.value("grpc_server_handled_total", grpc_code="OK", **PUT) == before + sent
    assert mp.value("grpc_server_msg_sent_total", **PUT) == before + sent

    watches = [HeldWatch(mp.proxy.endpoint, b"metrics/w") for _ in range(8)]
    try:
        for w in watches:
            assert w.created.wait(10)
        wait_until(lambda: open_watches(mp) == 8, 10, "8 open watch streams")
        assert mp.value("etcdproxy_grpc_server_in_flight", **WATCH) == 8
        puts_before_kill = mp.value("grpc_server_started_total", **PUT)

        # a worker that holds some of the watch connections (SO_REUSEPORT may give all to one)
        victim = next(w for w in workers if established_connections(w, mp.proxy.port) > 0)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: sum(w.error is not None for w in watches) > 0, 10, "a watch to break")
        wait_until(lambda: len(workers_of(mp)) == 2 and victim not in workers_of(mp), 20, "the worker respawned")
        broken = [w for w in watches if w.error is not None]
        assert all(w.error.code() == grpc.StatusCode.UNAVAILABLE for w in broken)  # type: ignore[union-attr]
        # the dead worker's streams are settled as handled Unavailable: no phantom open streams
        wait_until(lambda: open_watches(mp) == 8 - len(broken), 10, f"{8 - len(broken)} open watch streams")
        assert mp.value("grpc_server_handled_total", grpc_code="Unavailable", **WATCH) == len(broken)
        assert mp.value("etcdproxy_grpc_server_in_flight", **WATCH) == 8 - len(broken)
        # nothing went backwards, and new calls add on top
        assert mp.value("grpc_server_started_total", **PUT) == puts_before_kill
        puts(mp.proxy.endpoint, connections=4, each=5)
        wait_until(lambda: mp.value("grpc_server_started_total", **PUT) == puts_before_kill + 20, 10, "20 more")
    finally:
        for i, w in enumerate(watches):
            if i % 2:  # half-close first (etcd keeps such a stream open), then drop the connection
                w.requests.put(None)
                time.sleep(0.1)
                w.channel.close()
            else:
                w.close()
    wait_until(lambda: open_watches(mp) == 0, 10, "every watch stream handled")
    # the clients cancelled or dropped the others: handled as Canceled, like etcd's (the stream context's error)
    assert mp.value("grpc_server_handled_total", grpc_code="Canceled", **WATCH) == 8 - len(broken)
    assert mp.value("grpc_server_handled_total", grpc_code="OK", **WATCH) == 0
    # the hub hears of the ended streams a moment after the workers counted them handled
    wait_until(lambda: mp.value("etcd_grpc_proxy_watchers_coalescing_total") == 0, 10, "no c-watcher left")


def test_cache_hits_count_as_whole_calls(start: Callable[..., MetricsProxy]) -> None:
    """A Range answered from a worker's cache is one started, received, sent and handled-OK call."""
    etcdproxy_only()
    mp = start(workers=1)
    rng = {"grpc_type": "unary", "grpc_service": "etcdserverpb.KV", "grpc_method": "Range"}
    stubs = connect("proxy", mp.proxy.endpoint)
    try:
        stubs.kv.Put(rpc_pb2.PutRequest(key=b"metrics/hit", value=b"v"), timeout=10)
        request = rpc_pb2.RangeRequest(key=b"metrics/hit", serializable=True)
        hits_before = mp.value("etcd_grpc_proxy_cache_hits_total")
        started_before = mp.value("grpc_server_started_total", **rng)
        for _ in range(20):
            assert stubs.kv.Range(request, timeout=10).kvs[0].value == b"v"
    finally:
        stubs.close()
    wait_until(lambda: mp.value("grpc_server_started_total", **rng) == started_before + 20, 10, "20 Ranges started")
    assert mp.value("etcd_grpc_proxy_cache_hits_total") > hits_before  # some of them were hits
    for name in ("grpc_server_msg_received_total", "grpc_server_msg_sent_total"):
        assert mp.value(name, **rng) == started_before + 20, name
    assert mp.value("grpc_server_handled_total", grpc_code="OK", **rng) == started_before + 20
    assert mp.value("etcdproxy_grpc_server_in_flight", **rng) == 0


def test_watch_responses_sent_are_counted(start: Callable[..., MetricsProxy]) -> None:
    """grpc_server_msg_sent_total of Watch counts every response, the created answer (written by the stream's
    iterator) and the event responses (written straight from the fan-out, rpc Call.push) alike."""
    etcdproxy_only()
    mp = start(workers=1)
    watch = {"grpc_type": "bidi_stream", "grpc_service": "etcdserverpb.Watch", "grpc_method": "Watch"}
    before = mp.value("grpc_server_msg_sent_total", **watch)
    stubs = connect("proxy", mp.proxy.endpoint)
    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"metrics/sent")))
    call = stubs.watch.Watch(iter(requests.get, None), timeout=30)
    responses = events = 0
    try:
        for response in call:
            responses += 1
            if response.created:
                for i in range(30):
                    stubs.kv.Put(rpc_pb2.PutRequest(key=b"metrics/sent", value=b"%d" % i), timeout=10)
            events += len(response.events)
            if events >= 30:
                break
    finally:
        call.cancel()
        requests.put(None)
        stubs.close()
    assert events == 30 and responses >= 2
    wait_until(
        lambda: mp.value("grpc_server_msg_sent_total", **watch) == before + responses,
        10,
        f"{responses} Watch responses counted",
    )


def test_coalescing_metrics(start: Callable[..., MetricsProxy]) -> None:
    etcdproxy_only()
    mp = start(workers=2)
    watches = [HeldWatch(mp.proxy.endpoint, b"metrics/w") for _ in range(3)]
    try:
        for w in watches:
            assert w.created.wait(10)
        wait_until(lambda: mp.value("etcdproxy_watch_c_watchers") == 3, 10, "3 c-watchers")
        assert mp.value("etcdproxy_watch_s_watchers") == 1
        assert mp.value("etcd_grpc_proxy_watchers_coalescing_total") == 2
        before = mp.value("etcd_grpc_proxy_events_coalescing_total")
        puts(mp.proxy.endpoint, 1, 1)  # key metrics/0/0 is not watched ("metrics/w"): no event
        stubs = connect("proxy", mp.proxy.endpoint)
        stubs.kv.Put(rpc_pb2.PutRequest(key=b"metrics/w", value=b"x"), timeout=10)
        stubs.close()
        wait_until(lambda: mp.value("etcd_grpc_proxy_events_coalescing_total") == before + 2, 10, "+2 coalesced")
    finally:
        for w in watches:
            w.close()


# ---- health follows etcd -------------------------------------------------------------------------


def test_health_turns_503_within_2s_of_etcd_stopping(
    start: Callable[..., MetricsProxy], fresh_etcd: EtcdServer
) -> None:
    mp = start(fresh_etcd)
    assert mp.get("/health")[0] == 200
    assert fresh_etcd.proc is not None
    failures = mp.value("etcd_server_health_failures")
    os.kill(fresh_etcd.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all_threads_stopped(fresh_etcd.proc.pid), 5, "etcd's threads to stop")  # type: ignore[union-attr]
        stopped_at = time.monotonic()
        status, headers, body = mp.get("/health")
        took = time.monotonic() - stopped_at
        assert status == 503, body
        assert took < 2.0
        assert body.startswith(b'{"health":"false","reason":"GET ERROR:') and body.endswith(b"}\n")
        assert headers["Content-Type"] == TEXT
        assert mp.get("/proxy/health")[0] == 503
    finally:
        os.kill(fresh_etcd.proc.pid, signal.SIGCONT)
    wait_until(lambda: mp.get("/health")[0] == 200, 10, "/health back to 200")
    wait_until(lambda: mp.get("/proxy/health")[0] == 200, 10, "/proxy/health back to 200")
    assert mp.value("etcd_server_health_failures") >= failures + 2


def test_health_when_etcd_is_killed_and_restarted(start: Callable[..., MetricsProxy], fresh_etcd: EtcdServer) -> None:
    etcdproxy_only()
    mp = start(fresh_etcd)
    assert mp.get("/health")[0] == 200
    assert fresh_etcd.proc is not None
    args = fresh_etcd.proc.args
    fresh_etcd.proc.kill()
    fresh_etcd.proc.wait()
    started = time.monotonic()
    wait_until(lambda: mp.get("/health")[0] == 503, 2, "/health 503")
    assert time.monotonic() - started < 2.0
    assert mp.get("/metrics")[0] == 500  # no endpoint serves etcd's metrics now
    with fresh_etcd.log_path.open("ab") as log:
        fresh_etcd.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_until(lambda: mp.get("/health")[0] == 200, 15, "/health back to 200")
    assert mp.get("/metrics")[0] == 200


def test_health_with_etcd_auth_enabled(start: Callable[..., MetricsProxy], fresh_etcd: EtcdServer) -> None:
    """Go reports unhealthy forever here (SPEC 20.2 L): the probe has no token."""
    etcdproxy_only()
    etcdctl = [find_binary("etcdctl"), f"--endpoints={fresh_etcd.endpoint}"]
    subprocess.run([*etcdctl, "user", "add", "root:rootpw", "--interactive=false"], check=True, capture_output=True)
    subprocess.run([*etcdctl, "auth", "enable"], check=True, capture_output=True)
    mp = start(fresh_etcd)
    assert mp.get("/health")[:3:2] == (200, b'{"health":"true","reason":""}')
    assert mp.get("/proxy/health")[:3:2] == (200, b'{"health":"true","reason":""}')


def test_metrics_addr_that_cannot_be_parsed_exits_1(tmp_path: Path) -> None:
    etcdproxy_only()
    result = subprocess.run(
        [sys.executable, "-m", "etcdproxy", "--metrics-addr=http://[::1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    assert 'cannot parse "http://[::1"' in result.stderr


def test_hub_restart_keeps_the_metrics_port_and_the_totals(start: Callable[..., MetricsProxy]) -> None:
    etcdproxy_only()
    mp = start(workers=1)
    for _ in range(3):
        assert mp.get("/health")[0] == 200
    puts(mp.proxy.endpoint, 1, 5)
    wait_until(lambda: mp.value("grpc_server_started_total", **PUT) == 5, 10, "5 Puts counted")
    successes = mp.value("etcd_server_health_success")
    hubs = [pid for pid, _ in descendants(mp.proxy.proc.pid) if b"hub" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(hubs) == 1
    os.kill(hubs[0], signal.SIGKILL)
    wait_until(lambda: mp.get("/health")[0] == 200, 20, "a new hub serving /health")
    assert mp.value("etcd_server_health_success") >= successes + 1  # the dead hub's count is kept
    assert mp.value("grpc_server_started_total", **PUT) == 5
