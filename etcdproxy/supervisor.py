"""The supervisor: fork the hub and the workers, reap, respawn, heartbeats, signals, ordered stop.

Plain synchronous code on purpose: gRPC Python forbids fork() once a channel or server exists in
the forking process, so this process creates no gRPC, ZeroMQ or event-loop object and can fork a
replacement hub or worker at any moment. Signal handlers only enqueue; a select() loop woken by
``signal.set_wakeup_fd`` dispatches ``handle_<signal>``. Each child gets a readiness pipe and a
heartbeat file (see proc.py). Model: gunicorn's arbiter.

The supervisor binds --listen-addr (and --metrics-addr) itself and hands the sockets to the workers (and the
hub), so a reload (HUP: roll the workers, re-reading --config-file) and an upgrade (USR2: exec a new
supervisor that inherits the sockets) never close the port. TERM: health turns 503 (control file + USR1 to
every child), STOPPING=1, workers drain (--drain-delay, --graceful-timeout), then the hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from etcdproxy import logs, proc
from etcdproxy.config import LIVE_FIELDS, Config, ConfigError, flag_name
from etcdproxy.embedded import EmbeddedEtcd, EmbeddedEtcdError
from etcdproxy.proc import EXIT_BOOT_ERROR, HUB, WORKER, ChildSpec
from etcdproxy.worker import balance

log = logging.getLogger(__name__)

TICK_S = 1.0  # longest sleep of the main loop; also the heartbeat check period
ABORT_GRACE_S = 3.0  # after SIGABRT (faulthandler dumps the stacks) comes SIGKILL
FAST_STOP_S = 2.0  # per shutdown phase on INT/QUIT
START_WARNING_S = 30.0  # log who is not ready yet this often until "started gRPC proxy"
STOP_MARGIN_S = 1.0  # added to graceful_timeout_s per phase of a graceful stop
KILL_WAIT_S = 5.0  # how long to wait for a SIGKILLed child before giving up on it
# An upgrade (SIGUSR2) hands these to the new supervisor it execs: the listening sockets' fd numbers and
# the write end of a pipe on which the new one says b"R" once it serves.
ENV_LISTEN_FD = "ETCDPROXY_INHERITED_LISTEN_FD"
ENV_METRICS_FD = "ETCDPROXY_INHERITED_METRICS_FD"
ENV_UPGRADE_FD = "ETCDPROXY_UPGRADE_FD"
UPGRADE_TIMEOUT_S = 60.0  # a new supervisor not serving by then is stopped; the old one keeps serving


@dataclass(slots=True)
class Slot:
    """One place in the process tree (the hub, or worker N) and its current child, if any.

    Mutated only by the Supervisor's main loop.
    """

    role: str
    index: int
    generation: int = -1  # incremented on each spawn, so the first child is generation 0
    pid: int = 0  # 0 while no child runs (waiting for respawn)
    ready_fd: int = -1  # read end of the readiness pipe, -1 once closed
    ready: bool = False  # the current child wrote b"R"
    started_at: float = 0.0  # monotonic
    delay_s: float = 0.0  # the last respawn delay, input of proc.respawn_delay
    respawn_at: float | None = None  # monotonic; set while waiting to respawn
    heartbeat_path: str = ""
    heartbeat_mtime_ns: int = 0  # last value seen; compared for change, never against the clock
    heartbeat_changed_at: float = 0.0  # monotonic time heartbeat_mtime_ns last changed
    abort_sent_at: float | None = None
    retiring: bool = False  # removed by TTOU or replaced by HUP: not respawned
    replaces: Slot | None = None  # HUP: the old worker to stop once this one is ready

    @property
    def name(self) -> str:
        return self.role if self.role == HUB else f"{self.role} {self.index}"


def run_child(config: Config, spec: ChildSpec) -> int:
    """Body of a forked child after child_init(). Imports lazily: the supervisor must stay grpc-free."""
    if spec.role == HUB:
        from etcdproxy.hub.process import main
    else:
        from etcdproxy.worker.process import main
    return int(main(config, spec))


def exit_action(*, stopping: bool, retiring: bool, code: int, ready: bool) -> str:
    """What a child's exit means: "none" (we are stopping), "remove" (TTOU or replaced by HUP),
    "fatal" (a boot error before it ever served: respawning would loop), or "respawn"."""
    if stopping:
        return "none"
    if retiring:
        return "remove"
    if code == EXIT_BOOT_ERROR and not ready:
        return "fatal"
    return "respawn"


def signal_name(signum: int) -> str:
    """``9`` -> ``SIGKILL``; an unknown number -> ``signal 99``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class BootError(Exception):
    """The proxy cannot start; the message is for the operator and the exit code is 1."""


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid = os.getpid()
        self.slots: list[Slot] = []
        self.by_pid: dict[int, Slot] = {}
        self.signals: list[int] = []  # appended by the signal handler, drained by the main loop
        self.wake_r = self.wake_w = -1
        self.run_dir = ""
        self.own_run_dir = False
        self.guard = proc.Guard()
        self.listener: socket.socket | None = None  # --listen-addr, bound here, served by the workers
        self.metrics_listener: socket.socket | None = None  # --metrics-addr, bound here, served by the hub
        self.upgrade: subprocess.Popen[bytes] | None = None  # SIGUSR2: the new supervisor, until it serves
        self.upgrade_r = -1  # read end of its readiness pipe
        self.upgrade_deadline = 0.0  # monotonic
        self.upgrade_w = -1  # in the new supervisor: the write end, written once we serve
        self.etcd: EmbeddedEtcd | None = None
        # None while running, then "graceful" (TERM), "fast" (INT, QUIT, errors) or "upgraded" (the new
        # supervisor of a SIGUSR2 serves: stop this generation quietly)
        self.stop_mode: str | None = None
        self.exit_code = 0
        self.announced = False
        self.next_heartbeat_check = 0.0
        self.next_start_warning = time.monotonic() + START_WARNING_S
        self.saved_handlers: dict[int, signal._HANDLER] = {}
        self._balance: balance.Board | None = None  # the workers' accept balance (worker/balance.py)

    # --- life cycle ---

    def run(self) -> int:
        try:
            self.boot()
            self.dispatch_signals()  # a TERM during a slow embedded etcd start: do not fork at all
            if self.stop_mode is None:
                self.slots.append(Slot(HUB, 0))
                self.slots.extend(Slot(WORKER, i) for i in range(self.config.workers))
                for slot in self.slots:
                    self.spawn(slot)
                self.loop()
        except BootError as exc:
            log.error("%s", exc)
            self.exit_code = 1
        except Exception:
            log.exception("supervisor failed")
            self.exit_code = 1
        finally:
            self.shutdown()
        return self.exit_code

    def boot(self) -> None:
        """Everything before the first fork: signals, run dir, port guard, embedded etcd."""
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in proc.SUPERVISOR_SIGNALS:
            self.saved_handlers[sig] = signal.signal(sig, self._on_signal)
        upgrading = ENV_UPGRADE_FD in os.environ
        self.upgrade_w = int(os.environ.pop(ENV_UPGRADE_FD, "-1"))
        inherited = os.environ.pop(ENV_LISTEN_FD, "")
        inherited_metrics = os.environ.pop(ENV_METRICS_FD, "")
        try:
            if inherited:
                self.listener = proc.adopt_listener(int(inherited), self.config.listen_addr)
                log.info("upgrade: serving the inherited socket of --listen-addr %s", self.config.listen_addr)
            else:
                self.listener = proc.bind_listener(self.config.listen_addr)
            if inherited:
                self.check_inherited(self.listener, self.config.listen_addr, "--listen-addr")
            if inherited_metrics and not self.config.metrics_addr:  # the new config dropped it
                socket.socket(fileno=int(inherited_metrics)).close()
            elif inherited_metrics:
                self.metrics_listener = proc.adopt_listener(int(inherited_metrics), self.config.metrics_addr)
                self.check_inherited(self.metrics_listener, self.config.metrics_addr, "--metrics-addr")
            elif self.config.metrics_addr:
                url = urlsplit(self.config.metrics_addr)
                host = f"[{url.hostname}]" if url.hostname and ":" in url.hostname else url.hostname or ""
                self.metrics_listener = proc.bind_listener(f"{host}:{url.port}", "metrics-addr")
            # the old supervisor still holds a configured run dir: an upgrade runs in a temp one
            self.run_dir, self.own_run_dir = proc.make_run_dir("" if upgrading else self.config.run_dir)
            self.guard.take_run_dir(self.run_dir)
        except proc.GuardError as exc:
            raise BootError(str(exc)) from exc
        log.debug("metrics dir %s", proc.prepare_metrics_dir(self.run_dir))
        self.write_control()
        from etcdproxy import tls  # late: pulls in cryptography

        for warning in tls.unused_flag_warnings(self.config):
            log.warning("%s", warning)
        if self.config.auto_tls:
            # once, before any fork, so every worker serves the same certificate
            try:
                files = tls.ensure_self_signed(self.config)
            except OSError as exc:
                raise BootError(f"cannot create the --auto-tls certificate: {exc}") from exc
            if files is not None and files.auto:
                log.info("--auto-tls: serving the self-signed certificate %s", files.cert_file)
        if self.config.embedded_etcd:
            self.etcd = EmbeddedEtcd(debug=self.config.debug, parent_dir=self.run_dir)
            try:
                self.etcd.start()
            except EmbeddedEtcdError as exc:
                raise BootError(f"etcdproxy: {exc}") from exc
            self.config = dataclasses.replace(self.config, endpoints=(self.etcd.endpoint,))
        log.info(
            "supervisor pid %d: listen-addr %s, %d workers, endpoints %s, run dir %s",
            self.pid,
            self.config.listen_addr,
            self.config.workers,
            ",".join(self.config.endpoints),
            self.run_dir,
        )

    @staticmethod
    def check_inherited(sock: socket.socket, addr: str, flag: str) -> None:
        """An upgrade keeps the old listening socket even if the config now names another port: say so."""
        port = sock.getsockname()[1]
        if not addr.rstrip("/").endswith(f":{port}"):
            log.warning(
                "upgrade: %s is now %s, but the inherited socket listens on port %d; restart to move", flag, addr, port
            )

    def write_control(self, draining: bool = False) -> None:
        """What running children re-read on SIGUSR1 (proc.apply_control): log level, draining."""
        level = "debug" if self.config.debug else self.config.log_level
        try:
            proc.write_control(self.run_dir, log_level=level, draining=draining)
        except OSError as exc:
            log.warning("cannot write the control file in %s: %s", self.run_dir, exc)

    def close_listener(self) -> None:
        """Let go of our copies of the listening sockets (workers and hub keep theirs while they drain)."""
        for sock in (self.listener, self.metrics_listener):
            if sock is not None:
                sock.close()
        self.listener = self.metrics_listener = None

    def tell_children(self) -> None:
        """SIGUSR1 to every child: re-read the control file."""
        for slot in self.slots:
            self.kill(slot, signal.SIGUSR1)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # nothing else: logging or forking here could deadlock

    def loop(self) -> None:
        while self.stop_mode is None:
            self.wait(self.next_timeout())
            self.dispatch_signals()
            self.reap()
            if self.stop_mode is not None:
                break
            self.respawn_due()
            self.check_heartbeats()
            self.maybe_announce()
            self.check_upgrade()

    def next_timeout(self) -> float:
        now = time.monotonic()
        due = [self.next_heartbeat_check] + [s.respawn_at for s in self.slots if s.respawn_at is not None]
        return max(0.0, min(TICK_S, min(due) - now))

    def wait(self, timeout_s: float) -> None:
        """Sleep until a signal, a readiness byte or the timeout."""
        poller = select.poll()  # not select(): no FD_SETSIZE limit on descriptor numbers
        fds = [self.wake_r] + [s.ready_fd for s in self.slots if s.ready_fd >= 0]
        for fd in fds + ([self.upgrade_r] if self.upgrade_r >= 0 else []):
            poller.register(fd, select.POLLIN)
        readable = {fd for fd, _ in poller.poll(timeout_s * 1000)}  # POLLHUP too: EOF is read below
        if self.wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.wake_r, 4096):
                    pass
        for slot in self.slots:
            if slot.ready_fd in readable:
                self.read_ready(slot)
        if self.upgrade_r >= 0 and self.upgrade_r in readable:
            self.read_upgrade()

    def read_ready(self, slot: Slot) -> None:
        try:
            data = os.read(slot.ready_fd, 64)
        except BlockingIOError:
            return
        if b"R" in data and not slot.ready:
            slot.ready = True
            log.info("%s pid %d is ready", slot.name, slot.pid)
            old, slot.replaces = slot.replaces, None
            if old is not None and old.pid:
                log.info("stopping the %s it replaces, pid %d", old.name, old.pid)
                self.kill(old, signal.SIGTERM)
        if not data or slot.ready:  # EOF, or nothing more to hear on this pipe
            os.close(slot.ready_fd)
            slot.ready_fd = -1

    def maybe_announce(self) -> None:
        if self.announced:
            return
        waiting = [s.name for s in self.slots if not s.ready]
        if waiting:
            if time.monotonic() > self.next_start_warning:
                self.next_start_warning = time.monotonic() + START_WARNING_S
                log.warning("not started yet, waiting for: %s", ", ".join(waiting))
            return
        self.announced = True
        log.info("started gRPC proxy")
        proc.sd_notify(f"READY=1\nSTATUS=serving on {self.config.listen_addr}\nMAINPID={self.pid}")
        if self.upgrade_w >= 0:  # we are an upgrade: the old supervisor may leave now
            with contextlib.suppress(OSError):
                os.write(self.upgrade_w, b"R")
            os.close(self.upgrade_w)
            self.upgrade_w = -1
            log.info("upgrade: serving; told the old supervisor pid %d to drain and exit", os.getppid())

    # --- children ---

    def spawn(self, slot: Slot) -> None:
        slot.generation += 1
        # One file per child: during a HUP roll, two children share an index.
        name = f"heartbeat-{slot.role}-{slot.index}-{slot.generation}"
        slot.heartbeat_path = os.path.join(self.run_dir, name)
        proc.touch(slot.heartbeat_path)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        listen_fd = self.listener.fileno() if self.listener is not None and slot.role == WORKER else None
        metrics_fd = self.metrics_listener.fileno() if self.metrics_listener is not None and slot.role == HUB else None
        spec = ChildSpec(
            slot.role,
            slot.index,
            self.run_dir,
            slot.heartbeat_path,
            write_fd,
            self.pid,
            slot.generation,
            listen_fd,
            metrics_fd,
        )
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            slot.delay_s = proc.respawn_delay(slot.delay_s, 0.0)
            slot.respawn_at = time.monotonic() + slot.delay_s
            log.error("cannot fork %s: %s, retrying in %.1f s", slot.name, exc, slot.delay_s)
            return
        if pid == 0:
            self.child(spec, read_fd)  # never returns
        os.close(write_fd)
        now = time.monotonic()
        slot.pid, slot.ready_fd, slot.ready, slot.started_at = pid, read_fd, False, now
        slot.respawn_at, slot.abort_sent_at = None, None
        slot.heartbeat_mtime_ns, slot.heartbeat_changed_at = self.heartbeat_mtime(slot), now
        self.by_pid[pid] = slot
        log.info("spawned %s pid %d", slot.name, pid)

    def child(self, spec: ChildSpec, read_fd: int) -> None:
        """In the forked child: drop the supervisor's state, run the role, never return."""
        code = 1
        try:
            proc.child_init(spec, self.config.debug)
            os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
            private = [read_fd, self.wake_r, self.wake_w, *self.guard.fds, *(self.etcd.fds if self.etcd else [])]
            private += [s.ready_fd for s in self.slots if s.ready_fd >= 0]
            if spec.listen_fd is None and self.listener is not None:  # the hub: the port is the workers'
                private.append(self.listener.fileno())
            if spec.metrics_fd is None and self.metrics_listener is not None:  # a worker
                private.append(self.metrics_listener.fileno())
            private += [fd for fd in (self.upgrade_r, self.upgrade_w) if fd >= 0]
            for fd in private:
                with contextlib.suppress(OSError):
                    os.close(fd)
            code = run_child(self.config, spec)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("%s crashed", spec.name)
        finally:
            proc.exit_now(code)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.on_exit(pid, status)

    def on_exit(self, pid: int, status: int) -> None:
        if self.etcd is not None and pid == self.etcd.pid:
            self.etcd.reaped(status)
            if self.stop_mode is None:
                log.error("embedded etcd pid %d exited with code %s, stopping", pid, self.etcd.exit_code)
                self.exit_code, self.stop_mode = 1, "fast"
            return
        if self.upgrade is not None and pid == self.upgrade.pid:
            log.warning(
                "upgrade: the new supervisor pid %d exited with code %d", pid, os.waitstatus_to_exitcode(status)
            )
            self.upgrade.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            return
        slot = self.by_pid.pop(pid, None)
        if slot is None:
            log.debug("reaped unknown child pid %d", pid)
            return
        code = os.waitstatus_to_exitcode(status)
        if slot.ready_fd >= 0:  # it may have said ready just before dying
            self.read_ready(slot)
            if slot.ready_fd >= 0:
                os.close(slot.ready_fd)
                slot.ready_fd = -1
        proc.forget_metrics(pid)
        if slot.role == WORKER:  # a killed worker never cleared its record of the accept balance
            self.balance_board().clear(balance.record_of(slot.index, slot.generation), pid)
        with contextlib.suppress(OSError):
            os.unlink(slot.heartbeat_path)
        now = time.monotonic()
        lived_s = now - slot.started_at
        slot.pid = 0
        action = exit_action(stopping=self.stop_mode is not None, retiring=slot.retiring, code=code, ready=slot.ready)
        # Killed by a signal nobody here sent as part of a stop (kill -9, OOM killer, a crash): WARN.
        how = f" (killed by {signal_name(-code)})" if code < 0 else ""
        level = logging.WARNING if how and action != "none" else logging.INFO
        if action == "none":
            log.log(level, "%s pid %d exited with code %d%s", slot.name, pid, code, how)
        elif action == "remove":
            log.log(level, "%s pid %d exited with code %d, not respawning (removed)%s", slot.name, pid, code, how)
            self.slots.remove(slot)
        elif action == "fatal":
            log.error("%s pid %d could not boot (exit code %d), stopping", slot.name, pid, code)
            self.exit_code, self.stop_mode = 1, "fast"
        else:
            slot.delay_s = proc.respawn_delay(slot.delay_s, lived_s)
            slot.respawn_at = now + slot.delay_s
            slot.ready = False
            log.log(
                level, "%s pid %d exited with code %d, respawning in %.1f s%s", slot.name, pid, code, slot.delay_s, how
            )

    def balance_board(self) -> balance.Board:
        if self._balance is None:
            self._balance = balance.Board(self.run_dir)
        return self._balance

    def respawn_due(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.pid == 0 and not slot.retiring and slot.respawn_at is not None and now >= slot.respawn_at:
                self.spawn(slot)

    @staticmethod
    def heartbeat_mtime(slot: Slot) -> int:
        try:
            return os.stat(slot.heartbeat_path).st_mtime_ns
        except OSError:
            return slot.heartbeat_mtime_ns

    def check_heartbeats(self) -> None:
        """SIGABRT a child whose heartbeat file did not change for heartbeat_timeout_s, SIGKILL later.

        Only changes of the mtime are tracked, against the monotonic clock: a wall-clock jump
        cannot make every child look silent at once.
        """
        now = time.monotonic()
        if now < self.next_heartbeat_check:
            return
        self.next_heartbeat_check = now + TICK_S
        timeout_s = self.config.heartbeat_timeout_s
        for slot in self.slots:
            if slot.pid == 0 or timeout_s <= 0:
                continue
            mtime = self.heartbeat_mtime(slot)
            if mtime != slot.heartbeat_mtime_ns:
                slot.heartbeat_mtime_ns, slot.heartbeat_changed_at = mtime, now
                continue
            silent_s = now - slot.heartbeat_changed_at
            if slot.abort_sent_at is None and silent_s > timeout_s:
                log.warning("%s pid %d silent for %.1f s, sending SIGABRT", slot.name, slot.pid, silent_s)
                self.kill(slot, signal.SIGABRT)
                slot.abort_sent_at = now
            elif slot.abort_sent_at is not None and now - slot.abort_sent_at > ABORT_GRACE_S:
                log.warning("%s pid %d still alive after SIGABRT, sending SIGKILL", slot.name, slot.pid)
                self.kill(slot, signal.SIGKILL)

    def kill(self, slot: Slot, sig: int) -> None:
        if slot.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, sig)

    # --- signals (handle_<name>, called from the main loop) ---

    def dispatch_signals(self) -> None:
        while self.signals:
            sig = signal.Signals(self.signals.pop(0))
            handler = getattr(self, f"handle_{sig.name.lower()}", None)
            if handler is not None:
                handler()

    def handle_sigterm(self) -> None:
        if self.stop_mode is None:
            log.info("SIGTERM: graceful stop")
            self.stop_mode = "graceful"

    def handle_sigint(self) -> None:
        if self.stop_mode != "fast":
            log.info("fast stop")
            self.stop_mode = "fast"

    handle_sigquit = handle_sigint

    def handle_sighup(self) -> None:
        """Reload: parse the command line again (re-reading --config-file), apply what can change live,
        name the rest in a WARN line, and roll the workers: a new one per index first, the old one
        TERMed (it drains) once the new one serves, on the same listening socket, so no connection is
        refused. Hub and worker modules are imported after fork, so new workers also run the code on disk.
        """
        if self.stop_mode is not None:
            return
        if self.config.config_file:
            new = self.reload_config()
            if new is None:
                return
        else:
            new = self.config
            log.info("SIGHUP: no --config-file given, so there is nothing to re-read; the workers are rolled")
        self.config = new
        workers = [s for s in self.slots if s.role == WORKER and not s.retiring]
        workers.sort(key=lambda s: s.index)
        keep, extra = workers[: new.workers], workers[new.workers :]
        log.info("SIGHUP: rolling %d workers", len(keep))
        for slot in keep:
            self.replace(slot)
        for slot in extra:
            log.info("SIGHUP: removing worker %d (--workers %d)", slot.index, new.workers)
            self.retire(slot)
        used = {s.index for s in self.slots if s.role == WORKER and not s.retiring}
        for index in [i for i in range(new.workers + len(used)) if i not in used][: new.workers - len(keep)]:
            log.info("SIGHUP: adding worker %d (--workers %d)", index, new.workers)
            slot = Slot(WORKER, index)
            self.slots.append(slot)
            self.spawn(slot)

    def reload_config(self) -> Config | None:
        """The new Config with only LIVE_FIELDS changed, or None (ERROR logged) if the file is bad."""
        from etcdproxy import cli

        try:
            loaded = cli.load(cli.LAST_ARGS)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, keeping the running one: %s", "; ".join(exc.messages))
            return None
        if self.etcd is not None:  # --embedded-etcd: the endpoint is the one we started
            loaded = dataclasses.replace(loaded, endpoints=self.config.endpoints)
        old = self.config
        changed = [f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(loaded, f.name)]
        live = [name for name in changed if name in LIVE_FIELDS]
        fixed = [name for name in changed if name not in LIVE_FIELDS]
        if fixed:
            log.warning(
                "SIGHUP: %s changed in %s but need a restart (or an upgrade: SIGUSR2); still running with the old "
                "value%s",
                ", ".join(flag_name(name) for name in fixed),
                old.config_file,
                "s" if len(fixed) > 1 else "",
            )
        new = dataclasses.replace(old, **{name: getattr(loaded, name) for name in live})
        if live:
            log.info("SIGHUP: applying %s", ", ".join(f"{flag_name(n)}={getattr(loaded, n)!r}" for n in live))
        else:
            log.info("SIGHUP: nothing that applies live changed in %s", old.config_file)
        level = "debug" if new.debug else new.log_level
        if level != logs.current_level():
            logs.set_level(level)
        self.config = new
        self.write_control()
        self.tell_children()  # the hub takes the new log level now; workers are rolled anyway
        return new

    def replace(self, slot: Slot) -> None:
        """Start a new worker at ``slot``'s index; the old one is TERMed once the new one is ready."""
        slot.retiring = True
        if not slot.pid:  # waiting for a respawn: nothing to stop
            self.slots.remove(slot)
        fresh = Slot(WORKER, slot.index, generation=slot.generation, replaces=slot if slot.pid else None)
        self.slots.append(fresh)
        self.spawn(fresh)

    def retire(self, slot: Slot) -> None:
        if slot.pid:
            slot.retiring = True
            self.kill(slot, signal.SIGTERM)
        else:
            self.slots.remove(slot)

    def handle_sigusr1(self) -> None:
        log.info("SIGUSR1: logs go to stderr, nothing to reopen")

    def handle_sigusr2(self) -> None:
        """Upgrade (gunicorn's model): exec the supervisor's command line again as a child, handing it the
        listening sockets; it starts its own hub and workers on them and, once they serve, says so on a
        pipe; then this supervisor stops its generation (workers drain: GOAWAY while the new workers keep
        accepting on the same socket) without telling systemd it stops, and exits. If the new one fails
        before serving, this one keeps serving.
        """
        if self.stop_mode is not None or self.upgrade is not None or not self.announced or self.upgrade_w >= 0:
            log.warning("SIGUSR2: not now (starting, stopping or already upgrading), ignoring")
            return
        if self.etcd is not None:
            log.warning("SIGUSR2: no upgrade with --embedded-etcd (the new supervisor would start another etcd)")
            return
        assert self.listener is not None
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[ENV_LISTEN_FD] = str(self.listener.fileno())
        env[ENV_UPGRADE_FD] = str(write_fd)
        passed = [self.listener.fileno(), write_fd]
        if self.metrics_listener is not None:
            env[ENV_METRICS_FD] = str(self.metrics_listener.fileno())
            passed.append(self.metrics_listener.fileno())
        if env.get("PROMETHEUS_MULTIPROC_DIR") == os.path.join(self.run_dir, "metrics"):
            del env["PROMETHEUS_MULTIPROC_DIR"]  # ours, not the operator's: the new one makes its own
        argv = [sys.executable, *sys.orig_argv[1:]]
        try:
            self.upgrade = subprocess.Popen(argv, env=env, pass_fds=passed)
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            log.error("SIGUSR2: cannot start the new supervisor (%s): %s", " ".join(argv), exc)
            return
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.upgrade_r = read_fd
        self.upgrade_deadline = time.monotonic() + UPGRADE_TIMEOUT_S
        log.info("SIGUSR2: upgrading: started %s as pid %d; leaving once it serves", " ".join(argv), self.upgrade.pid)

    def check_upgrade(self) -> None:
        if self.upgrade_r < 0 or self.upgrade is None or time.monotonic() < self.upgrade_deadline:
            return
        log.error(
            "upgrade: the new supervisor pid %d does not serve after %.0f s; stopping it, this one keeps serving",
            self.upgrade.pid,
            UPGRADE_TIMEOUT_S,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.upgrade.pid, signal.SIGTERM)
        os.close(self.upgrade_r)
        self.upgrade_r = -1
        self.upgrade = None

    def read_upgrade(self) -> None:
        try:
            data = os.read(self.upgrade_r, 64)
        except BlockingIOError:
            return
        os.close(self.upgrade_r)
        self.upgrade_r = -1
        pid = self.upgrade.pid if self.upgrade is not None else 0
        if b"R" in data:
            log.info("upgrade: the new supervisor pid %d serves; this one drains its workers and exits", pid)
            if self.stop_mode is None:
                self.stop_mode = "upgraded"
        else:
            log.error("upgrade: the new supervisor pid %d ended before it served; this one keeps serving", pid)
            self.upgrade = None

    def handle_sigttin(self) -> None:
        if self.stop_mode is not None:
            return
        used = {s.index for s in self.slots if s.role == WORKER}
        index = next(i for i in range(len(used) + 1) if i not in used)
        slot = Slot(WORKER, index)
        self.slots.append(slot)
        log.info("SIGTTIN: adding worker %d", index)
        self.spawn(slot)

    def handle_sigttou(self) -> None:
        if self.stop_mode is not None:
            return
        workers = [s for s in self.slots if s.role == WORKER and not s.retiring]
        if len(workers) <= 1:
            log.info("SIGTTOU: keeping the last worker")
            return
        slot = max(workers, key=lambda s: s.index)
        log.info("SIGTTOU: removing worker %d", slot.index)
        if slot.pid:
            slot.retiring = True
            self.kill(slot, signal.SIGTERM)
        else:
            self.slots.remove(slot)

    # --- stop ---

    def shutdown(self) -> None:
        """Workers first (they drain clients), then the hub, then etcd; then files and locks."""
        if self.stop_mode is None:
            self.stop_mode = "fast"
        if self.upgrade is not None and self.upgrade.returncode is None and self.stop_mode != "upgraded":
            log.info("stopping the new supervisor pid %d of the unfinished upgrade", self.upgrade.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.upgrade.pid, signal.SIGTERM if self.stop_mode == "graceful" else signal.SIGINT)
        if self.upgrade_r >= 0:
            os.close(self.upgrade_r)
            self.upgrade_r = -1
        if any(s.pid for s in self.slots):
            if self.stop_mode == "graceful":
                # Health answers 503 now (hub: /health, /proxy/health; workers: the same paths on the
                # client port), while the workers keep accepting for drain_delay_s after their TERM.
                self.write_control(draining=True)
                self.tell_children()
                log.info(
                    "draining: health endpoints answer 503; workers keep accepting for %.1f s",
                    self.config.drain_delay_s,
                )
            if self.stop_mode != "upgraded":  # after an upgrade the service goes on: the new supervisor is it
                proc.sd_notify("STOPPING=1")
            # The workers hold their own copies of the listening socket for their drain; the port
            # closes when the last of them lets go.
            self.close_listener()
            self.stop_group([s for s in self.slots if s.role == WORKER], self.config.drain_delay_s)
            self.stop_group([s for s in self.slots if s.role == HUB])
        self.close_listener()
        if self.etcd is not None:
            self.etcd.stop()
        if self.run_dir:
            proc.clean_run_dir(self.run_dir, self.own_run_dir)
        self.guard.release()
        # Leave the process as we found it (matters when run() is called in-process, as in tests).
        signal.set_wakeup_fd(-1)
        for sig, handler in self.saved_handlers.items():
            signal.signal(sig, handler)
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1
        log.info("supervisor exiting with code %d", self.exit_code)

    def stop_group(self, slots: list[Slot], drain_s: float = 0.0) -> None:
        """Signal ``slots``' children, wait for them (graceful or fast), SIGKILL what is left.

        A graceful child gets ``drain_s`` (workers: --drain-delay, still accepting) plus
        graceful_timeout_s (in-flight calls) plus a margin before SIGKILL.
        """
        running = [s for s in slots if s.pid]
        if not running:
            return
        graceful = self.stop_mode in ("graceful", "upgraded")
        sig = signal.SIGTERM if graceful else signal.SIGINT
        for slot in running:
            log.info("sending %s to %s pid %d", sig.name, slot.name, slot.pid)
            self.kill(slot, sig)
        # A child spends up to graceful_timeout_s draining, then exits: give it a moment more.
        limit_s = drain_s + self.config.graceful_timeout_s + STOP_MARGIN_S if graceful else FAST_STOP_S
        deadline = time.monotonic() + limit_s
        while any(s.pid for s in running) and time.monotonic() < deadline:
            self.wait(min(0.2, max(0.0, deadline - time.monotonic())))
            self.dispatch_signals()
            self.reap()
            if graceful and self.stop_mode == "fast":  # INT/QUIT during a graceful stop
                graceful = False
                deadline = min(deadline, time.monotonic() + FAST_STOP_S)
                for slot in running:
                    self.kill(slot, signal.SIGINT)
        for slot in running:
            if slot.pid:
                log.warning("%s pid %d did not stop in time, sending SIGKILL", slot.name, slot.pid)
                self.kill(slot, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_S
        while any(s.pid for s in running) and time.monotonic() < deadline:
            self.wait(0.05)
            self.reap()
        for slot in running:
            if slot.pid:
                log.error("%s pid %d survived SIGKILL, giving up on it", slot.name, slot.pid)


def run(config: Config) -> int:
    """Run the proxy until stopped; returns the process exit code (the CLI exits with it)."""
    logs.configure(config.log_level, config.log_format)
    logs.setup("supervisor", config.debug)
    proc.set_title(None, "supervisor")
    return Supervisor(config).run()
