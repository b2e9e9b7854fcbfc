"""One robustness run: etcd (one member or a 3-member cluster), the target (etcdproxy, the Go
``etcd grpc-proxy`` or etcd itself), the ground-truth watch, seeded traffic, faults, a drain, and
the validators over the recorded history. Every process started here is stopped by pid."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from etcdproxy.etcdpb import rpc_pb2, rpc_pb2_grpc
from tests.faults import Relay
from tests.helpers import EtcdServer, ProxyProcess, descendants, start_etcd, start_proxy, wait_until
from tests.robustness.cluster import Cluster
from tests.robustness.history import History, Recorder, now
from tests.robustness.inject import LINK_FAULTS, MEMBER_FAULTS, Injector, Targets
from tests.robustness.traffic import KVClient, LeaseClient, Shared, Truth, WatchClient
from tests.robustness.validators import Report, check

TARGETS = ("proxy", "go", "direct")
KV_WEIGHTS: dict[str, float] = {
    "range": 3,
    "range_serializable": 3,
    "range_old": 0.5,
    "put": 4,
    "txn": 1.5,
    "delete": 1,
}


@dataclass(frozen=True)
class Profile:
    kv: int = 2
    kv_rate: float = 8.0
    watch: int = 3
    watch_rate: float = 2.0
    lease: int = 1
    churn: int = 1  # KV clients reconnecting every 3 calls
    direct: int = 1  # KV writers straight to etcd (writes made elsewhere, for the range cache)
    pause_s: float = 0.0  # watch clients stop reading this long now and then
    half_close: bool = False
    compact: float = 1.0  # weight of Compact in the first KV client


PROFILES = {
    "mixed": Profile(),
    "watch-heavy": Profile(
        kv=2, kv_rate=10.0, watch=6, watch_rate=3.0, lease=1, churn=0, pause_s=1.5, half_close=True, compact=0.6
    ),
    "lease-heavy": Profile(kv=1, watch=2, lease=4, churn=1),
}


@dataclass
class RunConfig:
    name: str
    out_dir: Path
    seed: int = 1
    target: str = "proxy"
    profile: str = "mixed"
    duration: float = 10.0
    faults: list[str] = field(default_factory=list)
    cluster: bool = False
    workers: int = 2
    hold_s: float = 2.0
    gap_s: float = 2.0
    sample_every: float = 0.0  # RSS/fd samples of the proxy processes (soak runs)
    staleness_s: float = 2.0
    lease_slack_s: float = 1.0


@dataclass
class Result:
    config: RunConfig
    path: Path
    report: Report
    faults_applied: list[str]
    errors: list[str]
    growth: list[str]
    kept: Path | None = None

    def ok(self) -> bool:
        return not self.report.violations and not self.errors and not self.growth

    def summary(self) -> str:
        c = self.config
        lines = [
            f"{c.name}: target={c.target} profile={c.profile} seed={c.seed} duration={c.duration}s "
            f"faults={self.faults_applied}",
            f"  {self.report.summary()}",
            f"  history: {self.path}" + (f" (kept: {self.kept})" if self.kept else ""),
        ]
        lines += [f"  ERROR {e}" for e in self.errors] + [f"  GROWTH {g}" for g in self.growth]
        lines += [f"  {v}" for v in self.report.violations[:15]]
        if len(self.report.violations) > 15:
            lines.append(f"  ... {len(self.report.violations) - 15} more")
        return "\n".join(lines)


def _final_revision(endpoints: list[str]) -> int:
    def attempt() -> int | None:
        for ep in endpoints:
            with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(ep) as ch:
                r = rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"\0", count_only=True), timeout=3)
                return int(r.header.revision)
        return None

    found: int | None = wait_until(attempt, 30, "a linearizable read of the final revision")
    assert found is not None
    return found


class Sampler(threading.Thread):
    """RSS and open fds of every process of the proxy, every ``every`` seconds."""

    def __init__(self, proxy: ProxyProcess, rec: Recorder, every: float, stop: threading.Event) -> None:
        super().__init__(name="sampler", daemon=True)
        self.proxy, self.rec, self.every, self.stop_flag = proxy, rec, every, stop

    def run(self) -> None:
        while not self.stop_flag.wait(self.every):
            pids = [self.proxy.proc.pid] + [p for p, _ in descendants(self.proxy.proc.pid)]
            for pid in pids:
                with contextlib.suppress(OSError, ValueError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
                    fds = len(os.listdir(f"/proc/{pid}/fd"))
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                    self.rec.write(
                        {"kind": "sample", "t": now(), "pid": pid, "title": title, "rss_kb": rss, "fds": fds}
                    )


def growth(samples: list[dict[str, Any]]) -> list[str]:
    """Processes whose RSS or fd count grew between the first and the last quarter of their
    samples (medians; a process needs 8 samples to be judged)."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    out = []
    for pid, ss in by_pid.items():
        if len(ss) < 8:
            continue
        q = len(ss) // 4
        for name, abs_limit, rel in (("rss_kb", 20_000, 0.25), ("fds", 20, 0.5)):
            first = statistics.median(x[name] for x in ss[:q])
            last = statistics.median(x[name] for x in ss[-q:])
            if last - first > max(abs_limit, rel * first):
                out.append(f"pid {pid} ({ss[0]['title']}): {name} {first:.0f} -> {last:.0f}")
    return out


