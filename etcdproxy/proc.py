"""Process plumbing shared by the supervisor and its children (hub and workers).

The supervisor builds a ``ChildSpec`` (plain data) before fork; the child calls ``child_init()``
first thing, runs ``heartbeat_loop()`` as a task on its own event loop and calls ``notify_ready()``
once it serves. Nothing here creates gRPC, ZeroMQ or event-loop objects, so the supervisor can
import it freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import faulthandler
import fcntl
import glob
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass

from etcdproxy import logs

log = logging.getLogger(__name__)

# A child exits with this code when it cannot boot (bad config, cannot bind). If it never became
# ready, the supervisor stops everything and exits 1 instead of respawning it in a loop.
EXIT_BOOT_ERROR = 3

HUB = "hub"
WORKER = "worker"

# Signals the supervisor handles itself; a child starts with their default actions.
SUPERVISOR_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Sent to a child when the supervisor dies. KILL, not TERM: a supervisor killed with -9 must not
# leave a hub or worker behind, and a dying supervisor cannot coordinate a graceful drain anyway.
PARENT_DEATH_SIGNAL = signal.SIGKILL


@dataclass(frozen=True, slots=True)
class ChildSpec:
    role: str  # HUB or WORKER
    index: int  # worker number 0..N-1 (0 for the hub)
    run_dir: str  # per-instance directory (mode 0700); the hub's socket is hub_endpoint(run_dir)
    heartbeat_path: str
    ready_fd: int  # write end of a pipe; the child writes b"R" once it serves; -1 if none
    supervisor_pid: int
    generation: int  # how many times this slot was (re)spawned, 0 first
    # The client listening socket the supervisor bound (inheritable; a worker serves on it with
    # socket.socket(fileno=...)); None: the worker binds --listen-addr itself (SO_REUSEPORT).
    listen_fd: int | None = None
    # The --metrics-addr listening socket the supervisor bound, for the hub (None: the hub binds it).
    metrics_fd: int | None = None

    @property
    def name(self) -> str:
        """``hub`` or ``worker 3``: used in titles and supervisor log lines."""
        return self.role if self.role == HUB else f"{self.role} {self.index}"


# --- the control file: state the supervisor changes while children run (SIGUSR1 = re-read it) ---
# JSON in the run dir: {"log_level": "warn", "draining": true}. A child reads it at start
# (child_init) and on SIGUSR1; the supervisor rewrites it atomically, then signals.
CONTROL_FILE = "control.json"
_control: dict[str, object] = {"draining": False}


def write_control(run_dir: str, **state: object) -> None:
    """Replace the control file atomically (children may read it at any moment)."""
    path = os.path.join(run_dir, CONTROL_FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(state, out)
    os.replace(temporary, path)


def read_control(run_dir: str) -> dict[str, object]:
    try:
        with open(os.path.join(run_dir, CONTROL_FILE), encoding="utf-8") as source:
            state = json.load(source)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def apply_control(run_dir: str) -> None:
    """Apply the control file to this process: log level, draining flag."""
    state = read_control(run_dir)
    level = state.get("log_level")
    if isinstance(level, str) and level in logs.LEVELS and level != logs.current_level():
        logs.set_level(level)
        log.info("log level is now %s", level)
    _control["draining"] = bool(state.get("draining", False))


def draining() -> bool:
    """True once the supervisor has started a graceful stop: health endpoints answer 503."""
    return bool(_control["draining"])


def hub_endpoint(run_dir: str) -> str:
    return f"ipc://{run_dir}/hub.sock"


def title_for(spec: ChildSpec | None, role_text: str) -> str:
    """``etcdproxy: <role_text>``; an empty ``role_text`` is derived from ``spec``."""
    text = role_text or (spec.name if spec is not None else "supervisor")
    return text if text.startswith("etcdproxy:") else f"etcdproxy: {text}"


def set_title(spec: ChildSpec | None, role_text: str) -> None:
    """Set the process title shown by ps and in /proc/<pid>/cmdline (e.g. ``etcdproxy: worker 3``)."""
    try:
        import setproctitle
    except ImportError:  # a hard dependency; a missing title must not stop the proxy
        log.debug("setproctitle is not installed, process title unchanged")
        return
    setproctitle.setproctitle(title_for(spec, role_text))


def set_parent_death_signal(sig: int = PARENT_DEATH_SIGNAL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent (the forking thread) dies.

    Also used as the ``preexec_fn`` of the embedded etcd. A no-op where prctl does not exist.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def log_role(spec: ChildSpec) -> str:
    """Role tag for log lines: ``hub`` or ``worker-3`` (no space, so lines split cleanly)."""
    return spec.role if spec.role == HUB else f"{spec.role}-{spec.index}"


def child_init(spec: ChildSpec, debug: bool = False) -> None:
    """First thing a forked child does: die with the supervisor, reset signals, title, logging."""
    set_parent_death_signal()
    # The supervisor may have died between fork() and prctl(): then no signal will ever come.
    if os.getppid() != spec.supervisor_pid:
        os._exit(1)
    # The supervisor's handlers only enqueue into its own loop, which does not run here.
    signal.set_wakeup_fd(-1)
    for sig in SUPERVISOR_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # USR1: re-read the control file (reload of the log level, drain). A plain handler (not the
    # event loop's): it runs in the main thread at once, and only sets a level and a flag.
    signal.signal(signal.SIGUSR1, lambda signum, frame: apply_control(spec.run_dir))
    # SIGABRT from the supervisor's heartbeat check then dumps every thread's stack to stderr.
    faulthandler.enable(all_threads=True)
    set_title(spec, spec.name)
    logs.setup(log_role(spec), debug)
    apply_control(spec.run_dir)  # a child started after a reload or during a drain


async def heartbeat_loop(spec: ChildSpec, interval_s: float = 1.0) -> None:
    """Touch the heartbeat file every ``interval_s`` from the child's event loop, forever.

    Runs as a task on the loop that serves requests: a blocked loop stops the heartbeat, and the
    supervisor aborts the child. Exits the process if the supervisor is gone (orphan check; the
    parent-death signal is the fast path, this one also covers a failed prctl).
    """
    warned = False
    while True:
        if os.getppid() != spec.supervisor_pid:
            log.error("supervisor pid %d is gone, exiting", spec.supervisor_pid)
            exit_now(1)
        try:
            touch(spec.heartbeat_path)
            warned = False
        except OSError as exc:
            if not warned:
                log.warning("cannot touch heartbeat file %s: %s", spec.heartbeat_path, exc)
                warned = True
        await asyncio.sleep(interval_s)


def touch(path: str) -> None:
    """Create ``path`` if needed and set its mtime to now."""
    try:
        os.utime(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)


# ready_fd values already written and closed by notify_ready() (ChildSpec is frozen).
_notified: set[int] = set()


def notify_ready(spec: ChildSpec) -> None:
    """Tell the supervisor this child serves: write b"R" to ``ready_fd`` and close it. Idempotent."""
    fd = spec.ready_fd
    if fd < 0 or fd in _notified:
        return
    _notified.add(fd)
    try:
        os.write(fd, b"R")
    except OSError as exc:  # EPIPE: the supervisor is gone; heartbeat_loop will end this process
        log.warning("cannot report readiness to the supervisor: %s", exc)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def exit_now(code: int) -> None:
    """``os._exit`` after flushing stdio: skips the atexit handlers inherited from the supervisor."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def respawn_delay(
    previous_s: float, lived_s: float, *, initial_s: float = 0.1, cap_s: float = 5.0, reset_after_s: float = 10.0
) -> float:
    """Backoff before respawning a slot whose child lived ``lived_s`` after the last delay ``previous_s``.

    Doubles on each quick death, capped at ``cap_s``; a child that lived longer than
    ``reset_after_s`` counts as healthy, so the next death waits ``initial_s`` again.
    """
    if lived_s > reset_after_s or previous_s <= 0:
        return initial_s
    return min(max(previous_s * 2, initial_s), cap_s)


