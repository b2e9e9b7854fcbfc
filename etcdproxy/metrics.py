"""Every metric object of etcdproxy, in prometheus-client multiprocess mode, and the exposition.

Import this module only in the hub and the workers (after fork): prometheus-client chooses its
storage when it is imported, and the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before forking
(proc.prepare_metrics_dir). Each process writes its own ``*_{pid}.db`` files; the hub, which serves
``/proxy/metrics``, reads them all per scrape (a fresh CollectorRegistry + MultiProcessCollector).

Survival rules, which the supervisor follows (proc.forget_metrics deletes only ``gauge_live*``):
* counters of dead processes stay on disk, so totals never go backwards across a respawn;
* ``live*`` gauges disappear with their process; gauges the hub owns use ``livemostrecent``;
* the one ``sum`` gauge, RPCS_IN_FLIGHT, is what lets a killed worker's open calls be closed in
  the books: ``settle_dead()`` counts them as handled with code ``Unavailable`` (what their clients
  saw) and deletes the dead process's ``gauge_sum`` file. Hence "started - handled" (the dashboards'
  "active streams") stays exact even after ``kill -9``.

Hot path: the workers count RPCs in plain ints (``RpcStats``) and ``flush()`` writes them every
FLUSH_INTERVAL_S. A multiprocess ``inc()`` takes a lock and writes an mmap (about 2 us); four of
them per unary call would cost more than everything else the worker does for it except gRPC
itself. A flush writes started, handled and in-flight together, so the files always hold a
consistent snapshot (started - handled == in flight) for settle_dead() to close.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

# prometheus_client imported before PROMETHEUS_MULTIPROC_DIR was set (by a test runner, say) would
# keep values in memory, invisible to the exposition. Values are created through this module
# attribute, so switching here still works for every metric defined below.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and not getattr(values.ValueClass, "_multiprocess", False):
    values.ValueClass = values.MultiProcessValue()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_INTERVAL_S = 0.5
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# ---- the Go proxy's five (server/proxy/grpcproxy/metrics.go): same names and help texts ----------

WATCHERS_COALESCING = Gauge(
    "etcd_grpc_proxy_watchers_coalescing_total",
    "Total number of current watchers coalescing",
    multiprocess_mode="livemostrecent",  # set by the hub: c-watchers - s-watchers
)
EVENTS_COALESCING = Counter("etcd_grpc_proxy_events_coalescing", "Total number of events coalescing")
CACHE_KEYS = Gauge(
    "etcd_grpc_proxy_cache_keys_total",
    "Total number of keys/ranges cached",
    multiprocess_mode="livesum",  # right for one cache in the hub and for one per worker alike
)
# Go declares these two as Gauges that it only ever increments. They are Counters here: the
# sample names are the same (``..._total``), so queries and rate() work unchanged; only the
# ``# TYPE`` line says counter. As Gauges in multiprocess mode they would either drop a dead
# process's count (live modes: the total goes backwards) or need a pid label; a Counter's
# files outlive its process, which keeps the total monotonic across respawns.
CACHE_HITS = Counter("etcd_grpc_proxy_cache_hits", "Total number of cache hits")
CACHE_MISSES = Counter("etcd_grpc_proxy_cache_misses", "Total number of cache misses")

# ---- go-grpc-prometheus server metrics (the families etcd dashboards and alerts query) -----------

STARTED = Counter("grpc_server_started", "Total number of RPCs started on the server.", RPC_LABELS)
HANDLED = Counter(
    "grpc_server_handled",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    (*RPC_LABELS, "grpc_code"),
)
MSG_RECEIVED = Counter(
    "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", RPC_LABELS
)
MSG_SENT = Counter("grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", RPC_LABELS)

# ---- etcd's health check counters (etcdhttp/health.go); Go names them without ``_total`` --------

HEALTH_SUCCESS = Counter("etcd_server_health_success", "The total number of successful health checks")
HEALTH_FAILURES = Counter("etcd_server_health_failures", "The total number of failed health checks")
# prometheus-client always appends _total to a counter's samples; exposition() strips it for these.
_NO_TOTAL = re.compile(rb"^(# (?:HELP|TYPE) )?(etcd_server_health_(?:success|failures))_total\b", re.MULTILINE)

# ---- etcdproxy's own ----------------------------------------------------------------------------

# The only gauge in "sum" mode: settle_dead() deletes dead processes' gauge_sum files.
RPCS_IN_FLIGHT = Gauge(
    "etcdproxy_grpc_server_in_flight",
    "RPCs and streams currently open on the workers' gRPC servers.",
    RPC_LABELS,
    multiprocess_mode="sum",
)
UPSTREAM_STATE = Gauge(
    "etcdproxy_upstream_connection_state",
    "1 for the current connectivity state of the hub's gRPC channel to etcd, 0 for the others.",
    ("state",),
    multiprocess_mode="livemostrecent",
)
UPSTREAM_ENDPOINT = Gauge(
    "etcdproxy_upstream_endpoint",
    "1 for each etcd endpoint the hub's channel currently uses, 0 for endpoints it used before.",
    ("endpoint",),
    multiprocess_mode="livemostrecent",
)
C_WATCHERS = Gauge(
    "etcdproxy_watch_c_watchers", "Client watches registered with the watch hub.", multiprocess_mode="livemostrecent"
)
S_WATCHERS = Gauge(
    "etcdproxy_watch_s_watchers", "Upstream watches the watch hub holds on etcd.", multiprocess_mode="livemostrecent"
)
LEASES_KEPT_ALIVE = Gauge(
    "etcdproxy_leases_kept_alive",
    "Distinct leases that clients sent a keepalive for through the proxy in the last 60 s.",
    multiprocess_mode="livemostrecent",
)
IPC_QUEUE_DEPTH = Gauge(
    "etcdproxy_ipc_queue_depth",
    "Items waiting between the hub and the workers: hub_backlog (frames the hub could not hand to a "
    "worker's socket yet), worker_unsent (requests waiting for a live hub), worker_pending_calls "
    "(unary calls waiting for the hub's answer), worker_stream_inbox (stream messages from the hub "
    "not yet written to clients).",
    ("queue",),
    multiprocess_mode="livesum",
)
METRICS_FILES = Gauge(
    "etcdproxy_metrics_files",
    "Files in PROMETHEUS_MULTIPROC_DIR; grows with process respawns and slows every scrape.",
    multiprocess_mode="livemostrecent",
)

# ---- gRPC status codes as Go names them (codes.Code.String()) ----------------------------------

GO_CODE_NAMES = (
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
)


def go_code_name(code: int) -> str:
    """The grpc_code label of a numeric status code: 1 -> "Canceled" (Python says CANCELLED)."""
    if 0 <= code < len(GO_CODE_NAMES):
        return GO_CODE_NAMES[code]
    return f"Code({code})"


# ---- buffered RPC counts of a worker --------------------------------------------------------------


class RpcStats:
    """One (grpc_type, grpc_service, grpc_method) of this process, counted in plain ints.

    Mutated by the instrumented handlers and by flush(), all on the worker's event loop.
    Invariant: ``open`` is the number of calls started and not yet handled in this process.
    """

    __slots__ = (
        "_children",
        "_handled_children",
        "_written_open",
        "handled",
        "inline_ok",
        "labels",
        "open",
        "received",
        "sent",
        "started",
    )

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = 0
        self.received = 0
        self.sent = 0
        self.open = 0
        self.handled: dict[str, int] = {}  # grpc_code -> calls ended since the last flush
        # whole calls answered inline with OK (cache hits): one increment on the hot path, folded
        # into started/received/sent/handled["OK"] at flush
        self.inline_ok = 0
        self._written_open = 0
        self._children: tuple[object, object, object, object] | None = None
        self._handled_children: dict[str, object] = {}

    def end(self, code: str) -> None:
        self.open -= 1
        self.handled[code] = self.handled.get(code, 0) + 1

    def flush(self) -> None:
        if self.inline_ok:
            n, self.inline_ok = self.inline_ok, 0
            self.started += n
            self.received += n
            self.sent += n
            self.handled["OK"] = self.handled.get("OK", 0) + n
        if not (self.started or self.received or self.sent or self.handled) and self.open == self._written_open:
            return  # also keeps series lazy, like go-grpc-prometheus: none before the first call
        if self._children is None:
            self._children = (
                STARTED.labels(*self.labels),
                MSG_RECEIVED.labels(*self.labels),
                MSG_SENT.labels(*self.labels),
                RPCS_IN_FLIGHT.labels(*self.labels),
            )
        started, received, sent, in_flight = self._children
        if self.started:
            started.inc(self.started)  # type: ignore[attr-defined]
            self.started = 0
        if self.received:
            received.inc(self.received)  # type: ignore[attr-defined]
            self.received = 0
        if self.sent:
            sent.inc(self.sent)  # type: ignore[attr-defined]
            self.sent = 0
        if self.handled:
            for code, count in self.handled.items():
                child = self._handled_children.get(code)
                if child is None:
                    child = self._handled_children[code] = HANDLED.labels(*self.labels, code)
                child.inc(count)  # type: ignore[attr-defined]
            self.handled.clear()
        if self.open != self._written_open:
            in_flight.set(self.open)  # type: ignore[attr-defined]
            self._written_open = self.open


_RPC_STATS: dict[tuple[str, str, str], RpcStats] = {}


def rpc_stats(grpc_type: str, service: str, method: str) -> RpcStats:
    labels = (grpc_type, service, method)
    stats = _RPC_STATS.get(labels)
    if stats is None:
        stats = _RPC_STATS[labels] = RpcStats(labels)
    return stats


def flush() -> None:
    """Write this process's buffered RPC counts to its multiprocess files."""
    for stats in _RPC_STATS.values():
        stats.flush()