def run(cfg: RunConfig) -> Result:
    assert cfg.target in TARGETS, cfg.target
    profile = PROFILES[cfg.profile]
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.out_dir / f"{cfg.name}-{cfg.target}-seed{cfg.seed}.jsonl"
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    rec = Recorder(path, meta)
    master = random.Random(cfg.seed)
    errors: list[str] = []
    cluster: Cluster | None = None
    single: EtcdServer | None = None
    relays: list[Relay] = []
    proxy: ProxyProcess | None = None
    shared = Shared()
    clients: list[Any] = []
    watchers: list[WatchClient] = []
    truth: Truth | None = None
    injector: Injector | None = None
    stop_samples = threading.Event()
    try:
        if cfg.cluster or any(f in MEMBER_FAULTS for f in cfg.faults):
            cluster = Cluster(cfg.out_dir / "cluster")
            cluster.base.mkdir(exist_ok=True)
            cluster.start()
            members = [m.endpoint for m in cluster.members]
        else:
            single = start_etcd(cfg.out_dir, name=f"{cfg.name}-etcd", extra_args=("--grpc-keepalive-min-time=500ms",))
            members = [single.endpoint]
        upstream = members
        extra: tuple[str, ...] = ()
        if any(f in LINK_FAULTS for f in cfg.faults):
            relays = [Relay(int(ep.rsplit(":", 1)[1])) for ep in members]
            upstream = [r.endpoint for r in relays]
        if cfg.target == "proxy" and (relays or cluster):
            extra = ("--dial-keepalive-time=1s", "--dial-keepalive-timeout=1s")
        if cfg.target == "direct":
            endpoint = members[-1]
        else:
            impl = "go" if cfg.target == "go" else "etcdproxy"
            proxy = start_proxy(upstream, cfg.out_dir, impl=impl, workers=cfg.workers, extra_args=extra)
            endpoint = proxy.endpoint
        truth_member = 0
        truth = Truth(members[truth_member:] + members[:truth_member], rec, shared)
        truth.start()

        def rng() -> random.Random:
            return random.Random(master.getrandbits(64))

        for i in range(profile.kv):
            w = dict(KV_WEIGHTS, compact=profile.compact) if i == 0 else KV_WEIGHTS
            clients.append(KVClient(f"kv{i}", endpoint, rec, shared, rng(), "proxy", weights=w, rate=profile.kv_rate))
        for i in range(profile.churn):
            clients.append(
                KVClient(
                    f"churn{i}", endpoint, rec, shared, rng(), "proxy", weights=KV_WEIGHTS, rate=4.0, churn_every=3
                )
            )
        for i in range(profile.direct):
            direct_w: dict[str, float] = {"put": 3, "delete": 1, "txn": 1}
            clients.append(KVClient(f"direct{i}", members[0], rec, shared, rng(), "direct", weights=direct_w, rate=3.0))
        for i in range(profile.watch):
            wc = WatchClient(
                f"watch{i}",
                endpoint,
                rec,
                shared,
                rng(),
                "proxy",
                rate=profile.watch_rate,
                pause_s=profile.pause_s if i % 2 else 0.0,
                half_close=profile.half_close and i % 3 == 2,
            )
            watchers.append(wc)
            clients.append(wc)
        for i in range(profile.lease):
            clients.append(LeaseClient(f"lease{i}", endpoint, rec, shared, rng(), "proxy"))
        for c in clients:
            c.start()
        if cfg.faults:
            targets = Targets(proxy=proxy, relays=relays, cluster=cluster, truth_member=truth_member)
            injector = Injector(cfg.faults, targets, rec, rng(), shared.stop, hold_s=cfg.hold_s, gap_s=cfg.gap_s)
            injector.start()
        if cfg.sample_every and proxy is not None:
            Sampler(proxy, rec, cfg.sample_every, stop_samples).start()
        shared.stop.wait(cfg.duration)
        shared.stop.set()
        stopped = now()
        if injector is not None:
            injector.join(timeout=60)
            if injector.error is not None:
                errors.append(f"fault injection failed: {injector.error!r}")
        for c in clients:
            c.join(timeout=15)
        rec.flush()
        final = _final_revision(members)
        try:
            wait_until(lambda: shared.truth_reached >= final, 30, f"ground truth at revision {final}")
        except AssertionError as exc:
            errors.append(str(exc))
        drained: list[str] = []
        deadline = time.monotonic() + 10
        for wc in watchers:
            drained += wc.drain(final, deadline)
        # leases let go at the stop expire within TTL (<= 4 s) + slack; give them that and a bit
        with contextlib.suppress(Exception):
            time.sleep(max(0.0, stopped + 4 + cfg.lease_slack_s + 2.5 - now()))
        rec.write(
            {"kind": "end", "t": now(), "final_revision": final, "drained": drained, "truth_resumes": truth.resumes}
        )
    finally:
        shared.stop.set()
        stop_samples.set()
        for wc in watchers:
            wc.close()
        if truth is not None:
            truth.stop()
        if proxy is not None:
            if not proxy.alive():
                errors.append(f"the proxy exited on its own ({proxy.proc.returncode}):\n{proxy.log_tail(30)}")
            proxy.stop()
            if proxy.survivors:
                errors.append(f"proxy children outlived it: {proxy.survivors}")
        for r in relays:
            r.close()
        if cluster is not None:
            cluster.stop()
        if single is not None:
            single.stop()
        rec.close()
    h = History.of(rec.records)
    report = check(h)
    result = Result(cfg, path, report, injector.applied if injector else [], errors, growth(h.samples))
    summary = {
        "name": cfg.name,
        "target": cfg.target,
        "seed": cfg.seed,
        "ok": result.ok(),
        "operations": report.operations,
        "watch_events": report.watch_events,
        "watchers": report.watchers,
        "violations": report.by_validator(),
        "faults": result.faults_applied,
        "errors": errors,
        "growth": result.growth,
    }
    path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    # pytest keeps only its last 3 tmp dirs: every summary, and a failing history, also go here
    keep = Path(os.environ.get("ROBUSTNESS_KEEP_DIR", "/tmp/etcdproxy-robustness/kept"))
    with contextlib.suppress(OSError):
        keep.mkdir(parents=True, exist_ok=True)
        with (keep / "summaries.jsonl").open("a") as f:
            f.write(json.dumps({**summary, "history": str(path)}) + "\n")
        if not result.ok():
            shutil.copy(path, keep / path.name)
            result.kept = keep / path.name
    return result
