"""Pure helpers of proc.py, logs.py and embedded.py: tables, no sockets, no child processes."""

from __future__ import annotations

import logging
import os
import signal
import socket

import pytest

from etcdproxy import logs, proc
from etcdproxy.proc import HUB, WORKER, ChildSpec


def spec(role: str = WORKER, index: int = 3, ready_fd: int = -1, run_dir: str = "/run/etcdproxy") -> ChildSpec:
    return ChildSpec(role, index, run_dir, f"{run_dir}/heartbeat", ready_fd, os.getpid(), 0)


# (previous delay, how long the child lived) -> next delay; defaults 0.1 s doubling to 5 s, reset after 10 s
@pytest.mark.parametrize(
    ("previous_s", "lived_s", "expected_s"),
    [
        (0.0, 0.0, 0.1),  # first death
        (0.0, 100.0, 0.1),
        (0.1, 0.5, 0.2),  # quick deaths double
        (0.2, 0.5, 0.4),
        (1.6, 0.5, 3.2),
        (3.2, 0.5, 5.0),  # capped
        (5.0, 0.5, 5.0),
        (5.0, 10.0, 5.0),  # exactly 10 s is not "longer than 10 s"
        (5.0, 10.1, 0.1),  # lived long enough: healthy again
        (0.05, 1.0, 0.1),  # never below the initial delay
    ],
)
def test_respawn_delay(previous_s: float, lived_s: float, expected_s: float) -> None:
    assert proc.respawn_delay(previous_s, lived_s) == pytest.approx(expected_s)


def test_respawn_delay_custom_bounds() -> None:
    assert proc.respawn_delay(0.0, 0.0, initial_s=1.0) == 1.0
    assert proc.respawn_delay(4.0, 0.0, cap_s=6.0) == 6.0
    assert proc.respawn_delay(4.0, 3.0, reset_after_s=2.0, initial_s=0.5) == 0.5


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:23790", ("127.0.0.1", 23790)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        (":23790", ("", 23790)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:23790", ("::1", 23790)),
        ("[::]:2379", ("::", 2379)),
        ("http://127.0.0.1:2379", ("127.0.0.1", 2379)),
        ("https://proxy.example:443/", ("proxy.example", 443)),
    ],
)
def test_split_host_port(addr: str, expected: tuple[str, int]) -> None:
    assert proc.split_host_port(addr) == expected


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "h:0", "h:65536", "::1:2379", ""])
def test_split_host_port_rejects(addr: str) -> None:
    with pytest.raises(ValueError):
        proc.split_host_port(addr)


@pytest.mark.parametrize(
    ("child", "role_text", "title"),
    [
        (None, "supervisor", "etcdproxy: supervisor"),
        (None, "", "etcdproxy: supervisor"),
        (spec(HUB, 0), "hub", "etcdproxy: hub"),
        (spec(HUB, 0), "", "etcdproxy: hub"),
        (spec(WORKER, 3), "", "etcdproxy: worker 3"),
        (spec(WORKER, 3), "worker 3", "etcdproxy: worker 3"),
        (spec(WORKER, 3), "etcdproxy: worker 3", "etcdproxy: worker 3"),
    ],
)
def test_title_for(child: ChildSpec | None, role_text: str, title: str) -> None:
    assert proc.title_for(child, role_text) == title


@pytest.mark.parametrize(
    ("child", "name", "log_role"),
    [
        (spec(HUB, 0), "hub", "hub"),
        (spec(WORKER, 0), "worker 0", "worker-0"),
        (spec(WORKER, 12), "worker 12", "worker-12"),
    ],
)
def test_child_names(child: ChildSpec, name: str, log_role: str) -> None:
    assert child.name == name
    assert proc.log_role(child) == log_role


def test_hub_endpoint() -> None:
    assert proc.hub_endpoint("/run/etcdproxy") == "ipc:///run/etcdproxy/hub.sock"


def test_notify_ready_writes_once_and_closes() -> None:
    read_fd, write_fd = os.pipe()
    try:
        child = spec(ready_fd=write_fd)
        proc.notify_ready(child)
        proc.notify_ready(child)  # idempotent: no second byte, no error on the closed fd
        assert os.read(read_fd, 10) == b"R"
        assert os.read(read_fd, 10) == b""  # EOF: the write end is closed
    finally:
        os.close(read_fd)


def test_notify_ready_without_pipe() -> None:
    proc.notify_ready(spec(ready_fd=-1))


def test_touch(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "heartbeat")
    proc.touch(path)
    assert os.path.exists(path)
    os.utime(path, ns=(0, 0))
    proc.touch(path)
    assert os.stat(path).st_mtime_ns > 0


