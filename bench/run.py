#!/usr/bin/env python3
"""Benchmark etcdproxy against direct etcd and the Go `etcd grpc-proxy` (issue 3). See bench/README.md.

python bench/run.py            # full run
python bench/run.py --quick    # under 3 minutes, same scenarios with smaller counts/durations
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchlib as bl

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HOT_KEY = b"bench/hot"
HOT_VALUE = bytes(ord("a") + i % 26 for i in range(100))
TARGETS = ("etcd", "go-proxy", "etcdproxy")
LABELS = {"etcd": "etcd (direct)", "go-proxy": "Go grpc-proxy", "etcdproxy": "etcdproxy"}


@dataclass
class Params:
    """Scenario sizes. The quick preset shrinks durations and counts, never drops a scenario."""

    duration: float = 10.0  # seconds of load for range/put/lease
    range_conns: int = 100  # h2load connections ("many connections")
    range_streams: int = 4  # concurrent streams per connection
    put_conns: int = 32
    put_inflight: int = 4
    fan_watchers: int = 1000  # on one key: 100 connections x 10 streams x 1 watcher
    fan_conns: int = 100
    fan_streams: int = 10
    fan_rate: float = 200.0  # puts/s
    fan_puts: int = 2000
    burst_puts: int = 2000
    burst_inflight: int = 16
    scale_watchers: int = 10000  # on 10,000 keys: 100 connections x 10 streams x 10 watchers
    scale_conns: int = 100
    scale_streams: int = 10
    scale_per_stream: int = 10
    scale_puts: int = 10000  # each key once
    scale_rate: float = 2000.0
    lease_n: int = 1000
    lease_clients: int = 10
    lease_window: int = 10  # keepalives in flight per client (closed loop)
    lease_ttl: int = 10  # the Go proxy answers a lease's repeat keepalives only every TTL/3
    storm_conns: int = 5000
    storm_parallel: int = 50
    drain: float = 60.0  # max wait for watch stragglers after the last put...
    idle: float = 3.0  # ...ending early once no event arrived for this long
    create_timeout: float = 60.0  # watch creation phase
    repeat: int = 3
    time_limit: float = 1800.0


QUICK = Params(
    duration=2.0,
    fan_puts=400,
    burst_puts=400,
    scale_puts=1000,
    scale_rate=1000.0,
    storm_conns=1000,
    storm_parallel=20,
    drain=15.0,
    create_timeout=15.0,
    repeat=1,
    time_limit=175.0,
)


@dataclass
class Target:
    name: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    available: bool = False
    note: str = ""


@dataclass
class Run:
    scenario: str
    target: str
    rep: int
    ok: bool = True
    reason: str = ""
    throughput: float = 0.0
    unit: str = ""
    ops: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    reached_etcd: dict[str, float] = field(default_factory=dict)
    proxy_cpu_s: float | None = None
    proxy_cpu_per_1k: float | None = None
    proxy_rss_mb: float | None = None
    proxy_rss_start_mb: float | None = None
    etcd_cpu_s: float | None = None
    etcd_cpu_per_1k: float | None = None
    loadgen_cpu_s: float = 0.0
    loadgen_cores: float = 0.0
    noise_cores: float | None = None
    wall_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        if self.ok:
            self.ok = False
            self.reason = why
        elif why not in self.reason:
            self.reason += "; " + why


class Bench:
    def __init__(self, args: argparse.Namespace, p: Params) -> None:
        self.args = args
        self.p = p
        self.procs = bl.Procs()
        self.t_start = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="etcdproxy-bench-"))
        self.targets: dict[str, Target] = {n: Target(n) for n in TARGETS}
        self.etcd_port = 0
        self.etcd: subprocess.Popen[bytes] | None = None
        self.h2bench_bin = self.tmp / "h2bench"
        self.runs: list[Run] = []
        self.meta: dict[str, Any] = {}
        self.seq = 0
        self.reserve = max(12.0, 0.12 * p.time_limit)  # seconds kept for shutdown, table, JSON and chart
        self.gauge_base: dict[str, float] = {}
        self.tls_files: tuple[Path, Path] = (Path(), Path())

    # ------------------------------------------------------------ time
    def remaining(self) -> float:
        return self.p.time_limit - (time.monotonic() - self.t_start)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------ setup
    def build(self) -> None:
        if not shutil.which("h2load"):
            sys.exit("h2load not found: run `bash bench/setup.sh` (apt-get install -y nghttp2-client)")
        if not shutil.which("gcc"):
            sys.exit("gcc not found: run `bash bench/setup.sh` (apt-get install -y gcc libc6-dev libnghttp2-dev)")
        src = BENCH / "h2bench.c"
        cmd = ["gcc", "-O2", "-Wall", "-o", str(self.h2bench_bin), str(src), "-lnghttp2"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"building {src} failed (needs gcc and libnghttp2-dev: run `bash bench/setup.sh`):\n{r.stderr}")

    def tls_args(self) -> list[str]:
        """--tls: the client-facing listeners of every target serve TLS with one self-signed certificate."""
        if not self.args.tls:
            return []
        return [f"--cert-file={self.tls_files[0]}", f"--key-file={self.tls_files[1]}"]

    def start_etcd(self) -> None:
        cport, pport = bl.free_port(), bl.free_port()
        self.etcd_port = cport
        # --tls: etcd also listens on https for direct clients; the proxies keep its plaintext URL upstream
        tport = bl.free_port() if self.args.tls else 0
        listen = f"http://127.0.0.1:{cport}" + (f",https://127.0.0.1:{tport}" if tport else "")
        out = open(self.tmp / "etcd.log", "wb")  # noqa: SIM115
        self.etcd = self.procs.start(
            [
                "etcd",
                "--name=bench",
                f"--data-dir={self.tmp / 'etcd-data'}",
                f"--listen-client-urls={listen}",
                *self.tls_args(),
                f"--advertise-client-urls=http://127.0.0.1:{cport}",
                f"--listen-peer-urls=http://127.0.0.1:{pport}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{pport}",
                f"--initial-cluster=bench=http://127.0.0.1:{pport}",
                f"--quota-backend-bytes={8 * 1024**3}",
                "--log-level=warn",
            ],
            stdout=out,
            stderr=out,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.etcd.poll() is not None:
                sys.exit(f"etcd exited: {(self.tmp / 'etcd.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cport}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            sys.exit("etcd did not become healthy in 30s")
        t = self.targets["etcd"]
        t.port, t.proc, t.available = tport or cport, self.etcd, True
        self.unary_check(t.port, put=True)

    def start_go_proxy(self) -> None:
        t = self.targets["go-proxy"]
        t.port = bl.free_port()
        out = open(self.tmp / "go-proxy.log", "wb")  # noqa: SIM115
        t.proc = self.procs.start(
            [
                "etcd",
                "grpc-proxy",
                "start",
                f"--endpoints=127.0.0.1:{self.etcd_port}",
                f"--listen-addr=127.0.0.1:{t.port}",
                "--advertise-client-url=",
                *self.tls_args(),
            ],
            stdout=out,
            stderr=out,
        )
        self._wait_ready(t, self.tmp / "go-proxy.log", None, 20)

    def start_etcdproxy(self) -> None:
        t = self.targets["etcdproxy"]
        t.port = bl.free_port()
        log = self.tmp / "etcdproxy.log"
        out = open(log, "wb")  # noqa: SIM115
        t.proc = self.procs.start(
            [
                sys.executable,
                "-m",
                "etcdproxy",
                f"--endpoints=http://127.0.0.1:{self.etcd_port}",
                f"--listen-addr=127.0.0.1:{t.port}",
                "--workers",
                str(self.args.workers),
                *self.tls_args(),
            ],
            stdout=out,
            stderr=out,
            cwd=REPO,
        )
        self._wait_ready(t, log, b"started gRPC proxy", self.args.proxy_start_timeout)

    def _wait_ready(self, t: Target, log: Path, marker: bytes | None, timeout: float) -> None:
        assert t.proc is not None
        deadline = time.monotonic() + timeout
        why = f"not ready within {timeout:.0f}s"
        while time.monotonic() < deadline:
            if t.proc.poll() is not None:
                why = f"exited with code {t.proc.returncode}"
                break
            if marker is None or marker in log.read_bytes():
                try:
                    self.unary_check(t.port)
                    t.available = True
                    return
                except Exception as e:
                    why = f"started but a Range through it failed: {e}"
            time.sleep(0.2)
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        t.note = f"not available: {why}" + (f" (log: {' | '.join(tail)[-600:]})" if tail else "")
        self.log(f"{LABELS[t.name]} {t.note}")
        if t.proc.poll() is None:
            self.procs.stop(t.proc)

    def unary_check(self, port: int, put: bool = False) -> None:
        """One real gRPC client round trip (grpc-status is checked, unlike with h2load)."""
        ch = bl.grpc_channel(port)
        try:
            if put:
                ch.unary_unary("/etcdserverpb.KV/Put")(bl.put_request(HOT_KEY, HOT_VALUE), timeout=5)
            resp = ch.unary_unary("/etcdserverpb.KV/Range")(bl.range_request(HOT_KEY, True), timeout=5)
            if bl.range_kv_values(resp) != [HOT_VALUE]:
                raise RuntimeError("Range returned the wrong value")
        finally:
            ch.close()

    def versions(self) -> dict[str, Any]:
        def out(cmd: list[str]) -> str:
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
            except Exception:
                return "?"

        with open("/proc/loadavg") as f:
            loadavg = f.read().split()[:3]
        import grpc

        return {
            "etcd": out(["etcd", "--version"]),
            "h2load": out(["h2load", "--version"]),
            "python": sys.version.split()[0],
            "grpcio": grpc.__version__,
            "etcdproxy_commit": out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "cpus": os.cpu_count(),
            "loadavg_at_start": loadavg,
        }

    # ------------------------------------------------------------ measurement
    def measure(
        self, scenario: str, t: Target, rep: int, fn: Callable[[Run, Target, float], None], runs_left: int
    ) -> Run:
        run = Run(scenario, t.name, rep)
        # leave time to stop processes and write the report; no run may take more than a few times its fair share
        # of what is left, so a slow target makes its own runs fail ("too slow") instead of crowding out the rest
        left = self.remaining() - self.reserve
        budget = min(left, max(10.0, 3.0 * left / max(runs_left, 1)))
        if not t.available:
            run.fail(t.note or "not available")
            run.details["skipped"] = True
            return run
        if t.proc is not None and t.proc.poll() is not None:
            t.available = False
            t.note = f"process exited with code {t.proc.returncode} during the benchmark"
            run.fail(t.note)
            return run
        if left < 8:
            run.fail("skipped: time budget exhausted")
            run.details["skipped"] = True
            return run
        self.seq += 1
        m0 = bl.scrape(self.metrics_url)
        run.details["gauges_before"] = self.gauges(m0)
        run.details["ka_open_before"] = _open_ka(m0)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        assert t.proc is not None and self.etcd is not None
        roots = {"proxy": t.proc.pid, "etcd": self.etcd.pid}
        hub = bl.child_titled(t.proc.pid, "etcdproxy: hub") if t.name == "etcdproxy" else None
        hub_cpu0 = bl.process_cpu_s(hub) if hub else None
        with bl.Sampler(roots) as s:
            try:
                fn(run, t, budget)
            except Exception as e:  # a crashed scenario is a failed one, never a silent gap
                run.fail(f"{type(e).__name__}: {e}")
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        if hub and hub_cpu0 is not None:
            hub_cpu1 = bl.process_cpu_s(hub)
            if hub_cpu1 is not None:  # the hub's own CPU per operation: what every forwarded call pays once
                run.details["hub_cpu_us_per_op"] = (hub_cpu1 - hub_cpu0) / max(run.ops, 1.0) * 1e6
        m1 = bl.scrape(self.metrics_url)
        self._etcd_deltas(run, m0, m1)
        proxy, etcd = s.stats.get("proxy"), s.stats.get("etcd")
        ops = max(run.ops, 1.0)
        if proxy:
            run.proxy_cpu_s = proxy.cpu_s
            run.proxy_cpu_per_1k = proxy.cpu_s / ops * 1000
            run.proxy_rss_mb = proxy.peak_rss_mb
            run.proxy_rss_start_mb = proxy.start_rss_mb
            run.details["proxy_tree_pids"] = proxy.pids
        if etcd:
            run.etcd_cpu_s = etcd.cpu_s
            run.etcd_cpu_per_1k = etcd.cpu_s / ops * 1000
        self_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        ours = (etcd.cpu_s if etcd else 0) + run.loadgen_cpu_s + self_cpu
        if t.name != "etcd" and proxy:
            ours += proxy.cpu_s
        run.noise_cores = max(0.0, (s.busy_s - ours) / s.wall_s) if s.wall_s else None
        run.wall_s = s.wall_s
        run.details["harness_cpu_s"] = round(self_cpu, 3)
        if not run.ok:
            run.throughput = 0.0  # a fast wrong answer scores zero
            log = self.tmp / f"{t.name}.log"
            with contextlib.suppress(OSError):
                run.details["target_log_tail"] = log.read_text(errors="replace").strip().splitlines()[-8:]
        return run

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}/metrics"

    @staticmethod
    def _etcd_deltas(run: Run, m0: bl.Metrics, m1: bl.Metrics) -> None:
        def d(name: str, **lab: str) -> float:
            return bl.metric(m1, name, **lab) - bl.metric(m0, name, **lab)

        r = run.reached_etcd
        r["range_calls"] = d("grpc_server_handled_total", grpc_method="Range")
        r["put_calls"] = d("grpc_server_handled_total", grpc_method="Put")
        r["keepalive_streams"] = d("grpc_server_started_total", grpc_method="LeaseKeepAlive")
        r["keepalive_msgs"] = d("grpc_server_msg_received_total", grpc_method="LeaseKeepAlive")
        r["watch_streams_started"] = d("grpc_server_started_total", grpc_method="Watch")

    def gauges(self, m: bl.Metrics | None = None) -> dict[str, float]:
        m = m if m is not None else bl.scrape(self.metrics_url)
        return {
            "watchers": bl.metric(m, "etcd_debugging_mvcc_watcher_total"),
            "watch_streams": bl.metric(m, "etcd_debugging_mvcc_watch_stream_total"),
        }

    # ------------------------------------------------------------ load generators
    def h2bench(
        self, run: Run, args: list[str], timeout: float, on_ready: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        cmd = [str(self.h2bench_bin), *args, f"--timeout={timeout:.0f}"]
        result: dict[str, Any] = {}

        def on_line(line: str) -> None:
            if line.startswith("READY") and on_ready:
                on_ready(line)
            elif line.startswith("RESULT "):
                result.update(json.loads(line[7:]))

        c = bl.run_child(self.procs, cmd, timeout + 10, on_line, self.tmp / f"h2bench-{self.seq}.err")
        run.loadgen_cpu_s += c.cpu_s
        run.loadgen_cores = run.loadgen_cpu_s / max(c.wall_s, 1e-9)
        if c.timed_out:
            run.fail(f"load generator killed after {timeout + 10:.0f}s")
        if c.rc != 0 or not result:
            run.fail(f"h2bench exit {c.rc}: {c.stderr.strip()[-300:]}")
            return result
        if result.get("errors"):
            run.fail(f"{result['errors']} errors, e.g. {'; '.join(result['error_samples'][:3])}")
        run.p50_ms = result.get("p50_ms")
        run.p99_ms = result.get("p99_ms")
        run.details["h2bench"] = result
        return result

    def sc_range(self, serializable: bool) -> Callable[[Run, Target, float], None]:
        def fn(run: Run, t: Target, budget: float) -> None:
            p = self.p
            body = self.tmp / f"range-{int(serializable)}.bin"
            body.write_bytes(bl.grpc_frame(bl.range_request(HOT_KEY, serializable)))
            logf = self.tmp / f"h2load-{self.seq}.tsv"
            dur = min(p.duration, budget - 5)
            cmd = [
                "h2load",
                f"--duration={max(1, round(dur))}",
                f"--clients={p.range_conns}",
                f"--max-concurrent-streams={p.range_streams}",
                "--threads=1",
                f"--data={body}",
                "--header=content-type: application/grpc",
                "--header=te: trailers",
                f"--log-file={logf}",
                f"{'https' if self.args.tls else 'http'}://127.0.0.1:{t.port}/etcdserverpb.KV/Range",
            ]
            stop = threading.Event()
            sample: dict[str, Any] = {"ok": 0, "bad": 0, "first_error": "", "min_len": None}
            checker = threading.Thread(target=self._grpc_sampler, args=(t.port, serializable, stop, sample))
            checker.start()
            try:
                c = bl.run_child(self.procs, cmd, dur + 30, None, self.tmp / f"h2load-{self.seq}.err")
            finally:
                stop.set()
                checker.join()
            run.loadgen_cpu_s = c.cpu_s
            run.loadgen_cores = c.cpu_s / max(c.wall_s, 1e-9)
            out = "\n".join(c.lines)
            run.details["h2load"] = {k: v for k, v in _parse_h2load(out).items()}
            run.details["grpc_sampled_check"] = sample
            h = run.details["h2load"]
            if c.rc != 0 or "rps" not in h:
                run.fail(f"h2load exit {c.rc}: {(out + c.stderr)[-300:]}")
                return
            lat, codes = _h2load_log(logf)
            if h["failed"] or h["errored"] or h["timeout"] or h["non2xx"] or codes.get(200, 0) != len(lat):
                run.fail(f"h2load: {h['failed']} failed, {h['errored']} errored, {h['timeout']} timeout, codes {codes}")
            if sample["bad"] or not sample["ok"]:
                run.fail(f"sampled gRPC check: {sample['ok']} ok, {sample['bad']} bad ({sample['first_error']})")
            elif "data" in h and h["data"] < h["succeeded"] * (sample["min_len"] + 5):
                # an error reply is trailers-only (no body): fewer body bytes than succeeded x smallest good reply
                # means some HTTP-200 replies were gRPC errors
                run.fail(
                    f"h2load got {h['data']:.0f} body bytes for {h['succeeded']:.0f} replies of >= "
                    f"{sample['min_len'] + 5} bytes: some replies carried a gRPC error"
                )
            # ops counts the sampler's calls too, so "reaching etcd / request" is exact
            run.throughput, run.unit, run.ops = h["rps"], "req/s", h["succeeded"] + sample["ok"] + sample["bad"]
            if lat:
                run.p50_ms, run.p99_ms = _pct(lat, 0.5), _pct(lat, 0.99)

        return fn

    def _grpc_sampler(self, port: int, serializable: bool, stop: threading.Event, out: dict[str, Any]) -> None:
        """While h2load runs, a real gRPC client checks replies (grpc-status and value) every 20 ms."""
        ch = bl.grpc_channel(port)
        call = ch.unary_unary("/etcdserverpb.KV/Range")
        req = bl.range_request(HOT_KEY, serializable)
        try:
            while not stop.wait(0.02):
                try:
                    resp = call(req, timeout=5)
                    if bl.range_kv_values(resp) == [HOT_VALUE]:
                        out["ok"] += 1
                        out["min_len"] = min(out["min_len"] or len(resp), len(resp))
                    else:
                        out["bad"] += 1
                        out["first_error"] = out["first_error"] or "wrong value"
                except Exception as e:
                    out["bad"] += 1
                    out["first_error"] = out["first_error"] or str(e)[:200]
        finally:
            ch.close()

    def sc_put(self, run: Run, t: Target, budget: float) -> None:
        p = self.p
        dur = min(p.duration, budget - 8)
        r = self.h2bench(
            run,
            [
                "--mode=unary",
                "--method=put",
                f"--port={t.port}",
                f"--conns={p.put_conns}",
                f"--inflight={p.put_inflight}",
                f"--duration={dur:.1f}",
                f"--prefix=bench/r{self.seq}",
            ],
            dur + 10,
        )
        run.throughput, run.unit, run.ops = r.get("qps", 0.0), "req/s", r.get("ok", 0)
        if r.get("failed"):
            run.fail(f"{r['failed']} puts failed")

    def sc_watch(self, kind: str) -> Callable[[Run, Target, float], None]:
        def fn(run: Run, t: Target, budget: float) -> None:
            p = self.p
            if kind == "scale":
                shape = [
                    f"--watchers={p.scale_watchers}",
                    f"--keys={p.scale_watchers}",
                    f"--conns={p.scale_conns}",
                    f"--streams={p.scale_streams}",
                    f"--per-stream={p.scale_per_stream}",
                    f"--puts={p.scale_puts}",
                    f"--rate={p.scale_rate}",
                ]
            else:
                shape = [
                    f"--watchers={p.fan_watchers}",
                    "--keys=1",
                    f"--conns={p.fan_conns}",
                    f"--streams={p.fan_streams}",
                    "--per-stream=1",
                ]
                if kind == "fanout":
                    shape += [f"--puts={p.fan_puts}", f"--rate={p.fan_rate}"]
                else:
                    shape += [f"--puts={p.burst_puts}", "--rate=0", f"--inflight={p.burst_inflight}"]
            timeout = min(budget - 4, p.create_timeout + p.drain + 60)

            def ready(line: str) -> None:
                # gauges once all watchers are created and again after the last put (max of both), minus what
                # idle etcd had with all three targets started (their own background watches)
                g, g0 = self.gauges(), self.gauge_base
                for k, v in g.items():
                    run.reached_etcd[k] = max(run.reached_etcd.get(k, 0.0), v - g0.get(k, 0.0))
                if line.startswith("READY watchers"):
                    run.details["ready"] = line

            r = self.h2bench(
                run,
                [
                    "--mode=watch",
                    f"--port={t.port}",
                    f"--writer-port={self.etcd_port}",
                    f"--drain={p.drain}",
                    f"--idle={p.idle}",
                    f"--create-timeout={p.create_timeout}",
                    f"--prefix=bench/r{self.seq}",
                    *shape,
                ],
                timeout,
                ready,
            )
            run.throughput, run.unit, run.ops = r.get("events_per_s", 0.0), "events/s", r.get("events", 0)
            run.details["create_s"] = r.get("create_s")
            if r.get("put_failed"):
                run.details["writer_note"] = f"{r['put_failed']} writer puts to etcd failed: {r.get('put_error')}"

        return fn

    def sc_lease(self, run: Run, t: Target, budget: float) -> None:
        p = self.p
        dur = min(p.duration, budget - 10)
        r = self.h2bench(
            run,
            [
                "--mode=lease",
                f"--port={t.port}",
                f"--writer-port={self.etcd_port}",
                f"--leases={p.lease_n}",
                f"--conns={p.lease_clients}",
                f"--window={p.lease_window}",
                f"--ttl={p.lease_ttl}",
                f"--duration={dur:.1f}",
            ],
            dur + p.lease_ttl / 3 + 20,
            lambda _line: self._later(dur / 2, lambda: self._open_keepalive_streams(run)),
        )
        run.throughput, run.unit, run.ops = r.get("rate", 0.0), "keepalives/s", r.get("answered", 0)

    @staticmethod
    def _later(delay: float, fn: Callable[[], None]) -> None:
        timer = threading.Timer(delay, fn)
        timer.daemon = True
        timer.start()

    def _open_keepalive_streams(self, run: Run) -> None:
        """LeaseKeepAlive streams open at etcd mid-run (started - handled) minus those open before the run: the
        streams this run added. A proxy reusing an upstream stream kept from an earlier run adds 0."""
        with contextlib.suppress(Exception):
            now_open = _open_ka(bl.scrape(self.metrics_url))
            run.reached_etcd["keepalive_streams_open"] = now_open
            run.reached_etcd["keepalive_streams_added"] = now_open - run.details["ka_open_before"]

    def sc_storm(self, run: Run, t: Target, budget: float) -> None:
        p = self.p
        r = self.h2bench(
            run,
            ["--mode=storm", f"--port={t.port}", f"--storm={p.storm_conns}", f"--parallel={p.storm_parallel}"],
            min(budget - 4, 60),
        )
        run.throughput, run.unit, run.ops = r.get("qps", 0.0), "conns/s", r.get("ok", 0)
        if r.get("failed"):
            run.fail(f"{r['failed']} of {p.storm_conns} connections failed")

    # ------------------------------------------------------------ main loop
    def scenarios(self) -> list[tuple[str, Callable[[Run, Target, float], None]]]:
        return [
            ("range-hot", self.sc_range(True)),
            ("range-linear", self.sc_range(False)),
            ("put", self.sc_put),
            ("watch-fanout", self.sc_watch("fanout")),
            ("watch-burst", self.sc_watch("burst")),
            ("watch-scale", self.sc_watch("scale")),
            ("lease-keepalive", self.sc_lease),
            ("conn-storm", self.sc_storm),
        ]

    def main(self) -> int:
        self.log(f"temp dir {self.tmp}; time limit {self.p.time_limit:.0f}s")
        self.build()
        if self.args.tls:
            self.tls_files = bl.make_self_signed(self.tmp)
            bl.TLS_CERT = self.tls_files[0].read_bytes()
        self.start_etcd()
        self.start_go_proxy()
        if self.args.no_etcdproxy:
            self.targets["etcdproxy"].note = "not available: disabled by --no-etcdproxy"
        else:
            self.start_etcdproxy()
        time.sleep(0.5)
        self.gauge_base = self.gauges()
        self.meta = {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
            "params": asdict(self.p),
            "workers": self.args.workers,
            "versions": self.versions(),
            "targets": {n: {"available": t.available, "note": t.note} for n, t in self.targets.items()},
            "etcd_idle_gauges": self.gauge_base,
        }
        for name, t in self.targets.items():
            self.log(f"{LABELS[name]}: {'port ' + str(t.port) if t.available else t.note}")
        only = set(self.args.only.split(",")) if self.args.only else None
        if self.args.tls:  # h2bench.c speaks plaintext only: the h2load scenarios
            only = (only or {"range-hot", "range-linear"}) & {"range-hot", "range-linear"}
        scens = [(s, fn) for s, fn in self.scenarios() if not only or s in only]
        live = sum(t.available for t in self.targets.values())
        runs_left = self.p.repeat * len(scens) * live
        for rep in range(self.p.repeat):
            for scen, fn in scens:
                for name in TARGETS:  # interleaved: A B C per scenario, then again per repeat
                    t = self.targets[name]
                    run = self.measure(scen, t, rep, fn, runs_left)
                    runs_left -= t.available
                    self.runs.append(run)
                    tag = "ok" if run.ok else f"FAIL ({run.reason[:160]})"
                    self.log(
                        f"rep {rep + 1}/{self.p.repeat} {scen:15} {LABELS[name]:14} "
                        f"{run.throughput:10.1f} {run.unit:12} p50 {_f(run.p50_ms)} p99 {_f(run.p99_ms)} ms "
                        f"loadgen {run.loadgen_cores:.2f} cores  {tag}"
                    )
                    self.write_json()
                    time.sleep(0.3)
        return 0

    # ------------------------------------------------------------ report
    def write_json(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "medians": self.medians(), "runs": [asdict(r) for r in self.runs]}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out)

    def medians(self) -> dict[str, dict[str, dict[str, Any]]]:
        med: dict[str, dict[str, dict[str, Any]]] = {}
        for r in self.runs:
            med.setdefault(r.scenario, {}).setdefault(r.target, {"runs": []})["runs"].append(r)
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for scen, by_t in med.items():
            for tname, d in by_t.items():
                runs: list[Run] = d["runs"]
                real = [r for r in runs if not r.details.get("skipped")]
                row: dict[str, Any] = {
                    "n": len(runs),
                    "ok": sum(r.ok for r in runs),
                    "reasons": sorted({" ".join(r.reason.split()) for r in runs if not r.ok}),
                    "unit": runs[0].unit,
                }
                for key in ROW_KEYS:
                    vals = [v for r in real if (v := _get(r, key)) is not None]
                    row[key] = statistics.median(vals) if vals else None
                row["writer_notes"] = sorted({r.details["writer_note"] for r in runs if "writer_note" in r.details})
                out.setdefault(scen, {})[tname] = row
        return out

    def table(self) -> str:
        med = self.medians()
        head = (
            f"| scenario | metric | {LABELS['etcd']} | {LABELS['go-proxy']} | {LABELS['etcdproxy']} "
            "| etcdproxy / Go proxy | etcdproxy / etcd |"
        )
        lines = [head, "|---|---|--:|--:|--:|--:|--:|"]
        notes: list[str] = []
        for scen, _ in self.scenarios():
            if scen not in med:
                continue
            by_t = med[scen]
            unit = next((r["unit"] for r in by_t.values() if r["unit"]), "")
            for label, key, fmt in _rows_for(scen, unit):
                cells = []
                vals: dict[str, float | None] = {}
                for name in TARGETS:
                    row = by_t.get(name)
                    v = row.get(key) if row else None
                    vals[name] = v
                    cell = _fmt(v, fmt)
                    if key == "throughput" and row and row["ok"] < row["n"]:
                        cell += f" ✗{row['n'] - row['ok']}/{row['n']}"
                    cells.append(cell)
                ratios = [
                    _ratio(vals["etcdproxy"], vals[b], fmt) if key not in NO_RATIO else "" for b in ("go-proxy", "etcd")
                ]
                lines.append(f"| {scen} | {label} | {' | '.join(cells)} | {ratios[0]} | {ratios[1]} |")
            for name in TARGETS:
                row = by_t.get(name)
                if row and row["reasons"]:
                    notes.append(f"- {scen} / {LABELS[name]}: ✗ " + "; ".join(x[:300] for x in row["reasons"]))
                if row and row["writer_notes"]:
                    notes.append(f"- {scen} / {LABELS[name]}: note: " + "; ".join(row["writer_notes"]))
        busy = [r.loadgen_cores for r in self.runs if r.loadgen_cores > LOADGEN_WARN]
        if busy:
            notes.append(
                f"- warning: {len(busy)} run(s) had a load generator above {LOADGEN_WARN} cores (max {max(busy):.2f}); "
                "those runs may be load-generator bound"
            )
        noise = [r.noise_cores for r in self.runs if r.noise_cores is not None]
        if noise and statistics.median(noise) > NOISE_WARN:
            notes.append(
                f"- warning: processes outside this benchmark used a median {statistics.median(noise):.2f} cores "
                f"(max {max(noise):.2f}) of this machine during the runs; absolute numbers are distorted by that"
            )
        return "\n".join(lines + (["", *notes] if notes else []))

    def chart(self, png: Path) -> str:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
        med = self.medians()
        scens = [s for s, _ in self.scenarios() if s in med]
        fig, axes = plt.subplots(2, len(scens), figsize=(2.6 * len(scens), 6.5), squeeze=False)
        colors = {"etcd": "#4c72b0", "go-proxy": "#55a868", "etcdproxy": "#c44e52"}
        for i, scen in enumerate(scens):
            for j, (key, title) in enumerate((("throughput", "throughput"), ("p99_ms", "p99 latency (ms)"))):
                ax = axes[j][i]
                vals = [(med[scen].get(n) or {}).get(key) or 0.0 for n in TARGETS]
                ax.bar(range(3), vals, color=[colors[n] for n in TARGETS])
                for k, n in enumerate(TARGETS):
                    row = med[scen].get(n)
                    if j == 0 and row and row["ok"] < row["n"]:
                        ax.annotate("✗", (k, 0), ha="center", va="bottom", color="red", fontsize=12)
                ax.set_xticks(range(3), ["etcd", "Go proxy", "etcdproxy"], fontsize=7)
                unit = (med[scen].get("etcd") or {}).get("unit", "")
                ax.set_title(f"{scen}\n{title if j else unit}", fontsize=8)
                ax.tick_params(axis="y", labelsize=7)
        fig.suptitle("etcd direct vs Go grpc-proxy vs etcdproxy (medians; ✗ runs score 0)", fontsize=10)
        fig.tight_layout()
        fig.savefig(png, dpi=90)
        plt.close(fig)
        return f"chart: {png}"

    def cleanup(self) -> None:
        self.procs.stop_all()
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


ROW_KEYS = (
    "throughput",
    "p50_ms",
    "p99_ms",
    "proxy_cpu_per_1k",
    "proxy_rss_mb",
    "proxy_rss_start_mb",
    "proxy_rss_added_mb",
    "etcd_cpu_per_1k",
    "loadgen_cores",
    "noise_cores",
    "reached_etcd.range_calls",
    "reached_etcd.put_calls",
    "reached_etcd.watchers",
    "reached_etcd.watch_streams",
    "reached_etcd.keepalive_streams",
    "reached_etcd.keepalive_streams_added",
    "reached_etcd.keepalive_streams_open",
    "reached_etcd.keepalive_msgs",
    "reached_etcd.range_fraction",
    "details.create_s",
    "details.hub_cpu_us_per_op",
)


NO_RATIO = ("loadgen_cores", "noise_cores")
LOADGEN_WARN = 0.8  # h2load runs with one thread and h2bench has one: near 1.0 it is the bottleneck
NOISE_WARN = 0.2


def _open_ka(m: bl.Metrics) -> float:
    lab = {"grpc_method": "LeaseKeepAlive"}
    return bl.metric(m, "grpc_server_started_total", **lab) - bl.metric(m, "grpc_server_handled_total", **lab)


def _get(r: Run, key: str) -> float | None:
    if key == "proxy_rss_added_mb":
        return r.proxy_rss_mb - r.proxy_rss_start_mb if r.proxy_rss_mb and r.proxy_rss_start_mb else None
    if key == "reached_etcd.range_fraction":
        calls = r.reached_etcd.get("range_calls")
        return calls / r.ops if calls is not None and r.ops else None
    if "." in key:
        a, b = key.split(".", 1)
        v = getattr(r, a).get(b)
    else:
        v = getattr(r, key)
    return float(v) if isinstance(v, int | float) else None


def _rows_for(scen: str, unit: str) -> list[tuple[str, str, str]]:
    rows = [(unit or "throughput", "throughput", ".0f"), ("p50 ms", "p50_ms", ".2f"), ("p99 ms", "p99_ms", ".2f")]
    reach = {
        "range-hot": [("Range calls reaching etcd / request", "reached_etcd.range_fraction", ".3f")],
        "range-linear": [("Range calls reaching etcd / request", "reached_etcd.range_fraction", ".3f")],
        "conn-storm": [("Range calls reaching etcd / request", "reached_etcd.range_fraction", ".3f")],
        "put": [("Put calls reaching etcd", "reached_etcd.put_calls", ".0f")],
        "watch-fanout": [
            ("etcd watchers", "reached_etcd.watchers", ".0f"),
            ("etcd watch streams", "reached_etcd.watch_streams", ".0f"),
            ("Range calls reaching etcd", "reached_etcd.range_calls", ".0f"),
        ],
        "watch-burst": [
            ("etcd watchers", "reached_etcd.watchers", ".0f"),
            ("etcd watch streams", "reached_etcd.watch_streams", ".0f"),
        ],
        "watch-scale": [
            ("etcd watchers", "reached_etcd.watchers", ".0f"),
            ("etcd watch streams", "reached_etcd.watch_streams", ".0f"),
            ("Range calls reaching etcd", "reached_etcd.range_calls", ".0f"),
            ("watch creation s", "details.create_s", ".2f"),
            ("proxy RSS added during the run MB (10k watchers)", "proxy_rss_added_mb", ".0f"),
        ],
        "lease-keepalive": [
            ("etcd LeaseKeepAlive streams open mid-run (all clients)", "reached_etcd.keepalive_streams_open", ".0f"),
            ("etcd LeaseKeepAlive streams added by the run", "reached_etcd.keepalive_streams_added", ".1f"),
            ("etcd LeaseKeepAlive msgs", "reached_etcd.keepalive_msgs", ".0f"),
        ],
    }[scen]
    tail = [
        ("proxy CPU s / 1k ops", "proxy_cpu_per_1k", ".3f"),
        ("etcdproxy hub CPU us / op", "details.hub_cpu_us_per_op", ".1f"),
        ("proxy peak RSS MB", "proxy_rss_mb", ".0f"),
        ("etcd CPU s / 1k ops", "etcd_cpu_per_1k", ".3f"),
        ("load generator cores", "loadgen_cores", ".2f"),
        ("other load on machine, cores", "noise_cores", ".2f"),
    ]
    return rows + reach + tail


def _fmt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _f(v: float | None) -> str:
    return "    -" if v is None else f"{v:7.2f}"


def _ratio(a: float | None, b: float | None, fmt: str) -> str:
    if a is None or b is None or float(format(b, fmt)) == 0:  # no ratio against a value shown as zero
        return "-"
    return f"{a / b:.2f}x"


def _pct(v: list[float], q: float) -> float:
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def _parse_h2load(out: str) -> dict[str, float]:
    h: dict[str, float] = {}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    if m:
        h["rps"] = float(m.group(3))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        out,
    )
    if m:
        for k, g in zip(
            ("total", "started", "done", "succeeded", "failed", "errored", "timeout"), m.groups(), strict=True
        ):
            h[k] = int(g)
    m = re.search(r"traffic: .*\((\d+)\) data", out)
    if m:
        h["data"] = int(m.group(1))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        h["2xx"] = int(m.group(1))
        h["non2xx"] = sum(int(x) for x in m.groups()[1:])
    return h


def _h2load_log(path: Path) -> tuple[list[float], dict[int, int]]:
    """h2load --log-file: start µs, HTTP status, µs until end of response; one line per request."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            code = int(parts[1])
            codes[code] = codes.get(code, 0) + 1
            lat.append(int(parts[2]) / 1000.0)
    lat.sort()
    return lat, codes