# ---- dead processes ------------------------------------------------------------------------------


def metrics_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def is_sibling(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) child of our own parent, i.e. a hub or worker of this
    proxy. A recycled pid now used by an unrelated process counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X") and int(fields[1]) == os.getppid()


def settle_dead(
    path: str | None = None, is_alive: Callable[[int], bool] = is_sibling, own_pid: int | None = None
) -> float:
    """Count the calls that dead processes left open as handled with code ``Unavailable`` and delete
    their ``gauge_sum`` files; returns how many calls were settled.

    Runs in one process at a time (the hub, under its scrape lock; a worker only for its own pid,
    see settle_own_pid), so no dead file is counted twice. Counts go to the caller's own counter
    file, which survives it like any counter.
    """
    path = path or metrics_dir()
    if not path:
        return 0.0
    settled = 0.0
    for name in glob.glob(os.path.join(glob.escape(path), "gauge_sum_*.db")):
        try:
            pid = int(os.path.basename(name)[len("gauge_sum_") : -len(".db")])
        except ValueError:
            continue
        if own_pid is not None:
            if pid != own_pid:
                continue
        elif is_alive(pid):
            continue
        try:
            entries = MmapedDict.read_all_values_from_file(name)
        except OSError:
            continue
        for key, value, _timestamp, _pos in entries:
            metric_name, _sample, labels, _help = json.loads(key)
            if metric_name != RPCS_IN_FLIGHT._name or value <= 0:
                continue
            HANDLED.labels(labels["grpc_type"], labels["grpc_service"], labels["grpc_method"], "Unavailable").inc(value)
            settled += value
        with contextlib.suppress(OSError):
            os.unlink(name)
    return settled