def split_host_port(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:23790"``, ``"[::1]:23790"``, ``"http://h:1"`` -> (host, port). ValueError if bad."""
    rest = addr.split("://", 1)[1] if "://" in addr else addr
    rest = rest.rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"listen address {addr!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"listen address {addr!r} has an invalid port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {addr!r}: an IPv6 host must be in brackets")
    return host, port


# --- supervisor side: one instance per listen address and run dir, run dir, sd_notify, metrics ---
# (Here rather than in supervisor.py to keep that module about the process tree only.)

# Longest run dir accepted: sockets in it ("/hub.sock" and whatever else the hub binds) must fit
# in sun_path (107 characters plus NUL on Linux).
RUN_DIR_MAX = 80


class GuardError(Exception):
    """Another instance holds the address or run dir, or it cannot be used; message for the operator."""


class Guard:
    """Exclusive flocks held for the supervisor's life, released by closing (or by its death).

    Only the run dir is locked this way; the listen address is guarded by binding it (bind_listener).
    """

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.paths: list[str] = []

    def take_run_dir(self, run_dir: str) -> None:
        holder = self._flock(os.path.join(run_dir, "supervisor.lock"))
        if holder is not None:
            raise GuardError(f"etcdproxy: run-dir {run_dir} is in use by etcdproxy pid {holder}")

    def _flock(self, path: str) -> str | None:
        """Lock ``path``; return None on success, or the holder's pid (as written in the file)."""
        for _ in range(5):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:  # e.g. someone else's file in sticky /tmp: the bind probe still guards
                log.warning("cannot open lock file %s: %s", path, exc)
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                return holder
            # release() unlinks the file before unlocking it: a lock on an inode that is no longer
            # at ``path`` guards nothing, so open the path again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fds.append(fd)
            self.paths.append(path)
            return None
        log.warning("lock file %s keeps changing, continuing without it", path)
        return None

    def release(self) -> None:
        """Unlink the lock files (no files left behind after a stop), then unlock by closing.

        Unlinking while still locked is what makes this safe: a process that opened the old file
        meanwhile finds, once it gets the lock, that the path now names another inode, and retries.
        """
        for path in self.paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.paths.clear()


LISTEN_BACKLOG = 4096


def bind_listener(addr: str, flag: str = "listen-addr") -> socket.socket:
    """Bind and listen on --listen-addr, once, for every worker (they serve on its fd, ChildSpec.listen_fd).

    No SO_REUSEPORT: a second instance (or any other program) on the address fails here with
    EADDRINUSE, which replaces a lock file as the one-instance-per-address guard; and a reload or an
    upgrade hands the same socket to the new workers, so no connection is refused meanwhile.
    SO_REUSEADDR only forgives TIME_WAIT leftovers of a previous run. A host name is resolved and the
    first address is used, like Go's net.Listen; an empty host means every address (dual-stack).
    """
    try:
        host, port = split_host_port(addr)
    except ValueError as exc:
        raise GuardError(f"etcdproxy: {exc}") from exc
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise GuardError(f"etcdproxy: {flag} {addr}: {exc}") from exc
    if not host:  # ":port": IPv6 wildcard accepting IPv4 too, where the host has IPv6
        infos.sort(key=lambda info: info[0] != socket.AF_INET6)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and not host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GuardError(f"etcdproxy: {flag} {addr} is already in use") from exc
        raise GuardError(f"etcdproxy: cannot bind {flag} {addr}: {exc.strerror}") from exc
    sock.set_inheritable(True)  # kept across the exec of an upgrade (SIGUSR2)
    return sock


def adopt_listener(fd: int, addr: str) -> socket.socket:
    """The listening socket an upgrading supervisor passed down (its fd number in our environment)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise GuardError(f"etcdproxy: inherited socket fd {fd} for {addr}: {exc.strerror}") from exc
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise GuardError(f"etcdproxy: inherited fd {fd} for {addr} is not a listening TCP socket")
    sock.set_inheritable(True)
    return sock


def make_run_dir(configured: str) -> tuple[str, bool]:
    """Return (run dir, created by us). Mode 0700: the hub socket must not be reachable by others."""
    if configured:
        path = os.path.abspath(configured)
        created = not os.path.isdir(path)
        os.makedirs(path, mode=0o700, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
    else:
        for stale in sweep_stale_run_dirs(tempfile.gettempdir()):
            log.info("removed %s, left behind by a killed etcdproxy", stale)
        path = tempfile.mkdtemp(prefix="etcdproxy-")
        if len(path) > RUN_DIR_MAX:  # a long $TMPDIR: fall back to /tmp
            os.rmdir(path)
            path = tempfile.mkdtemp(prefix="etcdproxy-", dir="/tmp")
        created = True
    if len(path) > RUN_DIR_MAX:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise GuardError(f"etcdproxy: run-dir {path} is too long for ipc:// sockets (max {RUN_DIR_MAX} characters)")
    return path, created


def sweep_stale_run_dirs(parent: str, min_age_s: float = 10.0) -> list[str]:
    """Remove the temp run dirs of supervisors that were killed (kill -9 leaves nobody to clean up).

    A live supervisor holds ``supervisor.lock`` in its run dir locked for its whole life and writes
    it right after creating the dir, so a lock file older than ``min_age_s`` that we can lock is an
    orphan's. Dirs without a lock file, or of another user, are left alone.
    """
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        lock = os.path.join(path, "supervisor.lock")
        if not name.startswith("etcdproxy-"):
            continue
        try:
            info = os.lstat(path)  # never follow a symlink into someone else's tree
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            if time.time() - os.stat(lock).st_mtime < min_age_s:
                continue
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


BALANCE_FILE = "balance"  # the workers' accept balance (worker/balance.py)


def clean_run_dir(path: str, created: bool) -> None:
    """Remove the run dir we created; in a run dir we were given, what the process tree put there
    (sockets, heartbeats, the control and balance files, the default metrics dir; the lock is Guard.release's)."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in os.listdir(path):
        if name.startswith("heartbeat-") or name.endswith(".sock") or name in (CONTROL_FILE, BALANCE_FILE):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
    if metrics_dir() == os.path.join(path, "metrics"):
        shutil.rmtree(metrics_dir(), ignore_errors=True)


def sd_notify(state: str) -> bool:
    """Send ``state`` to systemd if NOTIFY_SOCKET is set (Type=notify); no dependency needed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def metrics_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def prepare_metrics_dir(run_dir: str) -> str:
    """prometheus-client multiprocess mode for the whole tree: empty the directory (its documented
    rule) and return it. Defaults PROMETHEUS_MULTIPROC_DIR to ``{run_dir}/metrics`` before any fork,
    so every child, which imports prometheus_client after fork, shares one directory."""
    path = metrics_dir()
    if not path:
        path = os.path.join(run_dir, "metrics")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
    return path


def forget_metrics(pid: int) -> None:
    """What prometheus_client.multiprocess.mark_process_dead does, without importing prometheus
    into the supervisor (its storage mode is fixed at import time, and children inherit modules)."""
    path = metrics_dir()
    if not path:
        return
    for name in glob.glob(os.path.join(glob.escape(path), f"gauge_live*_{pid}.db")):
        with contextlib.suppress(OSError):
            os.unlink(name)