def parse_args() -> tuple[argparse.Namespace, Params]:
    ap = argparse.ArgumentParser(description="etcdproxy vs Go grpc-proxy vs direct etcd (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="smaller counts and durations, under 3 minutes in total")
    ap.add_argument("--repeat", type=int, help="runs per scenario and target (default 3, quick 1)")
    ap.add_argument("--workers", type=int, default=2, help="etcdproxy --workers (default 2)")
    ap.add_argument("--duration", type=float, help="seconds of load for range/put/lease scenarios")
    ap.add_argument("--time-limit", type=float, help="global watchdog in seconds (default 1800, quick 175)")
    ap.add_argument("--only", help="comma-separated scenario names to run")
    ap.add_argument("--no-etcdproxy", action="store_true", help="skip the etcdproxy target")
    ap.add_argument("--proxy-start-timeout", type=float, default=20.0, help="seconds to wait for etcdproxy")
    ap.add_argument("--out", help="JSON path (default bench/results/<UTC timestamp>.json; the PNG goes beside it)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, etcd data)")
    ap.add_argument(
        "--tls",
        action="store_true",
        help="every target serves its clients over TLS (one self-signed certificate); range scenarios only",
    )
    args = ap.parse_args()
    p = QUICK if args.quick else Params()
    if args.repeat:
        p.repeat = args.repeat
    if args.duration:
        p.duration = args.duration
    if args.time_limit:
        p.time_limit = args.time_limit
    if not args.out:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = str(BENCH / "results" / f"{stamp}.json")
    return args, p


def main() -> int:
    args, p = parse_args()
    bench = Bench(args, p)

    def watchdog() -> None:
        print(f"\nwatchdog: time limit {p.time_limit:.0f}s reached, stopping everything", file=sys.stderr, flush=True)
        bench.cleanup()
        with contextlib.suppress(Exception):
            bench.write_json()
            print(bench.table(), flush=True)
        os._exit(3)

    timer = threading.Timer(p.time_limit, watchdog)
    timer.daemon = True
    timer.start()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (nohup, &)
    rc = 1
    try:
        rc = bench.main()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping processes", file=sys.stderr)
        rc = 130
    finally:
        bench.cleanup()
    if bench.runs:
        bench.write_json()
        table = bench.table()
        print(f"\n## Results: medians of {p.repeat} run(s), `{bench.meta.get('command', '')}`\n")
        print(table)
        print()
        tg = bench.meta.get("targets", {})
        for name in TARGETS:
            if not tg.get(name, {}).get("available"):
                print(f"- {LABELS[name]}: {tg.get(name, {}).get('note', 'not available')}")
        print(f"- JSON: {args.out}")
        print(f"- {bench.chart(Path(args.out).with_suffix('.png'))}")
        print(f"- total wall time {time.monotonic() - bench.t_start:.0f}s")
    timer.cancel()  # the watchdog covers the report too
    return rc


if __name__ == "__main__":
    sys.exit(main())