def test_guard_flock_refuses_second_holder(tmp_path: os.PathLike[str]) -> None:
    first, second = proc.Guard(), proc.Guard()
    try:
        first.take_run_dir(str(tmp_path))
        with pytest.raises(proc.GuardError, match=f"in use by etcdproxy pid {os.getpid()}"):
            second.take_run_dir(str(tmp_path))
        first.release()
        second.take_run_dir(str(tmp_path))  # released: free again
    finally:
        first.release()
        second.release()


def test_make_run_dir_given(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "run")
    assert proc.make_run_dir(path) == (path, True)
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert proc.make_run_dir(path) == (path, False)  # exists: not ours to delete later
    for name in ("heartbeat-hub-0", "hub.sock", "keep.txt"):
        proc.touch(os.path.join(path, name))
    proc.clean_run_dir(path, created=False)
    assert os.listdir(path) == ["keep.txt"]
    proc.clean_run_dir(path, created=True)
    assert not os.path.exists(path)


def test_make_run_dir_too_long(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "x" * proc.RUN_DIR_MAX)
    with pytest.raises(proc.GuardError, match="too long"):
        proc.make_run_dir(path)
    assert not os.path.exists(path)


def test_make_run_dir_temp() -> None:
    path, created = proc.make_run_dir("")
    try:
        assert created
        assert os.path.basename(path).startswith("etcdproxy-")
        assert len(proc.hub_endpoint(path)) <= 107
    finally:
        os.rmdir(path)


def test_sd_notify_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert proc.sd_notify("READY=1") is False


def test_logs_setup_is_idempotent() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        logs.setup("hub", debug=False)
        logs.setup("worker-1", debug=True)
        ours = [h for h in root.handlers if h.get_name() == "etcdproxy-stderr"]
        assert len(ours) == 1
        assert root.level == logging.DEBUG
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def test_supervisor_signals_include_stop_signals() -> None:
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD} <= set(proc.SUPERVISOR_SIGNALS)


def test_embedded_etcd_binary() -> None:
    from etcdproxy import embedded

    try:
        path = embedded.etcd_binary()
    except embedded.EmbeddedEtcdError as exc:
        assert embedded.INSTALL_HINT in str(exc)
    else:
        assert path.endswith("/etcdbin/etcd")
        assert os.access(path, os.X_OK)


def test_sweep_stale_run_dirs(tmp_path: os.PathLike[str]) -> None:
    parent = str(tmp_path)
    old = 1_000_000_000

    def run_dir(name: str, lock_age: str) -> str:
        path = os.path.join(parent, name)
        os.mkdir(path)
        if lock_age != "none":
            proc.touch(os.path.join(path, "supervisor.lock"))
        if lock_age == "old":
            os.utime(os.path.join(path, "supervisor.lock"), (old, old))
        return path

    stale = run_dir("etcdproxy-stale", "old")
    held = run_dir("etcdproxy-held", "old")
    fresh = run_dir("etcdproxy-fresh", "new")  # a supervisor that has not locked yet
    unlocked = run_dir("etcdproxy-nolock", "none")
    other = run_dir("other-stale", "old")
    guard = proc.Guard()
    try:
        guard.take_run_dir(held)
        os.utime(os.path.join(held, "supervisor.lock"), (old, old))
        assert proc.sweep_stale_run_dirs(parent) == [stale]
    finally:
        guard.release()
    assert sorted(os.listdir(parent)) == sorted(os.path.basename(p) for p in (held, fresh, unlocked, other))


@pytest.mark.parametrize(
    ("stopping", "retiring", "code", "ready", "action"),
    [
        (False, False, -9, True, "respawn"),
        (False, False, 0, True, "respawn"),  # a hub or worker never exits on its own: bring it back
        (False, False, 1, False, "respawn"),  # a crash while booting: backoff, not a stop
        (False, False, proc.EXIT_BOOT_ERROR, False, "fatal"),  # cannot bind / bad config
        (False, False, proc.EXIT_BOOT_ERROR, True, "respawn"),  # served before: not a boot error
        (False, True, -9, True, "remove"),  # TTOU, or replaced by a HUP roll
        (False, True, proc.EXIT_BOOT_ERROR, False, "remove"),
        (True, False, proc.EXIT_BOOT_ERROR, False, "none"),  # stopping: nothing is respawned
        (True, True, 0, True, "none"),
    ],
)
def test_exit_action(stopping: bool, retiring: bool, code: int, ready: bool, action: str) -> None:
    from etcdproxy.supervisor import exit_action

    assert exit_action(stopping=stopping, retiring=retiring, code=code, ready=ready) == action


