"""The failover tests' TCP relay: it must not leak a thread or a socket per connection a partitioned peer gives up.

A CI run hung in test_member_cut_off_from_its_peers with 5,800 pump threads: etcd peers redial a blackholed link many
times a second, and each connection closed by its dialer left the other direction's pump running for good.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.faults import BLACKHOLE, PASS, Relay


def _pumps() -> int:
    return sum(1 for t in threading.enumerate() if t.name != "MainThread" and not t.name.startswith("relay-"))


def _wait_for(check: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def server() -> object:
    """A loopback server that accepts and keeps every connection open (like etcd's peer listener waiting for a
    request that never arrives)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, name="server", daemon=True)
    thread.start()
    yield listener.getsockname()[1], held
    stop.set()
    thread.join(2)
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", [PASS, BLACKHOLE])
def test_connections_closed_by_their_dialer_leave_no_pump_behind(
    server: tuple[int, list[socket.socket]], mode: str
) -> None:
    port, held = server
    relay = Relay(port)
    relay.set_mode(mode)
    before = _pumps()
    try:
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", relay.port), timeout=2) as conn:
                conn.sendall(b"POST /raft/stream HTTP/1.1\r\nX-Server-From: 1a2b\r\n\r\n")
        assert _wait_for(lambda: relay.accepted == 40), relay.accepted
        assert _wait_for(lambda: _pumps() == before), f"{_pumps() - before} pump threads left running"
        assert relay.open_connections() == 0
        # the server side of each pair was closed too: it reads EOF, and never a byte of a silenced request
        assert _wait_for(lambda: len(held) == 40)
        for conn in held:
            conn.settimeout(2)
            data = conn.recv(65536)
            assert data == (b"" if mode == BLACKHOLE else b"POST /raft/stream HTTP/1.1\r\nX-Server-From: 1a2b\r\n\r\n")
    finally:
        relay.close()


@pytest.mark.timeout(30)
def test_blackhole_keeps_open_connections_open_and_silent(server: tuple[int, list[socket.socket]]) -> None:
    port, held = server
    relay = Relay(port)
    try:
        conn = socket.create_connection(("127.0.0.1", relay.port), timeout=2)
        assert _wait_for(lambda: len(held) == 1)
        relay.set_mode(BLACKHOLE)
        conn.sendall(b"ping")
        held[0].settimeout(0.5)
        with pytest.raises(TimeoutError):  # nothing arrives, and the connection is not closed either
            held[0].recv(10)
        assert relay.open_connections() == 1
        conn.close()
    finally:
        relay.close()
