"""Plumbing for bench/run.py: child processes, /proc sampling, etcd metrics, tiny protobuf helpers."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes


class Procs:
    """Every process the benchmark starts; each gets its own session so it can be stopped as a group by its pid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        args: Sequence[str],
        *,
        stdout: IO[bytes] | int | None,
        stderr: IO[bytes] | int | None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            list(args), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True
        )
        with self._lock:
            self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM the child's process group (pgid == its pid), then SIGKILL it and any descendant left behind."""
        family = [p.pid, *descendants(p.pid)]
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(2)
        for pid in family[1:]:  # descendants that left the group (setsid) but are still ours
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with self._lock:
            if p in self.procs:
                self.procs.remove(p)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self.procs))
        for p in procs:
            self.stop(p, grace=3.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ChildResult:
    rc: int
    lines: list[str]
    stderr: str
    cpu_s: float
    wall_s: float
    timed_out: bool


def run_child(
    procs: Procs,
    args: Sequence[str],
    timeout: float,
    on_line: Callable[[str], None] | None = None,
    stderr_path: Path | None = None,
) -> ChildResult:
    """Run a load generator; call on_line for each stdout line as it arrives; return its rusage CPU via wait4."""
    errf = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.monotonic()
    p = procs.start(args, stdout=subprocess.PIPE, stderr=errf)
    q: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            q.put(raw.decode(errors="replace").rstrip("\n"))
        q.put(None)

    threading.Thread(target=reader, daemon=True).start()
    lines: list[str] = []
    timed_out = False
    deadline = t0 + timeout
    while True:
        try:
            line = q.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            timed_out = True
            break
        if line is None:
            break
        lines.append(line)
        if on_line:
            on_line(line)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    with procs._lock:
        if p in procs.procs:
            procs.procs.remove(p)
    if p.stdout:
        p.stdout.close()
    if not isinstance(errf, int):
        errf.close()
    err = stderr_path.read_text(errors="replace")[-2000:] if stderr_path else ""
    return ChildResult(p.returncode, lines, err, ru.ru_utime + ru.ru_stime, time.monotonic() - t0, timed_out)


# ---------------------------------------------------------------- /proc


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds utime+stime) for every live process."""
    out: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after "(comm)": state ppid ... utime(14th overall -> index 11 here) stime(12)
        out[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK)
    return out


def descendants(root: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    table = table if table is not None else _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK  # minus idle and iowait


@dataclass
class TreeStats:
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0
    pids: int = 0


@dataclass
class Sampler:
    """Samples CPU and RSS of process trees every `interval` seconds while running.

    CPU is the growth of utime+stime of every pid ever seen in the tree (a process that exits between samples loses
    at most one interval); RSS is the peak of the sum of VmRSS over the tree.
    """

    roots: dict[str, int]
    interval: float = 0.1
    stats: dict[str, TreeStats] = field(default_factory=dict)
    _base: dict[str, dict[int, float]] = field(default_factory=dict)
    _last: dict[str, dict[int, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _busy0: float = 0.0
    _t0: float = 0.0
    busy_s: float = 0.0
    wall_s: float = 0.0

    def _sample(self, first: bool) -> None:
        table = _proc_table()
        for name, root in self.roots.items():
            pids = [root, *descendants(root, table)] if root in table else []
            st = self.stats.setdefault(name, TreeStats())
            last = self._last.setdefault(name, {})
            base = self._base.setdefault(name, {})
            for pid in pids:
                cpu = table[pid][1]
                if first:
                    base[pid] = cpu
                last[pid] = cpu
            st.pids = max(st.pids, len(pids))
            rss = sum(_rss_kb(pid) for pid in pids) / 1024
            st.peak_rss_mb = max(st.peak_rss_mb, rss)
            if first:
                st.start_rss_mb = rss

    def __enter__(self) -> Sampler:
        self._busy0 = machine_busy_s()
        self._t0 = time.monotonic()
        self._sample(first=True)

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self._sample(first=False)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample(first=False)
        for name, last in self._last.items():
            base = self._base.get(name, {})
            self.stats[name].cpu_s = sum(v - base.get(pid, 0.0) for pid, v in last.items())
        self.busy_s = machine_busy_s() - self._busy0
        self.wall_s = time.monotonic() - self._t0


# ---------------------------------------------------------------- etcd /metrics

Metrics = dict[str, list[tuple[dict[str, str], float]]]
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout: float = 5.0) -> Metrics:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: Metrics = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        with contextlib.suppress(ValueError):
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def metric(m: Metrics, name: str, **labels: str) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


# ---------------------------------------------------------------- protobuf (the few fields needed)


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def pb_bytes(field_no: int, data: bytes) -> bytes:
    return _varint(field_no << 3 | 2) + _varint(len(data)) + data


def pb_uint(field_no: int, v: int) -> bytes:
    return _varint(field_no << 3) + _varint(v)


def pb_fields(data: bytes) -> Iterable[tuple[int, int | bytes]]:
    """Yield (field number, int or bytes) for varint and length-delimited fields; skip fixed-width ones."""
    i = 0
    n = len(data)

    def varint() -> int:
        nonlocal i
        r = shift = 0
        while True:
            b = data[i]
            i += 1
            r |= (b & 0x7F) << shift
            if b < 0x80:
                return r
            shift += 7

    while i < n:
        tag = varint()
        wt = tag & 7
        if wt == 0:
            yield tag >> 3, varint()
        elif wt == 2:
            ln = varint()
            yield tag >> 3, data[i : i + ln]
            i += ln
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"bad wire type {wt}")


def grpc_frame(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def range_request(key: bytes, serializable: bool) -> bytes:
    return pb_bytes(1, key) + (pb_uint(7, 1) if serializable else b"")


def put_request(key: bytes, value: bytes) -> bytes:
    return pb_bytes(1, key) + pb_bytes(2, value)


def range_kv_values(resp: bytes) -> list[bytes]:
    """Values of RangeResponse.kvs (field 2 -> KeyValue.value field 5)."""
    out: list[bytes] = []
    for f, v in pb_fields(resp):
        if f == 2 and isinstance(v, bytes):
            out.extend(x for g, x in pb_fields(v) if g == 5 and isinstance(x, bytes))
    return out


# --tls: the PEM certificate every TLS listener of the run uses (self-signed for 127.0.0.1), None for plaintext
TLS_CERT: bytes | None = None


def grpc_channel(port: int) -> Any:
    import grpc

    if TLS_CERT is not None:
        return grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=TLS_CERT))
    return grpc.insecure_channel(f"127.0.0.1:{port}")


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1 (openssl from Debian's openssl package)."""
    cert, key = directory / "tls-cert.pem", directory / "tls-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def child_titled(ppid: int, title: str) -> int | None:
    """The child of ``ppid`` whose process title is ``title`` (e.g. "etcdproxy: hub")."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == ppid and cmd == title:
            return int(entry)
    return None


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (not its children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