def test_prepare_metrics_dir(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # recorded, so the value set below is undone
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    path = proc.prepare_metrics_dir(str(tmp_path))
    assert path == os.path.join(tmp_path, "metrics")
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == path  # inherited by every child forked later
    for name in ("counter_12.db", "gauge_livesum_12.db", "gauge_livesum_13.db", "notes.txt"):
        proc.touch(os.path.join(path, name))
    proc.forget_metrics(12)  # a reaped child: its live gauges go, its counters stay
    assert sorted(os.listdir(path)) == ["counter_12.db", "gauge_livesum_13.db", "notes.txt"]
    assert proc.prepare_metrics_dir("/elsewhere") == path  # an explicit setting wins; files wiped
    assert os.listdir(path) == ["notes.txt"]


def test_child_spec_listen_fd_defaults_to_none() -> None:
    assert spec().listen_fd is None  # workers bind --listen-addr themselves unless given a socket
    given = ChildSpec(WORKER, 0, "/run/x", "/run/x/hb", -1, os.getpid(), 0, listen_fd=7)
    assert given.listen_fd == 7


def test_guard_release_removes_its_lock_files(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "x.lock")
    guard = proc.Guard()
    assert guard._flock(path) is None
    assert os.path.exists(path)
    guard.release()
    assert not os.path.exists(path)
    again = proc.Guard()  # and the path can be locked again at once
    assert again._flock(path) is None
    again.release()


def test_guard_retries_when_the_locked_file_was_replaced(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "x.lock")
    first = proc.Guard()
    assert first._flock(path) is None
    stale = os.open(path, os.O_RDWR)  # a second instance opened the file, then the first stopped
    first.release()
    try:
        second = proc.Guard()
        assert second._flock(path) is None  # locks the file now at the path, not the unlinked one
        assert os.path.samestat(os.fstat(second.fds[0]), os.stat(path))
        assert not os.path.samestat(os.fstat(stale), os.stat(path))
        second.release()
    finally:
        os.close(stale)


def test_clean_given_run_dir_leaves_nothing_of_ours(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = str(tmp_path)
    # what prepare_metrics_dir sets by default; through monkeypatch, so it does not leak into later tests
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", os.path.join(run_dir, "metrics"))
    metrics = proc.prepare_metrics_dir(run_dir)
    open(os.path.join(metrics, "counter_1.db"), "w").close()
    for name in ("hub.sock", "heartbeat-worker-0-0", proc.CONTROL_FILE, "operator-file"):
        open(os.path.join(run_dir, name), "w").close()
    proc.clean_run_dir(run_dir, created=False)
    assert os.listdir(run_dir) == ["operator-file"]


def test_control_file_round_trip(tmp_path: os.PathLike[str]) -> None:
    run_dir = str(tmp_path)
    assert proc.read_control(run_dir) == {}
    proc.write_control(run_dir, log_level="warn", draining=True)
    assert proc.read_control(run_dir) == {"log_level": "warn", "draining": True}
    assert sorted(os.listdir(run_dir)) == [proc.CONTROL_FILE]  # no temporary file left


def test_apply_control_sets_draining_and_level(tmp_path: os.PathLike[str]) -> None:
    run_dir = str(tmp_path)
    root = logging.getLogger()
    level = root.level
    try:
        proc.apply_control(run_dir)  # no file yet: not draining
        assert proc.draining() is False
        proc.write_control(run_dir, log_level="error", draining=True)
        proc.apply_control(run_dir)
        assert proc.draining() is True
        assert root.level == logging.ERROR
    finally:
        proc.write_control(run_dir, log_level="info", draining=False)
        proc.apply_control(run_dir)
        root.setLevel(level)
    assert proc.draining() is False


def test_bind_listener_guards_the_address() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = proc.bind_listener(f"127.0.0.1:{port}")
    try:
        assert listener.get_inheritable()  # survives the exec of an upgrade
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with pytest.raises(proc.GuardError, match=f"listen-addr 127.0.0.1:{port} is already in use"):
            proc.bind_listener(f"127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # queued in the backlog, no worker needed
            pass
    finally:
        listener.close()
    with pytest.raises(proc.GuardError, match="invalid port"):
        proc.bind_listener("127.0.0.1:0")


def test_adopt_listener_checks_the_inherited_fd() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = proc.bind_listener(f"127.0.0.1:{port}")
    adopted = proc.adopt_listener(os.dup(listener.fileno()), f"127.0.0.1:{port}")
    try:
        assert adopted.getsockname() == listener.getsockname()
        assert adopted.get_inheritable()
    finally:
        adopted.close()
        listener.close()
    with socket.socket() as idle:  # not listening: refused, and the fd is left to its owner
        with pytest.raises(proc.GuardError, match="not a listening TCP socket"):
            proc.adopt_listener(idle.fileno(), "x:1")
        assert idle.fileno() >= 0
    with pytest.raises(proc.GuardError, match="inherited socket fd"):
        proc.adopt_listener(9999, "x:1")