def settle_own_pid() -> float:
    """At worker start: a file with our pid belongs to a dead predecessor that had the same pid
    (the hub skips it now that the pid is alive again). Call before the first flush()."""
    return settle_dead(own_pid=os.getpid())


# ---- hub-owned gauges ----------------------------------------------------------------------------


class GaugeSet:
    """A labelled livemostrecent gauge used as a one-hot set: labels not in the current set are
    written 0 (prometheus-client cannot remove a label in multiprocess mode)."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.known: set[str] = set()

    def set(self, current: Iterable[str]) -> None:
        current = set(current)
        for label in self.known | current:
            self.gauge.labels(label).set(1 if label in current else 0)
        self.known |= current


UPSTREAM_STATES = GaugeSet(UPSTREAM_STATE)
UPSTREAM_ENDPOINTS = GaugeSet(UPSTREAM_ENDPOINT)


class RecentLeases:
    """Lease ids seen in keepalives, with when; mutated on the hub's loop only."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self.seen_at: dict[int, float] = {}
        self._pruned_at = 0.0

    def seen(self, lease_id: int, now: float) -> None:
        self.seen_at[lease_id] = now
        if now - self._pruned_at > self.WINDOW_S:  # bounded without any scrape
            self.count(now)

    def count(self, now: float) -> int:
        self._pruned_at = now
        stale = [lease_id for lease_id, at in self.seen_at.items() if now - at > self.WINDOW_S]
        for lease_id in stale:
            del self.seen_at[lease_id]
        return len(self.seen_at)


# ---- exposition ----------------------------------------------------------------------------------


def exposition(path: str | None = None) -> bytes:
    """The text exposition of every process's metrics (``/proxy/metrics``). Blocking file I/O:
    the hub calls it in a thread, one call at a time (settle_dead must not run twice at once)."""
    path = path or metrics_dir()
    settle_dead(path)
    with contextlib.suppress(OSError):
        METRICS_FILES.set(len(os.listdir(path)))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return _NO_TOTAL.sub(rb"\1\2", generate_latest(registry))
